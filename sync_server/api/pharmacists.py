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

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from protocol.pharmacist import Attendance, AttendancePage, SignOutReason
from sync_server import pharmacists
from sync_server.accounts import Role
from sync_server.api.deps import PrincipalDep, RuntimeDep, SessionDep, WriterSessionDep
from sync_server.db.models import Account, Institution, Pharmacist, PharmacistSession
from sync_server.runtime import ServerRuntime

router = APIRouter(tags=["pharmacists"])

MAX_PAGE = 500
CodeQuery = Annotated[str | None, Query(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_-]+$")]


def _http(exc: pharmacists.PharmacistError) -> HTTPException:
    if isinstance(exc, pharmacists.PharmacistNotFoundError):
        code = status.HTTP_404_NOT_FOUND
    elif isinstance(exc, pharmacists.PharmacistInputError):
        code = status.HTTP_422_UNPROCESSABLE_ENTITY
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
