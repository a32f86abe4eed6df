"""The maintenance screen behind an admin credential: peripherals, outbox depth and age, network, versions, last
sync — in English (issue 6 point 4).

Owns the sign-in state and the formatted facts. The credential is checked by the port (constant time) and never
kept; signing out, going home or the idle timeout closes the screen. It must never import Kivy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

from ui.i18n import Locale, text
from ui.viewmodels.base import Observable
from ui.viewmodels.kiosk import KioskModel, ScreenName
from ui.viewmodels.ports import MaintenanceFacts, MaintenancePort

EN = Locale.EN
DETAIL_CHARS: Final = 40


def _age(seconds: float | None) -> str:
    if seconds is None:
        return text("maint.none", EN)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class MaintenanceState:
    signed_in: bool = False
    message: str = ""
    lines: tuple[str, ...] = ()
    peripherals: tuple[str, ...] = ()


class MaintenanceViewModel(Observable[MaintenanceState]):
    def __init__(self, kiosk: KioskModel, port: MaintenancePort) -> None:
        super().__init__(MaintenanceState())
        self.kiosk = kiosk
        self.port = port
        kiosk.holds_personal_data(self)

    def open(self) -> None:
        self._set(MaintenanceState())
        self.kiosk.go(ScreenName.MAINTENANCE_LOGIN)

    def sign_in(self, credential: str) -> None:
        if not self.port.admin_ok(credential):
            self._set(MaintenanceState(message=text("maint.login.refused", EN)))
            return
        self._set(replace(self._render(self.port.facts()), signed_in=True))
        self.kiosk.go(ScreenName.MAINTENANCE)

    def refresh(self) -> None:
        if self.state.signed_in:
            self._set(replace(self._render(self.port.facts()), signed_in=True))

    def sign_out(self) -> None:
        self._set(MaintenanceState())
        self.kiosk.home()

    def clear_personal(self) -> None:
        # Not personal data, but an open maintenance session must not outlive the maintainer.
        self._set(MaintenanceState())

    @staticmethod
    def _render(facts: MaintenanceFacts) -> MaintenanceState:
        models = ", ".join(f"{k} {v}" for k, v in sorted(facts.model_versions.items())) or text("maint.none", EN)
        last = text("maint.never", EN) if facts.last_sync_age_s is None else _age(facts.last_sync_age_s) + " ago"
        lines = (
            text("maint.device", EN, device=facts.device_id),
            text("maint.versions", EN, software=facts.software_version, config=facts.config_version),
            text("maint.network", EN, state=text("maint.online" if facts.online else "maint.offline", EN)),
            text("maint.outbox", EN, depth=facts.outbox_depth, age=_age(facts.outbox_oldest_age_s)),
            text("maint.last_sync", EN, when=last),
            text("maint.models", EN, models=models),
        )
        # The detail only when something is wrong (a healthy device's detail is a port path): short enough to fit
        peripherals = tuple(
            f"{p.kind}: {p.state.upper()}" + (f" — {p.detail[:DETAIL_CHARS]}" if p.detail and p.state != "ok" else "")
            for p in facts.peripherals
        )
        return MaintenanceState(lines=lines, peripherals=peripherals)
