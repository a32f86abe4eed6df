"""The POS-initiated verification screen: the pharmacy's cash register asked the kiosk (over its local POS API,
`terminal.pos_api`) to verify the buyer; the kiosk shows what to do, then the outcome, then returns to the start.

Owns what the citizen sees during such a verification: who asked (the register), the live instruction of the
verifier (show the 医保码, place the card, look at the camera), elapsed time, and the masked outcome in words. It is
driven from the POS worker thread (`started`, `instruct`, `finished`, through `ui.services.KioskBuyerVerifier`) and
holds the result only for `RESULT_HOLD_S`. It must never import Kivy or hold an unmasked value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

from ui.i18n import text
from ui.viewmodels.base import Observable
from ui.viewmodels.kiosk import KioskModel, ScreenName

RESULT_HOLD_S: Final = 8.0
EXPECTED_S: Final = 15
MAX_ACTIVE_S: Final = 120.0
"""Longer than any verifier waits (60 s): a request that never reports back (the register registers a proxy agent
by hand, no face step follows) still leaves the screen."""


@dataclass(frozen=True)
class PosState:
    active: bool = False
    proxy: bool = False
    step: str = ""
    """Proxy purchase (代购): which of the two people is being checked now."""
    done: bool = False
    ok: bool | None = None
    title: str = text("pos.title")
    instruction: str = ""
    progress: str = ""
    result_lines: tuple[str, ...] = ()


class PosViewModel(Observable[PosState]):
    def __init__(self, kiosk: KioskModel) -> None:
        super().__init__(PosState())
        self.kiosk = kiosk
        self._started = 0.0
        self._finished = 0.0
        kiosk.holds_personal_data(self)

    # ------------------------------------------------------------------ from the POS worker

    def started(self, *, proxy: bool = False) -> None:
        """A register's request began; `proxy`: a proxy purchase (the beneficiary's credential, then the agent)."""
        self._started = self.kiosk.clock.monotonic()
        self._set(
            PosState(
                active=True,
                proxy=proxy,
                title=text("proxy.title" if proxy else "pos.title"),
                step=text("proxy.step_beneficiary") if proxy else "",
                instruction=text("pos.waiting"),
                progress=self._progress(),
            )
        )
        self.kiosk.go(ScreenName.POS)
        self.kiosk.speak("voice.proxy" if proxy else "voice.pos")

    def agent_step(self, beneficiary_name: str | None) -> None:
        """Proxy purchase: the beneficiary is verified; now the agent's face (K-05)."""
        step = text("proxy.step_agent", name=beneficiary_name or "***")
        self._set(replace(self.state, step=step, instruction=text("pos.waiting")))
        self.kiosk.speak("voice.proxy_agent")

    def instruct(self, zh: str, en: str) -> None:
        """The verifier's instruction (`terminal.pos_api.Show`): shown large and, in care mode, spoken."""
        if not self.state.active or zh == self.state.instruction:
            return
        self._set(replace(self.state, instruction=zh))
        if self.kiosk.care_mode:
            self.kiosk.speaker.say(zh)  # the verifier's fixed instructions, never personal data

    def finished(self, ok: bool, masked_name: str | None, masked_id: str | None, reason: str | None) -> None:
        self._finished = self.kiosk.clock.monotonic()
        if ok:
            lines: tuple[str, ...] = (
                text("result.name", name=masked_name or "***"),
                text("result.id", id=masked_id or "***"),
                text("pos.sent"),
            )
        else:
            lines = (text("pos.refused", reason=reason or "not_verified"),)
        self._set(
            replace(
                self.state,
                active=False,
                done=True,
                ok=ok,
                title=text("pos.ok" if ok else "pos.fail"),
                step="",
                instruction="",
                progress="",
                result_lines=lines,
            )
        )
        self.kiosk.speak("voice.ok" if ok else "voice.fail")

    # ------------------------------------------------------------------ from the UI clock

    def tick(self) -> None:
        state = self.state
        if (state.active or state.done) and self.kiosk.state.screen is not ScreenName.POS:
            # The kiosk moved on (a staff member took over, the citizen went home): the outcome is not on screen,
            # so forget it here rather than sending whatever is showing now back to the start later.
            if state.done:
                self._set(PosState())
            return
        if state.active:
            progress = self._progress()
            if progress != state.progress:
                self._set(replace(state, progress=progress))
            if self.kiosk.clock.monotonic() - self._started >= MAX_ACTIVE_S:
                self.kiosk.home()
        elif state.done and self.kiosk.clock.monotonic() - self._finished >= RESULT_HOLD_S:
            self.kiosk.home()  # the outcome went to the register; nothing personal stays on screen

    def clear_personal(self) -> None:
        self._set(PosState())

    def _progress(self) -> str:
        return text("common.elapsed", elapsed=int(self.kiosk.clock.monotonic() - self._started), eta=EXPECTED_S)
