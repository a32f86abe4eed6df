"""Durable commands to devices on the server: issuing, publishing, re-publishing, expiring, and recording answers.

Owns the server half of REQUIREMENTS Y-04 ("commands sent once, not duplicated, not lost") as a state machine stored in
`device_commands`:

    queued ──published (QoS 1)──► delivered ──CommandResult stored──► acknowledged
       │                             │  ▲
       │                             └──┘ re-published: the device came back online since the last publish, or
       │                                  `command_republish_after_s` passed without an answer
       └──────────── expires_at passed, no answer ──────────────► expired

A command is never published at or after its `expires_at` (it becomes `expired` instead). An answer moves a command to
`acknowledged` from any state, in the ingest transaction that stores the `CommandResult` (the device's word is what
happened, even when it arrives after the server gave up). Re-publishing is safe because the terminal carries out each
`command_id` at most once and answers it once (`terminal.commands`).

`CommandDispatcher` is a thread beside ingest. It publishes through a `DownlinkPublisher` seam; in a server process that
is the ingest worker's own MQTT client (`IngestWorker.publish_downlink`): one broker session per process, the client
that already publishes `uplink_ack` on the same topics, and nothing to configure twice. Several server processes may
run dispatchers on one database: a command might then be published twice, which the terminal absorbs.

Store functions work inside the caller's transaction and never commit. This module must never publish inside a
database transaction, never publish an expired command, never move a command backwards out of `acknowledged`, and
never log command arguments.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Protocol, cast

from sqlalchemy import CursorResult, Engine, and_, insert, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from protocol import Clock, CommandKind, CommandResult, DeviceCommand, Envelope, SystemClock
from sync_server.db.engine import session_factory
from sync_server.db.models import CommandState, Device, IssuedCommand, LinkStateColumn

logger = logging.getLogger(__name__)

DISPATCH_BATCH = 200
"""Most commands published per dispatcher pass."""


class DownlinkPublisher(Protocol):
    """Queues one QoS 1 message on a device's downlink topic; True if the MQTT client accepted it (never blocks)."""

    def __call__(self, device_id: str, payload: bytes) -> bool: ...


# ---------------------------------------------------------------------- store functions (caller's transaction)


INSERT_COMMANDS: Final = insert(IssuedCommand)
"""Queues commands from `queued_command` rows without the ORM (`sync_server.db.steps`)."""


def queued_command(
    *, device_id: str, kind: CommandKind, args: Mapping[str, Any], ttl_s: float, now: datetime
) -> dict[str, Any]:
    """The row of a new command (a fresh `command_id`), for `issue_command` or `INSERT_COMMANDS`."""
    return {
        "command_id": uuid.uuid4(),
        "device_id": device_id,
        "kind": kind.value,
        "args": dict(args),
        "issued_at": now,
        "expires_at": now + timedelta(seconds=ttl_s),
        "state": CommandState.QUEUED,
        "attempts": 0,
    }


def issue_command(
    session: Session, *, device_id: str, kind: CommandKind, args: Mapping[str, Any], ttl_s: float, now: datetime
) -> IssuedCommand:
    """Queue a new command (a fresh `command_id`); the dispatcher publishes it."""
    row = IssuedCommand(**queued_command(device_id=device_id, kind=kind, args=args, ttl_s=ttl_s, now=now))
    session.add(row)
    session.flush()
    return row


def wire_command(row: IssuedCommand) -> DeviceCommand:
    """The downlink message for a stored command."""
    return DeviceCommand(
        command_id=row.command_id,
        device_id=row.device_id,
        kind=CommandKind(row.kind),
        issued_at=row.issued_at,
        expires_at=row.expires_at,
        args=row.args,
    )


@dataclass(frozen=True, slots=True)
class ResultsApplied:
    """What `record_command_results` did with the `CommandResult` envelopes of one batch."""

    acknowledged: int
    """Commands moved to `acknowledged` now."""
    repeated: int
    """Results for commands already acknowledged (a redelivered or re-sent answer)."""
    unmatched: tuple[str, ...]
    """`device_id/command_id` of results that name no command issued to that device (stored, flagged here)."""


def record_command_results(session: Session, envelopes: Sequence[Envelope], *, now: datetime) -> ResultsApplied:
    """Move each command answered by a `CommandResult` in `envelopes` to `acknowledged` with the device's outcome.

    Called by ingest inside the transaction that stores the envelopes, so a stored answer and an acknowledged command
    never diverge. A result naming an unknown command, or one issued to another device, is stored as an event like
    any other and reported back as unmatched."""
    answers: dict[uuid.UUID, tuple[str, CommandResult]] = {}
    for env in envelopes:
        if isinstance(env.payload, CommandResult):
            answers.setdefault(env.payload.command_id, (env.device_id, env.payload))
    if not answers:
        return ResultsApplied(0, 0, ())
    rows = {
        row.command_id: row
        for row in session.scalars(
            select(IssuedCommand).where(IssuedCommand.command_id.in_(list(answers))).with_for_update()
        )
    }
    acknowledged = repeated = 0
    unmatched: list[str] = []
    for command_id, (device_id, result) in answers.items():
        row = rows.get(command_id)
        if row is None or row.device_id != device_id:
            unmatched.append(f"{device_id}/{command_id}")
            continue
        if row.state is CommandState.ACKNOWLEDGED:
            repeated += 1
            continue
        row.state = CommandState.ACKNOWLEDGED
        row.acknowledged_at = now
        row.result_outcome = result.outcome.value
        row.result_detail = result.detail[:200]
        row.result_at = result.applied_at
        acknowledged += 1
    return ResultsApplied(acknowledged, repeated, tuple(unmatched))


def expire_commands(session: Session, *, now: datetime) -> int:
    """Unanswered commands at or past `expires_at` become `expired`; returns how many."""
    # An UPDATE's result is a CursorResult (SQLAlchemy types `execute` for any statement).
    result = cast(
        CursorResult[Any],
        session.execute(
            update(IssuedCommand)
            .where(
                IssuedCommand.state.in_([CommandState.QUEUED, CommandState.DELIVERED]),
                IssuedCommand.expires_at <= now,
            )
            .values(state=CommandState.EXPIRED)
            .execution_options(synchronize_session=False)
        ),
    )
    return int(result.rowcount or 0)


def commands_to_publish(
    session: Session, *, now: datetime, republish_after_s: float, limit: int = DISPATCH_BATCH
) -> list[IssuedCommand]:
    """Unexpired commands due for a publish: every `queued` one, and each `delivered` one whose device came online
    after its last publish (the device may have missed it while away) or whose last publish is older than
    `republish_after_s`. Oldest first."""
    stale = now - timedelta(seconds=republish_after_s)
    back_online = and_(
        Device.link_state == LinkStateColumn.ONLINE,
        Device.link_state_at.is_not(None),
        Device.link_state_at > IssuedCommand.last_published_at,
    )
    query = (
        select(IssuedCommand)
        .join(Device, Device.device_id == IssuedCommand.device_id)
        .where(
            IssuedCommand.expires_at > now,
            or_(
                IssuedCommand.state == CommandState.QUEUED,
                and_(
                    IssuedCommand.state == CommandState.DELIVERED,
                    or_(IssuedCommand.last_published_at <= stale, back_online),
                ),
            ),
        )
        .order_by(IssuedCommand.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def mark_published(session: Session, command_ids: Sequence[uuid.UUID], *, now: datetime) -> int:
    """`queued`/`delivered` -> `delivered`, attempts + 1, for commands the MQTT client accepted. A command answered
    (or expired) meanwhile keeps its state."""
    if not command_ids:
        return 0
    result = cast(
        CursorResult[Any],
        session.execute(
            update(IssuedCommand)
            .where(
                IssuedCommand.command_id.in_(list(command_ids)),
                IssuedCommand.state.in_([CommandState.QUEUED, CommandState.DELIVERED]),
            )
            .values(state=CommandState.DELIVERED, attempts=IssuedCommand.attempts + 1, last_published_at=now)
            .execution_options(synchronize_session=False)
        ),
    )
    return int(result.rowcount or 0)


# ---------------------------------------------------------------------- the dispatcher thread


@dataclass(frozen=True, slots=True)
class DispatchStats:
    published: int
    """Publishes the MQTT client accepted (first publishes and re-publishes)."""
    republished: int
    """Of those, re-publishes of already delivered commands."""
    expired: int
    """Commands moved to `expired`."""
    not_accepted: int
    """Publishes the MQTT client refused (not connected); retried on the next pass."""


class CommandDispatcher:
    """Runs `dispatch_once()` every `interval_s` (or at once after `wake()`) between `start()` and `stop()`."""

    def __init__(
        self,
        engine: Engine,
        publish: DownlinkPublisher,
        *,
        interval_s: float,
        republish_after_s: float,
        clock: Clock | None = None,
    ) -> None:
        self._sessions = session_factory(engine, write_intent=True)
        self._publish = publish
        self._interval_s = interval_s
        self._republish_after_s = republish_after_s
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._published = self._republished = self._expired = self._not_accepted = 0
        self._failing = False
        self._refusal_logged = False

    def stats(self) -> DispatchStats:
        with self._lock:
            return DispatchStats(self._published, self._republished, self._expired, self._not_accepted)

    def wake(self) -> None:
        """Dispatch now (a command was just issued)."""
        self._wake.set()

    def dispatch_once(self) -> int:
        """Expire what is due, then publish what is due, then record the publishes. Returns how many were published.
        Raises SQLAlchemyError on database failure."""
        now = self._clock.now()
        with self._sessions.begin() as session:
            expired = expire_commands(session, now=now)
            due = [
                (row.command_id, row.device_id, row.state, wire_command(row).to_bytes())
                for row in commands_to_publish(session, now=now, republish_after_s=self._republish_after_s)
            ]
        if expired:
            logger.info("commands: %d command(s) expired without an answer", expired)
        accepted: list[uuid.UUID] = []
        republished = refused = 0
        for command_id, device_id, state, payload in due:  # outside any transaction: publish never waits on the DB
            if self._publish(device_id, payload):
                accepted.append(command_id)
                republished += state is CommandState.DELIVERED
            else:
                refused += 1
        if accepted:
            with self._sessions.begin() as session:
                mark_published(session, accepted, now=now)
        if refused and not self._refusal_logged:
            logger.warning("commands: the MQTT client is not accepting publishes; %d command(s) wait", refused)
        self._refusal_logged = bool(refused)
        with self._lock:
            self._published += len(accepted)
            self._republished += republished
            self._expired += expired
            self._not_accepted += refused
        if accepted:
            logger.debug("commands: published %d command(s) (%d again)", len(accepted), republished)
        return len(accepted)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="yibao-commands", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.dispatch_once()
            except SQLAlchemyError as exc:
                if not self._failing:
                    logger.warning(
                        "commands: dispatch failed (%s); retrying every %.1f s", type(exc).__name__, self._interval_s
                    )
                    self._failing = True
            else:
                if self._failing:
                    logger.info("commands: dispatch recovered")
                    self._failing = False
            self._wake.wait(self._interval_s)
            self._wake.clear()
