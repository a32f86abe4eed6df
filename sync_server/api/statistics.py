"""`/api/v1/statistics/...`: back-office statistics (D-04) for regulators, device administrators and institution heads.

Routes (policies in `sync_server.authz`): `GET /api/v1/statistics/devices` (device_admin, regulator, institution
head), `GET /api/v1/statistics/verifications` and `GET /api/v1/statistics/prescriptions` (regulator, institution
head). Owns turning the caller into a `sync_server.statistics.Scope` (a regulator sees its 医保区划 prefix, an
institution head its own institution; a device admin everything) and the query parameters (local days, an optional
region prefix inside the caller's own). The figures themselves are defined in `sync_server.statistics`. It must
never write.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, HTTPException, Query, status

from sync_server.accounts import Role
from sync_server.api.deps import ClockDep, PrincipalDep, SessionDep, SettingsDep
from sync_server.api.schemas import ErrorOut, UnprocessableOut
from sync_server.statistics import (
    REGION_PATTERN,
    DayRange,
    DeviceStatistics,
    OutOfScopeError,
    PrescriptionStatistics,
    Scope,
    StatisticsError,
    VerificationStatistics,
    device_statistics,
    prescription_filings,
    verification_statistics,
)

router = APIRouter(prefix="/api/v1/statistics", tags=["statistics"])

FirstDay = Annotated[
    date | None, Query(description="First local day (YYYY-MM-DD, display time zone); default: 6 days before last_day.")
]
LastDay = Annotated[date | None, Query(description="Last local day, included; default: today.")]
RegionQuery = Annotated[
    str | None,
    Query(pattern=REGION_PATTERN, description="Only this 医保区划 prefix (2, 4 or 6 digits), inside your own region."),
]
UNSCOPED_ROLES = frozenset({Role.DEVICE_ADMIN, Role.REGULATOR})


def caller_scope(principal: PrincipalDep, region: RegionQuery = None) -> Scope:
    """What the caller may count: a regulator its region prefix, an institution head (without a broader role) its
    institution; a `region` query narrows that further (403 outside the caller's region)."""
    institution_id = None
    if not principal.roles & UNSCOPED_ROLES:
        if principal.institution_id is None:  # fail closed: an institution role without an institution sees nothing
            raise HTTPException(status.HTTP_403_FORBIDDEN, "this account belongs to no institution")
        institution_id = principal.institution_id
    try:
        return Scope(principal.region_prefix, institution_id).narrowed(region)
    except OutOfScopeError as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from exc


ScopeDep = Annotated[Scope, Depends(caller_scope)]


def day_range(settings: SettingsDep, clock: ClockDep, first_day: FirstDay = None, last_day: LastDay = None) -> DayRange:
    tz = ZoneInfo(settings.display_timezone)
    try:
        return DayRange.of(first_day, last_day, today=clock.now().astimezone(tz).date(), tz=tz)
    except StatisticsError as exc:
        raise HTTPException(422, str(exc)) from exc


DaysDep = Annotated[DayRange, Depends(day_range)]
_ERRORS: dict[int | str, dict[str, object]] = {403: {"model": ErrorOut}, 422: {"model": UnprocessableOut}}


@router.get("/devices", response_model=DeviceStatistics, responses=_ERRORS)
def get_device_statistics(session: SessionDep, clock: ClockDep, scope: ScopeDep, days: DaysDep) -> DeviceStatistics:
    """Institutions covered by a terminal, devices by registration state, bound and online now (by 医保区划 roll-up:
    2, 4 and 6 digits), and per local day: devices that reported a heartbeat and binding changes. At most 31 days."""
    return device_statistics(session, scope, days, now=clock.now())


@router.get("/verifications", response_model=VerificationStatistics, responses=_ERRORS)
def get_verification_statistics(session: SessionDep, scope: ScopeDep, days: DaysDep) -> VerificationStatistics:
    """Identity verifications per method (face 1:1, face 1:N, liveness only, e-voucher, ID card, social-security
    card, POS, proxy) and outcome, per local day and region, from the terminals' identity audit events."""
    return verification_statistics(session, scope, days)


@router.get("/prescriptions", response_model=PrescriptionStatistics, responses=_ERRORS)
def get_prescription_statistics(session: SessionDep, scope: ScopeDep, days: DaysDep) -> PrescriptionStatistics:
    """Prescription filings per local day, current status and prescribing institution."""
    return prescription_filings(session, scope, days)
