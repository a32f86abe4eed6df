"""Device↔institution binding with approval (I-01…I-03, D-01…D-03, B-01; rules in docs/binding.md).

Owns the binding rules in the caller's transaction:

* `record_binding_applications` turns stored `binding_application` signed records into pending
  `binding_applications` rows, once per envelope (`message_id`). The signature is verified again here against the
  device's enrolled key of the record's epoch, whatever ingest's message security did: an unsigned, forged or
  malformed application never becomes a row (it is counted and logged without its contents);
* `approve` / `reject` decide a pending application, `unbind` ends a binding. Each change of a device's institution
  writes one `device_binding_history` row and queues a durable device command (`binding_decision` or `unbind`)
  through `sync_server.commands`;
* `upsert_institution` creates or updates an institution (D-02), storing the head and contact masked only.

Errors are `BindingError` (404-ish `BindingNotFoundError`, 409-ish `BindingConflictError`).
It must never commit, publish to MQTT, audit
(the API does that after the commit) or store or log raw personal data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from protocol import ContractError, Envelope
from protocol.binding import BindingApplicationRecord, parse_binding_application
from protocol.downlink import BindingDecisionArgs, CommandKind, UnbindArgs
from protocol.payloads import SignedRecord, SignedRecordKind
from sync_server.commands import issue_command
from sync_server.db.models import (
    BindingApplication,
    BindingStatus,
    Device,
    DeviceBindingHistory,
    Institution,
    InstitutionKind,
    IssuedCommand,
)
from sync_server.masking import mask_name, mask_phone
from sync_server.signed_records import verify_signed_record

logger = logging.getLogger(__name__)

BINDING_COMMAND_TTL_S = 7 * 24 * 3600.0
"""A decision waits a week for a terminal that is switched off (a pharmacy closed for a holiday)."""


class BindingError(Exception):
    """A binding request the rules refuse."""


class BindingNotFoundError(BindingError):
    """No such application, device or institution."""


class BindingConflictError(BindingError):
    """The request contradicts the current state (already decided, device bound, institution not registered)."""


@dataclass(frozen=True, slots=True)
class ApplicationsRecorded:
    created: int
    refused: int


def _verified_application(session: Session, envelope: Envelope, payload: SignedRecord) -> BindingApplicationRecord:
    verify_signed_record(session, envelope, payload)
    record = parse_binding_application(dict(payload.record))
    if record.face_decision != "accepted":
        raise ContractError("the applicant's face verification was not accepted")
    return record


def record_binding_applications(
    session: Session, envelopes: Sequence[Envelope], *, now: datetime
) -> ApplicationsRecorded:
    """Pending applications for the batch's verified `binding_application` records (redeliveries ignored)."""
    created = refused = 0
    for envelope in envelopes:
        payload = envelope.payload
        if not isinstance(payload, SignedRecord) or payload.record_type is not SignedRecordKind.BINDING_APPLICATION:
            continue
        exists = session.scalar(
            select(BindingApplication.id).where(BindingApplication.message_id == envelope.message_id)
        )
        if exists is not None:
            continue
        try:
            record = _verified_application(session, envelope, payload)
        except ContractError as exc:
            refused += 1
            logger.warning("binding application %s of %s refused: %s", envelope.message_id, envelope.device_id, exc)
            continue
        session.add(
            BindingApplication(
                message_id=envelope.message_id,
                device_id=envelope.device_id,
                institution_code=record.institution_code,
                applicant_ref=record.applicant_ref,
                applicant_masked=record.applicant_masked,
                verification=record.verification.value,
                face_template_hash=record.face_template_hash,
                reason=record.reason,
                applied_at=record.applied_at,
                received_at=now,
                key_epoch=payload.key_epoch,
                signature=payload.signature,
                status=BindingStatus.PENDING,
            )
        )
        created += 1
    if created:
        session.flush()
    return ApplicationsRecorded(created, refused)


def _application(session: Session, application_id: int) -> BindingApplication:
    """The application, its device row locked first and then the application itself: every decision locks in the
    order device -> application, so two admins deciding two applications of one device cannot deadlock."""
    device_id = session.scalar(select(BindingApplication.device_id).where(BindingApplication.id == application_id))
    if device_id is None:
        raise BindingNotFoundError(f"binding application {application_id} is not known to this server")
    _device(session, device_id)
    row = session.get(BindingApplication, application_id, with_for_update=True, populate_existing=True)
    if row is None:
        raise BindingNotFoundError(f"binding application {application_id} is not known to this server")
    return row


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id, with_for_update=True)
    if device is None:
        raise BindingNotFoundError(f"device {device_id} is not known to this server")
    return device


def _queue(session: Session, device_id: str, kind: CommandKind, args: dict[str, Any], now: datetime) -> IssuedCommand:
    return issue_command(session, device_id=device_id, kind=kind, args=args, ttl_s=BINDING_COMMAND_TTL_S, now=now)


def _decision_args(
    row: BindingApplication, institution: Institution | None, *, approved: bool, reason: str, contact: str | None
) -> dict[str, Any]:
    args = BindingDecisionArgs(
        application_id=row.id,
        approved=approved,
        institution_code=row.institution_code,
        institution_name=None if institution is None else institution.name,
        reason=reason,
        contact=contact,
    )
    return args.model_dump()


def _require_pending(row: BindingApplication) -> None:
    if row.status is not BindingStatus.PENDING:
        raise BindingConflictError(f"binding application {row.id} is already {row.status.value}")


def approve(
    session: Session, application_id: int, *, actor: str, reason: str, contact: str | None, now: datetime
) -> tuple[BindingApplication, IssuedCommand]:
    """Bind the application's device to its institution; close the device's other pending applications."""
    row = _application(session, application_id)
    _require_pending(row)
    institution = session.scalar(select(Institution).where(Institution.code == row.institution_code))
    if institution is None:
        raise BindingConflictError(f"institution {row.institution_code} is not registered; create it first (D-02)")
    device = _device(session, row.device_id)
    if device.institution_id is not None:
        raise BindingConflictError(f"device {device.device_id} is bound already; unbind it before binding it elsewhere")
    device.institution_id = institution.id
    command = _queue(
        session,
        row.device_id,
        CommandKind.BINDING_DECISION,
        _decision_args(row, institution, approved=True, reason=reason, contact=contact),
        now,
    )
    row.status, row.decided_at, row.decided_by = BindingStatus.APPROVED, now, actor
    row.decision_reason, row.command_id = reason, command.command_id
    session.add(
        DeviceBindingHistory(
            device_id=row.device_id,
            at=now,
            actor=actor,
            action="bind",
            from_institution_id=None,
            to_institution_id=institution.id,
            application_id=row.id,
            reason=reason,
            command_id=command.command_id,
        )
    )
    others = session.scalars(
        select(BindingApplication).where(
            BindingApplication.device_id == row.device_id,
            BindingApplication.status == BindingStatus.PENDING,
            BindingApplication.id != row.id,
        )
    )
    for other in others:
        other.status, other.decided_at, other.decided_by = BindingStatus.SUPERSEDED, now, actor
        other.decision_reason = f"superseded by application {row.id}"
    session.flush()
    return row, command


def reject(
    session: Session, application_id: int, *, actor: str, reason: str, contact: str | None, now: datetime
) -> tuple[BindingApplication, IssuedCommand]:
    """Refuse a pending application; the terminal is told why and whom to contact."""
    row = _application(session, application_id)
    _require_pending(row)
    institution = session.scalar(select(Institution).where(Institution.code == row.institution_code))
    command = _queue(
        session,
        row.device_id,
        CommandKind.BINDING_DECISION,
        _decision_args(row, institution, approved=False, reason=reason, contact=contact),
        now,
    )
    row.status, row.decided_at, row.decided_by = BindingStatus.REJECTED, now, actor
    row.decision_reason, row.command_id = reason, command.command_id
    session.flush()
    return row, command


def unbind(
    session: Session, device_id: str, *, actor: str, reason: str, contact: str | None, now: datetime
) -> tuple[DeviceBindingHistory, IssuedCommand]:
    """End a device's binding (the first half of a move: docs/binding.md)."""
    device = _device(session, device_id)
    if device.institution_id is None:
        raise BindingConflictError(f"device {device_id} is not bound to any institution")
    args = UnbindArgs(reason=reason, contact=contact).model_dump()
    command = _queue(session, device_id, CommandKind.UNBIND, args, now)
    history = DeviceBindingHistory(
        device_id=device_id,
        at=now,
        actor=actor,
        action="unbind",
        from_institution_id=device.institution_id,
        to_institution_id=None,
        application_id=None,
        reason=reason,
        command_id=command.command_id,
    )
    device.institution_id = None
    session.add(history)
    session.flush()
    return history, command


@dataclass(frozen=True, slots=True)
class InstitutionData:
    """What a device admin may set on an institution (D-02); head and contact are masked before storing."""

    name: str
    kind: InstitutionKind
    region_code: str
    address: str | None = None
    head_name: str | None = None
    contact_phone: str | None = None
    source: str | None = None


def _masked(value: str | None, mask: Any) -> str | None:
    # Idempotent on masked input, so a client may send back what it read.
    return None if value is None else str(mask(value)) if "*" not in value else value


def upsert_institution(
    session: Session, code: str, data: InstitutionData, *, now: datetime
) -> tuple[Institution, bool]:
    """Create (True) or update (False) the institution with `code`."""
    row = session.scalar(select(Institution).where(Institution.code == code).with_for_update())
    created = row is None
    if row is None:
        row = Institution(code=code, created_at=now)
        session.add(row)
    else:
        row.updated_at = now
    row.name, row.kind, row.region_code = data.name, data.kind, data.region_code
    row.address, row.source = data.address, data.source
    row.head_masked = _masked(data.head_name, mask_name)
    row.contact_masked = _masked(data.contact_phone, mask_phone)
    session.flush()
    return row, created
