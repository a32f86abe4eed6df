"""A register's request on the kiosk screen (`ui.pos_link.KioskBuyerVerifier` around a `BuyerVerifier`): a plain
verification and a proxy purchase (代购: the beneficiary's credential, then the agent's face), masked throughout."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from terminal.pos_api import AgentCheck, BuyerCheck, BuyerIdentity, BuyerMethod
from tests.terminal.conftest import FakeClock
from ui.i18n import text
from ui.pos_link import KioskBuyerVerifier
from ui.viewmodels.kiosk import KioskModel, ScreenName
from ui.viewmodels.pos import PosViewModel

BUYER = BuyerIdentity("诸葛明亮", "01", "110101194501011234")


@dataclass
class FakeVerifier:
    buyer: BuyerCheck = field(default_factory=lambda: BuyerCheck(BUYER, "evoucher"))
    agent: AgentCheck = field(default_factory=lambda: AgentCheck("agent-ref-1", "face_1toN"))
    seen: list[str] = field(default_factory=list)

    def verify_buyer(self, method: BuyerMethod, cancel: threading.Event, *, with_face: bool = True) -> BuyerCheck:
        self.seen.append(f"buyer:{method.value}:{with_face}")
        return self.buyer

    def verify_agent_face(self, candidate_refs: Sequence[str], cancel: threading.Event) -> AgentCheck:
        self.seen.append("agent")
        return self.agent


def _screen() -> tuple[KioskModel, PosViewModel, list[tuple[str, str]]]:
    kiosk = KioskModel(FakeClock())
    pos = PosViewModel(kiosk)
    steps: list[tuple[str, str]] = []
    pos.subscribe(lambda s: steps.append((s.title, s.step)))
    return kiosk, pos, steps


def _all_text(pos: PosViewModel) -> str:
    s = pos.state
    return " ".join((s.title, s.step, s.instruction, *s.result_lines))


def test_a_plain_request_shows_the_masked_buyer() -> None:
    kiosk, pos, _ = _screen()
    check = KioskBuyerVerifier(FakeVerifier(), pos).verify_buyer(BuyerMethod.EVOUCHER, threading.Event())
    assert check.verified
    assert kiosk.state.screen is ScreenName.POS
    assert (pos.state.done, pos.state.ok) == (True, True)
    assert "诸葛明亮" not in _all_text(pos)
    assert "110101194501011234" not in _all_text(pos)
    assert pos.state.result_lines[0] == text("result.name", name=BUYER.masked()["psn_name"])


def test_a_proxy_purchase_walks_through_beneficiary_then_agent() -> None:
    _, pos, steps = _screen()
    inner = FakeVerifier()
    link = KioskBuyerVerifier(inner, pos)
    assert link.verify_buyer(BuyerMethod.EVOUCHER, threading.Event(), with_face=False).verified
    assert pos.state.active
    assert not pos.state.done
    assert pos.state.step == text("proxy.step_agent", name=BUYER.masked()["psn_name"])
    assert link.verify_agent_face(["agent-ref-1"], threading.Event()).agent_ref == "agent-ref-1"
    assert (pos.state.done, pos.state.ok) == (True, True)
    assert inner.seen == ["buyer:evoucher:False", "agent"]
    assert (text("proxy.title"), text("proxy.step_beneficiary")) in steps
    assert "110101194501011234" not in _all_text(pos)


def test_a_refused_agent_is_stated_in_words() -> None:
    _, pos, _ = _screen()
    link = KioskBuyerVerifier(FakeVerifier(agent=AgentCheck(None, "face_1toN", "agent_not_registered")), pos)
    link.verify_buyer(BuyerMethod.ID_CARD_FACE, threading.Event(), with_face=False)
    link.verify_agent_face(["someone-else"], threading.Event())
    assert (pos.state.done, pos.state.ok) == (True, False)
    assert pos.state.result_lines == (text("pos.refused", reason="agent_not_registered"),)
