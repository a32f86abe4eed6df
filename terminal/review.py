"""Prescription review on the terminal (P-03…P-06, H-07; docs/prescriptions.md): the pending inbox and the review.

Owns:

* `PrescriptionInbox`, a small SQLite file beside the outbox holding the institution's pending prescriptions as the
  server last served them (`GET /device/v1/prescriptions/pending`) and the ones reviewed here (P-03: pending and
  reviewed). A refresh replaces the pending set; a prescription decided here stays 'reviewed' even while the server
  still lists it (the decision may be queued offline), and reviewed rows are pruned after `REVIEWED_KEEP_DAYS`;
* `InboxRefresher`, one worker thread that refreshes the inbox when asked (`prescriptions_pending` notice, start) and
  every `poll_s` as a safety net, logging once on failure and once on recovery; `PrescriptionsPendingHandler` is the
  notice's `CommandHandler` (it only wakes the worker: the downlink thread never waits on HTTP);
* `ReviewDesk`, the Kivy-free review flow: a signed-in pharmacist (`SignedInPharmacist`) opens a pending
  prescription, the drug rules the terminal holds are evaluated for its lines (`ReviewRules`, i.e. the
  `terminal.catalogue.CatalogueStore`), every warning must be acknowledged and no rule may block before approving,
  the decision is confirmed by the pharmacist's face (1:1 against their template, with liveness), and the signed
  `review_decision` record goes into the outbox (`TerminalRuntime.record_signed`), so it works offline.

It must never store or log a name, an ID number, a face or a template (the inbox holds what the server serves:
masked names and pseudonymous references), and never record a decision the face check did not confirm.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Protocol

from pydantic import JsonValue, ValidationError

from models.types import Embedding
from protocol import Clock, CommandKind, CommandOutcome, ContractError, DeviceCommand, Envelope, SignedRecordKind
from protocol.catalogue import DrugEntry
from protocol.drug_rules import (
    DrugRuleSet,
    Evaluation,
    Finding,
    HistoryLine,
    PersonFacts,
    Proposal,
    ProposedLine,
    RuleAction,
    RuleStage,
)
from protocol.prescription import (
    FaceConfirmation,
    FindingShown,
    HistoryUse,
    PendingPrescription,
    PendingPrescriptions,
    Prescription,
    ReviewDecisionRecord,
    ReviewedPrescriptions,
    ReviewOutcome,
    parse_pending,
    parse_reviewed,
)
from terminal.commands import CommandHandler, HandlerOutcome
from terminal.errors import TerminalError
from terminal.purchase_history import PurchaseHistorySource
from terminal.verification import FaceDecision

logger = logging.getLogger(__name__)

_PENDING_FIELDS: Final = set(PendingPrescription.model_fields)
"""A reviewed item's fields that make the pending form the inbox stores."""

PENDING_PATH: Final = "/device/v1/prescriptions/pending"
REVIEWED_PATH: Final = "/device/v1/prescriptions/reviewed"
INBOX_FILE: Final = "prescriptions.db"
"""The inbox file, in the outbox's folder."""
REVIEWED_KEEP_DAYS: Final = 30
"""Reviewed prescriptions stay viewable on the terminal this long (the server keeps them for good)."""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS prescription (
    prescription_id INTEGER PRIMARY KEY,
    rx_no           TEXT NOT NULL,
    institution     TEXT NOT NULL,
    body            TEXT NOT NULL,
    fetched_at      TEXT NOT NULL,
    decision        TEXT,
    decided_at      TEXT,
    message_id      TEXT,
    reviewed_on     TEXT,
    pharmacist_code TEXT
) STRICT
"""
_ADDED_COLUMNS: Final = (("reviewed_on", "TEXT"), ("pharmacist_code", "TEXT"))
"""Columns a file written before they existed lacks (added when it is opened)."""
_SELECT_PENDING: Final = (
    "SELECT body, decision, decided_at, message_id, reviewed_on, pharmacist_code FROM prescription "
    "WHERE decision IS NULL ORDER BY prescription_id"
)
_SELECT_REVIEWED: Final = (
    "SELECT body, decision, decided_at, message_id, reviewed_on, pharmacist_code FROM prescription "
    "WHERE decision IS NOT NULL ORDER BY decided_at DESC, prescription_id"
)
_SELECT_ONE: Final = (
    "SELECT body, decision, decided_at, message_id, reviewed_on, pharmacist_code FROM prescription "
    "WHERE prescription_id = ?"
)


class ReviewError(TerminalError):
    """The review cannot go on as asked; the message says why (never with personal data)."""


class InboxState(StrEnum):
    PENDING = "pending"
    REVIEWED = "reviewed"
    """Decided on this terminal (the decision is in the outbox, or already on the server), or on another terminal
    of the pharmacy (`InboxItem.reviewed_on` names it)."""


@dataclass(frozen=True, slots=True)
class InboxItem:
    pending: PendingPrescription
    state: InboxState
    decision: ReviewOutcome | None = None
    decided_at: datetime | None = None
    message_id: str | None = None
    """The outbox message carrying the decision, when it was made here."""
    reviewed_on: str | None = None
    """The terminal the decision was made on, as the server reported it (None: made here, not yet reported)."""
    pharmacist_code: str | None = None
    """审方医保药师代码, as the server reported it."""

    @property
    def prescription(self) -> Prescription:
        return self.pending.prescription

    @property
    def prescription_id(self) -> int:
        return self.pending.prescription_id


@dataclass(frozen=True, slots=True)
class RefreshResult:
    added: int
    removed: int
    pending: int
    total_on_server: int
    reviewed_elsewhere: int = 0
    """Reviews made on other terminals of the pharmacy that this refresh added to the reviewed list."""


class PrescriptionInbox:
    """The inbox file. Thread-safe: one connection behind a lock (the refresher writes, the review flow reads)."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._db = conn
        self._path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> PrescriptionInbox:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(_SCHEMA)
            present = {str(row[1]) for row in conn.execute("PRAGMA table_info(prescription)")}
            for name, kind in _ADDED_COLUMNS:
                if name not in present:
                    conn.execute(f"ALTER TABLE prescription ADD COLUMN {name} {kind}")
        except sqlite3.Error as exc:
            raise ReviewError(f"cannot open the prescription inbox {path}: {exc}") from exc
        return cls(conn, path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise ReviewError(f"prescription inbox {self._path}: {exc}") from exc

    def replace_pending(self, document: PendingPrescriptions, *, now: datetime) -> RefreshResult:
        """Make the pending set what the server served: new ones added, ones it no longer lists dropped (decided on
        another terminal, or withdrawn); ones decided here stay reviewed. Old reviewed rows are pruned."""
        served = {item.prescription_id: item for item in document.items}
        with self._transaction() as tx:
            rows = tx.execute("SELECT prescription_id, decision, institution FROM prescription").fetchall()
            held_pending = {int(r[0]) for r in rows if r[1] is None}
            held = {int(r[0]) for r in rows}
            gone = held_pending - served.keys()
            if len(document.items) < document.total and document.items:
                # A capped page: only drop what is older than the newest served (the rest may be past the cap).
                newest = max(item.prescription_id for item in document.items)
                gone = {pid for pid in gone if pid < newest}
            # The terminal moved to another institution: the old one's pending prescriptions are not its to review.
            gone |= {int(r[0]) for r in rows if r[1] is None and r[2] != document.institution_code}
            tx.executemany("DELETE FROM prescription WHERE prescription_id = ?", [(pid,) for pid in sorted(gone)])
            added = [item for pid, item in served.items() if pid not in held]
            tx.executemany(
                "INSERT INTO prescription (prescription_id, rx_no, institution, body, fetched_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (i.prescription_id, i.prescription.rx_no, i.institution_code, i.model_dump_json(), now.isoformat())
                    for i in added
                ],
            )
            cutoff = (now - timedelta(days=REVIEWED_KEEP_DAYS)).isoformat()
            tx.execute("DELETE FROM prescription WHERE decision IS NOT NULL AND decided_at < ?", (cutoff,))
            pending = tx.execute("SELECT count(*) FROM prescription WHERE decision IS NULL").fetchone()[0]
        return RefreshResult(len(added), len(gone), int(pending), document.total)

    def merge_reviewed(self, document: ReviewedPrescriptions, *, now: datetime) -> int:
        """Take in the pharmacy's reviews as the server stores them (P-03): a prescription still pending here that
        another terminal decided becomes reviewed, one this inbox never held is added as reviewed, and a decision
        made here gets the server's confirmation of where and by whom. Returns how many reviews made elsewhere were
        added. Reviews older than `REVIEWED_KEEP_DAYS` are not kept."""
        cutoff = now - timedelta(days=REVIEWED_KEEP_DAYS)
        added = 0
        with self._transaction() as tx:
            held = {
                int(r[0]): r[1] for r in tx.execute("SELECT prescription_id, decision FROM prescription").fetchall()
            }
            for item in document.items:
                if item.reviewed_at < cutoff or item.institution_code != document.institution_code:
                    continue
                values = (item.decision.value, item.reviewed_at.isoformat(), item.device_id, item.pharmacist_code)
                if item.prescription_id not in held:
                    tx.execute(
                        "INSERT INTO prescription (prescription_id, rx_no, institution, body, fetched_at, decision, "
                        "decided_at, reviewed_on, pharmacist_code) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            item.prescription_id,
                            item.prescription.rx_no,
                            item.institution_code,
                            PendingPrescription.model_validate(
                                item.model_dump(include=_PENDING_FIELDS)
                            ).model_dump_json(),
                            now.isoformat(),
                            *values,
                        ),
                    )
                    added += 1
                elif held[item.prescription_id] is None:
                    tx.execute(
                        "UPDATE prescription SET decision = ?, decided_at = ?, reviewed_on = ?, pharmacist_code = ? "
                        "WHERE prescription_id = ?",
                        (*values, item.prescription_id),
                    )
                    added += 1
                else:  # decided here: the server's record says where and by whom (the decision is the same one)
                    tx.execute(
                        "UPDATE prescription SET reviewed_on = ?, pharmacist_code = ? WHERE prescription_id = ?",
                        (item.device_id, item.pharmacist_code, item.prescription_id),
                    )
        return added

    def _items(self, *, reviewed: bool) -> list[InboxItem]:
        query = _SELECT_REVIEWED if reviewed else _SELECT_PENDING
        with self._lock:
            try:
                rows = self._db.execute(query).fetchall()
            except sqlite3.Error as exc:
                raise ReviewError(f"prescription inbox {self._path}: {exc}") from exc
        return [self._item(*row) for row in rows]

    def _item(
        self,
        body: str,
        decision: str | None,
        decided_at: str | None,
        message_id: str | None,
        reviewed_on: str | None = None,
        pharmacist_code: str | None = None,
    ) -> InboxItem:
        try:
            pending = PendingPrescription.model_validate_json(body)
        except ValidationError as exc:  # written by us after validation: only a damaged file gets here
            raise ReviewError(f"prescription inbox {self._path}: a stored prescription is unreadable") from exc
        if decision is None:
            return InboxItem(pending, InboxState.PENDING)
        return InboxItem(
            pending,
            InboxState.REVIEWED,
            ReviewOutcome(decision),
            None if decided_at is None else datetime.fromisoformat(decided_at),
            message_id,
            reviewed_on,
            pharmacist_code,
        )

    def pending(self) -> list[InboxItem]:
        """Pending prescriptions, oldest first (P-03)."""
        return self._items(reviewed=False)

    def reviewed(self) -> list[InboxItem]:
        """Prescriptions of the pharmacy reviewed in the last `REVIEWED_KEEP_DAYS` days, newest first (P-03): here,
        and on its other terminals as of the last refresh."""
        return self._items(reviewed=True)

    def get(self, prescription_id: int) -> InboxItem | None:
        with self._lock:
            try:
                row = self._db.execute(_SELECT_ONE, (prescription_id,)).fetchone()
            except sqlite3.Error as exc:
                raise ReviewError(f"prescription inbox {self._path}: {exc}") from exc
        return None if row is None else self._item(*row)

    def mark_decided(
        self, prescription_id: int, decision: ReviewOutcome, *, decided_at: datetime, message_id: str
    ) -> None:
        with self._transaction() as tx:
            tx.execute(
                "UPDATE prescription SET decision = ?, decided_at = ?, message_id = ? WHERE prescription_id = ?",
                (decision.value, decided_at.isoformat(), message_id, prescription_id),
            )


# ---------------------------------------------------------------------- refreshing from the server


class PendingSource(Protocol):
    """The device-authenticated server API (`terminal.server_api.ServerApi`): a signed GET returning decoded JSON."""

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any: ...


def refresh_inbox(inbox: PrescriptionInbox, source: PendingSource, *, now: datetime) -> RefreshResult:
    """Fetch the institution's pending prescriptions and its recent reviews, and make the inbox hold them
    (`ReviewError` when an answer breaks the contract; the source's own errors pass through)."""
    try:
        pending = parse_pending(source.get_json(PENDING_PATH))
        reviewed = parse_reviewed(source.get_json(REVIEWED_PATH, {"days": str(REVIEWED_KEEP_DAYS)}))
    except ContractError as exc:
        raise ReviewError(str(exc)) from exc
    result = inbox.replace_pending(pending, now=now)
    elsewhere = inbox.merge_reviewed(reviewed, now=now)
    return replace(result, reviewed_elsewhere=elsewhere)


class InboxRefresher:
    """Refreshes the inbox on its own thread when asked, and every `poll_s` in case a notice was missed (every
    `retry_s` while refreshing fails, or while the terminal is not bound).

    `bound` says whether this terminal is bound to an institution now (the runtime reads its binding status). While
    it says no, the refresher does not ask: the server answers an unbound terminal 409 (no institution, so no
    prescriptions), which is the terminal's normal state before its head applies, not a failure to warn about. It
    is said once at debug level; a refusal while bound, or any other failure, is still a warning."""

    def __init__(
        self,
        inbox: PrescriptionInbox,
        source: PendingSource,
        clock: Clock,
        *,
        poll_s: float = 600.0,
        retry_s: float = 30.0,
        bound: Callable[[], bool] | None = None,
    ) -> None:
        self._inbox = inbox
        self._source = source
        self._clock = clock
        self._poll_s = poll_s
        self._retry_s = retry_s
        self._bound = bound
        self._unbound = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.last: RefreshResult | None = None

    def refresh(self) -> RefreshResult:
        """One refresh now, on the caller's thread."""
        result = refresh_inbox(self._inbox, self._source, now=self._clock.now())
        self.last = result
        return result

    def request(self) -> None:
        """Ask for a refresh soon; never blocks."""
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._wake.set()  # refresh at start
            self._thread = threading.Thread(target=self._run, name="rx-inbox", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            # After a failure (no session key yet, server away) or while unbound (the binding decision may come any
            # moment) try again sooner than the safety-net poll.
            soon = self._failing or self._unbound
            self._wake.wait(min(self._retry_s, self._poll_s) if soon else self._poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._bound is not None and not self._bound():
                if not self._unbound:
                    logger.debug("prescription inbox: this terminal is not bound to an institution, nothing to fetch")
                    self._unbound = True
                continue
            self._unbound = False
            try:
                result = self.refresh()
            except Exception as exc:  # noqa: BLE001 - any failure of the source: logged once, retried later
                if not self._failing:
                    logger.warning("prescription inbox refresh failed: %s", type(exc).__name__)
                    self._failing = True
                continue
            if self._failing:
                logger.info("prescription inbox refresh works again")
                self._failing = False
            logger.debug("prescription inbox: %d pending (%d new)", result.pending, result.added)


@dataclass(frozen=True, slots=True)
class PrescriptionsPendingHandler:
    """`prescriptions_pending`: wake the refresher (the notice carries references only)."""

    refresher: InboxRefresher

    def __call__(self, command: DeviceCommand) -> HandlerOutcome:
        self.refresher.request()
        return HandlerOutcome(CommandOutcome.APPLIED, "inbox refresh requested")


def review_handlers(refresher: InboxRefresher) -> dict[CommandKind, CommandHandler]:
    """The handlers to pass to `terminal.commands.default_handlers(..., extra=...)`."""
    return {CommandKind.PRESCRIPTIONS_PENDING: PrescriptionsPendingHandler(refresher)}


# ---------------------------------------------------------------------- the review


class SignedInPharmacist(Protocol):
    """Who is signed in at this terminal as pharmacist (`terminal.pharmacists` builds it): the 医保药师代码 and the
    pharmacist's face template, or None when nobody is signed in."""

    def current(self) -> tuple[str, Embedding] | None: ...


class ReviewRules(Protocol):
    """The drug catalogue and usage rules the terminal holds (`terminal.catalogue.CatalogueStore`)."""

    @property
    def rule_set(self) -> DrugRuleSet | None: ...

    def drug(self, code: str) -> DrugEntry | None: ...

    def evaluate(self, proposal: Proposal) -> Evaluation: ...


class FaceConfirmer(Protocol):
    """1:1 face verification with liveness (`terminal.verification.FaceVerifier`)."""

    def verify_template(self, reference: Embedding, *, subject_ref: str | None = None) -> FaceDecision: ...


RecordSigned = Callable[[SignedRecordKind, dict[str, JsonValue]], Envelope]
"""`TerminalRuntime.record_signed`."""


@dataclass
class ReviewSession:
    """One prescription open for review by one pharmacist: the rule findings and which were acknowledged."""

    item: PendingPrescription
    pharmacist_code: str
    rule_set_version: int | None
    evaluation: Evaluation
    unknown_drugs: tuple[str, ...]
    """Drug codes the held catalogue does not list (their generic name is taken from the prescription)."""
    history: HistoryUse = HistoryUse.NOT_IDENTIFIED
    """Whether the period rules counted the patient's earlier purchases or this prescription only."""
    acknowledged: set[str] = field(default_factory=set)

    @property
    def findings(self) -> tuple[Finding, ...]:
        return self.evaluation.findings

    @property
    def blocked(self) -> bool:
        return self.evaluation.blocked

    @property
    def unacknowledged(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.evaluation.warnings if f.rule_id not in self.acknowledged)

    @property
    def can_approve(self) -> bool:
        return not self.blocked and not self.unacknowledged

    def acknowledge(self, rule_id: str) -> None:
        if rule_id not in {f.rule_id for f in self.findings}:
            raise ReviewError(f"no finding of rule {rule_id} in this review")
        self.acknowledged.add(rule_id)

    def acknowledge_all(self) -> None:
        self.acknowledged.update(f.rule_id for f in self.evaluation.warnings)


@dataclass(frozen=True, slots=True)
class ReviewResult:
    """`recorded` is True when the signed decision is in the outbox; otherwise the face check did not confirm it
    (`face` says why) and nothing was recorded: the pharmacist may try again."""

    recorded: bool
    face: FaceDecision
    envelope: Envelope | None = None
    record: ReviewDecisionRecord | None = None


def _proposal(
    prescription: Prescription, rules: ReviewRules, at: datetime, history: tuple[HistoryLine, ...]
) -> tuple[Proposal, tuple[str, ...]]:
    lines: list[ProposedLine] = []
    unknown: list[str] = []
    for line in prescription.lines:
        drug = rules.drug(line.drug_code)
        if drug is None:
            unknown.append(line.drug_code)
            generic = line.generic_name or line.drug_name
            amount = line.amount_fen
        else:
            generic = drug.generic_name
            amount = line.amount_fen
            if amount is None and drug.price_fen is not None:
                amount = drug.price_fen * line.quantity
        lines.append(ProposedLine(line.drug_code, generic, line.quantity, line.days_supply, amount))
    person = PersonFacts(prescription.patient_age_years, prescription.patient_sex)
    proposal = Proposal(RuleStage.REVIEW, at, person, tuple(lines), has_prescription=True, history=history)
    return proposal, tuple(unknown)


def _shown(finding: Finding, acknowledged: set[str]) -> FindingShown:
    return FindingShown(
        rule_id=finding.rule_id,
        rule_kind=finding.rule_kind,
        action=finding.action,
        drug_codes=list(finding.drug_codes),
        limit=finding.limit,
        observed=finding.observed,
        checkable=finding.checkable,
        acknowledged=finding.action is RuleAction.WARN and finding.rule_id in acknowledged,
    )


def _confirmation(face: FaceDecision) -> FaceConfirmation:
    return FaceConfirmation(
        decision=face.outcome.value,
        method=face.method,
        similarity=None if face.similarity is None else round(face.similarity, 4),
        threshold=round(face.threshold, 4),
        live=None if face.liveness is None else face.liveness.live,
        liveness_method=None if face.liveness is None else face.liveness.method[:64],
        template_hash=face.template_hash,
        model_sha256=face.model_sha256[:16],
    )


class ReviewDesk:
    """The review flow. Not thread-safe: the kiosk's review screen drives it from one worker."""

    def __init__(
        self,
        inbox: PrescriptionInbox,
        rules: ReviewRules,
        pharmacist: SignedInPharmacist,
        face: FaceConfirmer,
        record_signed: RecordSigned,
        clock: Clock,
        *,
        history: PurchaseHistorySource | None = None,
    ) -> None:
        """`history`: the platform's purchase lookback (`ServerPurchaseHistory`), asked at `open` for a prescription
        that names its patient (`patient_person_ref`), so the period rules count the patient's earlier purchases."""
        self._inbox = inbox
        self._rules = rules
        self._history = history
        self._pharmacist = pharmacist
        self._face = face
        self._record_signed = record_signed
        self._clock = clock

    def _signed_in(self) -> tuple[str, Embedding]:
        current = self._pharmacist.current()
        if current is None:
            raise ReviewError("a pharmacist must be signed in to review prescriptions")
        return current

    def open(self, prescription_id: int) -> ReviewSession:
        """Open a pending prescription for the signed-in pharmacist and evaluate the drug rules on it (P-05)."""
        code, _template = self._signed_in()
        item = self._inbox.get(prescription_id)
        if item is None:
            raise ReviewError(f"prescription {prescription_id} is not in this terminal's inbox")
        if item.state is not InboxState.PENDING:
            raise ReviewError(f"prescription {item.prescription.rx_no} is reviewed already")
        now = self._clock.now()
        earlier, used = self._earlier_purchases(item.prescription, now)
        proposal, unknown = _proposal(item.prescription, self._rules, now, earlier)
        rule_set = self._rules.rule_set
        return ReviewSession(
            item=item.pending,
            pharmacist_code=code,
            rule_set_version=None if rule_set is None else rule_set.version,
            evaluation=self._rules.evaluate(proposal),
            unknown_drugs=unknown,
            history=used,
        )

    def _earlier_purchases(
        self, prescription: Prescription, at: datetime
    ) -> tuple[tuple[HistoryLine, ...], HistoryUse]:
        ref = prescription.patient_person_ref
        if ref is None:
            return (), HistoryUse.NOT_IDENTIFIED
        lines = None if self._history is None else self._history.lines(ref, at=at)
        if lines is None:
            return (), HistoryUse.UNAVAILABLE
        return lines, HistoryUse.SERVER

    def decide(self, session: ReviewSession, decision: ReviewOutcome, reasons: list[str]) -> ReviewResult:
        """Confirm `decision` by the pharmacist's face and record it signed (P-04). Refuses (`ReviewError`, nothing
        recorded, no face attempt) an approval with a blocking or unacknowledged finding, a rejection or return
        without a reason, or a pharmacist other than the one who opened the review."""
        code, template = self._signed_in()
        if code != session.pharmacist_code:
            raise ReviewError("the pharmacist signed in is not the one who opened this review")
        current = self._inbox.get(session.item.prescription_id)
        if current is None or current.state is not InboxState.PENDING:
            raise ReviewError(f"prescription {session.item.prescription.rx_no} is no longer pending here")
        if decision is ReviewOutcome.APPROVED:
            if session.blocked:
                raise ReviewError("a drug rule blocks this prescription: it cannot be approved")
            if session.unacknowledged:
                raise ReviewError("every rule warning must be acknowledged before approving")
        elif not reasons:
            raise ReviewError("a rejection or return needs a reason")
        face = self._face.verify_template(template, subject_ref=code)
        if not face.accepted:
            return ReviewResult(recorded=False, face=face)
        now = self._clock.now()
        try:
            record = ReviewDecisionRecord(
                rx_no=session.item.prescription.rx_no,
                institution_code=session.item.institution_code,
                prescription_id=session.item.prescription_id,
                content_digest=session.item.content_digest,
                pharmacist_code=code,
                decision=decision,
                reasons=reasons,
                rule_set_version=session.rule_set_version,
                findings=[_shown(f, session.acknowledged) for f in session.findings],
                purchase_history=session.history,
                face=_confirmation(face),
                reviewed_at=now,
            )
        except ValidationError as exc:
            raise ReviewError(f"the review decision breaks the contract: {exc.error_count()} error(s)") from exc
        envelope = self._record_signed(SignedRecordKind.REVIEW_DECISION, record.to_record())
        self._inbox.mark_decided(
            session.item.prescription_id, decision, decided_at=now, message_id=str(envelope.message_id)
        )
        logger.info(
            "prescription %s %s by pharmacist %s (queued as %s)",
            record.rx_no,
            decision.value,
            code,
            envelope.message_id,
        )
        return ReviewResult(recorded=True, face=face, envelope=envelope, record=record)


def open_inbox(outbox_path: Path) -> PrescriptionInbox:
    """The inbox beside the outbox file."""
    return PrescriptionInbox.open(outbox_path.with_name(INBOX_FILE))
