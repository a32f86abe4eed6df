"""`/api/v1/institutions`: the designated institutions terminals can be bound to (read-only, minimal for now).

Binding with approval comes in a later issue. It must never write.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import func, select

from sync_server.api.deps import RegionDep, SessionDep
from sync_server.api.schemas import InstitutionList, InstitutionOut
from sync_server.db.models import Institution

router = APIRouter(prefix="/api/v1/institutions", tags=["institutions"])


@router.get("", response_model=InstitutionList)
def list_institutions(
    session: SessionDep,
    region: RegionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> InstitutionList:
    """Institutions ordered by code; a regulator sees those in its region only."""
    scope = [Institution.region_code.startswith(region)] if region is not None else []
    total = session.scalar(select(func.count()).select_from(Institution).where(*scope)) or 0
    rows = session.scalars(select(Institution).where(*scope).order_by(Institution.code).limit(limit).offset(offset))
    return InstitutionList(items=[InstitutionOut.of(row) for row in rows], total=total)
