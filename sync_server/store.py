"""Database writes of ingest: envelopes stored exactly once, device registry and presence updates.

Owns the rules that make redelivery harmless: an envelope is identified by `message_id` and by
(`device_id`, `seq`) and is stored at most once under unique constraints on both; a device's heartbeat, versions and
`last_seq` only move forward by `seq`, whatever order redelivered messages arrive in. Owns too each device's
`acked_through_seq` (the highest contiguous stored seq, advanced from its stored value through the unique
(device_id, seq) index, never by scanning the table) and the bookkeeping of a hole above it (`seq_gap_*`, the
`seq_gap` alarm). Every function works inside
the caller's transaction (it never commits) and lets SQLAlchemy errors propagate to the caller, which owns the
transaction and translates them at its boundary. It must never know about MQTT or HTTP, and never log payload
contents (they may reference people).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import String, Table, and_, any_, bindparam, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from protocol import DeviceStatusMessage, Envelope, Heartbeat, LinkState, SystemClock
from sync_server.db.models import (
    Base,
    Device,
    DevicePresence,
    Event,
    LinkStateColumn,
    PresenceReason,
    RegistrationState,
)

logger = logging.getLogger(__name__)

IN_CHUNK = 500
"""Most values in one SQL IN list (Oracle-class databases refuse more than 1000)."""
ACK_WALK_CHUNK = 1000
"""Stored seqs read per step when advancing `acked_through_seq`; one step covers a typical batch."""
ALARM_SEQ_GAP = "seq_gap"
"""Server-side alarm: a hole in a device's stored seqs outlived `seq_gap_alarm_after_s`."""

_T = TypeVar("_T")


class StoreMethod(StrEnum):
    """How `store_envelopes` inserts."""

    AUTO = "auto"
    """BULK on PostgreSQL, FAST on SQLite (INSERT … ON CONFLICT DO NOTHING), PORTABLE elsewhere."""
    BULK = "bulk"
    """PostgreSQL: one INSERT … SELECT FROM json_to_recordset(the batch as one JSON array) ON CONFLICT DO NOTHING
    RETURNING per batch. Two parameters and a statement text that never changes: the multi-row VALUES of FAST has
    9 placeholders per row, which psycopg parses again for every batch (measured: ~40 % of the storing thread),
    and per-column arrays cost as much in the driver's array quoting."""
    FAST = "fast"
    """One multi-row INSERT … VALUES (…), (…) ON CONFLICT DO NOTHING … RETURNING per batch."""
    PORTABLE = "portable"
    """Pre-select existing keys, then insert each new row in its own SAVEPOINT (any SQL database)."""


@dataclass(frozen=True, slots=True)
class StoreResult:
    """What one `store_envelopes` call did. `stored + duplicates == len(envelopes)`."""

    stored: int
    """Envelopes inserted now."""
    duplicates: int
    """Envelopes not inserted because their `message_id` or (`device_id`, `seq`) is already taken (by an earlier
    delivery, or earlier in the same batch)."""
    conflicts: int = 0
    """The subset of `duplicates` whose key is taken by a *different* record: same `seq` with another `message_id`,
    or the same `message_id` under another `seq`. A terminal that does this has a broken outbox; the first record
    stays stored and the conflicting one is logged."""

    def __add__(self, other: StoreResult) -> StoreResult:
        return StoreResult(
            self.stored + other.stored, self.duplicates + other.duplicates, self.conflicts + other.conflicts
        )


def _chunks(items: Sequence[_T], size: int = IN_CHUNK) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _in(session: Session, column: Any, values: Sequence[str]) -> Any:
    """`column IN (values)`. On PostgreSQL `column = ANY(one array parameter)`: the statement text stays the same
    whatever the number of values, so the driver does not parse a new 500-placeholder statement for every batch."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(String())))
    return column.in_(values)


def _dialect_insert(session: Session, table: Table) -> Any:
    """The dialect's INSERT that has `on_conflict_do_nothing()`, or None when the dialect has none."""
    name = session.get_bind().dialect.name
    if name == "sqlite":
        return sqlite.insert(table)
    if name == "postgresql":
        return postgresql.insert(table)
    return None


def _event_row(envelope: Envelope, received_at: datetime) -> dict[str, Any]:
    return {
        "device_id": envelope.device_id,
        "seq": envelope.seq,
        "message_id": envelope.message_id,
        "payload_type": envelope.payload_type.value,
        "device_time": envelope.device_time,
        "received_at": received_at,
        "boot_id": envelope.boot_id,
        "monotonic_ns": envelope.monotonic_ns,
        "payload": envelope.payload.model_dump(mode="json"),
    }


def _new_device_row(device_id: str, now: datetime) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "institution_id": None,
        "registration": RegistrationState.UNPROVISIONED,
        "link_state": LinkStateColumn.OFFLINE,
        "link_state_at": None,
        "online": False,
        "first_seen_at": now,
        "last_seq": 0,
        "created_at": now,
    }


def known_devices(session: Session, device_ids: Collection[str]) -> set[str]:
    """Which of `device_ids` are registered."""
    found: set[str] = set()
    ids = sorted(set(device_ids))
    for chunk in _chunks(ids):
        found.update(session.scalars(select(Device.device_id).where(_in(session, Device.device_id, chunk))))
    return found


def register_devices(session: Session, device_ids: Collection[str], *, now: datetime) -> list[str]:
    """Register every device in `device_ids` that is not yet known, as 'unprovisioned'. Safe against another
    worker registering the same device concurrently. Returns the ids registered by this call."""
    missing = sorted(set(device_ids) - known_devices(session, device_ids))
    if not missing:
        return []
    table = Base.metadata.tables[Device.__tablename__]
    stmt = _dialect_insert(session, table)
    registered: list[str] = []
    if stmt is not None:
        result = session.execute(
            stmt.on_conflict_do_nothing().returning(table.c.device_id), [_new_device_row(d, now) for d in missing]
        )
        registered = list(result.scalars())
    else:
        for device_id in missing:
            try:
                with session.begin_nested():
                    session.execute(insert(table).values(_new_device_row(device_id, now)))
                registered.append(device_id)
            except IntegrityError:
                logger.debug("device %s was registered concurrently", device_id)
    for device_id in registered:
        logger.info("registered new device %s (unprovisioned)", device_id)
    return registered


def _dedupe_batch(envelopes: Iterable[Envelope]) -> tuple[list[Envelope], int, int]:
    """First occurrence wins. Returns (unique envelopes, internal duplicates, internal conflicts)."""
    by_id: dict[uuid.UUID, Envelope] = {}
    by_key: dict[tuple[str, int], Envelope] = {}
    unique: list[Envelope] = []
    duplicates = conflicts = 0
    for env in envelopes:
        key = (env.device_id, env.seq)
        first = by_id.get(env.message_id) or by_key.get(key)
        if first is not None:
            duplicates += 1
            if first.message_id != env.message_id or (first.device_id, first.seq) != key:
                conflicts += 1
                _log_conflict(env, first.message_id, first.device_id, first.seq)
            continue
        by_id[env.message_id] = env
        by_key[key] = env
        unique.append(env)
    return unique, duplicates, conflicts


def _log_conflict(env: Envelope, other_id: uuid.UUID | None, other_device: str, other_seq: int) -> None:
    logger.warning(
        "device %s sent seq %d as message %s, but %s/%d is already message %s; kept the first, refused this one",
        env.device_id,
        env.seq,
        env.message_id,
        other_device,
        other_seq,
        other_id if other_id is not None else "(unknown)",
    )


def _stored_keys_by_id(session: Session, message_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[str, int]]:
    found: dict[uuid.UUID, tuple[str, int]] = {}
    for chunk in _chunks(message_ids):
        rows = session.execute(select(Event.message_id, Event.device_id, Event.seq).where(Event.message_id.in_(chunk)))
        found.update({mid: (dev, seq) for mid, dev, seq in rows})
    return found


def _stored_ids_by_key(session: Session, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], uuid.UUID]:
    """Existing rows by (device_id, seq), queried per device with `seq IN (…)` (row-value IN is not portable)."""
    seqs_by_device: dict[str, list[int]] = {}
    for device_id, seq in keys:
        seqs_by_device.setdefault(device_id, []).append(seq)
    found: dict[tuple[str, int], uuid.UUID] = {}
    for device_id, seqs in seqs_by_device.items():
        for chunk in _chunks(sorted(seqs)):
            rows = session.execute(
                select(Event.seq, Event.message_id).where(Event.device_id == device_id, Event.seq.in_(chunk))
            )
            found.update({(device_id, seq): mid for seq, mid in rows})
    return found


def _classify_refused(session: Session, refused: Sequence[Envelope]) -> int:
    """Count (and log) the refused envelopes that collide with a different stored record."""
    if not refused:
        return 0
    by_id = _stored_keys_by_id(session, [e.message_id for e in refused])
    by_key = _stored_ids_by_key(session, [(e.device_id, e.seq) for e in refused])
    conflicts = 0
    for env in refused:
        key = (env.device_id, env.seq)
        if by_id.get(env.message_id) == key:
            continue  # the very same record, delivered again
        conflicts += 1
        if env.message_id in by_id:
            other_device, other_seq = by_id[env.message_id]
            _log_conflict(env, env.message_id, other_device, other_seq)
        else:
            _log_conflict(env, by_key.get(key), env.device_id, env.seq)
    return conflicts


def store_envelopes(
    session: Session,
    envelopes: Sequence[Envelope],
    *,
    received_at: datetime | None = None,
    method: StoreMethod = StoreMethod.AUTO,
) -> StoreResult:
    """Insert each envelope exactly once; envelopes whose `message_id` or (`device_id`, `seq`) is already stored are
    counted as duplicates and left alone. Devices not yet registered are registered as 'unprovisioned' (callers
    enforce any registration policy before calling). Runs in the caller's transaction and never commits."""
    if not envelopes:
        return StoreResult(0, 0)
    when = received_at if received_at is not None else SystemClock().now()
    unique, batch_dups, batch_conflicts = _dedupe_batch(envelopes)
    register_devices(session, {e.device_id for e in unique}, now=when)
    table = Base.metadata.tables[Event.__tablename__]
    dialect = session.get_bind().dialect.name
    if method is StoreMethod.BULK or (method is StoreMethod.AUTO and dialect == "postgresql"):
        if dialect != "postgresql":
            raise ValueError(f"dialect {dialect!r} has no json_to_recordset(): StoreMethod.BULK is PostgreSQL only")
        return _store_bulk(session, unique, when) + StoreResult(0, batch_dups, batch_conflicts)
    fast_insert = _dialect_insert(session, table) if method is not StoreMethod.PORTABLE else None
    if method is StoreMethod.FAST and fast_insert is None:
        raise ValueError(f"dialect {dialect!r} has no INSERT … ON CONFLICT DO NOTHING")
    if fast_insert is not None:
        result = _store_fast(session, fast_insert, table, unique, when)
    else:
        result = _store_portable(session, table, unique, when)
    return result + StoreResult(0, batch_dups, batch_conflicts)


def _store_fast(session: Session, stmt: Any, table: Table, unique: Sequence[Envelope], when: datetime) -> StoreResult:
    # In key order, so two workers inserting overlapping redeliveries take the unique-index locks in the same order.
    rows = [_event_row(e, when) for e in sorted(unique, key=lambda e: (e.device_id, e.seq))]
    inserted = set(session.execute(stmt.on_conflict_do_nothing().returning(table.c.message_id), rows).scalars())
    refused = [e for e in unique if e.message_id not in inserted]
    return StoreResult(len(inserted), len(refused), _classify_refused(session, refused))


_BULK_INSERT = text(
    "INSERT INTO events (device_id, seq, message_id, payload_type, device_time, received_at, boot_id, monotonic_ns, "
    "payload) SELECT r.device_id, r.seq, r.message_id, r.payload_type, r.device_time, CAST(:received_at AS "
    "timestamptz), r.boot_id, r.monotonic_ns, r.payload FROM json_to_recordset(CAST(:rows AS json)) AS r(device_id "
    "varchar, seq bigint, message_id uuid, payload_type varchar, device_time timestamptz, boot_id uuid, "
    "monotonic_ns bigint, payload json) ORDER BY r.device_id, r.seq ON CONFLICT DO NOTHING RETURNING message_id"
)


def _store_bulk(session: Session, unique: Sequence[Envelope], when: datetime) -> StoreResult:
    """PostgreSQL: the whole batch as one JSON array of envelopes (pydantic's own serialisation, whose field names
    are the column names), expanded by the server; one statement whose text never changes (StoreMethod.BULK)."""
    if not unique:
        return StoreResult(0, 0)
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("naive datetime refused: pass a timezone-aware value")
    rows = "[" + ",".join(e.model_dump_json() for e in unique) + "]"
    inserted = set(session.execute(_BULK_INSERT, {"rows": rows, "received_at": when}).scalars())
    refused = [e for e in unique if e.message_id not in inserted]
    return StoreResult(len(inserted), len(refused), _classify_refused(session, refused))


def _store_portable(session: Session, table: Table, unique: Sequence[Envelope], when: datetime) -> StoreResult:
    by_id = _stored_keys_by_id(session, [e.message_id for e in unique])
    by_key = _stored_ids_by_key(session, [(e.device_id, e.seq) for e in unique])
    refused: list[Envelope] = []
    stored = 0
    for env in unique:
        if env.message_id in by_id or (env.device_id, env.seq) in by_key:
            refused.append(env)
            continue
        try:
            # A concurrent worker may insert the same record between our SELECT and this INSERT.
            with session.begin_nested():
                session.execute(insert(table).values(_event_row(env, when)))
            stored += 1
        except IntegrityError:
            refused.append(env)
    return StoreResult(stored, len(refused), _classify_refused(session, refused))


def is_online(link_state: LinkStateColumn | str, heartbeat_expires_at: datetime | None, now: datetime) -> bool:
    """The presence rule: connected according to the retained status AND the last heartbeat has not timed out."""
    return link_state == LinkStateColumn.ONLINE and heartbeat_expires_at is not None and heartbeat_expires_at > now


_LOCKED_DEVICES = "yibao_locked_devices"


def _lock_devices(session: Session, device_ids: Collection[str]) -> dict[str, Device]:
    """Load and row-lock devices in a fixed order (no deadlocks between workers; a no-op on SQLite, where the write
    lock is taken at BEGIN IMMEDIATE). Devices already locked in this transaction are not queried again.

    FOR NO KEY UPDATE, not FOR UPDATE: inserting an event takes FOR KEY SHARE on its device (the foreign key), which
    FOR UPDATE would wait for. Two workers that both inserted records of one device and then both asked for FOR
    UPDATE on it would deadlock; FOR NO KEY UPDATE only waits for the other worker's device lock."""
    transaction = session.get_transaction()
    cached = session.info.get(_LOCKED_DEVICES)
    if cached is None or cached[0] is not transaction:
        cached = (transaction, {})
        session.info[_LOCKED_DEVICES] = cached
    locked: dict[str, Device] = cached[1]
    wanted = set(device_ids)
    for chunk in _chunks(sorted(wanted - locked.keys())):
        stmt = (
            select(Device).where(Device.device_id.in_(chunk)).order_by(Device.device_id).with_for_update(key_share=True)
        )
        locked.update({d.device_id: d for d in session.scalars(stmt)})
    return {device_id: locked[device_id] for device_id in sorted(wanted) if device_id in locked}


@dataclass(slots=True)
class _DeviceRow:
    """The columns of a locked device that ingest reads and moves forward (Core rows: no ORM unit of work)."""

    device_id: str
    link_state: LinkStateColumn
    online: bool
    heartbeat_expires_at: datetime | None
    last_seq: int
    last_seen_at: datetime | None
    last_heartbeat_seq: int | None
    acked_through_seq: int
    seq_gap_from: int | None
    seq_gap_to: int | None
    seq_gap_since: datetime | None
    seq_gap_alarm_at: datetime | None


_ROW_COLUMNS = tuple(f.name for f in fields(_DeviceRow))
_DEVICE_ROWS = "yibao_device_rows"
_PG_TYPES = {
    "device_id": "varchar",
    "last_seq": "bigint",
    "last_seen_at": "timestamptz",
    "online": "boolean",
    "last_heartbeat_seq": "bigint",
    "last_heartbeat": "json",
    "last_heartbeat_at": "timestamptz",
    "heartbeat_expires_at": "timestamptz",
    "software_version": "varchar",
    "config_version": "varchar",
    "boot_id": "uuid",
    "acked_through_seq": "bigint",
    "seq_gap_from": "bigint",
    "seq_gap_to": "bigint",
    "seq_gap_since": "timestamptz",
    "seq_gap_alarm_at": "timestamptz",
}


def _devices_table() -> Table:
    return Base.metadata.tables[Device.__tablename__]


def _row_cache(session: Session) -> dict[str, _DeviceRow]:
    transaction = session.get_transaction()
    cached = session.info.get(_DEVICE_ROWS)
    if cached is None or cached[0] is not transaction:
        cached = (transaction, {})
        session.info[_DEVICE_ROWS] = cached
    rows: dict[str, _DeviceRow] = cached[1]
    return rows


def _lock_device_rows(session: Session, device_ids: Collection[str]) -> dict[str, _DeviceRow]:
    """Like `_lock_devices` (same lock, same order) but as plain rows, kept for the rest of the transaction so
    `record_device_activity` and `advance_acks` read each device once."""
    cache = _row_cache(session)
    wanted = set(device_ids)
    table = _devices_table()
    columns = [table.c[name] for name in _ROW_COLUMNS]
    for chunk in _chunks(sorted(wanted - cache.keys())):
        stmt = (
            select(*columns)
            .where(_in(session, table.c.device_id, chunk))
            .order_by(table.c.device_id)
            .with_for_update(key_share=True)
        )
        for row in session.execute(stmt):
            cache[row[0]] = _DeviceRow(*row)
    return {device_id: cache[device_id] for device_id in sorted(wanted) if device_id in cache}


def _forget_device_rows(session: Session, device_ids: Collection[str]) -> None:
    """Changed through the ORM: read these rows again when next needed."""
    cache = _row_cache(session)
    for device_id in device_ids:
        cache.pop(device_id, None)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime refused: pass a timezone-aware value")
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _write_device_rows(session: Session, changes: Sequence[dict[str, Any]]) -> None:
    """Write `changes` (dicts with `device_id` and the same other keys each) to their device rows: on PostgreSQL one
    UPDATE … FROM json_to_recordset for all of them, elsewhere one executemany UPDATE. Identity-map copies of these
    devices are expired so the ORM reads the new values."""
    if not changes:
        return
    names = [name for name in changes[0] if name != "device_id"]
    if session.get_bind().dialect.name == "postgresql":
        sets = ", ".join(f"{name} = r.{name}" for name in names)
        defs = ", ".join(f"{name} {_PG_TYPES[name]}" for name in ["device_id", *names])
        stmt = text(
            f"UPDATE devices AS d SET {sets} FROM json_to_recordset(CAST(:rows AS json)) AS r({defs}) "  # noqa: S608 -- names are ours
            "WHERE d.device_id = r.device_id"
        )
        doc = json.dumps([{k: _json_value(v) for k, v in change.items()} for change in changes])
        session.execute(stmt, {"rows": doc})
    else:
        table = _devices_table()
        update_stmt = (
            update(table)
            .where(table.c.device_id == bindparam("b_device_id"))
            .values({name: bindparam(f"b_{name}") for name in names})
        )
        session.execute(update_stmt, [{f"b_{k}": v for k, v in change.items()} for change in changes])
    ids = {change["device_id"] for change in changes}
    for obj in list(session.identity_map.values()):
        if isinstance(obj, Device) and obj.device_id in ids:
            session.expire(obj)


def record_device_activity(
    session: Session,
    envelopes: Sequence[Envelope],
    *,
    received_at: datetime,
    heartbeat_timeout_factor: float,
) -> None:
    """Move each device's `last_seen_at` and `last_seq` forward, and take its newest heartbeat (by `seq`).

    Call after `store_envelopes` in the same transaction (the devices exist then). Applying the same envelopes
    twice changes nothing the second time."""
    if not envelopes:
        return
    newest_heartbeat: dict[str, tuple[Envelope, Heartbeat]] = {}
    max_seq: dict[str, int] = {}
    for env in envelopes:
        max_seq[env.device_id] = max(max_seq.get(env.device_id, 0), env.seq)
        if isinstance(env.payload, Heartbeat):
            best = newest_heartbeat.get(env.device_id)
            if best is None or env.seq > best[0].seq:
                newest_heartbeat[env.device_id] = (env, env.payload)
    plain: list[dict[str, Any]] = []
    with_beat: list[dict[str, Any]] = []
    moved: list[dict[str, Any]] = []
    for device_id, row in _lock_device_rows(session, max_seq).items():
        row.last_seq = max(row.last_seq, max_seq[device_id])
        if row.last_seen_at is None or row.last_seen_at < received_at:
            row.last_seen_at = received_at
        change: dict[str, Any] = {"device_id": device_id, "last_seq": row.last_seq, "last_seen_at": row.last_seen_at}
        newest = newest_heartbeat.get(device_id)
        if newest is not None and newest[0].seq > (row.last_heartbeat_seq or 0):
            env, beat = newest
            row.last_heartbeat_seq = env.seq
            row.heartbeat_expires_at = received_at + timedelta(seconds=heartbeat_timeout_factor * beat.interval_s)
            change |= {
                "last_heartbeat_seq": env.seq,
                "last_heartbeat": beat.model_dump(mode="json"),
                "last_heartbeat_at": received_at,
                "heartbeat_expires_at": row.heartbeat_expires_at,
                "software_version": beat.software_version,
                "config_version": beat.config_version,
                "boot_id": env.boot_id,
            }
        change["online"] = is_online(row.link_state, row.heartbeat_expires_at, received_at)
        if change["online"] != row.online:
            row.online = change["online"]
            moved.append(_presence(device_id, row.online, received_at, PresenceReason.HEARTBEAT))
        (with_beat if "last_heartbeat" in change else plain).append(change)
    _write_device_rows(session, plain)
    _write_device_rows(session, with_beat)
    record_presence(session, moved)


def apply_statuses(session: Session, statuses: Sequence[DeviceStatusMessage], *, received_at: datetime) -> None:
    """Apply retained status messages in arrival order (the broker keeps per-topic order; the last one wins).
    The devices must exist."""
    if not statuses:
        return
    devices = _lock_devices(session, {s.device_id for s in statuses})
    moved: list[dict[str, Any]] = []
    for status in statuses:
        device = devices.get(status.device_id)
        if device is None:
            raise LookupError(f"device {status.device_id} is not registered")
        new_state = LinkStateColumn(status.state.value)
        if device.link_state != new_state:
            logger.debug("device %s link %s -> %s", device.device_id, device.link_state.value, new_state.value)
        device.link_state = new_state
        device.link_state_at = received_at
        was_online = bool(device.online)
        if status.state is LinkState.OFFLINE:
            device.online = False
        else:
            device.online = is_online(new_state, device.heartbeat_expires_at, received_at)
        if device.online != was_online:
            moved.append(_presence(device.device_id, device.online, received_at, PresenceReason.STATUS))
    session.flush()
    record_presence(session, moved)
    _forget_device_rows(session, devices)


def sweep_offline(session: Session, *, now: datetime) -> list[str]:
    """Mark devices offline whose last heartbeat timed out (or who never sent one). Returns their ids."""
    expired = or_(Device.heartbeat_expires_at.is_(None), Device.heartbeat_expires_at <= now)
    rows = session.execute(
        select(Device.device_id, Device.heartbeat_expires_at)
        .where(Device.online.is_(True), expired)
        .order_by(Device.device_id)
        .with_for_update()
    )
    deadlines: dict[str, datetime | None] = {row.device_id: row.heartbeat_expires_at for row in rows}
    ids = list(deadlines)
    for chunk in _chunks(ids):
        session.execute(
            update(Device)
            .where(and_(Device.device_id.in_(chunk), Device.online.is_(True), expired))
            .values(online=False)
            .execution_options(synchronize_session=False)
        )
    # offline from the deadline that passed (the sweep only notices it later), or now for one never announced
    record_presence(
        session,
        [
            _presence(device_id, False, now if deadline is None else min(deadline, now), PresenceReason.TIMEOUT)
            for device_id, deadline in deadlines.items()
        ],
    )
    return ids


def _presence(device_id: str, online: bool, at: datetime, reason: PresenceReason) -> dict[str, Any]:
    return {"device_id": device_id, "online": online, "at": at, "reason": reason}


def record_presence(session: Session, changes: Sequence[dict[str, Any]]) -> None:
    """Append changes of devices' `online` flag to `device_presence` (one executemany INSERT), in the caller's
    transaction: the history the statistics count time online from (docs/statistics.md)."""
    if changes:
        session.execute(insert(DevicePresence), list(changes))


def device_counts(session: Session, *, now: datetime) -> Mapping[str, int]:
    """Registered devices and how many are online now (by the presence rule, not just the stored flag)."""
    total = session.scalar(select(func.count()).select_from(Device)) or 0
    online = (
        session.scalar(
            select(func.count())
            .select_from(Device)
            .where(Device.link_state == LinkStateColumn.ONLINE, Device.heartbeat_expires_at > now)
        )
        or 0
    )
    return {"devices": total, "devices_online": online}


# ---------------------------------------------------------------------- acknowledgements and gaps


@dataclass(frozen=True, slots=True)
class AckState:
    """A device's acknowledgement after `advance_acks`, and what changed about its sequence hole."""

    device_id: str
    acked_through_seq: int
    """Every seq 1..N is stored: what the device is told in its `uplink_ack`."""
    gap_from: int | None = None
    """First missing seq of the open hole (None when there is none)."""
    gap_to: int | None = None
    """Last missing seq of the open hole (the next stored seq - 1)."""
    gap_opened: bool = False
    """This call found a new hole (first seen now)."""
    alarm_raised: bool = False
    """This call raised the `seq_gap` alarm (the hole outlived the alarm delay)."""
    alarm_cleared: bool = False
    """A hole with a raised alarm is filled (or superseded) as of this call."""
    gap_since: datetime | None = None


def _contiguous_through(session: Session, device_id: str, start: int) -> tuple[int, int | None]:
    """Walk the stored seqs above `start` in index order: (N, the next stored seq above N + 1 or None).

    Reads only rows above the stored acknowledgement, ACK_WALK_CHUNK at a time, and stops at the first hole."""
    n = start
    while True:
        seqs = list(
            session.scalars(
                select(Event.seq)
                .where(Event.device_id == device_id, Event.seq > n)
                .order_by(Event.seq)
                .limit(ACK_WALK_CHUNK)
            )
        )
        for seq in seqs:
            if seq != n + 1:
                return n, seq
            n = seq
        if len(seqs) < ACK_WALK_CHUNK:
            return n, None


def _stored_seqs_above_acks(session: Session, device_ids: Sequence[str]) -> dict[str, list[int]]:
    """Each device's stored seqs in (acked_through_seq, acked_through_seq + ACK_WALK_CHUNK], ascending: one query
    for a chunk of devices (through the unique (device_id, seq) index), not one per device."""
    found: dict[str, list[int]] = {}
    for chunk in _chunks(sorted(device_ids)):
        # Pending device changes (last_seq, heartbeat) do not touch acked_through_seq: no flush needed for this read.
        with session.no_autoflush:
            rows = session.execute(
                select(Event.device_id, Event.seq)
                .join(Device, Device.device_id == Event.device_id)
                .where(
                    _in(session, Event.device_id, chunk),
                    Event.seq > Device.acked_through_seq,
                    Event.seq <= Device.acked_through_seq + ACK_WALK_CHUNK,
                )
                .order_by(Event.device_id, Event.seq)
            )
        for device_id, seq in rows:
            found.setdefault(device_id, []).append(seq)
    return found


def _walk(start: int, seqs: Sequence[int]) -> tuple[int, int | None]:
    """(N, the first seq above N + 1 or None): N is the end of the contiguous run of `seqs` (ascending) from
    `start`."""
    n = start
    for seq in seqs:
        if seq != n + 1:
            return n, seq
        n = seq
    return n, None


def advance_acks(
    session: Session, device_ids: Collection[str], *, now: datetime, gap_alarm_after_s: float
) -> list[AckState]:
    """Advance each device's `acked_through_seq` over the seqs stored now, and track the hole above it.

    Call after `store_envelopes` in the same transaction; the devices are row-locked first, so two workers storing
    the same device serialise here and the second sees the first one's rows. Devices not registered are skipped.
    Returns one `AckState` per device, in device id order; the caller publishes acks and logs alarm changes only
    after its commit."""
    states: list[AckState] = []
    rows = _lock_device_rows(session, device_ids)
    above = _stored_seqs_above_acks(session, list(rows))
    changes: list[dict[str, Any]] = []
    for device_id, device in rows.items():
        before = (device.acked_through_seq, device.seq_gap_from, device.seq_gap_to, device.seq_gap_since)
        before_alarm = device.seq_gap_alarm_at
        through, next_stored = _walk(device.acked_through_seq, above.get(device_id, []))
        if next_stored is None and (through == device.acked_through_seq + ACK_WALK_CHUNK or through < device.last_seq):
            # The window ended without a hole, but stored seqs may lie beyond it: walk on from there.
            through, next_stored = _contiguous_through(session, device_id, through)
        device.acked_through_seq = through = max(device.acked_through_seq, through)
        had_alarm = device.seq_gap_alarm_at is not None
        if next_stored is None:
            cleared = had_alarm
            device.seq_gap_from = device.seq_gap_to = None
            device.seq_gap_since = device.seq_gap_alarm_at = None
            states.append(AckState(device_id, through, alarm_cleared=cleared))
        else:
            gap_from, gap_to = through + 1, next_stored - 1
            opened = device.seq_gap_since is None or device.seq_gap_from != gap_from
            cleared = False
            if opened:
                # The previous hole (if any) is filled; what remains above it is a new hole with its own clock.
                cleared = had_alarm
                device.seq_gap_since = now
                device.seq_gap_alarm_at = None
            device.seq_gap_from, device.seq_gap_to = gap_from, gap_to
            raised = _raise_if_due(device, now=now, after_s=gap_alarm_after_s)
            states.append(
                AckState(
                    device_id,
                    through,
                    gap_from=gap_from,
                    gap_to=gap_to,
                    gap_opened=opened,
                    alarm_raised=raised,
                    alarm_cleared=cleared,
                    gap_since=device.seq_gap_since,
                )
            )
        after = (device.acked_through_seq, device.seq_gap_from, device.seq_gap_to, device.seq_gap_since)
        if after != before or device.seq_gap_alarm_at != before_alarm:
            changes.append(
                {
                    "device_id": device_id,
                    "acked_through_seq": device.acked_through_seq,
                    "seq_gap_from": device.seq_gap_from,
                    "seq_gap_to": device.seq_gap_to,
                    "seq_gap_since": device.seq_gap_since,
                    "seq_gap_alarm_at": device.seq_gap_alarm_at,
                }
            )
    _write_device_rows(session, changes)
    return states


def _raise_if_due(device: Device | _DeviceRow, *, now: datetime, after_s: float) -> bool:
    since = device.seq_gap_since
    if since is None or device.seq_gap_alarm_at is not None:
        return False
    if now - since < timedelta(seconds=after_s):
        return False
    device.seq_gap_alarm_at = now
    return True


def raise_due_gap_alarms(session: Session, *, now: datetime, gap_alarm_after_s: float) -> list[AckState]:
    """Raise `seq_gap` on devices whose open hole is older than the alarm delay (a silent device sends no batch
    that would do it). Returns the states of the devices raised now; the caller logs them after its commit."""
    cutoff = now - timedelta(seconds=gap_alarm_after_s)
    ids = list(
        session.scalars(
            select(Device.device_id)
            .where(Device.seq_gap_since.is_not(None), Device.seq_gap_since <= cutoff, Device.seq_gap_alarm_at.is_(None))
            .order_by(Device.device_id)
        )
    )
    raised: list[AckState] = []
    for device_id, device in sorted(_lock_devices(session, ids).items()):
        if _raise_if_due(device, now=now, after_s=gap_alarm_after_s):
            raised.append(
                AckState(
                    device_id,
                    device.acked_through_seq,
                    gap_from=device.seq_gap_from,
                    gap_to=device.seq_gap_to,
                    alarm_raised=True,
                    gap_since=device.seq_gap_since,
                )
            )
    session.flush()
    return raised


def log_seq_gap_changes(states: Sequence[AckState]) -> None:
    """Log each raised and each cleared `seq_gap` alarm once; call after the transaction that changed them commits."""
    for state in states:
        if state.alarm_cleared:
            logger.info(
                "device %s: seq gap alarm cleared (acknowledged through seq %d)",
                state.device_id,
                state.acked_through_seq,
            )
        if state.alarm_raised:
            logger.warning(
                "device %s: seq gap alarm: seq %s..%s missing since %s while later records are stored",
                state.device_id,
                state.gap_from,
                state.gap_to,
                state.gap_since.isoformat() if state.gap_since is not None else "?",
            )
