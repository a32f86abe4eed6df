"""One `FaceVerifier`, two threads: the citizen's face check on the kiosk (`ui.services.RuntimeIdentity`) and a cash
register's proxy purchase asking for the agent's face (`ui.pos_link.KioskBuyerVerifier`) at the same moment. The
verifier is not thread-safe, so the two uses must take turns (`ui.services.face_lock`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import cast

from terminal.pos_api import AgentCheck, BuyerCheck, BuyerMethod
from terminal.runtime import TerminalRuntime
from terminal.verification import FaceOutcome, FaceVerifier, Prompt
from tests.terminal.conftest import FakeClock
from ui.pos_link import KioskBuyerVerifier
from ui.services import RuntimeIdentity
from ui.viewmodels.kiosk import KioskModel
from ui.viewmodels.pos import PosViewModel

ATTEMPT_S = 0.3


def _no_prompt(p: Prompt) -> None:
    return None


@dataclass(eq=False)  # hashable by identity, as the real verifier
class CountingFace:
    """Stands in for the camera-bound verifier: each attempt takes a while and notes how many run at once."""

    prompt: object = _no_prompt
    running: int = 0
    most: int = 0
    guard: threading.Lock = field(default_factory=threading.Lock)

    def identify(self) -> SimpleNamespace:
        with self.guard:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(ATTEMPT_S)
        with self.guard:
            self.running -= 1
        return SimpleNamespace(accepted=True, subject_ref="citizen-0001", outcome=FaceOutcome.NO_MATCH)


@dataclass
class AgentByFace:
    face: CountingFace

    def verify_buyer(self, method: BuyerMethod, cancel: threading.Event, *, with_face: bool = True) -> BuyerCheck:
        return BuyerCheck(None, method.value, "not_used")

    def verify_agent_face(self, candidate_refs: Sequence[str], cancel: threading.Event) -> AgentCheck:
        self.face.identify()  # what RuntimeBuyerVerifier does with the runtime's verifier
        return AgentCheck("citizen-0001", "face_1toN")


def test_the_kiosk_and_the_register_take_turns_with_the_face_verifier() -> None:
    face = CountingFace()
    verifier = cast(FaceVerifier, face)  # the two paths only touch `prompt` and `identify`
    runtime = cast(TerminalRuntime, SimpleNamespace(face=verifier))
    kiosk = RuntimeIdentity(runtime)
    register = KioskBuyerVerifier(AgentByFace(face), PosViewModel(KioskModel(FakeClock())), face=verifier)
    outcomes: list[bool] = []

    def citizen() -> None:
        outcomes.append(kiosk.verify_face(lambda g: None).ok)

    def cash_register() -> None:
        outcomes.append(register.verify_agent_face(["citizen-0001"], threading.Event()).reason is None)

    threads = [threading.Thread(target=citizen), threading.Thread(target=cash_register)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert outcomes == [True, True]
    assert face.most == 1, "two face attempts ran on the verifier at once"
    assert time.monotonic() - started >= 2 * ATTEMPT_S * 0.95
    # Each use put the prompt hook back (neither left the other's hook installed)
    assert face.prompt is _no_prompt
