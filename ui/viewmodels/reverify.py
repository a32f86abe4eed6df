"""The periodic re-verification of the pharmacist on duty (P-01/P-02 optional; `[pharmacists] reverify_every_min`).

Owns when the kiosk asks: every `CHECK_EVERY_S` of the kiosk's clock (from `tick()`, never a UI timer) it asks the
port whether the on-duty pharmacist's face check is due. When it is and the kiosk shows the attract screen or the
staff menu — never in the middle of a citizen's (or a staff) flow — it shows the calm prompt "请药师刷脸确认在岗"
once, and again only after `REPROMPT_S`; ignored, it stays offered on the staff menu. The face check runs on the
shared `StaffTask` screens and its outcome is said in words (a failed check closes the session: the terminal's
rule). It must never import Kivy and holds only the 医保药师代码 and the masked name of the pharmacist on duty.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ui.i18n import text
from ui.viewmodels.base import Observable, Runner
from ui.viewmodels.kiosk import KioskModel, ScreenName
from ui.viewmodels.staff_ports import AttendanceOutcome, ReverifyDue, ReverifyPort
from ui.viewmodels.staff_task import Action, StaffTask

logger = logging.getLogger(__name__)

CHECK_EVERY_S: Final = 30.0
REPROMPT_S: Final = 600.0
"""An ignored prompt comes back after this long (it stays on the staff menu meanwhile)."""
FACE_ETA_S: Final = 8
PROMPT_ON: Final = frozenset({ScreenName.ATTRACT, ScreenName.STAFF})
"""The screens the prompt may replace: nobody is in the middle of anything there."""


@dataclass(frozen=True)
class ReverifyState:
    due: bool = False
    code: str = ""
    who: str = ""
    """'药师：王**（YS…）' while a check is due."""
    menu_line: str = ""
    """'需要刷脸确认在岗：王**（YS…）' for the staff menu; '' when nothing is due."""


class ReverifyViewModel(Observable[ReverifyState]):
    def __init__(
        self,
        kiosk: KioskModel,
        port: ReverifyPort,
        task: StaffTask,
        runner: Runner,
        *,
        back: Callable[[], None],
    ) -> None:
        super().__init__(ReverifyState())
        self.kiosk = kiosk
        self.port = port
        self.task = task
        self.runner = runner
        self.back = back
        """Back to the staff menu."""
        self._checked_at: float | None = None
        self._checking = False
        self._prompted: tuple[str, float] | None = None
        """(code, when) of the last prompt shown."""
        self._from = ScreenName.ATTRACT

    # ------------------------------------------------------------------ the timer

    def tick(self) -> None:
        """Once a second from the kiosk's tick: ask the port every `CHECK_EVERY_S` (off the UI thread)."""
        now = self.kiosk.clock.monotonic()
        if self._checking or (self._checked_at is not None and now - self._checked_at < CHECK_EVERY_S):
            return
        self._checked_at = now
        self._checking = True
        self.runner(self._check)

    def check_soon(self) -> None:
        """Ask at the next tick instead of waiting out `CHECK_EVERY_S` (after a check, or when time was moved)."""
        self._checked_at = None

    def check_now(self) -> None:
        """Ask the port now, on the calling (worker) thread; the staff menu does it as it loads. Never prompts."""
        self._apply(self.port.due())

    def _check(self) -> None:
        try:
            due = self.port.due()
        except Exception:  # a timer must not die of one bad read; the next tick asks again
            logger.exception("re-verification check failed")
            return
        finally:
            self._checking = False
        self._apply(due)
        self._maybe_prompt()

    def _apply(self, due: ReverifyDue | None) -> None:
        if due is None:
            state = ReverifyState()
        else:
            name, code = due.who.masked_name, due.who.code
            state = ReverifyState(
                due=True,
                code=code,
                who=text("staff.pharmacist.who", name=name, code=code),
                menu_line=text("staff.reverify.menu_line", name=name, code=code),
            )
        if state != self.state:
            self._set(state)

    def _maybe_prompt(self) -> None:
        state, screen = self.state, self.kiosk.state.screen
        if not state.due or screen not in PROMPT_ON:
            return
        now = self.kiosk.clock.monotonic()
        if self._prompted is not None and self._prompted[0] == state.code and now - self._prompted[1] < REPROMPT_S:
            return
        self._prompted = (state.code, now)
        self._from = screen
        self.kiosk.go(ScreenName.REVERIFY)
        self.kiosk.speak("voice.reverify")

    # ------------------------------------------------------------------ intents

    def open(self) -> None:
        """From the staff menu: the same prompt, asked for."""
        if not self.state.due:
            return
        self._from = ScreenName.STAFF
        self.kiosk.go(ScreenName.REVERIFY)

    def later(self) -> None:
        """Not now: back where the prompt came up; the staff menu keeps offering it."""
        if self._from is ScreenName.STAFF:
            self.back()
        else:
            self.kiosk.go(ScreenName.ATTRACT)

    def verify(self) -> None:
        code, who = self.state.code, self.state.who
        if not code:
            return
        self.task.run(
            text("staff.reverify.title"),
            text("staff.face.hint"),
            FACE_ETA_S,
            lambda guide, _step: self.port.reverify(code, guide),
            lambda outcome: self._verified(who, outcome),
        )
        self.kiosk.speak("voice.face")

    def _verified(self, who: str, outcome: AttendanceOutcome) -> None:
        self.check_soon()  # the next check is one interval later, or none
        self._prompted = None  # a check that falls due after this one is prompted afresh
        self._apply(None)
        menu = Action(text("staff.menu.back"), self.back, primary=False)
        if outcome.ok:
            done = (who, text("staff.reverify.ok_line", at=outcome.at))
            self.task.finish(True, text("staff.reverify.ok"), done, (menu,))
            return
        why = (who, text(outcome.reason or "staff.reason.unavailable"), text("staff.reverify.closed"))
        self.task.finish(False, text("staff.reverify.fail"), why, (menu,))
