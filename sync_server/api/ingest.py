"""`GET /api/v1/ingest/stats`: this process's ingest counters and the database totals.

It must never reset counters or touch the broker.
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import func, select

from sync_server.api.deps import ClockDep, RuntimeDep, SessionDep
from sync_server.api.schemas import DatabaseTotalsOut, IngestCountersOut, IngestStatsOut
from sync_server.db.models import Event, Institution
from sync_server.store import device_counts

router = APIRouter(prefix="/api/v1/ingest", tags=["ingest"])


@router.get("/stats", response_model=IngestStatsOut)
def ingest_stats(runtime: RuntimeDep, session: SessionDep, clock: ClockDep) -> IngestStatsOut:
    stats = runtime.ingest.stats() if runtime.ingest is not None else None
    counts = device_counts(session, now=clock.now())
    return IngestStatsOut(
        ingest=IngestCountersOut.of(stats, mqtt=runtime.mqtt_state),
        database=DatabaseTotalsOut(
            events=session.scalar(select(func.count()).select_from(Event)) or 0,
            devices=counts["devices"],
            devices_online=counts["devices_online"],
            institutions=session.scalar(select(func.count()).select_from(Institution)) or 0,
        ),
    )
