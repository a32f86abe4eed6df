"""A clean-room simulator of the national 医保电子凭证 (medical-insurance e-voucher) platform's VISIBLE behaviour.

The real SDK and its code format are not public. What is simulated is what a terminal can observe (docs/evoucher.md):
the citizen's phone shows a dynamic QR code valid for about a minute; the terminal's SDK call exchanges it for a
single-use 40-character ecToken plus the holder's identity; a code decodes once; a token is consumed once; expired,
forged, malformed and replayed codes are refused with distinct errors; the platform can be unreachable.

INVENTED here (plausible, not the real thing, never to be presented as it):
  * the code text: "SIMEC1" + 40 base32 characters (A-Z, 2-7; QR alphanumeric mode) encoding 25 bytes:
    a 9-byte random nonce, the 4-byte issue time (platform clock, Unix seconds, big-endian) and a 12-byte
    HMAC-SM3 tag under the simulator's secret over prefix + nonce + issue time (so forgery is detectable offline
    of the table, and cheaply);
  * the ecToken: 40 lowercase hex characters (20 random bytes), valid TOKEN_TTL_S after the decode, bound to the
    institution and terminal that decoded it;
  * the identity fields (synthetic names, ID numbers with a valid GB 11643 check digit, 6-digit region codes).

Implements `terminal.evoucher.EVoucherPlatform`, so the kiosk's `EVoucherService` talks to it exactly as it would to
an adapter around the real SDK. Time comes from an injected `protocol.Clock` so tests move it. It must never be
imported by production code.
"""

from __future__ import annotations

import base64
import binascii
import random
import secrets
import struct
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Final

from protocol import Clock
from protocol.gm.sm3 import hmac_sm3, mac_equal
from terminal.evoucher import (
    EC_TOKEN_LENGTH,
    BusinessType,
    CodeExpiredError,
    CodeForgedError,
    CodeInvalidError,
    CodeMalformedError,
    CodeReplayedError,
    ConsumeReceipt,
    EVoucherIdentity,
    IdType,
    NotAuthorizedError,
    PlatformUnreachableError,
    TerminalContext,
    TokenInvalidError,
    TokenUsedError,
    token_ref,
)

CODE_PREFIX: Final = "SIMEC1"
CODE_BODY_CHARS: Final = 40
CODE_LENGTH: Final = len(CODE_PREFIX) + CODE_BODY_CHARS
CODE_TTL_S: Final = 60.0
TOKEN_TTL_S: Final = 300.0
CLOCK_SKEW_S: Final = 5.0
"""A code stamped up to this far in the platform's future is still accepted (phones and servers drift)."""

_NONCE_BYTES: Final = 9
_TAG_BYTES: Final = 12
_BODY: Final = struct.Struct(f">{_NONCE_BYTES}sI{_TAG_BYTES}s")


# ---------------------------------------------------------------------------------------------------- identities


def id_check_digit(first17: str) -> str:
    """GB 11643-1999 check character (ISO 7064 MOD 11-2) of the first 17 digits of an ID number."""
    if len(first17) != 17 or not first17.isdigit():
        raise ValueError("need exactly 17 digits")
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    total = sum(int(d) * w for d, w in zip(first17, weights, strict=True))
    return "10X98765432"[total % 11]


def valid_id_number(id_number: str) -> bool:
    return len(id_number) == 18 and id_number[:17].isdigit() and id_check_digit(id_number[:17]) == id_number[17]


@dataclass(frozen=True, slots=True, repr=False)
class Insured:
    """A synthetic insured person (personal data in shape: never logged; `repr` hides it)."""

    name: str
    id_number: str
    insured_region: str
    id_type: IdType = IdType.RESIDENT_ID

    def __repr__(self) -> str:
        return f"Insured(region={self.insured_region!r})"


_SURNAMES: Final = ("王", "李", "张", "刘", "陈", "杨", "黄", "赵", "周", "吴", "徐", "孙", "欧阳", "诸葛")
_GIVEN: Final = ("伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明")
REGIONS: Final = ("320583", "320505", "310104", "110105", "440305", "510107")
"""Kunshan, Suzhou Huqiu, Shanghai Xuhui, Beijing Chaoyang, Shenzhen Nanshan, Chengdu Wuhou."""


def synthetic_insured(count: int, *, seed: int = 4) -> list[Insured]:
    """`count` reproducible synthetic insured persons with valid ID numbers."""
    rng = random.Random(seed)  # noqa: S311 - synthetic test identities, not secrets
    people: list[Insured] = []
    for _ in range(count):
        region = rng.choice(REGIONS)
        year = rng.randint(1935, 2010)
        birth = f"{year:04d}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        first17 = f"{region}{birth}{rng.randint(0, 999):03d}"
        name = rng.choice(_SURNAMES) + "".join(rng.choice(_GIVEN) for _ in range(rng.randint(1, 2)))
        people.append(Insured(name, first17 + id_check_digit(first17), region))
    return people


# ---------------------------------------------------------------------------------------------------- the platform


@dataclass(slots=True)
class _IssuedCode:
    account: str
    issued_at: float
    decoded: bool = False


@dataclass(slots=True)
class _Token:
    account: str
    context: TerminalContext
    expires_at: float
    consumed: bool = False


@dataclass(slots=True)
class PlatformStats:
    """What happened at the simulated platform (tests and the demo read it; no personal data)."""

    codes_issued: int = 0
    decoded: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    consumed: int = 0


class EVoucherSimulator:
    """The national platform plus the citizens' phones, in process. Thread-safe.

    `reachable = False` simulates an outage (every call raises `PlatformUnreachableError`). `designated_orgs`, when
    given, is the set of institution codes allowed to call (others get `NotAuthorizedError`).
    """

    def __init__(
        self,
        clock: Clock,
        *,
        secret: bytes | None = None,
        code_ttl_s: float = CODE_TTL_S,
        token_ttl_s: float = TOKEN_TTL_S,
        designated_orgs: Collection[str] | None = None,
    ) -> None:
        self._clock = clock
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self._code_ttl_s = code_ttl_s
        self._token_ttl_s = token_ttl_s
        self._designated = frozenset(designated_orgs) if designated_orgs is not None else None
        self._lock = threading.Lock()
        self._accounts: dict[str, Insured] = {}
        self._codes: dict[bytes, _IssuedCode] = {}
        self._tokens: dict[str, _Token] = {}
        self.reachable = True
        self.stats = PlatformStats()

    # ------------------------------------------------------------------ the citizen's side (the phone app)

    def enrol(self, person: Insured) -> str:
        """Activate a person's e-voucher; returns the account id the phone uses to fetch codes."""
        with self._lock:
            account = f"acct-{len(self._accounts) + 1:06d}"
            self._accounts[account] = person
            return account

    def enrol_all(self, people: Sequence[Insured]) -> list[str]:
        return [self.enrol(p) for p in people]

    def issue_code(self, account: str) -> str:
        """The dynamic code the phone shows now (the app refreshes it; each call is a new code)."""
        with self._lock:
            if account not in self._accounts:
                raise KeyError(account)
            nonce = secrets.token_bytes(_NONCE_BYTES)
            now = self._clock.now().timestamp()
            issued = int(now)
            self._forget_before(now - self._code_ttl_s - CLOCK_SKEW_S)
            self._codes[nonce] = _IssuedCode(account, float(issued))
            self.stats.codes_issued += 1
        return self._encode(nonce, issued)

    def forge_code(self, *, issued_at: float | None = None) -> str:
        """A well-shaped code whose tag is made with the WRONG key (what a forger without the secret can do)."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        issued = int(issued_at if issued_at is not None else self._clock.now().timestamp())
        tag = hmac_sm3(secrets.token_bytes(32), self._signed_part(nonce, issued))[:_TAG_BYTES]
        return CODE_PREFIX + base64.b32encode(_BODY.pack(nonce, issued, tag)).decode()

    # ------------------------------------------------------------------ the terminal's side (the SDK)

    def decode(self, code: str, context: TerminalContext) -> EVoucherIdentity:
        """Exchange a code for a single-use ecToken and the holder's identity (`terminal.evoucher.EVoucherPlatform`)."""
        with self._lock:
            try:
                self._check_caller(context)
                nonce, issued = self._verify(code)
                # The issue time is inside the authenticated body, so expiry is decided before the table lookup
                # (and the table can forget codes once they are past their window).
                now = self._clock.now().timestamp()
                if now - issued > self._code_ttl_s:
                    raise CodeExpiredError(f"code is older than {self._code_ttl_s:.0f} s")
                if issued - now > CLOCK_SKEW_S:
                    raise CodeInvalidError("code is stamped in the future")
                issued_code = self._codes.get(nonce)
                if issued_code is None:
                    raise CodeInvalidError("code was never issued by this platform")
                if issued_code.decoded:
                    raise CodeReplayedError("code was already decoded")
            except (CodeInvalidError, CodeMalformedError, CodeReplayedError, CodeExpiredError) as exc:
                self._count(type(exc).__name__)
                raise
            issued_code.decoded = True
            token = secrets.token_hex(EC_TOKEN_LENGTH // 2)
            self._tokens[token] = _Token(issued_code.account, context, now + self._token_ttl_s)
            self.stats.decoded += 1
            person = self._accounts[issued_code.account]
        return EVoucherIdentity(
            ec_token=token,
            name=person.name,
            id_type=person.id_type,
            id_number=person.id_number,
            insured_region=person.insured_region,
        )

    def consume(self, ec_token: str, business: BusinessType, context: TerminalContext) -> ConsumeReceipt:
        """Use a token for one business call; a token works once, before its expiry, from the terminal that got it."""
        with self._lock:
            self._check_caller(context)
            token = self._tokens.get(ec_token)
            if token is None or token.context != context:
                self._count("TokenInvalidError")
                raise TokenInvalidError("token unknown to the platform or issued to another terminal")
            if token.consumed:
                self._count("TokenUsedError")
                raise TokenUsedError("token was already used")
            if self._clock.now().timestamp() > token.expires_at:
                self._count("TokenInvalidError")
                raise TokenInvalidError("token has expired")
            token.consumed = True
            self.stats.consumed += 1
            return ConsumeReceipt(token_ref(ec_token), business, f"SIMTX{self.stats.consumed:010d}")

    @property
    def live_codes(self) -> int:
        """Codes the platform still remembers (bounded: expired ones are forgotten as new ones are issued)."""
        with self._lock:
            return len(self._codes)

    # ------------------------------------------------------------------ internals

    def _check_caller(self, context: TerminalContext) -> None:
        if not self.reachable:
            raise PlatformUnreachableError("simulated outage: the national platform does not answer")
        if self._designated is not None and context.org_code not in self._designated:
            self._count("NotAuthorizedError")
            raise NotAuthorizedError("institution is not designated")

    def _forget_before(self, cutoff: float) -> None:
        # Expired codes are refused from their authenticated stamp alone; the table only needs the live ones.
        for nonce in [n for n, c in self._codes.items() if c.issued_at < cutoff]:
            del self._codes[nonce]
        for token in [t for t, k in self._tokens.items() if k.expires_at < cutoff]:
            del self._tokens[token]

    def _count(self, name: str) -> None:
        self.stats.refused[name] = self.stats.refused.get(name, 0) + 1

    def _signed_part(self, nonce: bytes, issued: int) -> bytes:
        return CODE_PREFIX.encode() + nonce + struct.pack(">I", issued)

    def _encode(self, nonce: bytes, issued: int) -> str:
        tag = hmac_sm3(self._secret, self._signed_part(nonce, issued))[:_TAG_BYTES]
        return CODE_PREFIX + base64.b32encode(_BODY.pack(nonce, issued, tag)).decode()

    def _verify(self, code: str) -> tuple[bytes, float]:
        if len(code) != CODE_LENGTH or not code.startswith(CODE_PREFIX):
            raise CodeMalformedError(f"expected {CODE_LENGTH} characters starting {CODE_PREFIX}")
        try:
            body = base64.b32decode(code[len(CODE_PREFIX) :], casefold=False)
        except (binascii.Error, ValueError) as exc:
            raise CodeMalformedError("code body is not base32") from exc
        if len(body) != _BODY.size:  # base32 padding can make a code of the right length decode short
            raise CodeMalformedError(f"code body decodes to {len(body)} bytes, not {_BODY.size}")
        nonce, issued, tag = _BODY.unpack(body)
        expected = hmac_sm3(self._secret, self._signed_part(nonce, issued))[:_TAG_BYTES]
        if not mac_equal(expected, tag):
            raise CodeForgedError("code tag does not verify")
        return nonce, float(issued)
