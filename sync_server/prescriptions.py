"""Prescription registration, review and settlement gate (H-05…H-07, P-03…P-06, I-06, F-07; docs/prescriptions.md).

Owns the prescription rules in the caller's transaction:

* `register` stores a prescription the HIS of its institution registers, once per (institution, 医保处方编号): the
  same body again is a replay (the stored result, nothing new), a different body is a conflict. The prescriber's
  name is masked before it is stored; the patient is a pseudonymous reference and a masked name already. Each
  terminal bound to the institution gets a `prescriptions_pending` notice through `sync_server.commands`;
* `pending_page` is what a terminal of the institution fetches; `settle` records that HIS settled an approved
  prescription (idempotent for the same 医保结算ID, refused for any other status or settlement);
* `record_review_decisions`, the ingest hook, turns stored `review_decision` signed records into the one review of a
  prescription. The signature is verified again here against the device's enrolled key of the record's epoch; the
  device must be bound to the prescription's institution; the record must name the content served
  (`content_digest`); the prescription must be pending. A second decision for a prescription is refused and counted
  on the prescription (`refused_decisions`), never applied over the first;
* `his_view_steps`: what HIS reads of its prescription, in one statement. HIS's calls are written once as steps
  (`register_steps`, `his_view_steps`, `settle_steps`; `sync_server.db.steps`) of Core statements built once here,
  with no ORM unit of work: they are the server's bulk traffic, and the API runs them on PostgreSQL's async pool on
  the event loop (elsewhere in a worker thread). `register` and `settle` run the same steps in a caller's session.

Errors are `PrescriptionError` (404-ish `PrescriptionNotFoundError`, 409-ish `PrescriptionConflictError`). It must
never commit, publish to MQTT, audit (the API does that after the commit), or store or log a name, an ID number or a
face.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from protocol import ContractError, Envelope
from protocol.downlink import CommandKind, PrescriptionsPendingArgs
from protocol.gm.records import canonical_json
from protocol.gm.sm3 import sm3_digest
from protocol.payloads import SignedRecord, SignedRecordKind
from protocol.prescription import (
    MAX_PENDING,
    Prescription,
    ReviewDecisionRecord,
    ReviewOutcome,
    parse_review_decision,
    prescription_digest,
)
from sync_server.commands import INSERT_COMMANDS, queued_command
from sync_server.db import steps
from sync_server.db.models import (
    Device,
    Institution,
    PrescriptionLineRow,
    PrescriptionReview,
    PrescriptionRow,
    PrescriptionState,
    RegistrationState,
)
from sync_server.db.statements import InsertIfNew
from sync_server.db.steps import Steps, run_steps
from sync_server.masking import mask_name
from sync_server.signed_records import verify_signed_record

logger = logging.getLogger(__name__)

NOTICE_TTL_S: Final = 24 * 3600.0
"""A notice waits a day for a terminal that is switched off; the terminal also refreshes its inbox at start."""

_DECIDED: Final = {
    ReviewOutcome.APPROVED: PrescriptionState.APPROVED,
    ReviewOutcome.REJECTED: PrescriptionState.REJECTED,
    ReviewOutcome.RETURNED: PrescriptionState.RETURNED,
}


class PrescriptionError(Exception):
    """A prescription request the rules refuse."""


class PrescriptionNotFoundError(PrescriptionError):
    """No such prescription at this institution."""


class PrescriptionConflictError(PrescriptionError):
    """The request contradicts the stored state (another body for the number, settling an unapproved one, ...)."""


@dataclass(frozen=True, slots=True)
class ReviewView:
    """The stored review as HIS and operators read it: decision, opinion, pharmacist code and times (E-03)."""

    decision: str
    reasons: list[str]
    pharmacist_code: str
    reviewed_at: datetime
    received_at: datetime
    device_id: str
    face_decision: str
    face_similarity: float | None
    rule_set_version: int | None
    findings: list[dict[str, Any]]
    purchase_history: str | None
    """What the period rules counted at review (the signed record's `purchase_history`), None when not recorded."""

    @classmethod
    def of(cls, row: PrescriptionReview) -> ReviewView:
        history = row.record.get("purchase_history")
        return cls(
            row.decision,
            list(row.reasons),
            row.pharmacist_code,
            row.reviewed_at,
            row.received_at,
            row.device_id,
            row.face_decision,
            row.face_similarity,
            row.rule_set_version,
            list(row.findings),
            history if isinstance(history, str) else None,
        )


@dataclass(frozen=True, slots=True)
class HisView:
    """What HIS reads of one of its prescriptions (H-05, H-07): status, review, settlement."""

    id: int
    rx_no: str
    status: PrescriptionState
    registered_at: datetime
    content_digest: str
    settlement_id: str | None
    settled_at: datetime | None
    review: ReviewView | None


@dataclass(frozen=True, slots=True)
class Registered:
    view: HisView
    created: bool
    """False: a replay of the same body; nothing was stored or queued."""
    notices: tuple[str, ...] = ()
    """The terminals a `prescriptions_pending` notice was queued for."""


@dataclass(frozen=True, slots=True)
class ReviewsRecorded:
    created: int
    refused: int


def request_digest(prescription: Prescription) -> str:
    """SM3 of the registration body as HIS sent it (before masking): the idempotency comparison."""
    return sm3_digest(canonical_json(prescription.model_dump(mode="json"))).hex()


def served_form(prescription: Prescription) -> Prescription:
    """The prescription as it is stored and served: the prescriber's name masked (idempotent on a masked name)."""
    name = prescription.prescriber_name
    if name is None or "*" in name:
        return prescription
    return prescription.model_copy(update={"prescriber_name": mask_name(name)})


def stored_prescription(row: PrescriptionRow) -> Prescription:
    """The served form back from its row (written by `register` after validation)."""
    return Prescription.model_validate(row.body)


def find(session: Session, institution_id: int, rx_no: str, *, lock: bool = False) -> PrescriptionRow | None:
    query = select(PrescriptionRow).where(
        PrescriptionRow.institution_id == institution_id, PrescriptionRow.rx_no == rx_no
    )
    if lock:
        query = query.with_for_update()
    return session.scalar(query)


# HIS's calls are the server's bulk traffic (source 003 asks >= 200 requests/s): they run as Core statements on the
# session's connection, built once here, and load no ORM entities (the stored body is never read back for HIS).
_HIS_VIEW = (
    select(
        PrescriptionRow.id,
        PrescriptionRow.rx_no,
        PrescriptionRow.status,
        PrescriptionRow.registered_at,
        PrescriptionRow.content_digest,
        PrescriptionRow.settlement_id,
        PrescriptionRow.settled_at,
        PrescriptionReview.id.label("review_id"),
        PrescriptionReview.decision,
        PrescriptionReview.reasons,
        PrescriptionReview.pharmacist_code,
        PrescriptionReview.reviewed_at,
        PrescriptionReview.received_at,
        PrescriptionReview.device_id,
        PrescriptionReview.face_decision,
        PrescriptionReview.face_similarity,
        PrescriptionReview.rule_set_version,
        PrescriptionReview.findings,
        PrescriptionReview.record["purchase_history"].as_string().label("purchase_history"),
    )
    .outerjoin(PrescriptionReview, PrescriptionReview.prescription_id == PrescriptionRow.id)
    .where(PrescriptionRow.institution_id == bindparam("institution_id"), PrescriptionRow.rx_no == bindparam("rx_no"))
)
_HIS_VIEW_LOCKED = _HIS_VIEW.with_for_update(of=PrescriptionRow)
_STORED_DIGEST = select(PrescriptionRow.request_digest).where(
    PrescriptionRow.institution_id == bindparam("institution_id"), PrescriptionRow.rx_no == bindparam("rx_no")
)
_INSERT_PRESCRIPTION = InsertIfNew(
    PrescriptionRow, (PrescriptionRow.institution_id, PrescriptionRow.rx_no), PrescriptionRow.id
)
_INSERT_LINES = insert(PrescriptionLineRow)
_BOUND_TERMINALS = (
    select(Device.device_id)
    .where(Device.institution_id == bindparam("institution_id"), Device.registration != RegistrationState.REVOKED)
    .order_by(Device.device_id)
)
_SETTLE = (
    update(PrescriptionRow)
    .where(PrescriptionRow.id == bindparam("prescription_id"))
    .values(
        status=PrescriptionState.SETTLED,
        settlement_id=bindparam("settlement_id"),
        settled_at=bindparam("settled_at", type_=PrescriptionRow.settled_at.type),
    )
)


def his_view_steps(institution_id: int, rx_no: str, *, lock: bool = False) -> Steps[HisView | None]:
    """The institution's prescription `rx_no` with its review, in one statement; `lock` holds the prescription's
    row (not its review's) until the transaction ends."""
    row = yield steps.one(_HIS_VIEW_LOCKED if lock else _HIS_VIEW, {"institution_id": institution_id, "rx_no": rx_no})
    return None if row is None else _his_view_of(row)


def _his_view_of(row: Mapping[str, Any]) -> HisView:
    review = None
    if row["review_id"] is not None:
        review = ReviewView(
            row["decision"],
            list(row["reasons"]),
            row["pharmacist_code"],
            row["reviewed_at"],
            row["received_at"],
            row["device_id"],
            row["face_decision"],
            row["face_similarity"],
            row["rule_set_version"],
            list(row["findings"]),
            row["purchase_history"],
        )
    return HisView(
        row["id"],
        row["rx_no"],
        row["status"],
        row["registered_at"],
        row["content_digest"],
        row["settlement_id"],
        row["settled_at"],
        review,
    )


def register(
    session: Session, prescription: Prescription, *, institution_id: int, client: str, now: datetime
) -> Registered:
    return run_steps(
        session.connection(), register_steps(prescription, institution_id=institution_id, client=client, now=now)
    )


def register_steps(prescription: Prescription, *, institution_id: int, client: str, now: datetime) -> Steps[Registered]:
    """Store `prescription` for the institution (or recognise a replay) and notify its bound terminals."""
    digest = request_digest(prescription)
    served = served_form(prescription)
    content_digest = prescription_digest(served)
    # Inserted first: a number registered already (a replay, or another request a moment earlier: the unique key)
    # gives no id, and the stored registration decides between a replay and a conflict.
    prescription_id: int | None = yield steps.scalar(
        _INSERT_PRESCRIPTION,
        {
            "institution_id": institution_id,
            "rx_no": prescription.rx_no,
            "request_digest": digest,
            "content_digest": content_digest,
            "body": served.model_dump(mode="json"),
            "prescribing_institution_code": served.prescribing_institution_code,
            "prescriber_code": served.prescriber_code,
            "prescribed_at": served.prescribed_at,
            "patient_ref": served.patient_ref,
            "status": PrescriptionState.PENDING,
            "registered_at": now,
            "registered_by": client,
            "refused_decisions": 0,
        },
    )
    if prescription_id is None:
        keys = {"institution_id": institution_id, "rx_no": prescription.rx_no}
        if (yield steps.scalar(_STORED_DIGEST, keys)) != digest:
            raise PrescriptionConflictError(
                f"prescription {prescription.rx_no} is registered already with different content"
            )
        view = yield from his_view_steps(institution_id, prescription.rx_no)
        if view is None:  # seen by the statement above; prescriptions are never deleted
            raise PrescriptionNotFoundError(f"prescription {prescription.rx_no} is not registered")
        return Registered(view, created=False)
    yield steps.execute(
        _INSERT_LINES,
        [
            {
                "prescription_id": prescription_id,
                "line_no": line.line_no,
                "drug_code": line.drug_code,
                "drug_name": line.drug_name,
                "generic_name": line.generic_name,
                "specification": line.specification,
                "quantity": line.quantity,
                "unit": line.unit,
                "dosage": line.dosage,
                "days_supply": line.days_supply,
                "amount_fen": line.amount_fen,
            }
            for line in served.lines
        ],
    )
    terminals: list[dict[str, Any]] = yield steps.rows(_BOUND_TERMINALS, {"institution_id": institution_id})
    notified = tuple(row["device_id"] for row in terminals)
    if notified:
        args = PrescriptionsPendingArgs(prescription_id=prescription_id, rx_no=prescription.rx_no).model_dump()
        yield steps.execute(
            INSERT_COMMANDS,
            [
                queued_command(
                    device_id=device_id,
                    kind=CommandKind.PRESCRIPTIONS_PENDING,
                    args=args,
                    ttl_s=NOTICE_TTL_S,
                    now=now,
                )
                for device_id in notified
            ],
        )
    view = HisView(
        prescription_id, prescription.rx_no, PrescriptionState.PENDING, now, content_digest, None, None, None
    )
    return Registered(view, created=True, notices=notified)


def review_of(session: Session, prescription_id: int) -> PrescriptionReview | None:
    return session.scalar(select(PrescriptionReview).where(PrescriptionReview.prescription_id == prescription_id))


def lines_of(session: Session, prescription_id: int) -> list[PrescriptionLineRow]:
    return list(
        session.scalars(
            select(PrescriptionLineRow)
            .where(PrescriptionLineRow.prescription_id == prescription_id)
            .order_by(PrescriptionLineRow.line_no)
        )
    )


def settle(
    session: Session, *, institution_id: int, rx_no: str, settlement_id: str, now: datetime
) -> tuple[HisView, bool]:
    return run_steps(
        session.connection(),
        settle_steps(institution_id=institution_id, rx_no=rx_no, settlement_id=settlement_id, now=now),
    )


def settle_steps(*, institution_id: int, rx_no: str, settlement_id: str, now: datetime) -> Steps[tuple[HisView, bool]]:
    """Record that HIS settled the approved prescription (I-06); True when this call settled it. The same
    settlement again is a replay (False); another settlement of a settled prescription, or settling one that is not
    approved, is a conflict (F-07). Run in a transaction: the prescription's row is locked until it ends."""
    view = yield from his_view_steps(institution_id, rx_no, lock=True)
    if view is None:
        raise PrescriptionNotFoundError(f"prescription {rx_no} is not registered at this institution")
    if view.status is PrescriptionState.SETTLED:
        if view.settlement_id == settlement_id:
            return view, False
        raise PrescriptionConflictError(f"prescription {rx_no} is settled already under another settlement")
    if view.status is not PrescriptionState.APPROVED:
        raise PrescriptionConflictError(
            f"prescription {rx_no} is {view.status.value}: only an approved prescription may be settled"
        )
    params = {"prescription_id": view.id, "settlement_id": settlement_id, "settled_at": now}
    yield steps.execute(_SETTLE, params)
    return replace(view, status=PrescriptionState.SETTLED, settlement_id=settlement_id, settled_at=now), True


def pending_page(
    session: Session, institution_id: int, *, limit: int = MAX_PENDING
) -> tuple[list[PrescriptionRow], int]:
    """The institution's pending prescriptions, oldest first (at most `limit`), and how many there are."""
    scope = (PrescriptionRow.institution_id == institution_id, PrescriptionRow.status == PrescriptionState.PENDING)
    total = session.scalar(select(func.count()).select_from(PrescriptionRow).where(*scope)) or 0
    rows = session.scalars(
        select(PrescriptionRow).where(*scope).order_by(PrescriptionRow.registered_at, PrescriptionRow.id).limit(limit)
    ).all()
    return list(rows), total


def reviewed_page(
    session: Session, institution_id: int, *, since: datetime, limit: int = MAX_PENDING
) -> tuple[list[tuple[PrescriptionRow, PrescriptionReview]], int]:
    """The institution's prescriptions reviewed at or after `since` (the review's signed time), newest first (at
    most `limit`) with their reviews, and how many there are (P-03: a pharmacy's terminals all list them)."""
    scope = (PrescriptionRow.institution_id == institution_id, PrescriptionReview.reviewed_at >= since)
    joined = select(PrescriptionRow, PrescriptionReview).join(
        PrescriptionReview, PrescriptionReview.prescription_id == PrescriptionRow.id
    )
    total = (
        session.scalar(
            select(func.count())
            .select_from(PrescriptionRow)
            .join(PrescriptionReview, PrescriptionReview.prescription_id == PrescriptionRow.id)
            .where(*scope)
        )
        or 0
    )
    rows = session.execute(
        joined.where(*scope).order_by(PrescriptionReview.reviewed_at.desc(), PrescriptionRow.id.desc()).limit(limit)
    ).all()
    return [(row, review) for row, review in rows], total


# ---------------------------------------------------------------------- ingest of signed review decisions


def _verified_decision(session: Session, envelope: Envelope, payload: SignedRecord) -> ReviewDecisionRecord:
    verify_signed_record(session, envelope, payload)
    return parse_review_decision(dict(payload.record))


def _target(session: Session, envelope: Envelope, record: ReviewDecisionRecord) -> PrescriptionRow:
    """The prescription the decision is about, locked; the device must be bound to its institution."""
    institution_id = session.scalar(select(Institution.id).where(Institution.code == record.institution_code))
    if institution_id is None:
        raise ContractError("the institution named is not registered")
    device_institution = session.scalar(select(Device.institution_id).where(Device.device_id == envelope.device_id))
    if device_institution != institution_id:
        raise ContractError("the device is not bound to the prescription's institution")
    row = find(session, institution_id, record.rx_no, lock=True)
    if row is None or row.id != record.prescription_id:
        raise ContractError("no such prescription at the institution")
    if row.content_digest != record.content_digest:
        raise ContractError("the decision names content other than the prescription registered")
    return row


def record_review_decisions(session: Session, envelopes: Sequence[Envelope], *, now: datetime) -> ReviewsRecorded:
    """The review of each prescription named by the batch's verified `review_decision` records (redeliveries of a
    stored record are ignored; refusals are counted and logged without their contents)."""
    created = refused = 0
    for envelope in envelopes:
        payload = envelope.payload
        if not isinstance(payload, SignedRecord) or payload.record_type is not SignedRecordKind.REVIEW_DECISION:
            continue
        exists = session.scalar(
            select(PrescriptionReview.id).where(PrescriptionReview.message_id == envelope.message_id)
        )
        if exists is not None:
            continue
        try:
            record = _verified_decision(session, envelope, payload)
            row = _target(session, envelope, record)
        except ContractError as exc:
            refused += 1
            logger.warning("review decision %s of %s refused: %s", envelope.message_id, envelope.device_id, exc)
            continue
        if row.status is not PrescriptionState.PENDING:
            refused += 1
            row.refused_decisions += 1
            logger.warning(
                "review decision %s of %s refused: prescription %d is %s already (first decision kept)",
                envelope.message_id,
                envelope.device_id,
                row.id,
                row.status.value,
            )
            continue
        session.add(
            PrescriptionReview(
                prescription_id=row.id,
                message_id=envelope.message_id,
                device_id=envelope.device_id,
                pharmacist_code=record.pharmacist_code,
                decision=record.decision.value,
                reasons=list(record.reasons),
                findings=[f.model_dump(mode="json") for f in record.findings],
                rule_set_version=record.rule_set_version,
                face_decision=record.face.decision,
                face_similarity=record.face.similarity,
                reviewed_at=record.reviewed_at,
                received_at=now,
                key_epoch=payload.key_epoch,
                record=dict(payload.record),
                signature=payload.signature,
            )
        )
        row.status, row.reviewed_at = _DECIDED[record.decision], record.reviewed_at
        created += 1
        session.flush()
    return ReviewsRecorded(created, refused)
