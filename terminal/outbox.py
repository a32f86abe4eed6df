"""The terminal's SQLite outbox: every uplink record is stored here before anything tries to send it.

Owns one SQLite file and the life of each record in it, as an explicit state machine enforced by the database itself
(a CHECK constraint and triggers generated from `TRANSITIONS`):

    PENDING ──claim──► INFLIGHT ──mark_sent──► SENT ──mark_acked_through──► ACKED ──prune_acked──► (deleted)
       ▲                  │                     │
       ├──release/crash───┤                     │  (PUBACK = the broker has it; ACKED = the server stored it)
       └──────────────────┼── requeue_unacked ──┘  (no server ack within server_ack_timeout_s: publish again)
                          └──undecodable──► QUARANTINED  (kept, reported in stats and by an audit event)

    Any PENDING, INFLIGHT or SENT row at or below the server's `acked_through_seq` becomes ACKED at once: the server
    has it, whatever our own bookkeeping says (an ack may overtake the PUBACK of the same record, or a re-send).

It also owns `applied_commands`: every downlink command id this terminal ever answered, with its outcome and the seq of
the `CommandResult` record that carries the answer. The answer row, the result record and any records the command
produced are written in ONE transaction (`answer_command`), so "applied" and "result queued" can never diverge, and
the table survives restarts (a trigger refuses deletes: a forgotten id could be carried out twice).

The row id *is* the per-device sequence number `seq` (`INTEGER PRIMARY KEY AUTOINCREMENT`, so a pruned number is
never handed out again), assigned in the same transaction that stores the record's envelope as JSON. One writer
connection, guarded by a lock, in WAL mode with `synchronous=FULL`: a record `enqueue` returned is on disk. The disk
bound `max_bytes` is enforced by SQLite (`max_page_count`); new records may fill it up to a reserve that keeps the
delivery bookkeeping of held records possible. When new records hit their limit, delivered rows are pruned and, if
that is not enough, `OutboxFullError` is raised and the `outbox_full` alarm set; when records are accepted again, an
`outbox.full` audit event saying how many were refused is stored for the server.

It must never drop, rewrite or reorder a record it accepted (only ACKED rows — those the server acknowledged as
stored — may be deleted; a trigger refuses any other delete), never unpickle anything (payloads are JSON validated
against `protocol`), never talk to the network, and never let a `sqlite3` exception escape: they are translated into
`terminal.errors` here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Final

from protocol import (
    MAX_ENVELOPE_BYTES,
    AuditEvent,
    AuditOutcome,
    Clock,
    CommandOutcome,
    CommandResult,
    ContractError,
    Envelope,
    Payload,
    PayloadType,
    decode_envelope,
)
from terminal.config import OutboxConfig
from terminal.errors import InvalidRecordError, OutboxError, OutboxFullError

logger = logging.getLogger(__name__)

OUTBOX_SCHEMA_VERSION: Final = 3
"""Stored in `PRAGMA user_version`; a file written by newer software is refused rather than guessed at. Version 1
had no ACKED status (`_migrate_v1_to_v2` rebuilds such a file in place); version 2 had no `applied_commands`
(`_migrate_v2_to_v3` adds it). Migrations run in order, each in its own transaction."""

BUSY_TIMEOUT_MS: Final = 5000
JOURNAL_SIZE_LIMIT_BYTES: Final = 4 * 1024 * 1024
RESERVE_FRACTION: Final = 0.10
MIN_RESERVE_PAGES: Final = 8
"""Pages of `max_bytes` that new records may not use. Claiming, acknowledging and releasing a record rewrite its row
a few bytes longer (status, timestamps, attempt count, a short error); the reserve guarantees that an outbox which
has just refused a new record can still deliver, and so drain, the ones it holds."""
MAX_ERROR_CHARS: Final = 64
"""Failure reasons are stored truncated: short enough to keep the reserve honest, long enough to diagnose."""
JITTER_FRACTION: Final = 0.5
"""A retry waits between (1 - JITTER_FRACTION) and 1 times its exponential delay, so terminals that lost the same
broker at the same moment do not all come back in the same second."""

ALARM_OUTBOX_FULL: Final = "outbox_full"
ALARM_OUTBOX_HIGH_WATER: Final = "outbox_high_water"
ALARM_OUTBOX_QUARANTINED: Final = "outbox_quarantined"

Jitter = Callable[[], float]
"""Returns a number in [0, 1); injected so tests can pin the back-off."""


class OutboxStatus(StrEnum):
    PENDING = "pending"
    """Waiting to be claimed (possibly not before `next_attempt_at`)."""
    INFLIGHT = "inflight"
    """Claimed by the sync worker and being published; back to PENDING on failure or after a crash."""
    SENT = "sent"
    """The broker acknowledged it (PUBACK); waits for the server's ack, or goes back to PENDING after
    `server_ack_timeout_s` (a broker with no server session drops what it cannot route)."""
    ACKED = "acked"
    """The server acknowledged it as stored (its seq is at or below `acked_through_seq`); kept for
    `sent_retention_s`, then pruned. The only status that may be deleted."""
    QUARANTINED = "quarantined"
    """Its stored envelope no longer decodes; kept for inspection and never published."""


TRANSITIONS: Final[Mapping[OutboxStatus, frozenset[OutboxStatus]]] = {
    # ACKED is reachable from every live status: an ack for seq <= N proves the server has the record, and it may
    # overtake our PUBACK bookkeeping or arrive for a record we re-queued after an ack timeout.
    OutboxStatus.PENDING: frozenset({OutboxStatus.INFLIGHT, OutboxStatus.ACKED}),
    OutboxStatus.INFLIGHT: frozenset(
        {OutboxStatus.SENT, OutboxStatus.PENDING, OutboxStatus.QUARANTINED, OutboxStatus.ACKED}
    ),
    OutboxStatus.SENT: frozenset({OutboxStatus.ACKED, OutboxStatus.PENDING}),
    OutboxStatus.ACKED: frozenset(),
    OutboxStatus.QUARANTINED: frozenset(),
}
LIVE_STATUSES: Final = frozenset({OutboxStatus.PENDING, OutboxStatus.INFLIGHT, OutboxStatus.SENT})
"""Statuses of records the server has not acknowledged yet: the heartbeat's `outbox_depth`."""


def _quoted(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in sorted(values))


_ALLOWED_MOVES: Final = _quoted(f"{a.value}>{b.value}" for a, targets in TRANSITIONS.items() for b in targets)

_TABLE_V2: Final = f"""
CREATE TABLE {{name}} (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      TEXT    NOT NULL UNIQUE,
    payload_type    TEXT    NOT NULL,
    envelope        TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending' CHECK (status IN ({_quoted(s.value for s in OutboxStatus)})),
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_at      REAL    NOT NULL,
    next_attempt_at REAL    NOT NULL,
    claimed_at      REAL,
    sent_at         REAL,
    acked_at        REAL,
    last_error      TEXT
);
"""

_COLUMNS_V1: Final = (
    "seq, message_id, payload_type, envelope, status, attempts, created_at, next_attempt_at, claimed_at, sent_at,"
    " last_error"
)

_INDEX_AND_TRIGGERS: Final = f"""
CREATE INDEX outbox_by_status ON outbox (status, seq);
CREATE TRIGGER outbox_legal_transition BEFORE UPDATE OF status ON outbox
WHEN OLD.status <> NEW.status AND OLD.status || '>' || NEW.status NOT IN ({_ALLOWED_MOVES})
BEGIN
    SELECT RAISE(ABORT, 'illegal outbox status transition');
END;
CREATE TRIGGER outbox_only_acked_are_deleted BEFORE DELETE ON outbox
WHEN OLD.status <> 'acked'
BEGIN
    SELECT RAISE(ABORT, 'only outbox records the server acknowledged may be deleted');
END;
"""

_APPLIED_COMMANDS: Final = f"""
CREATE TABLE applied_commands (
    command_id  TEXT    PRIMARY KEY,
    kind        TEXT    NOT NULL,
    outcome     TEXT    NOT NULL CHECK (outcome IN ({_quoted(o.value for o in CommandOutcome)})),
    detail      TEXT    NOT NULL,
    result_seq  INTEGER NOT NULL,
    answered_at REAL    NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER applied_commands_are_never_forgotten BEFORE DELETE ON applied_commands
BEGIN
    SELECT RAISE(ABORT, 'an answered command id is never forgotten');
END;
"""
"""Schema version 3: the command ids this terminal answered. Kept for the file's life: commands are few (an operator
issues them), and forgetting one would let a redelivery carry it out a second time."""

_SCHEMA: Final = (
    _TABLE_V2.format(name="outbox")
    + _INDEX_AND_TRIGGERS
    + """
CREATE TABLE outbox_counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO outbox_counter (name, value) VALUES ('sent_total', 0), ('acked_total', 0);
"""
    + _APPLIED_COMMANDS
)


@dataclass(frozen=True, slots=True)
class ClaimedRecord:
    """A record the sync worker now owns until it calls `mark_sent` or `release` for its `seq`."""

    seq: int
    envelope: Envelope
    wire: bytes
    """The exact bytes to publish: the JSON stored at enqueue time."""
    attempts: int


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """Bookkeeping of one stored record, for diagnosis and tests (no payload)."""

    seq: int
    message_id: str
    payload_type: str
    status: OutboxStatus
    attempts: int
    next_attempt_at: datetime
    last_error: str | None


@dataclass(frozen=True, slots=True)
class CommandAnswer:
    """What this terminal answered to one command id (one row of `applied_commands`)."""

    command_id: uuid.UUID
    kind: str
    outcome: CommandOutcome
    detail: str
    result_seq: int
    """Seq of the `CommandResult` record carrying the answer (pruned once the server acknowledged it)."""
    answered_at: datetime


class ResultDelivery(StrEnum):
    """Where the stored answer of a redelivered command is, after `resend_command_result`."""

    REQUEUED = "requeued"
    """It had reached the broker but the server had not acknowledged it: published again now."""
    UNDERWAY = "underway"
    """Still pending or in flight: it goes out with the next batch anyway."""
    STORED_ON_SERVER = "stored_on_server"
    """The server acknowledged it (ACKED, or pruned after that): nothing to send."""


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """What the heartbeat reports about the outbox."""

    depth: int
    """Records the server has not acknowledged yet (PENDING + INFLIGHT + SENT)."""
    oldest_age_s: float | None
    """Age of the oldest record the server has not acknowledged; None when `depth` is 0."""
    used_bytes: int
    """Bytes of live pages; pages freed by pruning are reused before the file grows."""
    capacity_bytes: int
    inflight: int
    sent_total: int
    """PUBACKs received over the life of this outbox file (a re-sent record counts again; survives pruning)."""
    unpublished: int = 0
    """Records the broker has not acknowledged yet (PENDING + INFLIGHT)."""
    acked_total: int = 0
    """Records the server acknowledged as stored over the life of this outbox file (survives pruning)."""
    quarantined: int = 0
    alarms: tuple[str, ...] = field(default_factory=tuple)


def _is_full(exc: sqlite3.Error) -> bool:
    # The primary result code is the low byte of the extended code SQLite reports. Errors raised by the sqlite3
    # module itself (e.g. a closed connection) carry no code at all.
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL


class Outbox:
    """The outbox of one terminal. Thread-safe; open it once per process with `Outbox.open(...)`."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        config: OutboxConfig,
        *,
        device_id: str,
        boot_id: uuid.UUID,
        clock: Clock,
        jitter: Jitter,
        owner_fd: int | None = None,
    ) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._owner_fd = owner_fd
        self._config = config
        self._device_id = device_id
        self._boot_id = boot_id
        self._clock = clock
        self._jitter = jitter
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._page_size = 4096
        self._hard_pages = 1
        self._record_pages = 1
        self._page_limit: int | None = None
        self._full_latched = False
        self._reserve_released = False
        """The disk filled up during bookkeeping and the ballast was deleted: refuse new records until it is back."""
        self._refused_records = 0
        # True when a server ack moved rows since the last re-send: the server is there, re-send all that is overdue.
        self._acked_since_requeue = False
        self._last_probe_ts: float | None = None
        self._server_silent = False

    # ------------------------------------------------------------------ life cycle

    @classmethod
    def open(
        cls,
        config: OutboxConfig,
        *,
        device_id: str,
        boot_id: uuid.UUID,
        clock: Clock,
        jitter: Jitter | None = None,
    ) -> Outbox:
        """Open (creating if needed) the outbox file, apply the PRAGMAs and recover records a crash left INFLIGHT."""
        path = Path(config.path)
        owner_fd = _take_ownership(path)
        try:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            os.close(owner_fd)
            raise OutboxError(f"cannot open outbox {path}: {exc}") from exc
        outbox = cls(
            conn,
            config,
            device_id=device_id,
            boot_id=boot_id,
            clock=clock,
            jitter=jitter if jitter is not None else secrets.SystemRandom().random,
            owner_fd=owner_fd,
        )
        try:
            with outbox._translated(f"open {path}"):
                outbox._prepare(path)
            outbox._recover_inflight()
            outbox._ensure_disk_reserve()
        except BaseException:
            outbox.close()
            raise
        return outbox

    def _prepare(self, path: Path) -> None:
        conn = self._require_conn()
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxError(f"outbox {path}: WAL journal mode unavailable (got {mode!r}); refusing to run")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        self._hard_pages = max(1, self._config.max_bytes // self._page_size)
        self._record_pages = max(1, self._hard_pages - max(MIN_RESERVE_PAGES, int(self._hard_pages * RESERVE_FRACTION)))
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > OUTBOX_SCHEMA_VERSION:
            raise OutboxError(
                f"outbox {path} has schema version {version}, newer than this software ({OUTBOX_SCHEMA_VERSION})"
            )
        if version == 0:
            # executescript() would COMMIT on its own; run the statements inside our own immediate transaction.
            with self._transaction() as tx:
                for statement in _split_sql(_SCHEMA):
                    tx.execute(statement)
                tx.execute(f"PRAGMA user_version = {OUTBOX_SCHEMA_VERSION}")
        else:
            if version == 1:
                self._migrate_v1_to_v2(path)
                version = 2
            if version == 2:
                self._migrate_v2_to_v3(path)

    def _migrate_v1_to_v2(self, path: Path) -> None:
        """Version 1 had no ACKED status, and SQLite cannot alter a CHECK constraint: rebuild the table.

        One immediate transaction: copy every row (seq and status unchanged) into a table with the new CHECK,
        swap it in, restore the AUTOINCREMENT high-water mark (`sqlite_sequence`, which may be above every remaining
        row after pruning), recreate the index and the triggers from the new `TRANSITIONS`, and bump `user_version`.
        A crash before COMMIT leaves the v1 file untouched. Rows that were SENT (PUBACKed) stay SENT and are re-sent
        after `server_ack_timeout_s` unless the server acknowledges them first: v1 never knew whether the server had
        them."""
        with self._transaction() as tx:
            high_water = tx.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
            rows = int(tx.execute("SELECT count(*) FROM outbox").fetchone()[0])
            tx.execute(_TABLE_V2.format(name="outbox_v2"))
            tx.execute(f"INSERT INTO outbox_v2 ({_COLUMNS_V1}) SELECT {_COLUMNS_V1} FROM outbox ORDER BY seq")  # noqa: S608 - our own column list
            tx.execute("DROP TABLE outbox")  # drops its index and triggers too
            tx.execute("ALTER TABLE outbox_v2 RENAME TO outbox")
            if high_water is not None:
                tx.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'outbox'", (int(high_water[0]),))
                if tx.execute("SELECT changes()").fetchone()[0] == 0:
                    tx.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (int(high_water[0]),))
            for statement in _split_sql(_INDEX_AND_TRIGGERS):
                tx.execute(statement)
            tx.execute("INSERT OR IGNORE INTO outbox_counter (name, value) VALUES ('acked_total', 0)")
            tx.execute("PRAGMA user_version = 2")
        logger.info("outbox %s: migrated schema 1 -> 2 (%d record(s) kept)", path, rows)

    def _migrate_v2_to_v3(self, path: Path) -> None:
        """Version 2 had no memory of downlink commands: add `applied_commands` (empty: a v2 terminal never carried
        out a command) in one immediate transaction; records and their statuses are untouched."""
        with self._transaction() as tx:
            for statement in _split_sql(_APPLIED_COMMANDS):
                tx.execute(statement)
            tx.execute("PRAGMA user_version = 3")
        logger.info("outbox %s: migrated schema 2 -> 3 (applied_commands added)", path)

    def _recover_inflight(self) -> None:
        """A previous process died between claim and ack: its INFLIGHT rows may or may not have reached the broker,
        so they go back to PENDING and are sent again (the server deduplicates by seq and message_id)."""
        now = self._now_ts()
        with self._lock, self._translated("recover in-flight records"), self._transaction() as tx:
            recovered = tx.execute(
                "UPDATE outbox SET status = ?, claimed_at = NULL, next_attempt_at = ? WHERE status = ?",
                (OutboxStatus.PENDING.value, now, OutboxStatus.INFLIGHT.value),
            ).rowcount
        if recovered:
            logger.warning("outbox: %d record(s) were in flight when the terminal stopped; queued again", recovered)

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close; idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
            owner_fd, self._owner_fd = self._owner_fd, None
        try:
            if conn is not None:
                try:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:
                    logger.warning("outbox: WAL checkpoint at close failed: %s", exc)
                finally:
                    conn.close()
        finally:
            if owner_fd is not None:
                os.close(owner_fd)  # releases the ownership lock

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def config(self) -> OutboxConfig:
        return self._config

    @property
    def record_capacity_bytes(self) -> int:
        """Bytes new records may fill: `max_bytes` less the bookkeeping reserve."""
        return self._record_pages * self._page_size

    # ------------------------------------------------------------------ producing records

    def enqueue(self, payload: Payload) -> Envelope:
        """Store one record and return its envelope; when this returns, the record is durable."""
        return self.enqueue_many([payload])[0]

    def enqueue_many(self, payloads: Sequence[Payload]) -> list[Envelope]:
        """Store several records in ONE transaction (all or none), with consecutive sequence numbers."""
        if not payloads:
            return []
        with self._lock:
            try:
                envelopes = self._insert_locked(payloads)
            except OutboxFullError:
                pruned = self._prune_locked(before_ts=None)
                try:
                    envelopes = self._insert_locked(payloads)
                except OutboxFullError:
                    if not self._full_latched:
                        logger.error(
                            "outbox: full (%s; pruned %d delivered); refusing new records",
                            self._full_cause(),
                            pruned,
                        )
                    self._full_latched = True
                    self._refused_records += len(payloads)
                    raise
            if self._full_latched:
                self._record_refusals_locked()
        self._work.set()
        return envelopes

    def _record_refusals_locked(self) -> None:
        """The outbox accepts again after refusing records: leave a durable trace of the refusal for the server.

        A heartbeat alarm alone could be lost, because heartbeats are refused too while the outbox is full; this
        audit event is stored right after the first records accepted again and travels like any other record."""
        notice = AuditEvent(
            category="system",
            action="outbox.full",
            outcome=AuditOutcome.FAILURE,
            detail={"refused_records": self._refused_records, "max_bytes": self._config.max_bytes},
        )
        try:
            self._insert_locked([notice])
        except OutboxError as exc:
            logger.warning("outbox: accepting again, but the refusal notice could not be stored yet: %s", exc)
            return
        logger.info("outbox: accepting records again after refusing %d", self._refused_records)
        self._full_latched = False
        self._refused_records = 0

    def _insert_locked(self, payloads: Sequence[Payload]) -> list[Envelope]:
        if self._reserve_released:
            self._ensure_disk_reserve()
            if self._reserve_released:  # new records must not eat the room delivery needs
                raise OutboxFullError(
                    f"outbox {self._config.path} is full (the disk holding it is full; its reserve is in use)"
                )
        with self._translated("enqueue"), self._transaction(new_records=True) as tx:
            return self._insert_in(tx, payloads)

    def _insert_in(self, tx: sqlite3.Connection, payloads: Sequence[Payload]) -> list[Envelope]:
        # Within BEGIN IMMEDIATE we are the only writer, so the next AUTOINCREMENT value is knowable up front and the
        # envelope can carry its own seq without a second write of every row.
        row = tx.execute(
            "SELECT max(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
            " COALESCE((SELECT max(seq) FROM outbox), 0))"
        ).fetchone()
        next_seq = int(row[0]) + 1
        envelopes: list[Envelope] = []
        rows: list[tuple[int, str, str, str, float, float]] = []
        for offset, payload in enumerate(payloads):
            now = self._clock.now()
            envelope = Envelope(
                device_id=self._device_id,
                seq=next_seq + offset,
                message_id=uuid.uuid4(),
                payload_type=PayloadType(payload.type),
                device_time=now,
                boot_id=self._boot_id,
                monotonic_ns=self._clock.monotonic_ns(),
                payload=payload,
            )
            text = envelope.model_dump_json()
            if len(text.encode("utf-8")) > MAX_ENVELOPE_BYTES:
                raise InvalidRecordError(
                    f"{envelope.payload_type.value} record exceeds the {MAX_ENVELOPE_BYTES}-byte envelope limit"
                )
            envelopes.append(envelope)
            ts = now.timestamp()
            rows.append((envelope.seq, str(envelope.message_id), envelope.payload_type.value, text, ts, ts))
        tx.executemany(
            "INSERT INTO outbox (seq, message_id, payload_type, envelope, created_at, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        return envelopes

    # ------------------------------------------------------------------ answering commands

    def command_answer(self, command_id: uuid.UUID) -> CommandAnswer | None:
        """The answer this terminal already gave to `command_id`, or None if it never answered it."""
        with self._lock, self._translated("look up a command answer"):
            row = (
                self._require_conn()
                .execute(
                    "SELECT kind, outcome, detail, result_seq, answered_at FROM applied_commands WHERE command_id = ?",
                    (str(command_id),),
                )
                .fetchone()
            )
        if row is None:
            return None
        kind, outcome, detail, result_seq, answered_at = row
        return CommandAnswer(
            command_id=command_id,
            kind=str(kind),
            outcome=CommandOutcome(outcome),
            detail=str(detail),
            result_seq=int(result_seq),
            answered_at=datetime.fromtimestamp(float(answered_at), UTC),
        )

    def answer_command(
        self, *, kind: str, result: CommandResult, records: Sequence[Payload] = ()
    ) -> tuple[CommandAnswer, list[Envelope]]:
        """Remember the answer to `result.command_id` and queue `records` (what the command produced) followed by the
        `CommandResult` itself, all in ONE transaction: either the id is remembered and its answer is on its way, or
        neither. Raises `OutboxError` if the id was already answered (the caller checks `command_answer` first; the
        primary key makes a second answer impossible anyway) and `OutboxFullError` when there is no room even after
        pruning acknowledged rows (then nothing is remembered, and a redelivery will try again)."""
        payloads: list[Payload] = [*records, result]
        with self._lock:
            try:
                envelopes = self._answer_locked(kind, result, payloads)
            except OutboxFullError:
                self._prune_locked(before_ts=None)
                envelopes = self._answer_locked(kind, result, payloads)
        self._work.set()
        answer = CommandAnswer(
            command_id=result.command_id,
            kind=kind,
            outcome=result.outcome,
            detail=result.detail,
            result_seq=envelopes[-1].seq,
            answered_at=result.applied_at,
        )
        return answer, envelopes

    def _answer_locked(self, kind: str, result: CommandResult, payloads: Sequence[Payload]) -> list[Envelope]:
        with self._translated("answer a command"), self._transaction(new_records=True) as tx:
            envelopes = self._insert_in(tx, payloads)
            tx.execute(
                "INSERT INTO applied_commands (command_id, kind, outcome, detail, result_seq, answered_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    str(result.command_id),
                    kind,
                    result.outcome.value,
                    result.detail,
                    envelopes[-1].seq,
                    result.applied_at.timestamp(),
                ),
            )
            return envelopes

    def resend_command_result(self, result_seq: int) -> ResultDelivery:
        """A command was delivered again: the server has not seen our answer yet (or the two crossed). Send the SAME
        record again (same seq and message_id, so the server stores it once) if it only reached the broker."""
        now = self._now_ts()
        with self._lock, self._translated("re-send a command result"), self._transaction() as tx:
            row = tx.execute("SELECT status FROM outbox WHERE seq = ?", (result_seq,)).fetchone()
            if row is None or row[0] == OutboxStatus.ACKED.value:
                return ResultDelivery.STORED_ON_SERVER  # only ACKED rows are ever deleted
            if row[0] != OutboxStatus.SENT.value:
                return ResultDelivery.UNDERWAY
            tx.execute(
                "UPDATE outbox SET status = 'pending', attempts = attempts + 1, claimed_at = NULL,"
                " next_attempt_at = ?, last_error = ? WHERE seq = ? AND status = 'sent'",
                (now, "command delivered again", result_seq),
            )
        self._work.set()
        return ResultDelivery.REQUEUED

    def answered_commands(self) -> int:
        """How many command ids this outbox file has answered over its life."""
        with self._lock, self._translated("count command answers"):
            return int(self._require_conn().execute("SELECT count(*) FROM applied_commands").fetchone()[0])

    def created_since(self, since: datetime) -> dict[str, int]:
        """Held records created at or after `since`, counted by payload type (acknowledged rows pruned earlier are not
        counted). No payloads are read."""
        with self._lock, self._translated("count recent records"):
            rows = (
                self._require_conn()
                .execute(
                    "SELECT payload_type, count(*) FROM outbox WHERE created_at >= ? GROUP BY payload_type",
                    (since.timestamp(),),
                )
                .fetchall()
            )
        return {str(kind): int(n) for kind, n in rows}

    # ------------------------------------------------------------------ delivering records

    def claim(self, limit: int | None = None) -> list[ClaimedRecord]:
        """Atomically move up to `limit` due PENDING records (lowest seq first) to INFLIGHT and return them.

        A row whose stored JSON no longer decodes into an envelope of this device with this seq is QUARANTINED in the
        same transaction instead of being returned, and an audit event about it is enqueued afterwards.
        """
        limit = self._config.batch_size if limit is None else limit
        if limit < 1:
            return []
        now = self._now_ts()
        quarantined: list[int] = []
        with self._lock, self._translated("claim"), self._transaction() as tx:
            # A due time further ahead than the longest back-off means the wall clock went backwards; such rows are
            # due now rather than stuck until the clock catches up.
            returned = tx.execute(
                "UPDATE outbox SET status = 'inflight', claimed_at = :now"
                " WHERE seq IN (SELECT seq FROM outbox WHERE status = 'pending'"
                "   AND (next_attempt_at <= :now OR next_attempt_at > :horizon) ORDER BY seq LIMIT :limit)"
                " RETURNING seq, envelope, attempts",
                {"now": now, "horizon": now + self._config.retry_max_s, "limit": limit},
            ).fetchall()
            claimed: list[ClaimedRecord] = []
            for seq, stored, attempts in sorted(returned, key=lambda r: int(r[0])):
                record, problem = self._decode_stored(int(seq), stored, int(attempts))
                if record is not None:
                    claimed.append(record)
                else:
                    tx.execute(
                        "UPDATE outbox SET status = 'quarantined', last_error = ? WHERE seq = ?",
                        (problem[:MAX_ERROR_CHARS], int(seq)),
                    )
                    quarantined.append(int(seq))
        if quarantined:
            logger.error("outbox: quarantined undecodable record(s) seq=%s; they will not be sent", quarantined)
            self._report_quarantine(quarantined)
        return claimed

    def _decode_stored(self, seq: int, stored: object, attempts: int) -> tuple[ClaimedRecord | None, str]:
        if isinstance(stored, str):
            wire = stored.encode("utf-8")
        elif isinstance(stored, bytes):
            wire = stored
        else:
            return None, "stored envelope is not text"
        try:
            envelope = decode_envelope(wire)
        except ContractError as exc:
            return None, str(exc)[:MAX_ERROR_CHARS]
        if envelope.seq != seq or envelope.device_id != self._device_id:
            return None, "stored envelope does not match its row (seq or device id)"
        return ClaimedRecord(seq=seq, envelope=envelope, wire=wire, attempts=attempts), ""

    def _report_quarantine(self, seqs: list[int]) -> None:
        """Tell the server why these seqs will never arrive, so its gap detection has an explanation.

        Best-effort and in its own transaction: a full outbox must not undo the claim (and with it stop delivery).
        The reason is generic on purpose; the stored text could contain anything, including personal data."""
        notices: list[Payload] = [
            AuditEvent(
                category="system",
                action="outbox.record_quarantined",
                outcome=AuditOutcome.FAILURE,
                detail={"seq": seq, "reason": "undecodable stored envelope"},
            )
            for seq in seqs
        ]
        try:
            with self._lock:
                self._insert_locked(notices)
        except OutboxError as exc:
            logger.warning("outbox: could not record the quarantine notice for seq=%s: %s", seqs, exc)
            return
        self._work.set()

    def mark_sent(self, seqs: Iterable[int]) -> int:
        """INFLIGHT -> SENT for records the broker acknowledged; returns how many moved."""
        batch = sorted(set(seqs))
        if not batch:
            return 0
        now = self._now_ts()
        with self._lock, self._translated("mark sent"), self._transaction() as tx:
            moved = 0
            for seq in batch:
                moved += tx.execute(
                    "UPDATE outbox SET status = 'sent', sent_at = ?, last_error = NULL"
                    " WHERE seq = ? AND status = 'inflight'",
                    (now, seq),
                ).rowcount
            tx.execute("UPDATE outbox_counter SET value = value + ? WHERE name = 'sent_total'", (moved,))
        if moved != len(batch):
            logger.debug("outbox: %d of %d acknowledged record(s) were not in flight", len(batch) - moved, len(batch))
        return moved

    def mark_acked_through(self, acked_through_seq: int) -> int:
        """The server stored every seq 1..`acked_through_seq`: each not yet ACKED row at or below it becomes ACKED,
        in one transaction. Returns how many moved (0 for a repeated or stale ack)."""
        if acked_through_seq < 1:
            return 0
        now = self._now_ts()
        with self._lock, self._translated("mark acknowledged"), self._transaction() as tx:
            moved = int(
                tx.execute(
                    "UPDATE outbox SET status = 'acked', acked_at = ?, claimed_at = NULL, last_error = NULL"
                    " WHERE seq <= ? AND status IN ('pending', 'inflight', 'sent')",
                    (now, acked_through_seq),
                ).rowcount
            )
            if moved:
                tx.execute("UPDATE outbox_counter SET value = value + ? WHERE name = 'acked_total'", (moved,))
            recovered = bool(moved) and self._server_silent
            if moved:
                self._acked_since_requeue = True
                self._server_silent = False
        if recovered:
            logger.info("outbox: the server acknowledges again (through seq %d)", acked_through_seq)
        if moved:
            logger.debug("outbox: server acknowledged %d record(s) through seq %d", moved, acked_through_seq)
        return moved

    def highest_seq(self) -> int:
        """The highest seq this outbox file has ever assigned (0 for a new file); pruning does not lower it."""
        with self._lock, self._translated("highest seq"):
            row = (
                self._require_conn()
                .execute(
                    "SELECT max(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
                    " COALESCE((SELECT max(seq) FROM outbox), 0))"
                )
                .fetchone()
            )
        return int(row[0])

    def ensure_seq_above(self, floor: int) -> bool:
        """Make the next record's seq exceed `floor`: the highest seq the server held for this device id when it
        enrolled it (`ConfigBundle.seq_floor`). A re-enrolled terminal with a new or wiped outbox would otherwise
        number records from 1 again, and the server, already holding 1..floor from the earlier life, would take
        them for records it has and acknowledge them: lost. True when the sequence was moved."""
        query = (
            "SELECT max(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
            " COALESCE((SELECT max(seq) FROM outbox), 0))"
        )
        with self._lock, self._translated("raise the sequence floor"), self._transaction() as tx:
            current = int(tx.execute(query).fetchone()[0])
            if current >= floor:
                return False
            colliding = int(tx.execute("SELECT count(*) FROM outbox WHERE status != 'acked'").fetchone()[0])
            if not tx.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'outbox'", (floor,)).rowcount:
                tx.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('outbox', ?)", (floor,))
        if colliding:
            logger.error(
                "outbox: %d undelivered record(s) carry seqs the server already holds for this device; they will be "
                "refused as conflicts",
                colliding,
            )
        logger.warning("outbox: sequence moved from %d to %d (the server's floor for this device id)", current, floor)
        return True

    def requeue_unacked(self) -> int:
        """SENT rows without a server ack for `server_ack_timeout_s` go back to PENDING (attempts+1), due at once.

        This closes the gap PUBACK leaves open: a broker with no server session routes a record nowhere yet still
        acknowledges it. Publishing again is harmless because the server deduplicates by seq and message_id.

        Paced so that a server that is down for days is not sent the whole backlog again every timeout (a broker
        holding the server's session would queue every copy): while no server ack has arrived since the last
        re-send, only the oldest `batch_size` overdue rows go back, at most once per timeout (a probe). As soon as an
        ack moves rows again, the next call re-sends every overdue row. Returns how many rows went back."""
        now = self._now_ts()
        timeout = self._config.server_ack_timeout_s
        reason = f"no server ack within {timeout:g} s"[:MAX_ERROR_CHARS]
        with self._lock:
            if self._acked_since_requeue:
                limit = -1  # SQLite: no limit
            elif self._last_probe_ts is None or now - self._last_probe_ts >= timeout:
                limit = self._config.batch_size
            else:
                return 0
            with self._translated("requeue unacknowledged"), self._transaction() as tx:
                stale = [
                    int(seq)
                    for (seq,) in tx.execute(
                        "SELECT seq FROM outbox WHERE status = 'sent' AND sent_at <= ? ORDER BY seq LIMIT ?",
                        (now - timeout, limit),
                    )
                ]
                tx.executemany(
                    "UPDATE outbox SET status = 'pending', attempts = attempts + 1, claimed_at = NULL,"
                    " next_attempt_at = ?, last_error = ? WHERE seq = ? AND status = 'sent'",
                    [(now, reason, seq) for seq in stale],
                )
            if not stale:
                return 0
            probing = limit != -1
            first_probe = probing and not self._server_silent
            if probing:
                self._last_probe_ts = now
                self._server_silent = True
            self._acked_since_requeue = False
        if first_probe:
            logger.warning(
                "outbox: no server ack within %g s; re-sending the oldest %d record(s) (seq %d..%d) once per %g s "
                "until the server answers",
                timeout,
                len(stale),
                stale[0],
                stale[-1],
                timeout,
            )
        elif not probing:
            logger.info(
                "outbox: re-sending %d record(s) (seq %d..%d) the server did not acknowledge",
                len(stale),
                stale[0],
                stale[-1],
            )
        else:
            logger.debug("outbox: probing the server again with seq %d..%d", stale[0], stale[-1])
        self._work.set()
        return len(stale)

    def release(self, seqs: Iterable[int], error: str, *, backoff: bool = True) -> int:
        """INFLIGHT -> PENDING after a failed attempt: attempts+1 and, with `backoff`, a jittered exponential delay.

        `backoff=False` is for records that never got a fair attempt (the link dropped, the worker is stopping):
        the connection's own reconnect back-off already paces those.
        """
        batch = sorted(set(seqs))
        if not batch:
            return 0
        now = self._now_ts()
        reason = error[:MAX_ERROR_CHARS]
        with self._lock, self._translated("release"), self._transaction() as tx:
            updates: list[tuple[float, str, int]] = []
            for seq in batch:
                row = tx.execute("SELECT attempts FROM outbox WHERE seq = ? AND status = 'inflight'", (seq,)).fetchone()
                if row is None:
                    continue
                attempts = int(row[0]) + 1
                due = now + self.retry_delay_s(attempts) if backoff else now
                updates.append((due, reason, seq))
            tx.executemany(
                "UPDATE outbox SET status = 'pending', attempts = attempts + 1, claimed_at = NULL,"
                " next_attempt_at = ?, last_error = ? WHERE seq = ? AND status = 'inflight'",
                updates,
            )
        if updates:
            self._work.set()
        return len(updates)

    def retry_delay_s(self, attempts: int) -> float:
        """Delay before attempt `attempts + 1`: retry_initial_s doubling per attempt, capped at retry_max_s, jittered
        down by up to JITTER_FRACTION."""
        exponent = min(max(attempts, 1) - 1, 60)
        ceiling = min(self._config.retry_max_s, self._config.retry_initial_s * 2.0**exponent)
        return ceiling * (1.0 - JITTER_FRACTION * self._jitter())

    def prune_acked(self, now: datetime | None = None) -> int:
        """Delete ACKED records acknowledged more than `sent_retention_s` ago; returns how many. Never touches a
        record the server has not acknowledged."""
        current = (now or self._clock.now()).timestamp()
        with self._lock:
            return self._prune_locked(before_ts=current - self._config.sent_retention_s)

    def _prune_locked(self, before_ts: float | None) -> int:
        with self._translated("prune delivered records"), self._transaction() as tx:
            if before_ts is None:
                pruned = tx.execute("DELETE FROM outbox WHERE status = 'acked'").rowcount
            else:
                pruned = tx.execute(
                    "DELETE FROM outbox WHERE status = 'acked' AND acked_at <= ?", (before_ts,)
                ).rowcount
        if pruned:
            logger.debug("outbox: pruned %d acknowledged record(s)", pruned)
        return int(pruned)

    def wake(self) -> None:
        """Wake a thread blocked in `wait_for_work` (used when stopping)."""
        self._work.set()

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until something was enqueued or released (or `timeout_s` passed); True if woken by work."""
        woken = self._work.wait(timeout_s)
        self._work.clear()
        return woken

    # ------------------------------------------------------------------ observing

    def stats(self) -> OutboxStats:
        now = self._now_ts()
        self._ensure_disk_reserve()
        with self._lock, self._translated("stats"):
            conn = self._require_conn()
            counts = dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall())
            oldest = conn.execute(
                "SELECT min(created_at) FROM outbox WHERE seq IN ("
                " SELECT min(seq) FROM outbox WHERE status = 'pending'"
                " UNION ALL SELECT min(seq) FROM outbox WHERE status = 'inflight'"
                " UNION ALL SELECT min(seq) FROM outbox WHERE status = 'sent')"
            ).fetchone()[0]
            counters = dict(conn.execute("SELECT name, value FROM outbox_counter").fetchall())
            page_count = int(conn.execute("PRAGMA page_count").fetchone()[0])
            free_pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            used = (page_count - free_pages) * self._page_size
            high_water = used >= self._config.high_water_ratio * self.record_capacity_bytes
            alarms: list[str] = []
            if self._full_latched:
                alarms.append(ALARM_OUTBOX_FULL)
            if high_water:
                alarms.append(ALARM_OUTBOX_HIGH_WATER)
            quarantined = int(counts.get(OutboxStatus.QUARANTINED.value, 0))
            if quarantined:
                alarms.append(ALARM_OUTBOX_QUARANTINED)
        pending = int(counts.get(OutboxStatus.PENDING.value, 0))
        inflight = int(counts.get(OutboxStatus.INFLIGHT.value, 0))
        sent = int(counts.get(OutboxStatus.SENT.value, 0))
        return OutboxStats(
            depth=pending + inflight + sent,
            oldest_age_s=None if oldest is None else max(0.0, now - float(oldest)),
            used_bytes=used,
            capacity_bytes=self._config.max_bytes,
            inflight=inflight,
            sent_total=int(counters.get("sent_total", 0)),
            unpublished=pending + inflight,
            acked_total=int(counters.get("acked_total", 0)),
            quarantined=quarantined,
            alarms=tuple(alarms),
        )

    def rows(self, statuses: Iterable[OutboxStatus] | None = None) -> list[OutboxRow]:
        """Bookkeeping of stored records (no payloads), lowest seq first."""
        wanted = list(statuses) if statuses is not None else list(OutboxStatus)
        found: list[tuple[int, str, str, str, int, float, str | None]] = []
        with self._lock, self._translated("list records"):
            conn = self._require_conn()
            for status in wanted:
                found.extend(
                    conn.execute(
                        "SELECT seq, message_id, payload_type, status, attempts, next_attempt_at, last_error"
                        " FROM outbox WHERE status = ? ORDER BY seq",
                        (status.value,),
                    ).fetchall()
                )
        found.sort(key=lambda row: row[0])
        return [
            OutboxRow(
                seq=int(seq),
                message_id=str(message_id),
                payload_type=str(payload_type),
                status=OutboxStatus(status),
                attempts=int(attempts),
                next_attempt_at=datetime.fromtimestamp(float(due), UTC),
                last_error=last_error,
            )
            for seq, message_id, payload_type, status, attempts, due, last_error in found
        ]

    def integrity_check(self) -> list[str]:
        """SQLite's own consistency check; `["ok"]` when the file is sound."""
        with self._lock, self._translated("integrity check"):
            return [str(r[0]) for r in self._require_conn().execute("PRAGMA integrity_check").fetchall()]

    # ------------------------------------------------------------------ plumbing

    def _now_ts(self) -> float:
        return self._clock.now().timestamp()

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError("outbox is closed")
        return self._conn

    @contextmanager
    def _transaction(self, *, new_records: bool = False) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; the caller holds `_lock` (or is opening).

        SQLite enforces the disk bound itself through `max_page_count`: transactions that add records may only grow
        the file to `_record_pages`; bookkeeping of records already held may use the reserve up to `_hard_pages`.
        """
        conn = self._require_conn()
        limit = self._record_pages if new_records else self._hard_pages
        if limit != self._page_limit:
            conn.execute(f"PRAGMA max_page_count = {limit}")
            self._page_limit = limit
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as rollback_exc:
                    logger.error("outbox: rollback failed: %s", rollback_exc)
            raise

    def _free_disk_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self._config.path.parent).free
        except OSError:
            return None

    def _full_cause(self) -> str:
        """SQLite says SQLITE_FULL both at our `max_page_count` bound and when the disk itself is full: tell which."""
        free = self._free_disk_bytes()
        if free is not None and free < DISK_FULL_FREE_BYTES:
            return f"the disk holding it is full: {free} bytes free"
        return f"{self._config.max_bytes}-byte bound"

    @property
    def disk_reserve_path(self) -> Path:
        return self._config.path.with_name(self._config.path.name + ".reserve")

    def _ensure_disk_reserve(self) -> None:
        """(Re)create the ballast file once the disk has room for it and as much again; never fails the caller."""
        size = self._config.disk_reserve_bytes
        reserve = self.disk_reserve_path
        if size == 0 or reserve.exists():
            self._reserve_released = False
            return
        free = self._free_disk_bytes()
        if free is None or free < 2 * size:
            return
        chunk = b"\0" * min(size, 64 * 1024)
        try:
            with reserve.open("xb") as f:
                written = 0
                while written < size:
                    written += f.write(chunk[: size - written])
                f.flush()
                os.fsync(f.fileno())
        except FileExistsError:
            self._reserve_released = False
            return
        except OSError as exc:
            reserve.unlink(missing_ok=True)
            logger.warning("outbox: cannot create the %d-byte disk reserve: %s", size, exc)
            return
        if self._reserve_released:
            logger.info("outbox: disk space is back; disk reserve restored, accepting records again")
        self._reserve_released = False

    def _release_disk_reserve(self, operation: str) -> bool:
        """Delete the ballast when the disk is full during bookkeeping; True if that freed space."""
        reserve = self.disk_reserve_path
        try:
            reserve.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            logger.error("outbox: cannot release the disk reserve %s: %s", reserve, exc)
            return False
        self._reserve_released = True
        logger.error(
            "outbox: the disk holding %s is full during %s; released the %d-byte reserve so delivery can go on "
            "(free some space: new records are refused until then)",
            self._config.path,
            operation,
            self._config.disk_reserve_bytes,
        )
        return True

    @contextmanager
    def _translated(self, operation: str) -> Iterator[None]:
        """The one place sqlite3 errors become terminal errors."""
        try:
            yield
        except sqlite3.Error as exc:
            if _is_full(exc):
                cause = self._full_cause()
                released = False
                if cause.startswith("the disk") and operation not in _RECORD_PRODUCING_OPERATIONS:
                    released = self._release_disk_reserve(operation)
                retry = "; disk reserve released, retry" if released else ""
                raise OutboxFullError(
                    f"outbox {self._config.path} is full ({cause}) during {operation}{retry}"
                ) from exc
            raise OutboxError(f"outbox {self._config.path}: {operation} failed: {exc}") from exc


DISK_FULL_FREE_BYTES = 1024 * 1024
"""Below this much free space on its filesystem, SQLITE_FULL is blamed on the disk, not on the outbox's bound."""
_RECORD_PRODUCING_OPERATIONS = frozenset({"enqueue", "answer a command"})
"""Operations that add records: they must never eat the disk reserve kept for delivery bookkeeping."""


def _take_ownership(path: Path) -> int:
    """Lock `<outbox>.lock` exclusively for this process's lifetime (the kernel drops it if the process dies).

    Two processes on one outbox would each recover the other's in-flight rows at start and publish them twice;
    refusing the second opener keeps the outbox single-writer. Returns the lock's file descriptor."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise OutboxError(f"cannot open outbox {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise OutboxError(f"outbox {path} is already in use by another process (lock {lock_path})") from exc
    return fd


def _split_sql(script: str) -> list[str]:
    """Split our own schema script into statements (trigger bodies contain ';', so split on complete statements)."""
    statements: list[str] = []
    current = ""
    for line in script.strip().splitlines():
        current += line + "\n"
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement in outbox schema: {current!r}")
    return statements
