"""Identity choice and checking: the four methods (医保码, face, ID card, social-security card), the waiting and
face-guidance screens, and the result.

Owns one identity attempt at a time: which method, what the citizen is told while it runs (hint, live face
guidance, elapsed time against an estimate), and the masked result. The blocking device work runs through the
injected `Runner` (a worker thread in the kiosk); a result that arrives after the citizen left (idle timeout,
cancel, home) is dropped by its attempt number. A non-face method is always offered (DESIGN.md §4). It must never
import Kivy and never hold a full ID number or a name in clear (ports return masked values).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from ui.i18n import text
from ui.viewmodels.base import Observable, Runner
from ui.viewmodels.kiosk import KioskModel, ScreenName
from ui.viewmodels.ports import NON_FACE_METHODS, Guidance, IdentityOutcome, IdentityPort, Method

logger = logging.getLogger(__name__)

SCAN_TIMEOUT_S: Final = 30.0
CARD_TIMEOUT_S: Final = 20.0
EXPECTED_S: Final[dict[Method, int]] = {Method.QR: 10, Method.FACE: 8, Method.ID_CARD: 5, Method.SS_CARD: 6}
"""What the progress line promises ("预计约 N 秒"): typical times, a little generous."""
METHOD_ORDER: Final = (Method.QR, Method.FACE, Method.ID_CARD, Method.SS_CARD)
VOICE: Final[dict[Method, str]] = {
    Method.QR: "voice.qr",
    Method.FACE: "voice.face",
    Method.ID_CARD: "voice.id_card",
    Method.SS_CARD: "voice.ss_card",
}


class Phase(StrEnum):
    CHOOSE = "choose"
    WAITING = "waiting"
    FACE = "face"
    RESULT = "result"


@dataclass(frozen=True)
class MethodChoice:
    method: Method
    label: str
    enabled: bool


@dataclass(frozen=True)
class IdentityState:
    phase: Phase = Phase.CHOOSE
    method: Method | None = None
    choices: tuple[MethodChoice, ...] = ()
    title: str = text("identity.title")
    hint: str = ""
    guidance: str = ""
    progress: str = ""
    ok: bool | None = None
    result_lines: tuple[str, ...] = ()


class IdentityViewModel(Observable[IdentityState]):
    def __init__(self, kiosk: KioskModel, port: IdentityPort, runner: Runner) -> None:
        super().__init__(IdentityState())
        self.kiosk = kiosk
        self.port = port
        self.runner = runner
        self._attempt = 0
        self._started = 0.0
        kiosk.holds_personal_data(self)

    # ------------------------------------------------------------------ intents

    def open(self) -> None:
        """Show the choice of methods (a missing device's method disabled, the non-face ones always listed)."""
        self._attempt += 1
        available = self.port.available()
        choices = tuple(
            MethodChoice(
                m,
                text(f"identity.{m.value}") + ("" if m in available else text("identity.unavailable")),
                m in available,
            )
            for m in METHOD_ORDER
        )
        self._set(IdentityState(choices=choices, hint=text("identity.non_face_hint")))
        self.kiosk.go(ScreenName.IDENTITY)
        self.kiosk.speak("voice.identity")

    def choose(self, method: Method) -> None:
        if method not in self.port.available():
            return
        self._attempt += 1
        attempt = self._attempt
        self._started = self.kiosk.clock.monotonic()
        if method is Method.FACE:
            self._set(
                replace(
                    self.state,
                    phase=Phase.FACE,
                    method=method,
                    title=text("face.title"),
                    hint=text("face.hint"),
                    guidance=text("face.starting"),
                    progress=self._progress(method),
                )
            )
            self.kiosk.go(ScreenName.FACE)
        else:
            self._set(
                replace(
                    self.state,
                    phase=Phase.WAITING,
                    method=method,
                    title=text(f"scan.{method.value}.title"),
                    hint=text(f"scan.{method.value}.hint"),
                    guidance="",
                    progress=self._progress(method),
                )
            )
            self.kiosk.go(ScreenName.SCAN)
        self.kiosk.speak(VOICE[method])
        self.runner(lambda: self._run(attempt, method))

    def cancel(self) -> None:
        """Leave the running attempt (its late result is dropped) and go back to the choice."""
        self.open()

    def tick(self) -> None:
        """Refresh the elapsed/estimate line while waiting (called once a second by the UI)."""
        state = self.state
        if state.phase in (Phase.WAITING, Phase.FACE) and state.method is not None:
            progress = self._progress(state.method)
            if progress != state.progress:
                self._set(replace(state, progress=progress))

    def clear_personal(self) -> None:
        self._attempt += 1
        self._set(IdentityState())

    # ------------------------------------------------------------------ worker side

    def _run(self, attempt: int, method: Method) -> None:
        try:
            if method is Method.QR:
                outcome = self.port.scan_qr(SCAN_TIMEOUT_S)
            elif method is Method.ID_CARD:
                outcome = self.port.read_id_card(CARD_TIMEOUT_S)
            elif method is Method.SS_CARD:
                outcome = self.port.read_ss_card(CARD_TIMEOUT_S)
            else:
                outcome = self.port.verify_face(lambda g: self._guide(attempt, g))
        except Exception:
            # A port is meant to turn device errors into outcomes; anything else is a bug shown calmly.
            logger.exception("identity check by %s failed unexpectedly", method.value)
            if attempt == self._attempt:
                self.kiosk.fail(f"identity check by {method.value} raised")
            return
        self._finish(attempt, method, outcome)

    def _guide(self, attempt: int, guidance: Guidance) -> None:
        if attempt != self._attempt or guidance.zh == self.state.guidance:
            return  # the pipeline repeats an instruction every frame; say it once
        self._set(replace(self.state, guidance=guidance.zh))
        if self.kiosk.care_mode:
            self.kiosk.speaker.say(guidance.zh)  # fixed instructions of the face pipeline, never personal data

    def _finish(self, attempt: int, method: Method, outcome: IdentityOutcome) -> None:
        if attempt != self._attempt:
            logger.info("identity result for a finished attempt dropped")
            return
        if outcome.ok and outcome.person is not None:
            person = outcome.person
            lines: tuple[str, ...] = (
                text("result.name", name=person.masked_name),
                text("result.id", id=person.masked_id),
                text("result.method", method=text(f"identity.{method.value}")),
            )
            title = text("result.ok.title")
            self.kiosk.speak("voice.ok")
        else:
            lines = (text(outcome.reason or "reason.unavailable"),)
            title = text("result.fail.title")
            self.kiosk.speak("voice.fail")
        self._set(
            replace(
                self.state,
                phase=Phase.RESULT,
                title=title,
                hint="",
                guidance="",
                progress="",
                ok=outcome.ok,
                result_lines=lines,
            )
        )
        self.kiosk.go(ScreenName.RESULT)

    def _progress(self, method: Method) -> str:
        elapsed = int(self.kiosk.clock.monotonic() - self._started)
        return text("common.elapsed", elapsed=elapsed, eta=EXPECTED_S[method])


def offers_non_face(state: IdentityState) -> bool:
    """Whether the choice lists at least one non-face method (it must, always)."""
    return any(c.method in NON_FACE_METHODS for c in state.choices)
