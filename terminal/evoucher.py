"""The 医保电子凭证 (medical-insurance e-voucher, "医保码") at the kiosk: the seam the national SDK plugs into, and the
service the kiosk's identity step calls with the code TEXT (from the camera decode or the serial QR scanner).

Owns:
  * `EVoucherPlatform`, the Protocol the real SDK adapter (or `hardware_sim.evoucher`) implements: `decode` a code
    into an `EVoucherIdentity` (a single-use 40-character `ec_token` plus identity fields), `consume` the token for
    one business call;
  * the typed error tree the adapter translates the SDK's errors into (`EVoucherError` and below);
  * `EVoucherService`: local shape check, the platform call, the audit event of every attempt, and THE OFFLINE
    POLICY (docs/evoucher.md):

        A dynamic e-voucher code can be validated only by the national platform, is single-use and expires in about
        a minute. So when the platform cannot be reached the kiosk must NOT treat the code as identity, must NOT
        settle with it and must NOT queue it for later (by the time the link is back it has expired; a queued code
        is an unverified identity claim). The citizen is told plainly (Chinese and English), is offered the
        offline-capable paths (ID card + face, social-security card + face), and the refused attempt is recorded
        as an audit event without the code text or any identity field.

It must never log or record the code text, a name, an ID number or the full `ec_token` (a short SM3 reference of
the token is what logs and events carry), never retry a code (a retry of a one-shot code is a replay), and never
import `hardware_sim` (the composition root passes the platform in).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, Literal, Protocol

from protocol import AuditEvent, AuditOutcome, Clock, SystemClock
from protocol.gm.sm3 import sm3_digest
from terminal.errors import TerminalError

logger = logging.getLogger(__name__)

EC_TOKEN_LENGTH: Final = 40

CODE_PATTERN: Final = re.compile(r"[0-9A-Za-z+/=_.:\-]{16,512}")
"""What a dynamic e-voucher code may look like before it is worth a platform call: printable ASCII without spaces,
16..512 characters. Deliberately loose (the real code format is the SDK's business); it only keeps other codes
(a URL with spaces, a drug's EAN-13, an empty scan) from reaching the platform. Adapters may pass a stricter one."""


# ---------------------------------------------------------------------------------------------------- errors


class EVoucherError(TerminalError):
    """Base of the e-voucher errors; messages never carry the code text or identity data."""


class CodeMalformedError(EVoucherError):
    """The text is not shaped like an e-voucher code (checked locally, never sent to the platform)."""


class CodeInvalidError(EVoucherError):
    """The platform does not recognise the code: forged (bad MAC), corrupted, or never issued."""


class CodeForgedError(CodeInvalidError):
    """The code's authentication tag does not verify: someone made or altered it."""


class CodeExpiredError(EVoucherError):
    """The code's validity window (about a minute) is over: the citizen refreshes it on the phone."""


class CodeReplayedError(EVoucherError):
    """The code was already decoded once; a dynamic code is one-shot."""


class TokenUsedError(EVoucherError):
    """The ecToken was already consumed by a business call (single-use)."""


class TokenInvalidError(EVoucherError):
    """The ecToken is unknown to the platform or its validity is over."""


class NotAuthorizedError(EVoucherError):
    """The platform does not accept this terminal/institution (not designated, suspended)."""


class PlatformUnreachableError(EVoucherError):
    """No answer from the national platform (network down, timeout, platform outage): the offline policy applies."""


# ---------------------------------------------------------------------------------------------------- the seam


class IdType(StrEnum):
    """Certificate types of the insured (the national standard's code list; the two a kiosk meets)."""

    RESIDENT_ID = "01"
    """居民身份证 (2nd-generation ID card number, 18 characters)."""
    FOREIGNER_PERMANENT = "08"
    """外国人永久居留身份证."""


class BusinessType(StrEnum):
    """What the ecToken is consumed for (one token, one business call)."""

    PURCHASE = "purchase"
    """Drug purchase settlement (购药结算)."""
    PROXY_PURCHASE = "proxy_purchase"
    """Purchase on behalf of another insured person (代购), with the holder's own code."""
    QUERY = "query"
    """Balance / record query."""


@dataclass(frozen=True, slots=True)
class TerminalContext:
    """Who is asking: the designated institution (定点机构编码) and the terminal. Sent with every platform call."""

    org_code: str
    device_id: str


@dataclass(frozen=True, slots=True, repr=False)
class EVoucherIdentity:
    """The platform's answer to a decoded code. Personal data: keep it in memory for the transaction only.

    `repr` masks everything, so an accidental `%r` in a log line leaks nothing.
    """

    ec_token: str
    name: str
    id_type: IdType
    id_number: str
    insured_region: str
    """6-digit administrative division code of the insured's 医保统筹区."""

    @property
    def token_ref(self) -> str:
        return token_ref(self.ec_token)

    @property
    def masked_name(self) -> str:
        return mask_name(self.name)

    @property
    def masked_id_number(self) -> str:
        return mask_id_number(self.id_number)

    def __repr__(self) -> str:
        return (
            f"EVoucherIdentity(token_ref={self.token_ref!r}, name={self.masked_name!r}, "
            f"id_number={self.masked_id_number!r}, region={self.insured_region!r})"
        )


@dataclass(frozen=True, slots=True)
class ConsumeReceipt:
    """The platform's acknowledgement of one business call on a token."""

    token_ref: str
    business: BusinessType
    serial: str
    """The platform's transaction serial (opaque, not personal)."""


class EVoucherPlatform(Protocol):
    """The national e-voucher SDK as the kiosk sees it. Implementations translate every SDK/network error into the
    `EVoucherError` tree (`raise ... from exc`), apply their own timeout (raising `PlatformUnreachableError`), and
    never retry `decode` on their own: a resent code is a replay."""

    def decode(self, code: str, context: TerminalContext) -> EVoucherIdentity:
        """Exchange a dynamic code for a single-use ecToken and the holder's identity."""
        ...

    def consume(self, ec_token: str, business: BusinessType, context: TerminalContext) -> ConsumeReceipt:
        """Use the ecToken for one business call; a second use raises `TokenUsedError`."""
        ...


# ---------------------------------------------------------------------------------------------------- helpers


def token_ref(ec_token: str) -> str:
    """A short, stable reference of a token for logs and events: the first 12 hex digits of its SM3 digest."""
    return sm3_digest(ec_token.encode()).hex()[:12]


def mask_name(name: str) -> str:
    """张三 -> 张*, 欧阳娜娜 -> 欧***; one-character names -> *."""
    return name[:1] + "*" * (len(name) - 1) if len(name) > 1 else "*"


def mask_id_number(id_number: str) -> str:
    """110105199001011234 -> 1101**********1234 (region prefix and last four only)."""
    if len(id_number) <= 8:
        return "*" * len(id_number)
    return id_number[:4] + "*" * (len(id_number) - 8) + id_number[-4:]


# ---------------------------------------------------------------------------------------------------- the service


class IdentityMethod(StrEnum):
    """The ways a citizen can prove who they are at the kiosk."""

    EVOUCHER = "evoucher"
    ID_CARD_FACE = "id_card_face"
    SOCIAL_SECURITY_CARD_FACE = "ssc_face"


OFFLINE_CAPABLE: Final = (IdentityMethod.ID_CARD_FACE, IdentityMethod.SOCIAL_SECURITY_CARD_FACE)
"""Paths that work without the national platform: the card is read locally and the face is matched on the device."""


class RefusalReason(StrEnum):
    MALFORMED = "malformed"
    INVALID = "invalid"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    TOKEN_USED = "token_used"  # noqa: S105 - a refusal reason, not a secret
    TOKEN_INVALID = "token_invalid"  # noqa: S105 - a refusal reason, not a secret
    NOT_AUTHORIZED = "not_authorized"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class CitizenMessage:
    """What the kiosk shows (and may read aloud): Chinese first, English second."""

    zh: str
    en: str


MESSAGES: Final[dict[RefusalReason, CitizenMessage]] = {
    RefusalReason.MALFORMED: CitizenMessage(
        "这不是医保电子凭证二维码。请在手机上打开医保码后重新扫描。",
        "This is not a medical-insurance e-voucher code. Open your 医保码 on your phone and scan again.",
    ),
    RefusalReason.INVALID: CitizenMessage(
        "医保码无法识别。请在手机上刷新医保码后重新扫描，或改用身份证或社保卡。",
        "The e-voucher code was not recognised. Refresh it on your phone and scan again, or use your ID card or "
        "social-security card.",
    ),
    RefusalReason.EXPIRED: CitizenMessage(
        "医保码已过期（约一分钟有效）。请在手机上刷新后重新扫描。",
        "The e-voucher code has expired (it is valid for about one minute). Refresh it on your phone and scan again.",
    ),
    RefusalReason.REPLAYED: CitizenMessage(
        "这个医保码已经使用过。请在手机上刷新后重新扫描。",
        "This e-voucher code has already been used. Refresh it on your phone and scan again.",
    ),
    RefusalReason.TOKEN_USED: CitizenMessage(
        "本次凭证已使用，请重新扫描医保码。",
        "This e-voucher session was already used. Please scan your code again.",
    ),
    RefusalReason.TOKEN_INVALID: CitizenMessage(
        "本次凭证已失效，请重新扫描医保码。",
        "This e-voucher session is no longer valid. Please scan your code again.",
    ),
    RefusalReason.NOT_AUTHORIZED: CitizenMessage(
        "本终端暂时无法使用医保码，请改用身份证或社保卡，或联系工作人员。",
        "This terminal cannot accept e-voucher codes right now. Please use your ID card or social-security card, "
        "or ask the staff.",
    ),
    RefusalReason.OFFLINE: CitizenMessage(
        "网络暂时中断，医保码需要联网核验，现在无法使用。请改用身份证或社保卡加刷脸，可离线办理。",
        "The network is down. The e-voucher code can only be checked online, so it cannot be used now. Please use "
        "your ID card or social-security card with face verification instead; they work offline.",
    ),
}

_ERRORS: Final[tuple[tuple[type[EVoucherError], RefusalReason], ...]] = (
    (CodeMalformedError, RefusalReason.MALFORMED),
    (CodeInvalidError, RefusalReason.INVALID),
    (CodeExpiredError, RefusalReason.EXPIRED),
    (CodeReplayedError, RefusalReason.REPLAYED),
    (TokenUsedError, RefusalReason.TOKEN_USED),
    (TokenInvalidError, RefusalReason.TOKEN_INVALID),
    (NotAuthorizedError, RefusalReason.NOT_AUTHORIZED),
    (PlatformUnreachableError, RefusalReason.OFFLINE),
)

CodeSource = Literal["camera", "scanner"]


@dataclass(frozen=True, slots=True)
class EVoucherAccepted:
    """The platform vouched for the holder. `identity` is personal data: the flow keeps it for this transaction."""

    identity: EVoucherIdentity
    event: AuditEvent
    accepted: Literal[True] = True


@dataclass(frozen=True, slots=True)
class EVoucherRefused:
    """The code cannot be used. `message` is for the citizen; `alternatives` are the paths to offer instead."""

    reason: RefusalReason
    message: CitizenMessage
    alternatives: tuple[IdentityMethod, ...]
    event: AuditEvent
    accepted: Literal[False] = False


@dataclass(frozen=True, slots=True)
class EVoucherConsumed:
    receipt: ConsumeReceipt
    event: AuditEvent
    accepted: Literal[True] = True


EVoucherOutcome = EVoucherAccepted | EVoucherRefused
EventSink = Callable[[AuditEvent], object]
"""Where the service's audit events go: `lambda e: runtime.record_audits([e])` (durable in the outbox when it
returns). If the sink raises (outbox full), the exception propagates and the caller must treat the attempt as not
done (fail closed): an accepted identity without a trace is not allowed (S-09)."""


def refusal_event(
    reason: RefusalReason, *, source: CodeSource, step: Literal["decode", "consume"], latency_ms: float
) -> AuditEvent:
    """The audit record of a refused e-voucher attempt: the reason, where the code came from and how long the
    platform took. Never the code text, never identity data."""
    return AuditEvent(
        category="identity",
        action=f"evoucher.{step}.refused",
        outcome=AuditOutcome.FAILURE,
        detail={
            "method": IdentityMethod.EVOUCHER.value,
            "reason": reason.value,
            "source": source,
            "offline": reason is RefusalReason.OFFLINE,
            "latency_ms": round(latency_ms, 1),
        },
    )


@dataclass
class EVoucherService:
    """What the kiosk's identity step calls with the text of a scanned code. One per terminal; thread-safe as long
    as the platform adapter is (the service keeps only the time of the last outage)."""

    platform: EVoucherPlatform
    context: TerminalContext
    record: EventSink
    clock: Clock = field(default_factory=SystemClock)
    code_pattern: re.Pattern[str] = CODE_PATTERN
    last_unreachable_at: float | None = field(default=None, init=False)
    """Monotonic time of the last `PlatformUnreachableError`; cleared by the next answer. The UI may use it to
    present the card paths first while the platform is down (it never stops a scan from being tried)."""

    def verify(self, code_text: str, *, source: CodeSource) -> EVoucherOutcome:
        """Check the code's shape, ask the platform, record the attempt; never raises for a refusal (only if the
        event sink fails). Scanner line endings and surrounding spaces are stripped."""
        code = code_text.strip()
        start = time.perf_counter()
        if self.code_pattern.fullmatch(code) is None:
            return self._refuse(RefusalReason.MALFORMED, source, "decode", start)
        try:
            identity = self.platform.decode(code, self.context)
        except EVoucherError as exc:
            return self._refuse(_reason_of(exc), source, "decode", start)
        self.last_unreachable_at = None
        if len(identity.ec_token) != EC_TOKEN_LENGTH:
            # An adapter bug or a changed SDK: refusing is safer than carrying a token of unknown shape.
            logger.error("e-voucher platform returned a token of %d characters", len(identity.ec_token))
            return self._refuse(RefusalReason.INVALID, source, "decode", start)
        latency_ms = (time.perf_counter() - start) * 1000.0
        event = AuditEvent(
            category="identity",
            action="evoucher.decode.accepted",
            outcome=AuditOutcome.SUCCESS,
            subject=identity.token_ref,
            detail={
                "method": IdentityMethod.EVOUCHER.value,
                "source": source,
                "id_type": identity.id_type.value,
                "insured_region": identity.insured_region,
                "latency_ms": round(latency_ms, 1),
            },
        )
        self.record(event)
        logger.info("e-voucher accepted: token %s, %.0f ms", identity.token_ref, latency_ms)
        return EVoucherAccepted(identity, event)

    def consume(
        self, identity: EVoucherIdentity, business: BusinessType, *, source: CodeSource = "camera"
    ) -> EVoucherConsumed | EVoucherRefused:
        """Use the token for one business call. Offline this is refused like `verify` (never queued)."""
        start = time.perf_counter()
        try:
            receipt = self.platform.consume(identity.ec_token, business, self.context)
        except EVoucherError as exc:
            return self._refuse(_reason_of(exc), source, "consume", start)
        self.last_unreachable_at = None
        event = AuditEvent(
            category="identity",
            action="evoucher.consume.accepted",
            outcome=AuditOutcome.SUCCESS,
            subject=receipt.token_ref,
            detail={"business": business.value, "serial": receipt.serial[:64]},
        )
        self.record(event)
        logger.info("e-voucher token %s consumed for %s", receipt.token_ref, business.value)
        return EVoucherConsumed(receipt, event)

    def _refuse(
        self, reason: RefusalReason, source: CodeSource, step: Literal["decode", "consume"], start: float
    ) -> EVoucherRefused:
        latency_ms = (time.perf_counter() - start) * 1000.0
        if reason is RefusalReason.OFFLINE:
            self.last_unreachable_at = self.clock.monotonic()
        event = refusal_event(reason, source=source, step=step, latency_ms=latency_ms)
        self.record(event)
        logger.info("e-voucher %s refused: %s (source %s)", step, reason.value, source)
        # Offline or refused by the platform for this terminal: only the card paths can help. Otherwise a fresh
        # code may work (expired, replayed, unrecognised), so it is offered first, the cards beside it.
        if reason in (RefusalReason.OFFLINE, RefusalReason.NOT_AUTHORIZED):
            alternatives: tuple[IdentityMethod, ...] = OFFLINE_CAPABLE
        else:
            alternatives = (IdentityMethod.EVOUCHER, *OFFLINE_CAPABLE)
        return EVoucherRefused(reason, MESSAGES[reason], alternatives, event)


def _reason_of(exc: EVoucherError) -> RefusalReason:
    for kind, reason in _ERRORS:
        if isinstance(exc, kind):
            return reason
    # An adapter raised the bare base class: unknown failure, treat it as an unrecognised code (fail closed).
    return RefusalReason.INVALID
