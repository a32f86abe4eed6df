"""The kiosk's e-voucher service against the platform simulator: the camera and scanner paths, every refusal, the
offline policy, the audit events (into a real outbox) and what never reaches a log."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from drivers.qr_decode import decode_qr
from hardware_sim.evoucher import EVoucherSimulator, Insured, synthetic_insured
from hardware_sim.qr_images import composite, load_backgrounds, render_qr
from protocol import AuditEvent, AuditOutcome
from terminal.errors import OutboxFullError
from terminal.evoucher import (
    MESSAGES,
    OFFLINE_CAPABLE,
    BusinessType,
    ConsumeReceipt,
    EVoucherAccepted,
    EVoucherConsumed,
    EVoucherError,
    EVoucherIdentity,
    EVoucherRefused,
    EVoucherService,
    IdentityMethod,
    RefusalReason,
    TerminalContext,
    mask_id_number,
    mask_name,
    refusal_event,
    token_ref,
)
from tests.face_data import person_photos
from tests.terminal.conftest import FakeClock, open_outbox

CTX = TerminalContext(org_code="H32058300001", device_id="term-0001")


@pytest.fixture
def platform(clock: FakeClock) -> EVoucherSimulator:
    return EVoucherSimulator(clock)


@pytest.fixture
def person() -> Insured:
    return synthetic_insured(3)[2]


@pytest.fixture
def events() -> list[AuditEvent]:
    return []


@pytest.fixture
def service(platform: EVoucherSimulator, clock: FakeClock, events: list[AuditEvent]) -> EVoucherService:
    return EVoucherService(platform, CTX, events.append, clock=clock)


def _assert_private(text: str, person: Insured, *secrets: str) -> None:
    for secret in (person.name, person.id_number, *secrets):
        assert secret not in text


def test_camera_path_from_a_real_photo(
    service: EVoucherService, platform: EVoucherSimulator, person: Insured, events: list[AuditEvent]
) -> None:
    code = platform.issue_code(platform.enrol(person))
    photo = load_backgrounds([person_photos()["biden"][1]])[0]
    frame = composite(photo, render_qr(code, module_px=6), np.random.default_rng(5), side_px=180, tilt=0.06)
    (found,) = decode_qr(frame, qr_only=True)
    outcome = service.verify(found.text, source="camera")
    assert isinstance(outcome, EVoucherAccepted)
    assert outcome.identity.id_number == person.id_number
    assert [e.action for e in events] == ["evoucher.decode.accepted"]
    assert events[0].subject == outcome.identity.token_ref
    _assert_private(events[0].model_dump_json(), person, code, outcome.identity.ec_token)


def test_scanner_path_strips_the_line_ending(
    service: EVoucherService, platform: EVoucherSimulator, person: Insured
) -> None:
    code = platform.issue_code(platform.enrol(person))
    outcome = service.verify(code + "\r\n", source="scanner")
    assert isinstance(outcome, EVoucherAccepted)
    assert outcome.event.detail["source"] == "scanner"


def test_consume_once_then_refused(
    service: EVoucherService, platform: EVoucherSimulator, person: Insured, events: list[AuditEvent]
) -> None:
    accepted = service.verify(platform.issue_code(platform.enrol(person)), source="camera")
    assert isinstance(accepted, EVoucherAccepted)
    first = service.consume(accepted.identity, BusinessType.PURCHASE)
    assert isinstance(first, EVoucherConsumed)
    again = service.consume(accepted.identity, BusinessType.PURCHASE)
    assert isinstance(again, EVoucherRefused)
    assert again.reason is RefusalReason.TOKEN_USED
    assert [e.action for e in events][-2:] == ["evoucher.consume.accepted", "evoucher.consume.refused"]


@pytest.mark.parametrize(
    ("make_code", "reason"),
    [
        (lambda p, a, c: "hello world", RefusalReason.MALFORMED),
        (lambda p, a, c: "5901234123457", RefusalReason.MALFORMED),  # a drug box's EAN-13 is not a 医保码
        (lambda p, a, c: "SIMEC1" + "A" * 30, RefusalReason.MALFORMED),  # well shaped locally, not for the platform
        (lambda p, a, c: p.forge_code(), RefusalReason.INVALID),
    ],
)
def test_bad_codes_are_refused_with_their_reason(
    service: EVoucherService,
    platform: EVoucherSimulator,
    person: Insured,
    clock: FakeClock,
    events: list[AuditEvent],
    make_code: object,
    reason: RefusalReason,
) -> None:
    account = platform.enrol(person)
    code = make_code(platform, account, clock)  # type: ignore[operator]  # the parametrized lambdas above
    outcome = service.verify(code, source="scanner")
    assert isinstance(outcome, EVoucherRefused)
    assert outcome.reason is reason
    assert outcome.alternatives == (IdentityMethod.EVOUCHER, *OFFLINE_CAPABLE)
    assert events[-1].outcome is AuditOutcome.FAILURE
    assert events[-1].detail["reason"] == reason.value


def test_local_shape_check_never_calls_the_platform(service: EVoucherService, platform: EVoucherSimulator) -> None:
    for text in ("", "   ", "短", "http://example.com/a b", "x" * 600):
        outcome = service.verify(text, source="camera")
        assert isinstance(outcome, EVoucherRefused)
        assert outcome.reason is RefusalReason.MALFORMED
    assert platform.stats.refused == {}


def test_expired_and_replayed(
    service: EVoucherService, platform: EVoucherSimulator, person: Insured, clock: FakeClock
) -> None:
    account = platform.enrol(person)
    stale = platform.issue_code(account)
    clock.advance(61)
    expired = service.verify(stale, source="camera")
    assert isinstance(expired, EVoucherRefused)
    assert expired.reason is RefusalReason.EXPIRED
    assert "刷新" in expired.message.zh
    assert "Refresh" in expired.message.en
    code = platform.issue_code(account)
    assert isinstance(service.verify(code, source="camera"), EVoucherAccepted)
    replay = service.verify(code, source="camera")
    assert isinstance(replay, EVoucherRefused)
    assert replay.reason is RefusalReason.REPLAYED


def test_offline_policy(
    tmp_path: Path, clock: FakeClock, platform: EVoucherSimulator, person: Insured, caplog: pytest.LogCaptureFixture
) -> None:
    """Offline, a code is not identity, is not queued and is not retried: the citizen is sent to the card paths and
    the refusal is recorded (durably, in the real outbox) without the code or identity."""
    outbox = open_outbox(tmp_path / "outbox.db", clock)
    service = EVoucherService(platform, CTX, outbox.enqueue, clock=clock)
    code = platform.issue_code(platform.enrol(person))
    platform.reachable = False
    with caplog.at_level(logging.DEBUG):
        outcome = service.verify(code, source="camera")
    assert isinstance(outcome, EVoucherRefused)
    assert outcome.reason is RefusalReason.OFFLINE
    assert outcome.alternatives == (IdentityMethod.ID_CARD_FACE, IdentityMethod.SOCIAL_SECURITY_CARD_FACE)
    assert IdentityMethod.EVOUCHER not in outcome.alternatives
    assert "身份证" in outcome.message.zh
    assert "社保卡" in outcome.message.zh
    assert "offline" in outcome.message.en
    assert service.last_unreachable_at == clock.monotonic()
    (record,) = outbox.claim()
    stored = json.loads(record.wire)
    assert stored["payload"]["action"] == "evoucher.decode.refused"
    assert stored["payload"]["detail"]["offline"] is True
    _assert_private(record.wire.decode(), person, code)
    _assert_private(caplog.text, person, code)
    # Nothing was queued for later: when the link is back, the code has expired and the platform never saw it.
    clock.advance(61)
    platform.reachable = True
    assert platform.stats.decoded == 0
    assert outbox.claim() == []
    outbox.close()


def test_offline_at_settlement_is_refused_not_queued(
    service: EVoucherService, platform: EVoucherSimulator, person: Insured
) -> None:
    accepted = service.verify(platform.issue_code(platform.enrol(person)), source="camera")
    assert isinstance(accepted, EVoucherAccepted)
    platform.reachable = False
    refused = service.consume(accepted.identity, BusinessType.PURCHASE)
    assert isinstance(refused, EVoucherRefused)
    assert refused.reason is RefusalReason.OFFLINE
    assert platform.stats.consumed == 0
    platform.reachable = True
    assert isinstance(service.consume(accepted.identity, BusinessType.PURCHASE), EVoucherConsumed)
    assert service.last_unreachable_at is None


def test_nothing_personal_in_logs(
    service: EVoucherService, platform: EVoucherSimulator, person: Insured, caplog: pytest.LogCaptureFixture
) -> None:
    code = platform.issue_code(platform.enrol(person))
    with caplog.at_level(logging.DEBUG):
        outcome = service.verify(code, source="camera")
        assert isinstance(outcome, EVoucherAccepted)
        service.consume(outcome.identity, BusinessType.QUERY)
        logging.getLogger("test").info("identity %r", outcome.identity)
    _assert_private(caplog.text, person, code, outcome.identity.ec_token)
    assert outcome.identity.token_ref in caplog.text


class _Adapter:
    """An SDK adapter with a bug: returns a token of the wrong length; or raises the bare base error."""

    def __init__(self, token: str, fail: bool = False) -> None:
        self.token = token
        self.fail = fail

    def decode(self, code: str, context: TerminalContext) -> EVoucherIdentity:
        if self.fail:
            raise EVoucherError("sdk said something new")
        return EVoucherIdentity(self.token, "张三", synthetic_insured(1)[0].id_type, "110105194912310021", "110105")

    def consume(self, ec_token: str, business: BusinessType, context: TerminalContext) -> ConsumeReceipt:
        raise AssertionError("not reached")


def test_adapter_surprises_fail_closed(events: list[AuditEvent]) -> None:
    for adapter in (_Adapter("short"), _Adapter("x" * 40, fail=True)):
        outcome = EVoucherService(adapter, CTX, events.append).verify("SIMEC1" + "A" * 40, source="camera")
        assert isinstance(outcome, EVoucherRefused)
        assert outcome.reason is RefusalReason.INVALID


def test_a_full_outbox_fails_the_attempt(platform: EVoucherSimulator, person: Insured) -> None:
    def full(event: AuditEvent) -> None:
        raise OutboxFullError("outbox at its bound")

    service = EVoucherService(platform, CTX, full)
    with pytest.raises(OutboxFullError):
        service.verify(platform.issue_code(platform.enrol(person)), source="camera")


def test_masks_and_refs() -> None:
    assert mask_name("张三") == "张*"
    assert mask_name("欧阳娜娜") == "欧***"
    assert mask_name("王") == "*"
    assert mask_id_number("11010519491231002X") == "1101**********002X"
    assert mask_id_number("123") == "***"
    assert len(token_ref("a" * 40)) == 12
    assert token_ref("a" * 40) != token_ref("b" * 40)


def test_every_reason_has_both_languages_and_an_event() -> None:
    for reason in RefusalReason:
        assert MESSAGES[reason].zh
        assert MESSAGES[reason].en
        event = refusal_event(reason, source="scanner", step="decode", latency_ms=1.234)
        assert event.detail["latency_ms"] == 1.2


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80) | st.from_regex(r"SIMEC1[A-Z2-7=]{40}", fullmatch=True))
@example(text="SIMEC1" + "2" * 39 + "=")  # right length, but the padding makes the body decode 1 byte short
def test_arbitrary_text_is_refused_never_raised(platform: EVoucherSimulator, text: str) -> None:
    events: list[AuditEvent] = []
    outcome = EVoucherService(platform, CTX, events.append).verify(text, source="scanner")
    assert isinstance(outcome, EVoucherRefused)
    assert outcome.reason in {RefusalReason.MALFORMED, RefusalReason.INVALID}
    assert len(events) == 1
    if len(text.strip()) >= 16:
        assert text.strip() not in events[0].model_dump_json()
