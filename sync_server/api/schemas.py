"""Request and response schemas of the HTTP API (pydantic), and their construction from ORM rows.

These are the public JSON shapes; changing a field is an API change. Times are timezone-aware UTC. The last
heartbeat is returned as the wire model `protocol.Heartbeat` itself. It must never expose columns that are
internal bookkeeping unless they help an operator, and never personal data.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol import Heartbeat
from sync_server.db.models import Device, Event, Institution, InstitutionKind, RegistrationState
from sync_server.ingest import IngestStats
from sync_server.runtime import MqttState
from sync_server.store import is_online

logger = logging.getLogger(__name__)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class ErrorOut(_Out):
    detail: str = Field(description="What went wrong, in words.")


class HealthOut(_Out):
    status: Literal["ok", "degraded", "error"] = Field(
        description="'ok'; 'degraded' when the database is fine but ingest lost the broker; 'error' (HTTP 503) "
        "when the database is unreachable."
    )
    database: Literal["ok", "error"]
    mqtt: MqttState = Field(
        description="The ingest worker's broker session; 'disabled' when this process runs no ingest."
    )


class InstitutionOut(_Out):
    id: int
    code: str = Field(description="医保 institution code (定点机构编码).")
    name: str
    kind: InstitutionKind
    region_code: str = Field(description="6-digit 医保区划 code.")
    created_at: datetime

    @classmethod
    def of(cls, row: Institution) -> InstitutionOut:
        return cls(
            id=row.id,
            code=row.code,
            name=row.name,
            kind=row.kind,
            region_code=row.region_code,
            created_at=row.created_at,
        )


class InstitutionList(_Out):
    items: list[InstitutionOut]
    total: int


class DeviceOut(_Out):
    device_id: str
    institution: InstitutionOut | None = Field(description="The institution the device is bound to, if any.")
    registration: RegistrationState = Field(
        description="'unprovisioned' for auto-registered devices; enrolment comes with device identity."
    )
    online: bool = Field(
        description="link_state is online AND the last heartbeat is younger than timeout factor x its interval_s."
    )
    link_state: Literal["online", "offline"] = Field(description="The device's last retained status message.")
    link_state_at: datetime | None
    first_seen_at: datetime
    last_seen_at: datetime | None = Field(description="When the server last received an envelope from it.")
    last_heartbeat_at: datetime | None = Field(description="When the server received its last heartbeat.")
    heartbeat_expires_at: datetime | None = Field(description="When it counts as offline without a new heartbeat.")
    software_version: str | None
    config_version: str | None
    last_seq: int = Field(description="Highest envelope sequence number received.")
    heartbeat: Heartbeat | None = Field(
        description="The last heartbeat: outbox depth and oldest age, peripherals, alarms, versions."
    )

    @classmethod
    def of(cls, row: Device, *, now: datetime) -> DeviceOut:
        return cls(
            device_id=row.device_id,
            institution=InstitutionOut.of(row.institution) if row.institution is not None else None,
            registration=row.registration,
            online=is_online(row.link_state, row.heartbeat_expires_at, now),
            link_state="online" if row.link_state == "online" else "offline",
            link_state_at=row.link_state_at,
            first_seen_at=row.first_seen_at,
            last_seen_at=row.last_seen_at,
            last_heartbeat_at=row.last_heartbeat_at,
            heartbeat_expires_at=row.heartbeat_expires_at,
            software_version=row.software_version,
            config_version=row.config_version,
            last_seq=row.last_seq,
            heartbeat=stored_heartbeat(row),
        )


def stored_heartbeat(row: Device) -> Heartbeat | None:
    """The device's last heartbeat as the wire model, or None (also when stored under an older schema)."""
    if row.last_heartbeat is None:
        return None
    try:
        return Heartbeat.model_validate(row.last_heartbeat)
    except ValidationError:
        logger.debug("stored heartbeat of %s no longer matches the schema", row.device_id)
        return None


class DeviceList(_Out):
    items: list[DeviceOut]
    total: int = Field(description="Devices matching the filters (all pages).")


class EventOut(_Out):
    seq: int
    message_id: uuid.UUID
    payload_type: str = Field(description="heartbeat, audit_event, …")
    device_time: datetime = Field(description="The terminal's wall clock when the record was made (may be wrong).")
    received_at: datetime = Field(description="When the server received it.")
    payload: dict[str, Any]

    @classmethod
    def of(cls, row: Event) -> EventOut:
        return cls(
            seq=row.seq,
            message_id=row.message_id,
            payload_type=row.payload_type,
            device_time=row.device_time,
            received_at=row.received_at,
            payload=row.payload,
        )


class EventPage(_Out):
    items: list[EventOut]
    next_after_seq: int | None = Field(
        description="Pass as after_seq to get the next page; null when this page is the last."
    )
    total: int = Field(description="Events matching the filters (all pages).")


class IngestCountersOut(_Out):
    running: bool = Field(description="Whether this process runs an ingest worker.")
    mqtt: MqttState
    started_at: datetime | None
    received: int
    stored: int
    duplicates: int
    conflicts: int
    statuses: int
    rejected: int
    batches: int
    store_failures: int
    last_commit_at: datetime | None

    @classmethod
    def of(cls, stats: IngestStats | None, *, mqtt: MqttState) -> IngestCountersOut:
        if stats is None:
            stats = IngestStats(started_at=None, connected=False)
            running = False
        else:
            running = True
        return cls(
            running=running,
            mqtt=mqtt,
            started_at=stats.started_at,
            received=stats.received,
            stored=stats.stored,
            duplicates=stats.duplicates,
            conflicts=stats.conflicts,
            statuses=stats.statuses,
            rejected=stats.rejected,
            batches=stats.batches,
            store_failures=stats.store_failures,
            last_commit_at=stats.last_commit_at,
        )


class DatabaseTotalsOut(_Out):
    events: int
    devices: int
    devices_online: int
    institutions: int


class IngestStatsOut(_Out):
    ingest: IngestCountersOut = Field(description="Counters of this process's ingest worker since it started.")
    database: DatabaseTotalsOut = Field(description="Totals in the database (all workers, all time).")
