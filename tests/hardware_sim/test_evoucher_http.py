"""The simulator over real HTTP (uvicorn on loopback) through `HttpEVoucherPlatform` and the kiosk's service:
every refusal keeps its type across the wire, and the network's failures become the offline policy."""

from __future__ import annotations

import pytest

from hardware_sim.evoucher import EVoucherSimulator, Insured, synthetic_insured
from hardware_sim.evoucher_http import create_app
from protocol import AuditEvent
from terminal.evoucher import (
    BusinessType,
    CodeExpiredError,
    CodeForgedError,
    CodeMalformedError,
    CodeReplayedError,
    EVoucherAccepted,
    EVoucherConsumed,
    EVoucherRefused,
    EVoucherService,
    NotAuthorizedError,
    PlatformUnreachableError,
    RefusalReason,
    TerminalContext,
    TokenUsedError,
)
from terminal.evoucher_http import HttpEVoucherPlatform
from tests.hardware_sim.test_evoucher import StepClock
from tests.http_serving import serving_url

CTX = TerminalContext(org_code="H32058300001", device_id="term-0001")


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture
def simulator(clock: StepClock) -> EVoucherSimulator:
    return EVoucherSimulator(clock, designated_orgs={CTX.org_code})


@pytest.fixture
def person() -> Insured:
    return synthetic_insured(1)[0]


def test_errors_keep_their_type_across_http(simulator: EVoucherSimulator, clock: StepClock, person: Insured) -> None:
    account = simulator.enrol(person)
    with serving_url(create_app(simulator)) as url, HttpEVoucherPlatform(url, timeout_s=5) as platform:
        code = simulator.issue_code(account)
        identity = platform.decode(code, CTX)
        assert (identity.id_number, len(identity.ec_token)) == (person.id_number, 40)
        with pytest.raises(CodeReplayedError):
            platform.decode(code, CTX)
        with pytest.raises(CodeForgedError):
            platform.decode(simulator.forge_code(), CTX)
        with pytest.raises(CodeMalformedError):
            platform.decode("not a code", CTX)
        stale = simulator.issue_code(account)
        clock.advance(61)
        with pytest.raises(CodeExpiredError):
            platform.decode(stale, CTX)
        with pytest.raises(NotAuthorizedError):
            platform.decode(simulator.issue_code(account), TerminalContext("H00000000000", "x"))
        receipt = platform.consume(identity.ec_token, BusinessType.PURCHASE, CTX)
        assert receipt.token_ref == identity.token_ref
        with pytest.raises(TokenUsedError):
            platform.consume(identity.ec_token, BusinessType.PURCHASE, CTX)
        simulator.reachable = False
        with pytest.raises(PlatformUnreachableError):
            platform.decode(simulator.issue_code(account), CTX)


def test_network_failures_are_the_offline_policy(simulator: EVoucherSimulator, person: Insured) -> None:
    account = simulator.enrol(person)
    events: list[AuditEvent] = []
    app = create_app(simulator)
    with serving_url(app) as url, HttpEVoucherPlatform(url, timeout_s=0.5) as platform:
        service = EVoucherService(platform, CTX, events.append)
        accepted = service.verify(simulator.issue_code(account), source="camera")
        assert isinstance(accepted, EVoucherAccepted)
        # A platform slower than the terminal's timeout is an unreachable one.
        app.state.delay_s = 2.0
        slow = service.verify(simulator.issue_code(account), source="camera")
        assert isinstance(slow, EVoucherRefused)
        assert slow.reason is RefusalReason.OFFLINE
        app.state.delay_s = 0.0
        assert isinstance(service.consume(accepted.identity, BusinessType.QUERY), EVoucherConsumed)
    # The server is gone: connection refused.
    with HttpEVoucherPlatform(url, timeout_s=0.5) as platform:
        refused = EVoucherService(platform, CTX, events.append).verify(simulator.issue_code(account), source="scanner")
    assert isinstance(refused, EVoucherRefused)
    assert refused.reason is RefusalReason.OFFLINE
    assert [e.detail.get("reason") for e in events if e.outcome.value == "failure"] == ["offline", "offline"]
