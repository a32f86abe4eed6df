"""`/api/v1/devices`: the device registry, each device's stored events, and its daily reconciliation (read-only).

Owns filtering, keyset pagination (events are paged by `seq`, so a page never shifts when new events arrive) and the
reconciliation of one device and one local day: what the server stored next to what the terminal's heartbeats say
the server acknowledged. A regulator sees only devices of institutions in its region (others are 404). It must
never write.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import AwareDatetime
from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session, selectinload

from protocol import Heartbeat, PayloadType
from sync_server.api.deps import ClockDep, RegionDep, SessionDep, SettingsDep
from sync_server.api.schemas import (
    DeviceList,
    DeviceOut,
    ErrorOut,
    EventOut,
    EventPage,
    ReconciliationOut,
    SeqGapOut,
    StoredDayOut,
    TerminalDayOut,
    device_alarms,
)
from sync_server.db.models import Device, Event, Institution, LinkStateColumn

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{2,63}$"
DeviceIdPath = Annotated[str, Path(pattern=DEVICE_ID_PATTERN, description="The terminal's device id.")]
MAX_PAGE = 1000


def online_clause(now: datetime) -> ColumnElement[bool]:
    """SQL form of `sync_server.store.is_online`, evaluated at `now`."""
    return and_(Device.link_state == LinkStateColumn.ONLINE, Device.heartbeat_expires_at > now)


def get_device_or_404(session: Session, device_id: str) -> Device:
    device = session.scalar(
        select(Device).options(selectinload(Device.institution)).where(Device.device_id == device_id)
    )
    if device is None:
        raise HTTPException(status_code=404, detail=f"device {device_id!r} is not known to this server")
    return device


def in_region(device: Device, region: str | None) -> bool:
    """Is `device` visible to a caller scoped to `region` (a 医保区划 prefix; None: unscoped)?"""
    if region is None:
        return True
    return device.institution is not None and device.institution.region_code.startswith(region)


def get_scoped_device_or_404(session: Session, device_id: str, region: str | None) -> Device:
    device = get_device_or_404(session, device_id)
    if not in_region(device, region):  # outside a regulator's region a device does not exist
        raise HTTPException(status_code=404, detail=f"device {device_id!r} is not known to this server")
    return device


@router.get("", response_model=DeviceList)
def list_devices(
    session: SessionDep,
    clock: ClockDep,
    region: RegionDep,
    online: Annotated[bool | None, Query(description="Only devices that are (or are not) online now.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 500,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DeviceList:
    """Devices ordered by device id."""
    now = clock.now()
    conditions: list[ColumnElement[bool]] = []
    if online is True:
        conditions.append(online_clause(now))
    elif online is False:
        conditions.append(
            or_(
                Device.link_state != LinkStateColumn.ONLINE,
                Device.heartbeat_expires_at.is_(None),
                Device.heartbeat_expires_at <= now,
            )
        )
    if region is not None:
        conditions.append(
            Device.institution_id.in_(select(Institution.id).where(Institution.region_code.startswith(region)))
        )
    total = session.scalar(select(func.count()).select_from(Device).where(*conditions)) or 0
    rows = session.scalars(
        select(Device)
        .options(selectinload(Device.institution))
        .where(*conditions)
        .order_by(Device.device_id)
        .limit(limit)
        .offset(offset)
    )
    return DeviceList(items=[DeviceOut.of(row, now=now) for row in rows], total=total)


@router.get("/{device_id}", response_model=DeviceOut, responses={404: {"model": ErrorOut}})
def get_device(device_id: DeviceIdPath, session: SessionDep, clock: ClockDep, region: RegionDep) -> DeviceOut:
    return DeviceOut.of(get_scoped_device_or_404(session, device_id, region), now=clock.now())


def event_page(
    session: Session,
    device_id: str,
    *,
    payload_type: PayloadType | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    after_seq: int = 0,
    limit: int = 100,
) -> EventPage:
    """One page of a device's events in `seq` order; shared by the API and the web page."""
    filters: list[ColumnElement[bool]] = [Event.device_id == device_id]
    if payload_type is not None:
        filters.append(Event.payload_type == payload_type.value)
    if since is not None:
        filters.append(Event.device_time >= since)
    if until is not None:
        filters.append(Event.device_time < until)
    total = session.scalar(select(func.count()).select_from(Event).where(*filters)) or 0
    rows = list(
        session.scalars(select(Event).where(*filters, Event.seq > after_seq).order_by(Event.seq).limit(limit + 1))
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return EventPage(
        items=[EventOut.of(row) for row in rows],
        next_after_seq=rows[-1].seq if more else None,
        total=total,
    )


@router.get("/{device_id}/events", response_model=EventPage, responses={404: {"model": ErrorOut}})
def list_events(
    device_id: DeviceIdPath,
    session: SessionDep,
    payload_type: Annotated[PayloadType | None, Query(description="Only events of this payload type.")] = None,
    since: Annotated[
        AwareDatetime | None, Query(description="Only events whose device_time is at or after this (ISO 8601).")
    ] = None,
    until: Annotated[
        AwareDatetime | None, Query(description="Only events whose device_time is before this (ISO 8601).")
    ] = None,
    after_seq: Annotated[int, Query(ge=0, description="Keyset cursor: events with seq greater than this.")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> EventPage:
    """A device's stored events in `seq` order. `total` counts every event matching the filters (all pages);
    follow `next_after_seq` until it is null."""
    if since is not None and until is not None and since >= until:
        raise HTTPException(status_code=422, detail="'since' must be earlier than 'until'")
    get_device_or_404(session, device_id)
    return event_page(
        session,
        device_id,
        payload_type=payload_type,
        since=since,
        until=until,
        after_seq=after_seq,
        limit=limit,
    )


def _sent_total(payload: dict[str, object]) -> tuple[int, int] | None:
    """(outbox_sent_total, outbox_depth) of a stored heartbeat payload, or None if it no longer validates."""
    try:
        heartbeat = Heartbeat.model_validate(payload)
    except ValueError:
        return None
    return heartbeat.outbox_sent_total, heartbeat.outbox_depth


def reconcile_day(session: Session, device: Device, day: date, tz: ZoneInfo) -> ReconciliationOut:
    """The reconciliation of one device for one local day (shared by the API and, later, reports)."""
    start = datetime.combine(day, time.min, tzinfo=tz)
    end = datetime.combine(day + timedelta(days=1), time.min, tzinfo=tz)
    on_day = and_(Event.device_id == device.device_id, Event.device_time >= start, Event.device_time < end)
    count, min_seq, max_seq = session.execute(
        select(func.count(), func.min(Event.seq), func.max(Event.seq)).where(on_day)
    ).one()
    count = int(count or 0)
    heartbeat_on_day = and_(on_day, Event.payload_type == PayloadType.HEARTBEAT.value)
    heartbeats = session.scalar(select(func.count()).select_from(Event).where(heartbeat_on_day)) or 0
    first = session.scalar(select(Event.payload).where(heartbeat_on_day).order_by(Event.seq).limit(1))
    last = session.scalar(select(Event.payload).where(heartbeat_on_day).order_by(Event.seq.desc()).limit(1))
    first_counts = _sent_total(first) if first is not None else None
    last_counts = _sent_total(last) if last is not None else None
    return ReconciliationOut(
        device_id=device.device_id,
        day=day,
        timezone=str(tz),
        day_start=start,
        day_end=end,
        stored=StoredDayOut(
            count=count,
            min_seq=min_seq,
            max_seq=max_seq,
            missing_in_range=(int(max_seq) - int(min_seq) + 1 - count) if count else 0,
        ),
        terminal=TerminalDayOut(
            heartbeats=heartbeats,
            first_sent_total=first_counts[0] if first_counts else None,
            last_sent_total=last_counts[0] if last_counts else None,
            acked_during_day=last_counts[0] - first_counts[0] if first_counts and last_counts else None,
            last_outbox_depth=last_counts[1] if last_counts else None,
        ),
        acked_through_seq=device.acked_through_seq,
        last_seq=device.last_seq,
        open_gap=SeqGapOut.of(device),
        alarms=device_alarms(device),
    )


@router.get(
    "/{device_id}/reconciliation",
    response_model=ReconciliationOut,
    responses={404: {"model": ErrorOut}},
)
def get_reconciliation(
    device_id: DeviceIdPath,
    session: SessionDep,
    settings: SettingsDep,
    region: RegionDep,
    day: Annotated[date, Query(description="The local day (YYYY-MM-DD) in the server's display_timezone.")],
) -> ReconciliationOut:
    """Per-device daily reconciliation: records stored with a device_time on `day` (count, min/max seq), the
    terminal's own acknowledged-record counter from that day's heartbeats, and the device's acknowledged range and
    open hole now."""
    device = get_scoped_device_or_404(session, device_id, region)
    return reconcile_day(session, device, day, ZoneInfo(settings.display_timezone))
