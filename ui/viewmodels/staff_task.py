"""One staff task at a time on the shared waiting and result screens: sign-in, sign-out, a review's face
confirmation, the binding application.

Owns the task's display (title, step hint, live face guidance, elapsed time against an estimate) and its result
(ok or not, lines in words, the next actions). The blocking work runs through the injected `Runner`; a result that
arrives after the person left (idle timeout, home, a newer task) is dropped by its attempt number. It must never
import Kivy and holds only masked display strings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from ui.i18n import text
from ui.viewmodels.base import Observable, Runner
from ui.viewmodels.kiosk import KioskModel, ScreenName
from ui.viewmodels.ports import Guidance

logger = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class Action:
    """A button on the result screen."""

    label: str
    run: Callable[[], None]
    primary: bool = True


@dataclass(frozen=True)
class StaffTaskState:
    title: str = ""
    hint: str = ""
    guidance: str = ""
    progress: str = ""
    busy: bool = False
    ok: bool | None = None
    lines: tuple[str, ...] = ()
    actions: tuple[Action, ...] = ()


class StaffTask(Observable[StaffTaskState]):
    def __init__(self, kiosk: KioskModel, runner: Runner) -> None:
        super().__init__(StaffTaskState())
        self.kiosk = kiosk
        self.runner = runner
        self._attempt = 0
        self._started = 0.0
        self._eta = 0
        kiosk.holds_personal_data(self)

    def run(
        self,
        title: str,
        hint: str,
        eta_s: int,
        job: Callable[[Callable[[Guidance], None], Callable[[str], None]], R],
        done: Callable[[R], None],
    ) -> None:
        """Show the waiting screen and run `job(guidance, step)` off the UI thread; `done(result)` is called with
        its result unless the task was abandoned meanwhile. A job that raises shows the calm error screen."""
        self._attempt += 1
        attempt = self._attempt
        self._started = self.kiosk.clock.monotonic()
        self._eta = eta_s
        self._set(StaffTaskState(title=title, hint=hint, guidance="", progress=self._progress(), busy=True))
        self.kiosk.go(ScreenName.STAFF_WAIT)

        def work() -> None:
            try:
                result = job(lambda g: self._guide(attempt, g), lambda key: self._step(attempt, key))
            except Exception:
                logger.exception("staff task %r failed unexpectedly", title)
                if attempt == self._attempt:
                    self.kiosk.fail("staff task raised")
                return
            if attempt != self._attempt:
                logger.info("staff task result for an abandoned attempt dropped")
                return
            done(result)

        self.runner(work)

    def finish(self, ok: bool, title: str, lines: tuple[str, ...], actions: tuple[Action, ...]) -> None:
        self._set(StaffTaskState(title=title, ok=ok, lines=lines, actions=actions))
        self.kiosk.speak("voice.staff.ok" if ok else "voice.staff.fail")
        self.kiosk.go(ScreenName.STAFF_RESULT)

    def abandon(self) -> None:
        """The person left the task (cancel): a late result is dropped."""
        self._attempt += 1
        self._set(StaffTaskState())

    def tick(self) -> None:
        state = self.state
        if state.busy:
            progress = self._progress()
            if progress != state.progress:
                self._set(replace(state, progress=progress))

    def clear_personal(self) -> None:
        self.abandon()

    def _guide(self, attempt: int, guidance: Guidance) -> None:
        if attempt != self._attempt or guidance.zh == self.state.guidance:
            return  # the face pipeline repeats an instruction every frame: show (and say) it once
        self._set(replace(self.state, guidance=guidance.zh))
        if self.kiosk.care_mode:
            self.kiosk.speaker.say(guidance.zh)  # fixed instructions of the face pipeline, never personal data

    def _step(self, attempt: int, key: str) -> None:
        if attempt == self._attempt:
            self._set(replace(self.state, hint=text(key), guidance=""))

    def _progress(self) -> str:
        elapsed = int(self.kiosk.clock.monotonic() - self._started)
        return text("common.elapsed", elapsed=elapsed, eta=self._eta)
