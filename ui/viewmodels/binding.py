"""The terminal's binding to its institution (I-01, I-02): the status in words (bound / pending / rejected with the
reason / unbound with whom to contact) and the institution head's application (face + 医保码, or face + ID card).

Owns the binding screen's state (status lines, the institution code typed, the methods offered) and starts the
application on the shared `StaffTask` screens; the signed record and the status file are the terminal's
(`terminal.binding`). It must never import Kivy and holds only the head's masked name, briefly, for the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Final

from ui.i18n import text
from ui.viewmodels.base import Observable, Runner
from ui.viewmodels.kiosk import KioskModel, ScreenName
from ui.viewmodels.staff_ports import BindingApplied, BindingPort, BindingShown, BindingView, HeadMethod
from ui.viewmodels.staff_task import Action, StaffTask

INSTITUTION_CODE: Final = re.compile(r"^[A-Za-z0-9]{6,32}$")
"""定点医药机构编码: letters and digits (the record allows up to 32)."""
APPLY_ETA_S: Final = 20
METHOD_ORDER: Final = (HeadMethod.YIBAO_CODE, HeadMethod.ID_CARD)


@dataclass(frozen=True)
class MethodOffer:
    method: HeadMethod
    label: str
    enabled: bool


@dataclass(frozen=True)
class BindingState:
    shown: BindingShown | None = None
    headline: str = ""
    """The state in words ('已绑定', '审核中', …); the screen adds a colour band but never relies on it."""
    lines: tuple[str, ...] = ()
    can_apply: bool = False
    methods: tuple[MethodOffer, ...] = ()
    institution_code: str = ""
    message: str = ""
    loading: bool = False


def status_lines(view: BindingView) -> tuple[str, ...]:
    lines: list[str] = []
    if view.institution:
        lines.append(text("staff.binding.institution", institution=view.institution))
    if view.reason:
        lines.append(text("staff.binding.reason", reason=view.reason))
    if view.state in (BindingShown.UNBOUND, BindingShown.REJECTED):
        contact = view.contact or text("staff.binding.contact_default")
        lines.append(text("staff.binding.contact", contact=contact))
    if view.updated_at:
        lines.append(text("staff.binding.updated", at=view.updated_at))
    return tuple(lines)


class BindingViewModel(Observable[BindingState]):
    def __init__(self, kiosk: KioskModel, port: BindingPort, task: StaffTask, runner: Runner) -> None:
        super().__init__(BindingState())
        self.kiosk = kiosk
        self.port = port
        self.task = task
        self.runner = runner
        self._query = 0
        kiosk.holds_personal_data(self)

    def open(self) -> None:
        self._query += 1
        query = self._query
        # The code typed stays (a head coming back after a rejection need not type it again)
        self._set(
            BindingState(loading=True, message=text("staff.loading"), institution_code=self.state.institution_code)
        )
        self.kiosk.go(ScreenName.BINDING)
        self.runner(lambda: self._loaded(query, self.port.status(), self.port.methods()))

    def refresh(self) -> None:
        self.open()

    def set_code(self, code: str) -> None:
        self.kiosk.touch()
        self._set(replace(self.state, institution_code=code.strip(), message=""))

    def apply(self, method: HeadMethod | str, institution_code: str | None = None) -> None:
        """Apply for binding to `institution_code` after the head identifies themselves by `method`."""
        method = HeadMethod(method)
        code = (institution_code if institution_code is not None else self.state.institution_code).strip()
        if not self.state.can_apply:
            return
        if not INSTITUTION_CODE.fullmatch(code):
            self._set(replace(self.state, institution_code=code, message=text("staff.binding.code_invalid")))
            return
        if method not in {m.method for m in self.state.methods if m.enabled}:
            return
        self._set(replace(self.state, institution_code=code, message=""))
        first = "staff.binding.step.qr" if method is HeadMethod.YIBAO_CODE else "staff.binding.step.id_card"
        self.task.run(
            text("staff.binding.apply.title"),
            text(first),
            APPLY_ETA_S,
            lambda guide, step: self.port.apply(code, method, step, guide),
            self._applied,
        )
        self.kiosk.speak("voice.qr" if method is HeadMethod.YIBAO_CODE else "voice.id_card")

    def clear_personal(self) -> None:
        self._query += 1
        self._set(BindingState())

    def _loaded(self, query: int, view: BindingView, available: frozenset[HeadMethod]) -> None:
        if query != self._query:
            return
        can_apply = view.state is not BindingShown.BOUND
        offers = tuple(
            MethodOffer(
                m,
                text(f"staff.binding.method.{m.value}") + ("" if m in available else text("identity.unavailable")),
                can_apply and m in available,
            )
            for m in METHOD_ORDER
        )
        message = text("staff.binding.bound_note") if view.state is BindingShown.BOUND else ""
        if view.state is BindingShown.PENDING:
            message = text("staff.binding.pending_note")
        self._set(
            replace(
                self.state,
                shown=view.state,
                headline=text(f"staff.binding.state.{view.state.value}"),
                lines=status_lines(view),
                can_apply=can_apply,
                methods=offers,
                loading=False,
                message=message,
            )
        )

    def _applied(self, applied: BindingApplied) -> None:
        back = Action(text("staff.binding.show_status"), self.open)
        if applied.ok:
            lines = (
                text("staff.binding.applicant", name=applied.masked_name),
                text("staff.binding.code_line", code=self.state.institution_code),
                text("staff.binding.applied_note"),
            )
            self.task.finish(True, text("staff.binding.applied"), lines, (back,))
        else:
            self.task.finish(
                False,
                text("staff.binding.apply_failed"),
                (text(applied.reason or "staff.reason.unavailable"),),
                (back,),
            )
