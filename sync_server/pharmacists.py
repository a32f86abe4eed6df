"""Pharmacists on the server (H-08, E-04, P-01, P-02; docs/pharmacists.md): the HIS roster, face templates for
the terminals of one institution, and attendance sessions.

Owns, in the caller's transaction:

* `sync_pharmacists`: the HIS base-info sync of one institution (batch upsert). Names and ID numbers are masked
  before they are stored; the ID number is also kept as a keyed HMAC (`id_number_ref`) so a pharmacist's own
  account can find their records without the number being kept. A pharmacist marked left (离职时间 or 有效标志 0)
  loses their template at once and every terminal bound to the institution gets a `template_purge` command; any
  change sends the bound terminals a `roster_update` notice (they fetch the roster themselves);
* `store_template` / `roster`: a template arrives sealed under the enrolling terminal's session key, is re-sealed at
  rest under a key derived from the server secret (`TemplateSeal`), and leaves only sealed under the session key of
  a terminal bound to the same institution;
* `record_pharmacist_sessions`: the ingest hook that turns verified `sign_in` / `sign_out` records into
  `pharmacist_sessions` rows (idempotent per session id; the terminal's word wins over the server's auto-close);
  `pharmacist_enrolment` records are verified and otherwise only kept as events;
* `close_overdue_sessions`: closes sessions left open past the closing hour (a terminal that was switched off).

Errors are `PharmacistError` (`PharmacistNotFoundError` 404-ish, `PharmacistConflictError` 409-ish,
`PharmacistInputError` 422-ish). It must never commit, never store or log a clear name, ID number or template.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, exists, or_, select
from sqlalchemy.orm import Session

from protocol import ContractError, Envelope
from protocol.downlink import CommandKind, RosterUpdateArgs, TemplatePurgeArgs
from protocol.gm import sm4
from protocol.gm.errors import CryptoError
from protocol.gm.sm3 import hmac_sm3, sm3_kdf
from protocol.payloads import SignedRecord, SignedRecordKind
from protocol.pharmacist import (
    SealedTemplate,
    SignOutReason,
    TemplateDirection,
    TemplateUpload,
    close_moment,
    open_template,
    parse_enrolment,
    parse_sign_in,
    parse_sign_out,
    seal_template,
    template_aad,
    template_bytes,
    template_from_bytes,
)
from sync_server.commands import issue_command
from sync_server.db.models import (
    Device,
    DeviceBindingHistory,
    Institution,
    IssuedCommand,
    Pharmacist,
    PharmacistSession,
    PharmacistStatus,
    PharmacistTemplate,
)
from sync_server.masking import mask_id_number, mask_name
from sync_server.signed_records import verify_signed_record

logger = logging.getLogger(__name__)

PHARMACIST_COMMAND_TTL_S = 7 * 24 * 3600.0
"""A purge or a roster notice waits a week for a terminal that is switched off."""

TEMPLATE_SEAL_INFO = b"|yibao-pharmacist-template-v1"
ID_REF_INFO = b"|yibao-pharmacist-id-ref-v1"


class PharmacistError(Exception):
    """A pharmacist request the rules refuse."""


class PharmacistNotFoundError(PharmacistError):
    """No such pharmacist in the caller's institution."""


class PharmacistConflictError(PharmacistError):
    """The request contradicts the current state (device not bound, pharmacist left, stale session key)."""


class PharmacistInputError(PharmacistError):
    """The request is well-formed JSON but its content is unusable (a template that does not open)."""


class TemplateSeal:
    """The at-rest seal of templates and the ID-number reference key, both derived from the server's secret_key (so
    every worker process derives the same ones). Never logs a key."""

    def __init__(self, secret_key: str) -> None:
        secret = secret_key.encode("utf-8")
        self._seal_key = sm3_kdf(secret + TEMPLATE_SEAL_INFO, sm4.KEY_SIZE)
        self._ref_key = sm3_kdf(secret + ID_REF_INFO, 32)

    @staticmethod
    def _aad(pharmacist_id: int, model_sha256: str) -> bytes:
        return f"yibao/pharmacist-template-at-rest/v1\x00{pharmacist_id}\x00{model_sha256}".encode()

    def seal(self, pharmacist_id: int, model_sha256: str, raw: bytes) -> bytes:
        return sm4.seal(self._seal_key, raw, self._aad(pharmacist_id, model_sha256))

    def open(self, pharmacist_id: int, model_sha256: str, sealed: bytes) -> bytes:
        """`DecryptionFailedError` if the row was altered, moved to another pharmacist, or sealed under another
        secret_key."""
        return sm4.open(self._seal_key, sealed, self._aad(pharmacist_id, model_sha256))

    def id_number_ref(self, id_number: str) -> str:
        """A keyed hash of an ID number: equal numbers give equal refs on this server, and nothing else."""
        return hmac_sm3(self._ref_key, id_number.strip().upper().encode("utf-8")).hex()


# ---------------------------------------------------------------- the HIS roster


@dataclass(frozen=True, slots=True)
class PharmacistData:
    """One pharmacist as the HIS sends it (E-04 names); the name and ID number are masked before storing."""

    code: str
    name: str
    his_person_id: str | None = None
    cert_type: str | None = None
    id_number: str | None = None
    practising_cert_no: str | None = None
    practising_type: str | None = None
    practising_scope: str | None = None
    practising_region: str | None = None
    multi_site: bool | None = None
    tech_duty: str | None = None
    psn_role: str | None = None
    left_on: dt.date | None = None
    valid: bool = True

    def __repr__(self) -> str:  # never the name or the ID number
        return f"PharmacistData(code={self.code!r}, valid={self.valid})"

    @property
    def left(self) -> bool:
        return self.left_on is not None or not self.valid


@dataclass(frozen=True, slots=True)
class SyncResult:
    created: int
    updated: int
    left: int
    templates_deleted: int
    commands: tuple[IssuedCommand, ...]


def bound_devices(session: Session, institution_id: int) -> list[str]:
    return list(
        session.scalars(
            select(Device.device_id).where(Device.institution_id == institution_id).order_by(Device.device_id)
        )
    )


def _queue(
    session: Session, device_id: str, kind: CommandKind, args: dict[str, Any], now: dt.datetime
) -> IssuedCommand:
    return issue_command(session, device_id=device_id, kind=kind, args=args, ttl_s=PHARMACIST_COMMAND_TTL_S, now=now)


def _delete_template(session: Session, pharmacist_id: int) -> bool:
    result = session.execute(delete(PharmacistTemplate).where(PharmacistTemplate.pharmacist_id == pharmacist_id))
    return bool(getattr(result, "rowcount", 0))


def sync_pharmacists(
    session: Session,
    institution: Institution,
    items: Sequence[PharmacistData],
    *,
    seal: TemplateSeal,
    now: dt.datetime,
) -> SyncResult:
    """Upsert the HIS's pharmacists of `institution`; a code listed twice is a `PharmacistInputError`."""
    codes = [item.code for item in items]
    if len(set(codes)) != len(codes):
        raise PharmacistInputError("a pharmacist code is listed twice in one sync")
    existing = {
        row.code: row
        for row in session.scalars(
            select(Pharmacist)
            .where(Pharmacist.institution_id == institution.id, Pharmacist.code.in_(codes))
            .with_for_update()
        )
    }
    created = updated = left = deleted = 0
    purge: list[str] = []
    for item in items:
        row = existing.get(item.code)
        previous: PharmacistStatus | None = None
        if row is None:
            row = Pharmacist(institution_id=institution.id, code=item.code, created_at=now)
            session.add(row)
            created += 1
        else:
            previous = row.status
            updated += 1
        row.his_person_id, row.cert_type = item.his_person_id, item.cert_type
        row.name_masked = mask_name(item.name)
        row.id_number_masked = None if item.id_number is None else mask_id_number(item.id_number)
        row.id_number_ref = None if item.id_number is None else seal.id_number_ref(item.id_number)
        row.practising_cert_no, row.practising_type = item.practising_cert_no, item.practising_type
        row.practising_scope, row.practising_region = item.practising_scope, item.practising_region
        row.multi_site, row.tech_duty, row.psn_role = item.multi_site, item.tech_duty, item.psn_role
        row.left_on = None if item.left_on is None else item.left_on.isoformat()
        row.status = PharmacistStatus.LEFT if item.left else PharmacistStatus.ACTIVE
        row.updated_at = now
        if item.left:
            session.flush()
            if _delete_template(session, row.id):
                deleted += 1
            if previous is not PharmacistStatus.LEFT:
                left += 1
                purge.append(item.code)
    session.flush()
    commands: list[IssuedCommand] = []
    devices = bound_devices(session, institution.id)
    for device_id in devices:
        for code in purge:
            args = TemplatePurgeArgs(pharmacist_code=code, reason="pharmacist_left").model_dump()
            commands.append(_queue(session, device_id, CommandKind.TEMPLATE_PURGE, args, now))
        if items:
            notice = RosterUpdateArgs(institution_code=institution.code, reason="his_sync").model_dump()
            commands.append(_queue(session, device_id, CommandKind.ROSTER_UPDATE, notice, now))
    return SyncResult(created, updated, left, deleted, tuple(commands))


def _pharmacist(session: Session, institution_id: int, code: str) -> Pharmacist:
    row = session.scalar(select(Pharmacist).where(Pharmacist.institution_id == institution_id, Pharmacist.code == code))
    if row is None:
        raise PharmacistNotFoundError(f"pharmacist {code} is not on this institution's roster")
    return row


def _bound_institution(session: Session, device_id: str) -> Institution:
    device = session.get(Device, device_id)
    if device is None or device.institution_id is None:
        raise PharmacistConflictError(f"device {device_id} is not bound to an institution")
    institution = session.get(Institution, device.institution_id)
    if institution is None:  # the foreign key makes this impossible; narrows the type
        raise PharmacistConflictError(f"device {device_id} is not bound to an institution")
    return institution


# ---------------------------------------------------------------- templates


def store_template(
    session: Session,
    *,
    device_id: str,
    key_id: uuid.UUID,
    session_key: bytes,
    code: str,
    upload: TemplateUpload,
    seal: TemplateSeal,
    now: dt.datetime,
) -> tuple[PharmacistTemplate, list[IssuedCommand]]:
    """Accept the enrolling terminal's template for a pharmacist of its own institution; notify the other bound
    terminals. The upload must be sealed under the key that signed the request (409 otherwise: the terminal
    rotated in between and retries)."""
    institution = _bound_institution(session, device_id)
    pharmacist = _pharmacist(session, institution.id, code)
    if pharmacist.status is not PharmacistStatus.ACTIVE:
        raise PharmacistConflictError(f"pharmacist {code} has left this institution")
    if upload.key_id != key_id:
        raise PharmacistConflictError("the template is sealed under another session key than the request's")
    aad = template_aad(TemplateDirection.UPLOAD, device_id, code, upload.model_sha256)
    try:
        vector = open_template(session_key, upload.sealed, aad, upload.dims)
        raw = template_bytes(vector)
    except ContractError as exc:
        raise PharmacistInputError(str(exc)) from exc
    sealed = seal.seal(pharmacist.id, upload.model_sha256, raw)
    row = session.scalar(
        select(PharmacistTemplate).where(PharmacistTemplate.pharmacist_id == pharmacist.id).with_for_update()
    )
    if row is None:
        row = PharmacistTemplate(pharmacist_id=pharmacist.id)
        session.add(row)
    row.model_sha256, row.dims, row.sealed = upload.model_sha256, upload.dims, sealed
    row.sha256 = hashlib.sha256(sealed).hexdigest()
    row.enrolled_device_id, row.enrolled_at = device_id, now
    row.consent_version, row.consent_at = upload.consent_version, upload.consent_at
    row.id_photo_similarity = upload.id_photo_similarity
    session.flush()
    notice = RosterUpdateArgs(institution_code=institution.code, reason="template_enrolled").model_dump()
    commands = [
        _queue(session, other, CommandKind.ROSTER_UPDATE, notice, now)
        for other in bound_devices(session, institution.id)
        if other != device_id
    ]
    return row, commands


@dataclass(frozen=True, slots=True)
class RosterEntry:
    code: str
    name_masked: str
    id_number_masked: str | None
    template: SealedTemplate | None
    template_enrolled_at: dt.datetime | None


def roster(
    session: Session, *, device_id: str, key_id: uuid.UUID, session_key: bytes, seal: TemplateSeal
) -> tuple[Institution, list[RosterEntry]]:
    """The active pharmacists of the caller's institution, each template sealed under the caller's session key."""
    institution = _bound_institution(session, device_id)
    rows = session.execute(
        select(Pharmacist, PharmacistTemplate)
        .outerjoin(PharmacistTemplate, PharmacistTemplate.pharmacist_id == Pharmacist.id)
        .where(Pharmacist.institution_id == institution.id, Pharmacist.status == PharmacistStatus.ACTIVE)
        .order_by(Pharmacist.code)
    )
    entries: list[RosterEntry] = []
    for pharmacist, template in rows:
        sealed: SealedTemplate | None = None
        if template is not None:
            try:
                raw = seal.open(pharmacist.id, template.model_sha256, template.sealed)
                vector = template_from_bytes(raw, template.dims)
            except (CryptoError, ContractError):
                logger.error("the stored template of pharmacist row %d does not open; not sent", pharmacist.id)
            else:
                aad = template_aad(TemplateDirection.DOWNLOAD, device_id, pharmacist.code, template.model_sha256)
                sealed = SealedTemplate(
                    key_id=key_id,
                    sealed=seal_template(session_key, vector, aad),
                    model_sha256=template.model_sha256,
                    dims=template.dims,
                )
        entries.append(
            RosterEntry(
                code=pharmacist.code,
                name_masked=pharmacist.name_masked,
                id_number_masked=pharmacist.id_number_masked,
                template=sealed,
                template_enrolled_at=None if template is None else template.enrolled_at,
            )
        )
    return institution, entries


# ---------------------------------------------------------------- attendance sessions (ingest hook)


@dataclass(frozen=True, slots=True)
class SessionsRecorded:
    opened: int
    closed: int
    enrolments: int
    refused: int


def _verify(session: Session, envelope: Envelope, payload: SignedRecord) -> None:
    verify_signed_record(session, envelope, payload)


def _attendance_subject(session: Session, device_id: str, institution_code: str, code: str) -> Pharmacist:
    """The pharmacist a device's record names: in an institution the device is or was bound to."""
    institution = session.scalar(select(Institution).where(Institution.code == institution_code))
    if institution is None:
        raise ContractError("unknown institution")
    bound = session.scalar(
        select(
            or_(
                exists().where(Device.device_id == device_id, Device.institution_id == institution.id),
                exists().where(
                    DeviceBindingHistory.device_id == device_id,
                    DeviceBindingHistory.to_institution_id == institution.id,
                ),
            )
        )
    )
    if not bound:
        raise ContractError("the device was never bound to the record's institution")
    pharmacist = session.scalar(
        select(Pharmacist).where(Pharmacist.institution_id == institution.id, Pharmacist.code == code)
    )
    if pharmacist is None:
        raise ContractError("the pharmacist is not on the institution's roster")
    return pharmacist


_ATTENDANCE = {SignedRecordKind.SIGN_IN, SignedRecordKind.SIGN_OUT, SignedRecordKind.PHARMACIST_ENROLMENT}


def record_pharmacist_sessions(
    session: Session, envelopes: Sequence[Envelope], *, now: dt.datetime
) -> SessionsRecorded:
    """Sessions for the batch's verified `sign_in` / `sign_out` records (redeliveries change nothing)."""
    opened = closed = enrolments = refused = 0
    for envelope in envelopes:
        payload = envelope.payload
        if not isinstance(payload, SignedRecord) or payload.record_type not in _ATTENDANCE:
            continue
        try:
            _verify(session, envelope, payload)
            if payload.record_type is SignedRecordKind.PHARMACIST_ENROLMENT:
                enrolment = parse_enrolment(dict(payload.record))
                _attendance_subject(session, envelope.device_id, enrolment.institution_code, enrolment.pharmacist_code)
                enrolments += 1
                continue
            if payload.record_type is SignedRecordKind.SIGN_IN:
                opened += _sign_in(session, envelope, payload, now)
            else:
                closed += _sign_out(session, envelope, payload, now)
        except ContractError as exc:
            refused += 1
            logger.warning(
                "%s record %s of %s refused: %s",
                payload.record_type.value,
                envelope.message_id,
                envelope.device_id,
                exc,
            )
    if opened or closed:
        session.flush()
    return SessionsRecorded(opened, closed, enrolments, refused)


def _session_row(session: Session, session_id: uuid.UUID) -> PharmacistSession | None:
    return session.scalar(select(PharmacistSession).where(PharmacistSession.session_id == session_id).with_for_update())


def _sign_in(session: Session, envelope: Envelope, payload: SignedRecord, now: dt.datetime) -> int:
    record = parse_sign_in(dict(payload.record))
    if record.face_decision.value != "accepted":
        raise ContractError("the sign-in face decision was not accepted")
    pharmacist = _attendance_subject(session, envelope.device_id, record.institution_code, record.pharmacist_code)
    row = _session_row(session, record.session_id)
    if row is not None and row.sign_in_message_id is not None:
        return 0  # redelivered
    if row is None:
        row = PharmacistSession(session_id=record.session_id, received_at=now)
        session.add(row)
    row.pharmacist_id, row.institution_id, row.device_id = pharmacist.id, pharmacist.institution_id, envelope.device_id
    row.signed_in_at = record.signed_in_at
    row.sign_in_similarity, row.face_threshold = record.face_similarity, record.face_threshold
    row.sign_in_message_id, row.key_epoch, row.signature = envelope.message_id, payload.key_epoch, payload.signature
    return 1


def _sign_out(session: Session, envelope: Envelope, payload: SignedRecord, now: dt.datetime) -> int:
    record = parse_sign_out(dict(payload.record))
    if record.signed_out_at < record.signed_in_at:
        raise ContractError("signed out before signing in")
    pharmacist = _attendance_subject(session, envelope.device_id, record.institution_code, record.pharmacist_code)
    row = _session_row(session, record.session_id)
    if row is not None and row.sign_out_message_id is not None:
        return 0  # redelivered
    if row is None:  # the sign-in was refused or is still on its way: the sign-out carries its time
        row = PharmacistSession(
            session_id=record.session_id,
            pharmacist_id=pharmacist.id,
            institution_id=pharmacist.institution_id,
            device_id=envelope.device_id,
            signed_in_at=record.signed_in_at,
            received_at=now,
        )
        session.add(row)
    elif row.pharmacist_id != pharmacist.id:
        raise ContractError("the sign-out names another pharmacist than its session")
    # The terminal's word wins over a server auto-close made while it was away.
    row.signed_out_at, row.closed_reason = record.signed_out_at, record.reason.value
    row.sign_out_similarity = None if record.face is None else record.face.face_similarity
    row.sign_out_message_id = envelope.message_id
    return 1


def close_overdue_sessions(session: Session, *, now: dt.datetime, close_hour: int, tz: dt.tzinfo) -> int:
    """Close every open session whose closing hour has passed (reason `server_closed`, at the closing moment)."""
    rows = session.scalars(
        select(PharmacistSession)
        .where(PharmacistSession.signed_out_at.is_(None), PharmacistSession.signed_in_at < now)
        .with_for_update()
    )
    closed = 0
    for row in rows:
        moment = close_moment(row.signed_in_at, close_hour, tz)
        if moment <= now:
            row.signed_out_at, row.closed_reason = moment, SignOutReason.SERVER_CLOSED.value
            closed += 1
    if closed:
        session.flush()
    return closed
