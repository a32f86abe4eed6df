"""Request and response schemas of the HTTP API (pydantic), and their construction from ORM rows.

These are the public JSON shapes; changing a field is an API change. Times are timezone-aware UTC. The last
heartbeat is returned as the wire model `protocol.Heartbeat` itself. It must never expose columns that are
internal bookkeeping unless they help an operator, and never personal data.
"""

from __future__ import annotations

import logging
import uuid
from datetime import date, datetime
from typing import Any, Literal

from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol import MAX_COMMAND_ARGS, CommandArgs, CommandKind, Heartbeat
from sync_server.db.models import (
    CommandState,
    Device,
    Event,
    Institution,
    InstitutionKind,
    IssuedCommand,
    RegistrationState,
)
from sync_server.ingest import IngestStats
from sync_server.runtime import MqttState
from sync_server.store import ALARM_SEQ_GAP, is_online

logger = logging.getLogger(__name__)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class ErrorOut(_Out):
    detail: str = Field(description="What went wrong, in words.")


class ValidationIssue(_Out):
    loc: list[str | int] = Field(description="Where: 'body', 'query' or 'path', then the field's path.")
    msg: str = Field(description="What is wrong with it (never the value sent).")
    type: str = Field(description="A machine-readable kind, e.g. 'missing', 'string_too_long'.")


class UnprocessableOut(_Out):
    """A 422: the request was understood but refused. Validation names each field and rule (never echoing the
    values, which may be personal data); a domain rule says what it refuses in words."""

    detail: list[ValidationIssue] | str = Field(description="The fields refused and why, or the rule broken.")


class HealthOut(_Out):
    status: Literal["ok", "degraded", "error"] = Field(
        description="'ok'; 'degraded' when the database is fine but ingest lost the broker; 'error' (HTTP 503) "
        "when the database is unreachable."
    )
    database: Literal["ok", "error"]
    mqtt: MqttState = Field(
        description="The ingest worker's broker session; 'disabled' when this process runs no ingest (an HTTP "
        "worker process, `http_workers`)."
    )
    pid: int = Field(description="The server process that answered (the main process or an HTTP worker).")


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


class SeqGapOut(_Out):
    """An open hole in a device's stored sequence numbers: records above it are stored, these are not (yet)."""

    missing_from: int = Field(description="First missing seq (acked_through_seq + 1).")
    missing_to: int | None = Field(description="Last missing seq when last computed (the next stored seq - 1).")
    since: datetime = Field(description="When the server first saw this hole.")
    alarm: bool = Field(description="True once the hole outlived seq_gap_alarm_after_s (alarm 'seq_gap').")
    alarm_at: datetime | None = Field(description="When the alarm was raised.")

    @classmethod
    def of(cls, row: Device) -> SeqGapOut | None:
        if row.seq_gap_from is None or row.seq_gap_since is None:
            return None
        return cls(
            missing_from=row.seq_gap_from,
            missing_to=row.seq_gap_to,
            since=row.seq_gap_since,
            alarm=row.seq_gap_alarm_at is not None,
            alarm_at=row.seq_gap_alarm_at,
        )


class DeviceOut(_Out):
    device_id: str
    institution: InstitutionOut | None = Field(description="The institution the device is bound to, if any.")
    registration: RegistrationState = Field(
        description="unprovisioned (auto-registered by plaintext traffic), registered, enrolled or revoked."
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
    acked_through_seq: int = Field(
        description="Every seq 1..N of this device is stored; the value of the last uplink_ack sent to it."
    )
    seq_gap: SeqGapOut | None = Field(description="The open hole above acked_through_seq, if any.")
    alarms: list[str] = Field(description="Server-side alarms of this device, e.g. 'seq_gap'.")
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
            acked_through_seq=row.acked_through_seq,
            seq_gap=SeqGapOut.of(row),
            alarms=device_alarms(row),
            heartbeat=stored_heartbeat(row),
        )


def device_alarms(row: Device) -> list[str]:
    """The server-side alarms of a device now (the terminal's own travel in its heartbeat)."""
    return [ALARM_SEQ_GAP] if row.seq_gap_alarm_at is not None else []


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
    acks_sent: int = Field(description="uplink_ack messages queued to devices after their batch committed.")
    commands_acknowledged: int = Field(default=0, description="Commands moved to acknowledged by a stored result.")
    command_results_unmatched: int = Field(
        default=0, description="Command results stored that answer no command issued to their device (flagged)."
    )
    security_refused: int = Field(
        default=0, description="Of `rejected`, messages refused by message security (see security_events)."
    )

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
            acks_sent=stats.acks_sent,
            commands_acknowledged=stats.commands_acknowledged,
            security_refused=stats.security_refused,
            command_results_unmatched=stats.command_results_unmatched,
        )


class DatabaseTotalsOut(_Out):
    events: int
    devices: int
    devices_online: int
    institutions: int


class IngestStatsOut(_Out):
    ingest: IngestCountersOut = Field(description="Counters of this process's ingest worker since it started.")
    database: DatabaseTotalsOut = Field(description="Totals in the database (all workers, all time).")


class StoredDayOut(_Out):
    """What the server stored of one device for one local day (by the record's device_time)."""

    count: int = Field(description="Records stored whose device_time falls on the day.")
    min_seq: int | None = Field(description="Lowest seq among them; null when there are none.")
    max_seq: int | None = Field(description="Highest seq among them; null when there are none.")
    missing_in_range: int = Field(
        description="Seqs between min_seq and max_seq not stored with a device_time on this day (holes, or records "
        "whose clock put them on another day)."
    )


class TerminalDayOut(_Out):
    """What the terminal itself reported for the day, from its heartbeats (cumulative outbox counters)."""

    heartbeats: int = Field(description="Heartbeats stored whose device_time falls on the day.")
    first_sent_total: int | None = Field(description="outbox_sent_total in the first heartbeat of the day.")
    last_sent_total: int | None = Field(description="outbox_sent_total in the last heartbeat of the day.")
    acked_during_day: int | None = Field(
        description="last_sent_total - first_sent_total: records the server acknowledged between those heartbeats."
    )
    last_outbox_depth: int | None = Field(
        description="Records the server had not acknowledged, as of the last heartbeat of the day."
    )


class ReconciliationOut(_Out):
    """One device, one day: the server's count next to the terminal's own, and what is still open."""

    device_id: str
    day: date = Field(description="The local day reconciled.")
    timezone: str = Field(description="The time zone of that day (the server's display_timezone).")
    day_start: datetime
    day_end: datetime
    stored: StoredDayOut
    terminal: TerminalDayOut
    acked_through_seq: int = Field(description="Every seq 1..N of the device is stored (all days).")
    last_seq: int = Field(description="Highest seq stored (all days).")
    open_gap: SeqGapOut | None = Field(description="The open hole above acked_through_seq, if any.")
    alarms: list[str] = Field(description="Server-side alarms of the device now.")


DEFAULT_COMMAND_TTL_S = 3600.0


class CommandIn(BaseModel):
    """A command to queue for one device. `args` are checked against the kind's closed model where it has one
    (`protocol.COMMAND_ARGS_MODELS`: `ping` takes none, `log_request` takes `window_s`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: CommandKind = Field(description="What the device is asked to do.")
    args: CommandArgs = Field(
        default_factory=dict, max_length=MAX_COMMAND_ARGS, description="Flat arguments of the kind."
    )
    ttl_s: float = Field(
        default=DEFAULT_COMMAND_TTL_S,
        gt=0,
        description="Seconds from now after which the command must not be carried out (bounded by the server's "
        "command_max_ttl_s).",
    )


class CommandOut(_Out):
    command_id: uuid.UUID = Field(description="The idempotency key the device remembers.")
    device_id: str
    kind: str
    args: dict[str, Any]
    issued_at: datetime
    expires_at: datetime
    state: CommandState = Field(description="queued, delivered, acknowledged or expired.")
    attempts: int = Field(description="Times published to the device's downlink topic.")
    last_published_at: datetime | None
    acknowledged_at: datetime | None = Field(description="When the device's answer was stored.")
    result_outcome: str | None = Field(description="The device's answer: applied, rejected, expired or failed.")
    result_detail: str | None
    result_at: datetime | None = Field(description="The device's own time of the answer.")

    @classmethod
    def of(cls, row: IssuedCommand) -> CommandOut:
        return cls(
            command_id=row.command_id,
            device_id=row.device_id,
            kind=row.kind,
            args=row.args,
            issued_at=row.issued_at,
            expires_at=row.expires_at,
            state=row.state,
            attempts=row.attempts,
            last_published_at=row.last_published_at,
            acknowledged_at=row.acknowledged_at,
            result_outcome=row.result_outcome,
            result_detail=row.result_detail,
            result_at=row.result_at,
        )


class CommandPage(_Out):
    items: list[CommandOut] = Field(description="Newest first.")
    total: int = Field(description="Commands issued to this device (all pages).")


def model_response(model: BaseModel, status_code: int = 200) -> Response:
    """`model` as its JSON answer, for the busiest routes (the HIS interfaces). A sync route that returns a model has
    FastAPI validate it again against its `response_model` in a worker thread (one more thread hop per request) and
    serialise it twice; the route's `response_model` still documents the answer. Use only with the very type the
    route declares."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")
