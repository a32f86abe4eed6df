"""The e-voucher platform simulator: one-shot codes, single-use tokens, expiry, forgery and outages."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from hardware_sim.evoucher import (
    CODE_LENGTH,
    CODE_PREFIX,
    EVoucherSimulator,
    Insured,
    id_check_digit,
    synthetic_insured,
    valid_id_number,
)
from terminal.evoucher import (
    EC_TOKEN_LENGTH,
    BusinessType,
    CodeExpiredError,
    CodeForgedError,
    CodeInvalidError,
    CodeMalformedError,
    CodeReplayedError,
    EVoucherError,
    NotAuthorizedError,
    PlatformUnreachableError,
    TerminalContext,
    TokenInvalidError,
    TokenUsedError,
)

CTX = TerminalContext(org_code="H32058300001", device_id="term-0001")
OTHER = TerminalContext(org_code="H32058300002", device_id="term-0002")


class StepClock:
    """A `protocol.Clock` moved by the test."""

    def __init__(self) -> None:
        self.wall = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
        self.mono = 100.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def monotonic_ns(self) -> int:
        return int(self.mono * 1e9)

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture
def platform(clock: StepClock) -> EVoucherSimulator:
    return EVoucherSimulator(clock)


@pytest.fixture
def person() -> Insured:
    return synthetic_insured(1)[0]


def test_check_digit_matches_the_standard_example() -> None:
    # GB 11643-1999's worked example: 11010519491231002X.
    assert id_check_digit("11010519491231002") == "X"
    assert valid_id_number("11010519491231002X")
    assert not valid_id_number("110105194912310021")
    with pytest.raises(ValueError, match="17 digits"):
        id_check_digit("123")


def test_synthetic_people_are_valid_and_reproducible() -> None:
    people = synthetic_insured(50)
    assert people == synthetic_insured(50)
    assert all(valid_id_number(p.id_number) and p.id_number.startswith(p.insured_region) for p in people)
    assert people[0].id_number not in repr(people[0])
    assert people[0].name not in repr(people[0])


def test_code_shape(platform: EVoucherSimulator, person: Insured) -> None:
    code = platform.issue_code(platform.enrol(person))
    assert len(code) == CODE_LENGTH
    assert code.startswith(CODE_PREFIX)
    assert code == code.upper()  # QR alphanumeric mode
    assert platform.issue_code(platform.enrol(person)) != code


def test_decode_gives_a_40_char_token_and_identity(platform: EVoucherSimulator, person: Insured) -> None:
    identity = platform.decode(platform.issue_code(platform.enrol(person)), CTX)
    assert len(identity.ec_token) == EC_TOKEN_LENGTH
    assert (identity.name, identity.id_number, identity.insured_region) == (
        person.name,
        person.id_number,
        person.insured_region,
    )
    assert person.id_number not in repr(identity)
    assert identity.ec_token not in repr(identity)
    assert platform.stats.decoded == 1


def test_a_code_decodes_once(platform: EVoucherSimulator, person: Insured) -> None:
    code = platform.issue_code(platform.enrol(person))
    platform.decode(code, CTX)
    with pytest.raises(CodeReplayedError):
        platform.decode(code, CTX)
    with pytest.raises(CodeReplayedError):
        platform.decode(code, OTHER)
    assert platform.stats.refused == {"CodeReplayedError": 2}


def test_a_code_expires_after_about_a_minute(clock: StepClock, platform: EVoucherSimulator, person: Insured) -> None:
    account = platform.enrol(person)
    fresh = platform.issue_code(account)
    clock.advance(59)
    platform.decode(fresh, CTX)
    stale = platform.issue_code(account)
    clock.advance(61)
    with pytest.raises(CodeExpiredError):
        platform.decode(stale, CTX)


def test_forged_and_tampered_codes_are_told_apart_from_malformed(platform: EVoucherSimulator, person: Insured) -> None:
    code = platform.issue_code(platform.enrol(person))
    with pytest.raises(CodeForgedError) as forged:
        platform.decode(platform.forge_code(), CTX)
    assert isinstance(forged.value, CodeInvalidError)
    # Flip one bit of the issue time inside the body: the tag no longer verifies.
    body = bytearray(base64.b32decode(code[len(CODE_PREFIX) :]))
    body[10] ^= 0x01
    tampered = CODE_PREFIX + base64.b32encode(bytes(body)).decode()
    with pytest.raises(CodeForgedError):
        platform.decode(tampered, CTX)
    for bad in ("", code[:-1], "XXXEC1" + code[6:], CODE_PREFIX + "1" * 40, code.lower()):
        with pytest.raises(CodeMalformedError):
            platform.decode(bad, CTX)
    platform.decode(code, CTX)  # the genuine code was not burnt by the failed attempts


def test_a_code_from_another_platform_instance_is_forged(clock: StepClock, person: Insured) -> None:
    other = EVoucherSimulator(clock)
    with pytest.raises(CodeForgedError):
        EVoucherSimulator(clock).decode(other.issue_code(other.enrol(person)), CTX)


def test_same_secret_but_never_issued_is_invalid(clock: StepClock, person: Insured) -> None:
    secret = b"k" * 32
    issuer = EVoucherSimulator(clock, secret=secret)
    with pytest.raises(CodeInvalidError) as info:
        EVoucherSimulator(clock, secret=secret).decode(issuer.issue_code(issuer.enrol(person)), CTX)
    assert not isinstance(info.value, CodeForgedError)


def test_token_is_single_use_and_bound_to_its_terminal(
    clock: StepClock, platform: EVoucherSimulator, person: Insured
) -> None:
    account = platform.enrol(person)
    token = platform.decode(platform.issue_code(account), CTX).ec_token
    with pytest.raises(TokenInvalidError):
        platform.consume(token, BusinessType.PURCHASE, OTHER)
    receipt = platform.consume(token, BusinessType.PURCHASE, CTX)
    assert receipt.business is BusinessType.PURCHASE
    assert token not in repr(receipt)
    with pytest.raises(TokenUsedError):
        platform.consume(token, BusinessType.PURCHASE, CTX)
    with pytest.raises(TokenInvalidError):
        platform.consume("0" * 40, BusinessType.QUERY, CTX)
    late = platform.decode(platform.issue_code(account), CTX).ec_token
    clock.advance(301)
    with pytest.raises(TokenInvalidError):
        platform.consume(late, BusinessType.PURCHASE, CTX)


def test_outage_and_undesignated_institutions(platform: EVoucherSimulator, clock: StepClock, person: Insured) -> None:
    code = platform.issue_code(platform.enrol(person))
    platform.reachable = False
    with pytest.raises(PlatformUnreachableError):
        platform.decode(code, CTX)
    platform.reachable = True
    platform.decode(code, CTX)  # an unanswered call did not burn the code
    strict = EVoucherSimulator(clock, designated_orgs={CTX.org_code})
    account = strict.enrol(person)
    with pytest.raises(NotAuthorizedError):
        strict.decode(strict.issue_code(account), OTHER)
    strict.decode(strict.issue_code(account), CTX)


def test_the_code_table_forgets_expired_codes(clock: StepClock, platform: EVoucherSimulator, person: Insured) -> None:
    account = platform.enrol(person)
    old = [platform.issue_code(account) for _ in range(20)]
    clock.advance(120)
    platform.issue_code(account)
    assert platform.live_codes == 1
    with pytest.raises(CodeExpiredError):
        platform.decode(old[0], CTX)


def test_every_refusal_is_an_evoucher_error(platform: EVoucherSimulator) -> None:
    with pytest.raises(EVoucherError):
        platform.decode("garbage", CTX)
