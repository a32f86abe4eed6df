"""Pharmacists over HTTP (H-08, E-04, P-01, P-02; docs/pharmacists.md).

Routes (policies in `sync_server.authz`):

* `PUT /his/v1/pharmacists` — the HIS base-info sync of the calling HIS client's own institution (batch upsert);
* `POST /device/v1/pharmacists/{code}/template` — the enrolling terminal uploads a template sealed under its session
  key, for a pharmacist of its own institution;
* `GET /device/v1/pharmacists` — the roster of the calling terminal's institution, templates sealed under its key;
* `GET /device/v1/pharmacist-sessions?pharmacist=CODE` — attendance records for the terminal's display (P-02);
* `GET /api/v1/pharmacist-sessions` — attendance for a regulator (region), an institution head (own institution)
  or a pharmacist (own records); names and ID numbers are masked.

Sessions left open past the closing hour are closed (`server_closed`) before a query answers. The rules live in
`sync_server.pharmacists`; this module validates, translates errors to 404/409/422 and renders masked data only.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from protocol.pharmacist import Attendance, AttendancePage, Roster, RosterEntry, SignOutReason, TemplateUpload
from sync_server import pharmacists
from sync_server.accounts import Role
from sync_server.api.deps import (
    ClockDep,
    DeviceCallerDep,
    PrincipalDep,
    RuntimeDep,
    SessionDep,
    WriterSessionDep,
)
from sync_server.api.schemas import ErrorOut, UnprocessableOut
from sync_server.db.models import Account, Institution, Pharmacist, PharmacistSession
from sync_server.runtime import ServerRuntime

router = APIRouter(tags=["pharmacists"])

MAX_PAGE = 500
CodeQuery = Annotated[str | None, Query(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_-]+$")]
CodePath = Annotated[str, Path(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_-]+$")]
_Dict3 = Annotated[str | None, Field(default=None, min_length=1, max_length=3)]
_Dict6 = Annotated[str | None, Field(default=None, min_length=1, max_length=6)]
_Flag = Annotated[str | None, Field(default=None, pattern=r"^[01]$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HisPharmacistIn(_In):
    """One pharmacist as the HIS sends it (药店基础信息同步, E-04). Only what the platform needs is accepted (K-34,
    minimum necessary): contact details, address, ethnicity and the like are refused as unknown fields. The name
    and the ID number are masked before they are stored."""

    dr_id: str | None = Field(default=None, min_length=1, max_length=32, description="医师id (C32).")
    dr_code: str = Field(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_-]+$", description="医保药师代码 (C20).")
    dr_name: str = Field(min_length=1, max_length=20, description="医师姓名 (C20); stored masked.")
    psn_cert_type: _Dict3 = Field(default=None, description="证件类型 (字典 psn_cert_type).")
    certno: str | None = Field(
        default=None, min_length=6, max_length=20, pattern=r"^[0-9A-Za-z]+$", description="证件号码; stored masked."
    )
    dr_prac_cert_no: str | None = Field(default=None, min_length=1, max_length=20, description="执业证书编号 (C20).")
    dr_prac_type: _Dict6 = Field(default=None, description="执业类别 (字典 dr_prac_type).")
    dr_prac_scp_code: _Dict6 = Field(default=None, description="执业范围代码 (字典 dr_prac_scp_code).")
    prac_regn: str | None = Field(default=None, pattern=r"^[0-9]{6}$", description="执业地区 (C6).")
    mul_prac_flag: _Flag = Field(default=None, description="多点执业标志: 1 是, 0 否.")
    dr_pro_tech_duty: _Dict6 = Field(default=None, description="专业技术职务 (字典 dr_pro_tech_duty).")
    psn_role: _Dict6 = Field(default=None, description="人员角色 (字典 psn_role).")
    resign_date: dt.date | None = Field(default=None, description="离职时间: set when the pharmacist left.")
    vali_flag: str = Field(default="1", pattern=r"^[01]$", description="有效标志: 0 = no longer valid (left).")

    def data(self) -> pharmacists.PharmacistData:
        return pharmacists.PharmacistData(
            code=self.dr_code,
            name=self.dr_name,
            his_person_id=self.dr_id,
            cert_type=self.psn_cert_type,
            id_number=self.certno,
            practising_cert_no=self.dr_prac_cert_no,
            practising_type=self.dr_prac_type,
            practising_scope=self.dr_prac_scp_code,
            practising_region=self.prac_regn,
            multi_site=None if self.mul_prac_flag is None else self.mul_prac_flag == "1",
            tech_duty=self.dr_pro_tech_duty,
            psn_role=self.psn_role,
            left_on=self.resign_date,
            valid=self.vali_flag == "1",
        )


class HisPharmacistsIn(_In):
    pharmacists: list[HisPharmacistIn] = Field(min_length=1, max_length=500)


class HisSyncOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    institution_code: str
    created: int
    updated: int
    left: int = Field(description="Pharmacists who left with this sync (their templates purged).")
    templates_deleted: int
    commands: int = Field(description="Commands queued to the institution's terminals (notices and purges).")


class TemplateStoredOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pharmacist_code: str
    enrolled_at: dt.datetime
    notified_devices: int


_RESPONSES: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorOut},
    409: {"model": ErrorOut},
    422: {"model": UnprocessableOut},
}


def _http(exc: pharmacists.PharmacistError) -> HTTPException:
    if isinstance(exc, pharmacists.PharmacistNotFoundError):
        code = status.HTTP_404_NOT_FOUND
    elif isinstance(exc, pharmacists.PharmacistInputError):
        code = status.HTTP_422_UNPROCESSABLE_CONTENT
    else:
        code = status.HTTP_409_CONFLICT
    return HTTPException(status_code=code, detail=str(exc))


def template_seal(runtime: ServerRuntime) -> pharmacists.TemplateSeal:
    return pharmacists.TemplateSeal(runtime.settings.secret_key.get_secret_value())


def close_overdue(runtime: ServerRuntime, session: Session) -> None:
    """The lazy half of the closing hour: sessions the terminals left open are closed before anyone reads them."""
    settings = runtime.settings
    with session.begin():
        pharmacists.close_overdue_sessions(
            session,
            now=runtime.clock.now(),
            close_hour=settings.pharmacist_close_hour,
            tz=ZoneInfo(settings.display_timezone),
        )


def attendance_page(
    session: Session,
    scope: list[ColumnElement[bool]],
    *,
    pharmacist: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    limit: int,
    offset: int,
) -> AttendancePage:
    where = list(scope)
    if pharmacist is not None:
        where.append(Pharmacist.code == pharmacist)
    if since is not None:
        where.append(PharmacistSession.signed_in_at >= since)
    if until is not None:
        where.append(PharmacistSession.signed_in_at < until)
    base = (
        select(PharmacistSession, Pharmacist.code, Pharmacist.name_masked, Institution.code)
        .join(Pharmacist, Pharmacist.id == PharmacistSession.pharmacist_id)
        .join(Institution, Institution.id == PharmacistSession.institution_id)
        .where(*where)
    )
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    rows = session.execute(
        base.order_by(PharmacistSession.signed_in_at.desc(), PharmacistSession.id.desc()).limit(limit).offset(offset)
    )
    items = [
        Attendance(
            session_id=row.session_id,
            pharmacist_code=code,
            pharmacist_masked=masked,
            institution_code=institution_code,
            device_id=row.device_id,
            signed_in_at=row.signed_in_at,
            signed_out_at=row.signed_out_at,
            closed_reason=None if row.closed_reason is None else SignOutReason(row.closed_reason),
            sign_in_similarity=row.sign_in_similarity,
            sign_out_similarity=row.sign_out_similarity,
            face_threshold=row.face_threshold,
        )
        for row, code, masked, institution_code in rows
    ]
    return AttendancePage(items=items, total=total)


Since = Annotated[dt.datetime | None, Query(description="Sessions signed in at or after this instant.")]
Until = Annotated[dt.datetime | None, Query(description="Sessions signed in before this instant.")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Offset = Annotated[int, Query(ge=0)]


@router.get("/api/v1/pharmacist-sessions", response_model=AttendancePage)
def list_attendance(
    principal: PrincipalDep,
    session: SessionDep,
    writer: WriterSessionDep,
    runtime: RuntimeDep,
    pharmacist: CodeQuery = None,
    institution: Annotated[str | None, Query(min_length=1, max_length=32)] = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> AttendancePage:
    """Attendance, newest first (P-02, R-07): a regulator sees its region, an institution head their institution, a
    pharmacist their own sessions."""
    close_overdue(runtime, writer)
    scope: list[ColumnElement[bool]] = []
    if Role.REGULATOR in principal.roles:
        if principal.region_prefix is not None:
            scope.append(Institution.region_code.startswith(principal.region_prefix))
    elif Role.INSTITUTION_HEAD in principal.roles and principal.institution_id is not None:
        scope.append(PharmacistSession.institution_id == principal.institution_id)
    elif Role.PHARMACIST in principal.roles and principal.institution_id is not None:
        account = session.get(Account, principal.account_id) if principal.account_id is not None else None
        if account is None or not account.id_number:
            raise HTTPException(
                status_code=status.HTTP_409_CONFLICT,
                detail="this pharmacist account has no 证件号码 to link it to a pharmacist record",
            )
        ref = template_seal(runtime).id_number_ref(account.id_number)
        scope += [PharmacistSession.institution_id == principal.institution_id, Pharmacist.id_number_ref == ref]
    else:
        raise HTTPException(
            status_code=status.HTTP_409_CONFLICT, detail="this account is not linked to an institution or a region"
        )
    if institution is not None:
        scope.append(Institution.code == institution)
    return attendance_page(session, scope, pharmacist=pharmacist, since=since, until=until, limit=limit, offset=offset)


# ---------------------------------------------------------------- the HIS (H-08)


@router.put("/his/v1/pharmacists", response_model=HisSyncOut, responses=_RESPONSES)
def his_sync_pharmacists(
    body: HisPharmacistsIn,
    principal: PrincipalDep,
    session: WriterSessionDep,
    clock: ClockDep,
    runtime: RuntimeDep,
) -> HisSyncOut:
    """Pharmacy base-info sync (药店基础信息同步): create or update the calling HIS client's institution's pharmacists.
    A pharmacist marked left (resign_date, or vali_flag 0) loses their face template and every terminal of the
    institution is told to purge it."""
    if principal.institution_id is None:
        raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail="this caller is not tied to an institution")
    with session.begin():
        institution = session.get(Institution, principal.institution_id)
        if institution is None:
            raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail="the caller's institution is not known")
        try:
            result = pharmacists.sync_pharmacists(
                session, institution, [p.data() for p in body.pharmacists], seal=template_seal(runtime), now=clock.now()
            )
        except pharmacists.PharmacistError as exc:
            raise _http(exc) from exc
        out = HisSyncOut(
            institution_code=institution.code,
            created=result.created,
            updated=result.updated,
            left=result.left,
            templates_deleted=result.templates_deleted,
            commands=len(result.commands),
        )
    runtime.audit.record(
        "pharmacists.synced",
        institution_code=out.institution_code,
        created=out.created,
        updated=out.updated,
        left=out.left,
        client=principal.name,
    )
    if runtime.dispatcher is not None and out.commands:
        runtime.dispatcher.wake()
    return out


# ---------------------------------------------------------------- the terminals


@router.post("/device/v1/pharmacists/{code}/template", response_model=TemplateStoredOut, responses=_RESPONSES)
def device_upload_template(
    code: CodePath,
    body: TemplateUpload,
    caller: DeviceCallerDep,
    session: WriterSessionDep,
    clock: ClockDep,
    runtime: RuntimeDep,
) -> TemplateStoredOut:
    """The enrolling terminal's template of a pharmacist of its own institution, sealed under the session key the
    request is signed with (409 if another key: seal again and retry). Re-sealed at rest; the institution's other
    terminals are told to fetch the roster."""
    with session.begin():
        try:
            row, commands = pharmacists.store_template(
                session,
                device_id=caller.device_id,
                key_id=caller.key_id,
                session_key=caller.session_key,
                code=code,
                upload=body,
                seal=template_seal(runtime),
                now=clock.now(),
            )
        except pharmacists.PharmacistError as exc:
            raise _http(exc) from exc
        out = TemplateStoredOut(pharmacist_code=code, enrolled_at=row.enrolled_at, notified_devices=len(commands))
    runtime.audit.record(
        "pharmacist.template_enrolled",
        device_id=caller.device_id,
        pharmacist_code=code,
        consent_version=body.consent_version,
    )
    if runtime.dispatcher is not None and commands:
        runtime.dispatcher.wake()
    return out


@router.get("/device/v1/pharmacists", response_model=Roster, responses=_RESPONSES)
def device_roster(caller: DeviceCallerDep, session: SessionDep, runtime: RuntimeDep) -> Roster:
    """The active pharmacists of the calling terminal's institution, each template sealed under the caller's key."""
    try:
        institution, entries = pharmacists.roster(
            session,
            device_id=caller.device_id,
            key_id=caller.key_id,
            session_key=caller.session_key,
            seal=template_seal(runtime),
        )
    except pharmacists.PharmacistError as exc:
        raise _http(exc) from exc
    return Roster(
        institution_code=institution.code,
        pharmacists=[
            RosterEntry(
                code=e.code, name_masked=e.name_masked, id_number_masked=e.id_number_masked, template=e.template
            )
            for e in entries
        ],
    )


@router.get("/device/v1/pharmacist-sessions", response_model=AttendancePage, responses=_RESPONSES)
def device_attendance(
    caller: DeviceCallerDep,
    session: SessionDep,
    writer: WriterSessionDep,
    runtime: RuntimeDep,
    pharmacist: CodeQuery = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> AttendancePage:
    """Attendance at the calling terminal's institution (every terminal of it), for the pharmacist's own screen."""
    if caller.institution_id is None:
        raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail="this terminal is not bound to an institution")
    close_overdue(runtime, writer)
    scope: list[ColumnElement[bool]] = [PharmacistSession.institution_id == caller.institution_id]
    return attendance_page(session, scope, pharmacist=pharmacist, since=since, until=until, limit=limit, offset=offset)
