"""The view-models' ports implemented over a running terminal (`terminal.runtime.TerminalRuntime`).

Owns the translation from the terminal's flows and device errors into the kiosk's plain outcomes: the QR scanner
plus the e-voucher service (医保码), the face verifier with its live prompts, the ID-card and social-security-card
readers, catalogue search, the maintenance facts (peripherals, outbox, network, versions, last sync), the citizen's
personal queries on the national platform (`RuntimeNational`: the credential read here, the relay's masked answers
turned into display rows) and the one lock every user of the face verifier takes (`face_lock`). Every personal
value leaves here masked. It must never import Kivy or `hardware_sim`, never log personal data, and
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
from datetime import date
from typing import Final, Protocol

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
from protocol.national_query import (
    ContributionsAnswer,
    ContributionView,
    CreditsAnswer,
    CreditView,
    InstitutionsAnswer,
    PersonInfoAnswer,
    SettlementsAnswer,
    SettlementView,
)
from terminal.evoucher import EVoucherAccepted, RefusalReason
from terminal.national_queries import (
    CredentialNotAcceptedError,
    NationalQueries,
    NationalQueryError,
    PersonNotInsuredError,
)
from terminal.runtime import TerminalRuntime
from terminal.verification import FaceOutcome, Prompt
from ui.i18n import text
from ui.viewmodels.ports import (
    NATIONAL_METHODS,
    Guidance,
    IdentityOutcome,
    MaintenanceFacts,
    Method,
    NationalKind,
    NationalOutcome,
    NationalPerson,
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
    """`QueryPort` over the synced catalogues (work offline, DESIGN.md §3). Designated institutions (K-19) are asked
    of the national platform first when the relay is there (its list is the current one) and come from the synced
    catalogue when the platform cannot answer."""

    def __init__(self, runtime: TerminalRuntime, national: NationalClient | None = None) -> None:
        self.runtime = runtime
        if national is None and runtime.server_api is not None:
            national = NationalQueries(runtime.server_api)
        self.national = national

    def search(self, kind: QueryKind, needle: str) -> QueryAnswer:
        if kind is QueryKind.INSTITUTIONS and self.national is not None:
            try:
                found = self.national.institutions(None, needle[:100]).institutions
            except NationalQueryError:
                pass  # the platform cannot answer now: the synced catalogue still can, offline
            else:
                return QueryAnswer(tuple(QueryRow(i.fixmedins_name, i.addr or i.admdvs) for i in found[:QUERY_LIMIT]))
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


# national queries (K-11…K-16)
class NationalClient(Protocol):
    """What `RuntimeNational` asks of the national-platform relay: `terminal.national_queries.NationalQueries` (over
    the server's device API), or any object with the same methods and errors (the screen tour's in-process relay)."""

    def person_info(self, cert_type: str, cert_no: str, *, card_sn: str | None = None) -> PersonInfoAnswer: ...

    def settlements(
        self, query_ref: str, begndate: date | None = None, enddate: date | None = None
    ) -> SettlementsAnswer: ...

    def account_credits(
        self, query_ref: str, begndate: date | None = None, enddate: date | None = None
    ) -> CreditsAnswer: ...

    def contributions(
        self, query_ref: str, begndate: date | None = None, enddate: date | None = None
    ) -> ContributionsAnswer: ...

    def institutions(self, fixmedins_type: str | None = None, fixmedins_name: str = "") -> InstitutionsAnswer: ...


class RuntimeNational:
    """`NationalPort` over the runtime's credential devices and the national-platform relay. The credential (ecToken,
    ID number, card number and card_sn) lives only inside `identify`; the kiosk gets masked display rows and the
    platform's opaque query_ref."""

    def __init__(self, runtime: TerminalRuntime, client: NationalClient | None = None) -> None:
        self.runtime = runtime
        if client is None and runtime.server_api is not None:
            client = NationalQueries(runtime.server_api)
        self.client = client

    def available(self) -> frozenset[Method]:
        if self.client is None:
            return frozenset()
        return RuntimeIdentity(self.runtime).available() & frozenset(NATIONAL_METHODS)

    def identify(self, method: Method, timeout_s: float) -> NationalOutcome:
        client = self.client
        if client is None:
            return NationalOutcome(reason="national.unavailable")
        credential = self._credential(method, timeout_s)
        if isinstance(credential, str):
            return NationalOutcome(reason=credential)
        cert_type, cert_no, card_sn = credential
        try:
            answer = client.person_info(cert_type, cert_no, card_sn=card_sn)
        except CredentialNotAcceptedError:
            return NationalOutcome(reason="national.code_expired" if method is Method.QR else "national.card_refused")
        except PersonNotInsuredError:
            return NationalOutcome(reason="national.not_insured")
        except NationalQueryError:  # unavailable, or a failure the client logged: either way "try later"
            return NationalOutcome(reason="national.unavailable")
        person = answer.person
        return NationalOutcome(
            NationalPerson(person.psn_name_masked, person.certno_masked, _person_rows(answer), answer.query_ref)
        )

    def records(self, kind: NationalKind, query_ref: str) -> QueryAnswer:
        client = self.client
        if client is None:
            return QueryAnswer(reason="national.unavailable")
        try:
            if kind is NationalKind.SETTLEMENTS:
                settled = client.settlements(query_ref).records
                return QueryAnswer(tuple(_settlement_row(s) for s in sorted(settled, key=lambda s: s.setl_time)[::-1]))
            if kind is NationalKind.CREDITS:
                credits_ = client.account_credits(query_ref).records
                return QueryAnswer(tuple(_credit_row(c) for c in sorted(credits_, key=lambda c: c.crdt_date)[::-1]))
            if kind is NationalKind.CONTRIBUTIONS:
                paid = client.contributions(query_ref).records
                return QueryAnswer(tuple(_contribution_row(c) for c in sorted(paid, key=lambda c: c.clct_ym)[::-1]))
        except CredentialNotAcceptedError:
            return QueryAnswer(reason="national.session_lapsed")
        except PersonNotInsuredError:
            return QueryAnswer(reason="national.not_insured")
        except NationalQueryError:
            return QueryAnswer(reason="national.unavailable")
        return QueryAnswer(reason="national.unavailable")  # PERSON is answered by identify, never asked here

    def _credential(self, method: Method, timeout_s: float) -> tuple[str, str, str | None] | str:
        """The 就诊凭证 read with `method` as (mdtrt_cert_type, mdtrt_cert_no, card_sn), or a reason key."""
        devices = self.runtime.devices
        if devices is None:
            return "reason.unavailable"
        if method is Method.QR:
            service = self.runtime.evoucher
            if devices.qr_scanner is None or service is None:
                return "reason.unavailable"
            try:
                code = devices.qr_scanner.read_code(timeout_s)
            except ScanTimeoutError:
                return "reason.timeout"
            except MalformedScanError:
                return "reason.code_invalid"
            except QrScannerError:
                return "reason.device_fault"
            outcome = service.verify(code.text, source="scanner")
            if not isinstance(outcome, EVoucherAccepted):
                if outcome.reason is RefusalReason.EXPIRED:
                    return "national.code_expired"
                return _REFUSALS.get(outcome.reason, "reason.unavailable")
            return ("01", outcome.identity.ec_token, None)
        try:
            if method is Method.ID_CARD and devices.id_card_reader is not None:
                return ("02", devices.id_card_reader.read_card(timeout_s).id_number, None)
            if method is Method.SS_CARD and devices.ss_card_reader is not None:
                card = devices.ss_card_reader.read_card(timeout_s)
                return ("03", card.card_number, card.card_identification_code)
        except CardReaderError as exc:
            return _card_reason(exc)
        return "reason.unavailable"


def _code(prefix: str, value: str, known: frozenset[str]) -> str:
    return text(f"{prefix}.{value}" if value in known else f"{prefix}.other")


def _insutype(value: str) -> str:
    return _code("insutype", value, frozenset({"310", "390"}))


def _person_rows(answer: PersonInfoAnswer) -> tuple[QueryRow, ...]:
    person = answer.person
    gender = _code("gender", person.gend, frozenset({"1", "2"}))
    rows = [
        QueryRow(
            text("national.row.name", name=person.psn_name_masked),
            text("national.row.id", id=person.certno_masked),
        ),
        QueryRow(text("national.row.age", age=person.age, gender=gender)),
    ]
    for insurance in answer.insurance:
        status = _code("insu_stas", insurance.psn_insu_stas, frozenset({"1", "2", "4"}))
        place = insurance.emp_name or insurance.insuplc_admdvs
        rows.append(
            QueryRow(
                text("national.row.insurance", insutype=_insutype(insurance.insutype)),
                text("national.row.insurance_detail", status=status, since=insurance.psn_insu_date, place=place),
            )
        )
        rows.append(
            QueryRow(
                text("national.row.balance", balance=insurance.balance),
                text("national.row.balance_detail", insutype=_insutype(insurance.insutype)),
            )
        )
    return tuple(rows)


def _settlement_row(s: SettlementView) -> QueryRow:
    return QueryRow(
        text("national.row.settlement", day=s.setl_time[:10], institution=s.fixmedins_name),
        text(
            "national.row.settlement_detail",
            total=s.medfee_sumamt,
            fund=s.fund_pay_sumamt,
            account=s.acct_pay,
            cash=s.psn_cash_pay,
        ),
    )


def _credit_row(c: CreditView) -> QueryRow:
    kind = _code("crdt_type", c.crdt_type, frozenset({"1", "2"}))
    return QueryRow(
        text("national.row.credit", month=_month(c.crdt_ym), amount=c.crdt_amt),
        text("national.row.credit_detail", kind=kind, day=c.crdt_date, balance=c.balc),
    )


def _contribution_row(c: ContributionView) -> QueryRow:
    kind = _code("clct_type", c.clct_type, frozenset({"10", "31"}))
    return QueryRow(
        text("national.row.contribution", month=_month(c.clct_ym), person=c.psn_clct_amt),
        text("national.row.contribution_detail", employer=c.emp_clct_amt, base=c.clct_base, kind=kind),
    )


def _month(ym: str) -> str:
    """'202605' → '2026-05' (the platform's 年月); anything else as it came."""
    return f"{ym[:4]}-{ym[4:]}" if len(ym) == 6 and ym.isdigit() else ym
