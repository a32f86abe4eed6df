"""Binding with approval over HTTP (I-03, D-02, D-03, B-01): institutions, binding applications, unbinding, history.

Routes (policies in `sync_server.authz`): `PUT /api/v1/institutions/{code}` (create or update, device_admin),
`GET /api/v1/binding-applications` (device_admin; a regulator sees its region's), `POST
/api/v1/binding-applications/{application_id}/approve|reject` and `POST /api/v1/devices/{device_id}/unbind`
(device_admin, reason mandatory), `GET /api/v1/binding-history` (device_admin, regulator in region).

Every admin action is recorded in the server's audit chain after its commit, and the dispatcher is woken so the
decision reaches the terminal at once if it is online. The rules live in `sync_server.binding`; this module only
validates, translates errors to 404/409 and renders masked or pseudonymous data, never raw personal data.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from sync_server import binding
from sync_server.api.deps import AdminDep, ClockDep, RegionDep, RuntimeDep, SessionDep, WriterSessionDep
from sync_server.api.devices import DeviceIdPath
from sync_server.api.schemas import ErrorOut, UnprocessableOut
from sync_server.db.models import BindingApplication, BindingStatus, DeviceBindingHistory, Institution, InstitutionKind

router = APIRouter(prefix="/api/v1", tags=["binding"])

MAX_PAGE = 500
CodePath = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InstitutionIn(_In):
    name: str = Field(min_length=1, max_length=200)
    kind: InstitutionKind
    region_code: str = Field(pattern=r"^[0-9]{6}$", description="6-digit 医保区划 code.")
    address: str | None = Field(default=None, max_length=256)
    head_name: str | None = Field(default=None, max_length=50, description="Stored masked only.")
    contact_phone: str | None = Field(default=None, max_length=20, description="Stored masked only.")
    source: str | None = Field(default=None, max_length=32, description="Where the record came from (D-02).")


class InstitutionDetailOut(_Out):
    id: int
    code: str
    name: str
    kind: InstitutionKind
    region_code: str
    address: str | None
    head_masked: str | None
    contact_masked: str | None
    source: str | None
    created_at: datetime
    updated_at: datetime | None

    @classmethod
    def of(cls, row: Institution) -> InstitutionDetailOut:
        return cls(
            id=row.id,
            code=row.code,
            name=row.name,
            kind=row.kind,
            region_code=row.region_code,
            address=row.address,
            head_masked=row.head_masked,
            contact_masked=row.contact_masked,
            source=row.source,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class DecisionIn(_In):
    reason: str = Field(min_length=1, max_length=256, description="Mandatory: why (kept in history and audit).")
    contact: str | None = Field(
        default=None, max_length=64, description="Service desk the terminal shows to unbound staff."
    )


class ApplicationOut(_Out):
    id: int
    device_id: str
    institution_code: str
    applicant_ref: str = Field(description="Pseudonymous; never an ID number.")
    applicant_masked: str | None
    verification: str
    face_template_hash: str | None
    reason: str
    applied_at: datetime
    received_at: datetime
    key_epoch: int
    status: BindingStatus
    decided_at: datetime | None
    decided_by: str | None
    decision_reason: str | None
    command_id: uuid.UUID | None

    @classmethod
    def of(cls, row: BindingApplication) -> ApplicationOut:
        return cls(
            id=row.id,
            device_id=row.device_id,
            institution_code=row.institution_code,
            applicant_ref=row.applicant_ref,
            applicant_masked=row.applicant_masked,
            verification=row.verification,
            face_template_hash=row.face_template_hash,
            reason=row.reason,
            applied_at=row.applied_at,
            received_at=row.received_at,
            key_epoch=row.key_epoch,
            status=row.status,
            decided_at=row.decided_at,
            decided_by=row.decided_by,
            decision_reason=row.decision_reason,
            command_id=row.command_id,
        )


class ApplicationPage(_Out):
    items: list[ApplicationOut]
    total: int


class HistoryOut(_Out):
    id: int
    device_id: str
    at: datetime
    actor: str
    action: str
    from_institution_code: str | None
    to_institution_code: str | None
    application_id: int | None
    reason: str
    command_id: uuid.UUID | None


class HistoryPage(_Out):
    items: list[HistoryOut]
    total: int


class UnbindOut(_Out):
    device_id: str
    history: HistoryOut


def _http(exc: binding.BindingError) -> HTTPException:
    code = status.HTTP_404_NOT_FOUND if isinstance(exc, binding.BindingNotFoundError) else status.HTTP_409_CONFLICT
    return HTTPException(status_code=code, detail=str(exc))


@router.put(
    "/institutions/{code}",
    response_model=InstitutionDetailOut,
    responses={422: {"model": UnprocessableOut}},
)
def put_institution(
    code: CodePath,
    body: InstitutionIn,
    session: WriterSessionDep,
    clock: ClockDep,
    runtime: RuntimeDep,
    admin: AdminDep,
) -> InstitutionDetailOut:
    """Create or update an institution (D-02); the head's name and phone are stored masked only."""
    data = binding.InstitutionData(
        name=body.name,
        kind=body.kind,
        region_code=body.region_code,
        address=body.address,
        head_name=body.head_name,
        contact_phone=body.contact_phone,
        source=body.source,
    )
    with session.begin():
        row, created = binding.upsert_institution(session, code, data, now=clock.now())
        out = InstitutionDetailOut.of(row)
    runtime.audit.record("institution.created" if created else "institution.updated", code=code, admin=admin)
    return out


@router.get("/binding-applications", response_model=ApplicationPage)
def list_applications(
    session: SessionDep,
    region: RegionDep,
    status_: Annotated[BindingStatus | None, Query(alias="status")] = None,
    device_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ApplicationPage:
    """Binding applications, oldest first (I-03); a regulator sees those for institutions in its region."""
    return application_page(session, status_, device_id, region=region, limit=limit, offset=offset)


def application_page(
    session: Session,
    status_: BindingStatus | None,
    device_id: str | None = None,
    *,
    region: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> ApplicationPage:
    scope = []
    if status_ is not None:
        scope.append(BindingApplication.status == status_)
    if device_id is not None:
        scope.append(BindingApplication.device_id == device_id)
    if region is not None:
        in_region = select(Institution.code).where(Institution.region_code.startswith(region))
        scope.append(BindingApplication.institution_code.in_(in_region))
    total = session.scalar(select(func.count()).select_from(BindingApplication).where(*scope)) or 0
    rows = session.scalars(
        select(BindingApplication).where(*scope).order_by(BindingApplication.id).limit(limit).offset(offset)
    )
    return ApplicationPage(items=[ApplicationOut.of(r) for r in rows], total=total)


def _decide(
    application_id: int,
    body: DecisionIn,
    session: Session,
    clock: ClockDep,
    runtime: RuntimeDep,
    admin: str,
    *,
    approved: bool,
) -> ApplicationOut:
    action = binding.approve if approved else binding.reject
    with session.begin():
        try:
            row, command = action(
                session, application_id, actor=admin, reason=body.reason, contact=body.contact, now=clock.now()
            )
        except binding.BindingError as exc:
            raise _http(exc) from exc
        out = ApplicationOut.of(row)
    runtime.audit.record(
        "binding.approved" if approved else "binding.rejected",
        application_id=application_id,
        device_id=out.device_id,
        institution_code=out.institution_code,
        command_id=str(command.command_id),
        reason=body.reason,
        admin=admin,
    )
    if runtime.dispatcher is not None:
        runtime.dispatcher.wake()
    return out


_DECISION_RESPONSES: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorOut},
    409: {"model": ErrorOut},
    422: {"model": UnprocessableOut},
}


@router.post(
    "/binding-applications/{application_id}/approve",
    response_model=ApplicationOut,
    responses=_DECISION_RESPONSES,
)
def approve_application(
    application_id: int,
    body: DecisionIn,
    session: WriterSessionDep,
    clock: ClockDep,
    runtime: RuntimeDep,
    admin: AdminDep,
) -> ApplicationOut:
    """Bind the device to the institution applied for (409 if it is bound already or decided already)."""
    return _decide(application_id, body, session, clock, runtime, admin, approved=True)


@router.post(
    "/binding-applications/{application_id}/reject",
    response_model=ApplicationOut,
    responses=_DECISION_RESPONSES,
)
def reject_application(
    application_id: int,
    body: DecisionIn,
    session: WriterSessionDep,
    clock: ClockDep,
    runtime: RuntimeDep,
    admin: AdminDep,
) -> ApplicationOut:
    """Refuse the application; the terminal shows the reason and the contact."""
    return _decide(application_id, body, session, clock, runtime, admin, approved=False)


@router.post("/devices/{device_id}/unbind", response_model=UnbindOut, responses=_DECISION_RESPONSES)
def unbind_device(
    device_id: DeviceIdPath,
    body: DecisionIn,
    session: WriterSessionDep,
    clock: ClockDep,
    runtime: RuntimeDep,
    admin: AdminDep,
) -> UnbindOut:
    """End the device's binding and send it `unbind` (409 if it is not bound)."""
    with session.begin():
        try:
            _history, command = binding.unbind(
                session, device_id, actor=admin, reason=body.reason, contact=body.contact, now=clock.now()
            )
        except binding.BindingError as exc:
            raise _http(exc) from exc
        out = UnbindOut(device_id=device_id, history=history_page(session, device_id=device_id, limit=1).items[0])
    runtime.audit.record(
        "binding.unbound", device_id=device_id, command_id=str(command.command_id), reason=body.reason, admin=admin
    )
    if runtime.dispatcher is not None:
        runtime.dispatcher.wake()
    return out


@router.get("/binding-history", response_model=HistoryPage)
def list_history(
    session: SessionDep,
    region: RegionDep,
    device_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> HistoryPage:
    """Every binding change, newest first; a regulator sees changes touching its region's institutions."""
    return history_page(session, device_id=device_id, region=region, limit=limit, offset=offset)


def history_page(
    session: Session, *, device_id: str | None = None, region: str | None = None, limit: int = 100, offset: int = 0
) -> HistoryPage:
    src, dst = aliased(Institution), aliased(Institution)
    scope = []
    if device_id is not None:
        scope.append(DeviceBindingHistory.device_id == device_id)
    if region is not None:
        scope.append(src.region_code.startswith(region) | dst.region_code.startswith(region))
    base = (
        select(DeviceBindingHistory, src.code, dst.code)
        .outerjoin(src, src.id == DeviceBindingHistory.from_institution_id)
        .outerjoin(dst, dst.id == DeviceBindingHistory.to_institution_id)
        .where(*scope)
    )
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    rows = session.execute(
        base.order_by(DeviceBindingHistory.at.desc(), DeviceBindingHistory.id.desc()).limit(limit).offset(offset)
    )
    items = [
        HistoryOut(
            id=h.id,
            device_id=h.device_id,
            at=h.at,
            actor=h.actor,
            action=h.action,
            from_institution_code=from_code,
            to_institution_code=to_code,
            application_id=h.application_id,
            reason=h.reason,
            command_id=h.command_id,
        )
        for h, from_code, to_code in rows
    ]
    return HistoryPage(items=items, total=total)
