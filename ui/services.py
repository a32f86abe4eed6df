"""The view-models' ports implemented over a running terminal (`terminal.runtime.TerminalRuntime`).

Owns the translation from the terminal's flows and device errors into the kiosk's plain outcomes: the QR scanner
plus the e-voucher service (医保码), the face verifier with its live prompts, the ID-card and social-security-card
readers, catalogue search, and the maintenance facts (peripherals, outbox, network, versions, last sync). Every
personal value leaves here masked. It must never import Kivy or `hardware_sim`, never log personal data, and
never keep a card's data after the outcome is built.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from drivers.card_reader import (
    CardReaderError,
    CardRefusedError,
    InvalidCardDataError,
    NoCardError,
    ReaderTimeoutError,
    mask_name,
    mask_number,
)
from drivers.qr_scanner import MalformedScanError, QrScannerError, ScanTimeoutError
from protocol.catalogue import CatalogueKind, DesignatedInstitution, DrugEntry, TreatmentItem
from terminal.evoucher import EVoucherAccepted, RefusalReason
from terminal.runtime import TerminalRuntime
from terminal.verification import FaceOutcome, Prompt
from ui.viewmodels.ports import (
    Guidance,
    IdentityOutcome,
    MaintenanceFacts,
    Method,
    PeripheralFact,
    QueryAnswer,
    QueryKind,
    QueryRow,
    VerifiedPerson,
)

logger = logging.getLogger(__name__)

ADMIN_HASH_ENV: Final = "YIBAO_KIOSK_ADMIN_HASH"
"""An argon2id hash of the maintenance password, e.g. from
`python -c "from argon2 import PasswordHasher as H; print(H().hash('…'))"`. Without it the maintenance screen cannot
be opened from the kiosk."""
QUERY_LIMIT: Final = 60

_REFUSALS: Final[dict[RefusalReason, str]] = {
    RefusalReason.MALFORMED: "reason.code_invalid",
    RefusalReason.INVALID: "reason.code_invalid",
    RefusalReason.EXPIRED: "reason.code_expired",
    RefusalReason.REPLAYED: "reason.code_used",
    RefusalReason.TOKEN_USED: "reason.code_used",
    RefusalReason.TOKEN_INVALID: "reason.code_invalid",
    RefusalReason.NOT_AUTHORIZED: "reason.unavailable",
    RefusalReason.OFFLINE: "reason.platform_unreachable",
}
_FACE_REASONS: Final[dict[FaceOutcome, str]] = {
    FaceOutcome.NO_MATCH: "reason.face_no_match",
    FaceOutcome.LIVENESS_FAILED: "reason.face_liveness",
    FaceOutcome.TIMEOUT: "reason.face_timeout",
    FaceOutcome.CAMERA_FAULT: "reason.device_fault",
    FaceOutcome.NOT_ENROLLED: "reason.not_enrolled",
}
_KINDS: Final[dict[QueryKind, CatalogueKind]] = {
    QueryKind.DRUGS: CatalogueKind.DRUG,
    QueryKind.TREATMENTS: CatalogueKind.TREATMENT,
    QueryKind.INSTITUTIONS: CatalogueKind.INSTITUTION,
}


def _card_reason(exc: CardReaderError) -> str:
    if isinstance(exc, NoCardError | ReaderTimeoutError):
        return "reason.no_card"
    if isinstance(exc, CardRefusedError | InvalidCardDataError):
        return "reason.card_unreadable"
    return "reason.device_fault"


_FACE_LOCKS: Final[weakref.WeakKeyDictionary[object, threading.Lock]] = weakref.WeakKeyDictionary()
_FACE_LOCKS_GUARD: Final = threading.Lock()


def face_lock(verifier: object) -> threading.Lock:
    """The one lock serialising every use of `verifier` (a `FaceVerifier` is not thread-safe: one camera, one
    attempt state, one `prompt` hook). The citizen's face check (`RuntimeIdentity`) and a cash register's request
    (`ui.pos_link.KioskBuyerVerifier`) run on different threads and may arrive at the same moment; both take this
    lock, so one waits for the other instead of interleaving frames and prompts."""
    with _FACE_LOCKS_GUARD:
        lock = _FACE_LOCKS.get(verifier)
        if lock is None:
            lock = _FACE_LOCKS[verifier] = threading.Lock()
        return lock


class RuntimeIdentity:
    """`IdentityPort` over the runtime's devices, e-voucher service and face verifier."""

    def __init__(self, runtime: TerminalRuntime) -> None:
        self.runtime = runtime

    def available(self) -> frozenset[Method]:
        devices = self.runtime.devices
        methods: set[Method] = set()
        if devices is not None:
            if devices.qr_scanner is not None and self.runtime.evoucher is not None:
                methods.add(Method.QR)
            if devices.id_card_reader is not None:
                methods.add(Method.ID_CARD)
            if devices.ss_card_reader is not None:
                methods.add(Method.SS_CARD)
        if self.runtime.face is not None:
            methods.add(Method.FACE)
        return frozenset(methods)

    def scan_qr(self, timeout_s: float) -> IdentityOutcome:
        devices, service = self.runtime.devices, self.runtime.evoucher
        if devices is None or devices.qr_scanner is None or service is None:
            return IdentityOutcome(False, reason="reason.unavailable")
        try:
            code = devices.qr_scanner.read_code(timeout_s)
        except ScanTimeoutError:
            return IdentityOutcome(False, reason="reason.timeout")
        except MalformedScanError:
            return IdentityOutcome(False, reason="reason.code_invalid")
        except QrScannerError:
            return IdentityOutcome(False, reason="reason.device_fault")
        outcome = service.verify(code.text, source="scanner")
        if isinstance(outcome, EVoucherAccepted):
            who = outcome.identity
            return IdentityOutcome(True, VerifiedPerson(who.masked_name, who.masked_id_number, Method.QR))
        return IdentityOutcome(False, reason=_REFUSALS.get(outcome.reason, "reason.unavailable"))

    def read_id_card(self, timeout_s: float) -> IdentityOutcome:
        devices = self.runtime.devices
        if devices is None or devices.id_card_reader is None:
            return IdentityOutcome(False, reason="reason.unavailable")
        try:
            card = devices.id_card_reader.read_card(timeout_s)
        except CardReaderError as exc:
            return IdentityOutcome(False, reason=_card_reason(exc))
        shown = card.masked()
        return IdentityOutcome(True, VerifiedPerson(shown["name"], shown["id_number"], Method.ID_CARD))

    def read_ss_card(self, timeout_s: float) -> IdentityOutcome:
        devices = self.runtime.devices
        if devices is None or devices.ss_card_reader is None:
            return IdentityOutcome(False, reason="reason.unavailable")
        try:
            card = devices.ss_card_reader.read_card(timeout_s)
        except CardReaderError as exc:
            return IdentityOutcome(False, reason=_card_reason(exc))
        return IdentityOutcome(True, VerifiedPerson(mask_name(card.name), mask_number(card.ss_number), Method.SS_CARD))

    def verify_face(self, guidance: Callable[[Guidance], None]) -> IdentityOutcome:
        """1:N against the terminal's gallery (citizens who enrolled their face here); the face pipeline's own
        prompts (distance, light, the liveness challenge) are passed on live."""
        verifier = self.runtime.face
        if verifier is None:
            return IdentityOutcome(False, reason="reason.unavailable")
        with face_lock(verifier):
            previous = verifier.prompt

            def prompt(p: Prompt) -> None:
                # Shown first: the citizen must see (and hear) the instruction before anything waits on them.
                guidance(Guidance(p.zh, p.en, is_challenge=p.challenge is not None))
                previous(p)

            verifier.prompt = prompt
            try:
                decision = verifier.identify()
            finally:
                verifier.prompt = previous
        if decision.accepted and decision.subject_ref is not None:
            # The gallery holds pseudonymous references only; the name is not known to this terminal.
            return IdentityOutcome(True, VerifiedPerson("***", "****" + decision.subject_ref[-4:], Method.FACE))
        return IdentityOutcome(False, reason=_FACE_REASONS.get(decision.outcome, "reason.face_no_match"))


class RuntimeQueries:
    """`QueryPort` over the synced catalogues (work offline, DESIGN.md §3)."""

    def __init__(self, runtime: TerminalRuntime) -> None:
        self.runtime = runtime

    def search(self, kind: QueryKind, needle: str) -> QueryAnswer:
        store = self.runtime.catalogue
        if store is None:
            return QueryAnswer(reason="queries.offline")
        result = store.search(needle, _KINDS[kind], limit=QUERY_LIMIT)
        rows = []
        for hit in result.hits:
            entry = store.get(hit.kind, hit.code)
            rows.append(_row(entry) if entry is not None else QueryRow(hit.name))
        return QueryAnswer(tuple(rows))


def _row(entry: DrugEntry | TreatmentItem | DesignatedInstitution) -> QueryRow:
    if isinstance(entry, DrugEntry):
        return QueryRow(entry.name, f"{entry.specification} · {entry.package} · {entry.category.value}类")
    if isinstance(entry, TreatmentItem):
        price = "" if entry.price_fen is None else f" · {entry.price_fen / 100:.2f} 元/{entry.unit}"
        return QueryRow(entry.name, f"{entry.category.value}类{price}")
    return QueryRow(entry.name, entry.address or entry.region_code)


@dataclass
class RuntimeMaintenance:
    """`MaintenancePort` over the runtime; the admin credential is an argon2 hash (never the password)."""

    runtime: TerminalRuntime
    admin_hash: str | None = field(default_factory=lambda: os.environ.get(ADMIN_HASH_ENV) or None)
    _last_acked: int = -1
    _last_sync_mono: float | None = None

    def admin_ok(self, credential: str) -> bool:
        if not self.admin_hash or not credential:
            hmac.compare_digest(credential.encode(), b"-")  # same work either way
            return False
        try:
            return PasswordHasher().verify(self.admin_hash, credential)
        except (VerificationError, InvalidHashError):
            return False

    def facts(self) -> MaintenanceFacts:
        runtime = self.runtime
        stats = runtime.outbox.stats()
        now = runtime.clock.monotonic()
        if stats.acked_total != self._last_acked:
            if self._last_acked >= 0:
                self._last_sync_mono = now  # the server acknowledged more since we last looked
            self._last_acked = stats.acked_total
        peripherals = tuple(
            PeripheralFact(s.name, s.kind.value, s.state.value, s.detail or "") for s in runtime.health.snapshot()
        )
        return MaintenanceFacts(
            device_id=runtime.config.device_id,
            software_version=runtime.config.software_version,
            config_version=runtime.config.config_version,
            peripherals=peripherals,
            outbox_depth=stats.depth,
            outbox_oldest_age_s=stats.oldest_age_s,
            online=runtime.sync.link.is_connected(),
            last_sync_age_s=None if self._last_sync_mono is None else now - self._last_sync_mono,
            model_versions=dict(runtime.model_versions),
        )
