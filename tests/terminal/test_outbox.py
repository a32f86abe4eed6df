"""The outbox state machine, its sequence numbers, its crash safety and its disk bound, on real SQLite files."""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from protocol import AuditEvent, AuditOutcome, Envelope, PayloadType, decode_envelope
from terminal.errors import InvalidRecordError, OutboxError, OutboxFullError
from terminal.outbox import (
    ALARM_OUTBOX_FULL,
    ALARM_OUTBOX_HIGH_WATER,
    ALARM_OUTBOX_QUARANTINED,
    TRANSITIONS,
    Outbox,
    OutboxStatus,
)
from tests.terminal.conftest import DEVICE_ID, FakeClock, fill_until_full, open_outbox

REPO = Path(__file__).resolve().parents[2]


def event(n: int, **detail: str | int) -> AuditEvent:
    return AuditEvent(category="system", action="test.record", outcome=AuditOutcome.INFO, detail={"n": n, **detail})


def statuses(outbox: Outbox) -> dict[int, OutboxStatus]:
    return {row.seq: row.status for row in outbox.rows()}


@contextmanager
def raw_db(path: Path) -> Iterator[sqlite3.Connection]:
    """A second, independent connection, as an operator's sqlite3 shell (or a bug) would have."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        yield conn


@pytest.fixture
def outbox(tmp_path: Path, clock: FakeClock) -> Iterator[Outbox]:
    with open_outbox(tmp_path / "outbox.sqlite3", clock) as ob:
        yield ob


# ---------------------------------------------------------------------- state machine


def test_record_moves_pending_inflight_sent_acked(outbox: Outbox, clock: FakeClock) -> None:
    envelope = outbox.enqueue(event(1))
    assert envelope.device_id == DEVICE_ID
    assert envelope.payload_type is PayloadType.AUDIT_EVENT
    assert statuses(outbox) == {envelope.seq: OutboxStatus.PENDING}

    [claimed] = outbox.claim()
    assert claimed.envelope == envelope
    assert decode_envelope(claimed.wire) == envelope
    assert statuses(outbox) == {envelope.seq: OutboxStatus.INFLIGHT}
    assert outbox.claim() == [], "an in-flight record is not claimed twice"

    assert outbox.mark_sent([envelope.seq]) == 1
    assert statuses(outbox) == {envelope.seq: OutboxStatus.SENT}
    clock.advance(2)
    stats = outbox.stats()
    assert (stats.depth, stats.unpublished, stats.inflight, stats.sent_total) == (1, 0, 0, 1)
    assert stats.oldest_age_s == 2.0, "a record the server has not acknowledged still counts as waiting"

    assert outbox.mark_acked_through(envelope.seq) == 1
    assert statuses(outbox) == {envelope.seq: OutboxStatus.ACKED}
    stats = outbox.stats()
    assert (stats.depth, stats.acked_total, stats.oldest_age_s) == (0, 1, None)
    assert outbox.mark_acked_through(envelope.seq) == 0, "a repeated ack changes nothing"


def test_release_returns_to_pending_with_attempt_counted(outbox: Outbox, clock: FakeClock) -> None:
    seq = outbox.enqueue(event(1)).seq
    outbox.claim()
    assert outbox.release([seq], "no PUBACK within 2 s") == 1
    [row] = outbox.rows()
    assert (row.status, row.attempts, row.last_error) == (OutboxStatus.PENDING, 1, "no PUBACK within 2 s")
    assert row.next_attempt_at == clock.now() + timedelta(seconds=1)


def test_only_inflight_records_can_be_acked_or_released(outbox: Outbox) -> None:
    seq = outbox.enqueue(event(1)).seq
    assert outbox.mark_sent([seq]) == 0, "a PENDING record was never published"
    assert outbox.release([seq], "x") == 0
    outbox.claim()
    outbox.mark_sent([seq])
    assert outbox.release([seq], "late failure") == 0, "a SENT record stays sent"
    assert statuses(outbox) == {seq: OutboxStatus.SENT}


def test_database_refuses_illegal_transitions_and_deleting_undelivered(tmp_path: Path, outbox: Outbox) -> None:
    seq = outbox.enqueue(event(1)).seq
    with raw_db(tmp_path / "outbox.sqlite3") as db:
        for illegal in (OutboxStatus.SENT, OutboxStatus.QUARANTINED):
            assert illegal not in TRANSITIONS[OutboxStatus.PENDING]
            with pytest.raises(sqlite3.IntegrityError, match="illegal outbox status transition"):
                db.execute("UPDATE outbox SET status = ? WHERE seq = ?", (illegal.value, seq))
        with pytest.raises(sqlite3.IntegrityError, match="only outbox records the server acknowledged"):
            db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("UPDATE outbox SET status = 'lost' WHERE seq = ?", (seq,))
    assert statuses(outbox) == {seq: OutboxStatus.PENDING}


def test_pragmas_and_schema_version(tmp_path: Path, outbox: Outbox) -> None:
    with raw_db(tmp_path / "outbox.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'outbox'").fetchone()[0]
        assert "INTEGER PRIMARY KEY AUTOINCREMENT" in sql


def test_file_from_newer_software_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite3"
    with raw_db(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(OutboxError, match="newer than this software"):
        open_outbox(path)


def test_server_ack_may_overtake_the_puback_and_covers_every_live_row_below_it(outbox: Outbox) -> None:
    seqs = [e.seq for e in outbox.enqueue_many([event(n) for n in range(5)])]
    outbox.claim(3)  # 1..3 in flight, 4..5 pending
    outbox.mark_sent([seqs[0]])
    assert outbox.mark_acked_through(seqs[3]) == 4, "SENT, INFLIGHT and PENDING rows at or below N"
    assert statuses(outbox) == {
        seqs[0]: OutboxStatus.ACKED,
        seqs[1]: OutboxStatus.ACKED,
        seqs[2]: OutboxStatus.ACKED,
        seqs[3]: OutboxStatus.ACKED,
        seqs[4]: OutboxStatus.PENDING,
    }
    # The PUBACK bookkeeping of the in-flight batch arrives after the ack: nothing moves back.
    assert outbox.mark_sent(seqs[1:3]) == 0
    assert outbox.release(seqs[1:3], "late") == 0
    assert [r.seq for r in outbox.claim()] == [seqs[4]], "an acknowledged PENDING row is never published again"
    assert outbox.mark_acked_through(1000) == 1, "an ack beyond our highest seq only covers what exists"
    assert outbox.stats().depth == 0


def test_transition_table_allows_ack_from_every_live_status_and_nothing_leaves_acked() -> None:
    for status in (OutboxStatus.PENDING, OutboxStatus.INFLIGHT, OutboxStatus.SENT):
        assert OutboxStatus.ACKED in TRANSITIONS[status]
    assert TRANSITIONS[OutboxStatus.ACKED] == frozenset()
    assert OutboxStatus.ACKED not in TRANSITIONS[OutboxStatus.QUARANTINED]


def test_sent_without_server_ack_goes_back_to_pending_after_the_timeout(tmp_path: Path, clock: FakeClock) -> None:
    with open_outbox(tmp_path / "o.sqlite3", clock, server_ack_timeout_s=120.0) as outbox:
        seqs = [e.seq for e in outbox.enqueue_many([event(n) for n in range(3)])]
        outbox.mark_sent(r.seq for r in outbox.claim())
        outbox.mark_acked_through(seqs[0])
        clock.advance(119)
        assert outbox.requeue_unacked() == 0
        clock.advance(1)
        assert outbox.requeue_unacked() == 2
        rows = {r.seq: r for r in outbox.rows()}
        assert rows[seqs[0]].status is OutboxStatus.ACKED
        assert [rows[s].status for s in seqs[1:]] == [OutboxStatus.PENDING, OutboxStatus.PENDING]
        assert rows[seqs[1]].last_error == "no server ack within 120 s"
        assert rows[seqs[1]].attempts == 1
        assert [r.seq for r in outbox.claim()] == seqs[1:], "due at once; the server deduplicates"


def test_while_the_server_is_silent_only_one_batch_per_timeout_is_sent_again(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A server down for days must not receive the whole backlog again every timeout: one batch probes, once per
    timeout; when its ack comes back, everything overdue goes at once."""
    caplog.set_level(logging.INFO, logger="terminal.outbox")
    with open_outbox(tmp_path / "o.sqlite3", clock, server_ack_timeout_s=120.0, batch_size=2) as outbox:
        seqs = [e.seq for e in outbox.enqueue_many([event(n) for n in range(7)])]
        while batch := outbox.claim(10):
            outbox.mark_sent(r.seq for r in batch)
        clock.advance(120)
        assert outbox.requeue_unacked() == 2, "a probe: the oldest batch"
        assert [r.seq for r in outbox.rows([OutboxStatus.PENDING])] == seqs[:2]
        clock.advance(60)
        assert outbox.requeue_unacked() == 0, "no more until a timeout has passed without an answer"
        outbox.mark_sent(r.seq for r in outbox.claim(10))  # the probe is published again
        clock.advance(60)
        assert outbox.requeue_unacked() == 2, "the next probe"
        outbox.mark_sent(r.seq for r in outbox.claim(10))
        assert outbox.mark_acked_through(seqs[1]) == 2, "the server answers the first probe"
        assert outbox.requeue_unacked() == 3, "the server is there: everything overdue goes again"
        assert [r.seq for r in outbox.rows([OutboxStatus.PENDING])] == seqs[4:]
    warnings = [r for r in caplog.records if "no server ack within" in r.getMessage()]
    assert len(warnings) == 1, "the silence is logged once"
    assert any("acknowledges again" in r.getMessage() for r in caplog.records), "and the recovery once"


def test_database_refuses_deleting_a_record_the_server_has_not_acknowledged(tmp_path: Path, outbox: Outbox) -> None:
    seq = outbox.enqueue(event(1)).seq
    outbox.claim()
    outbox.mark_sent([seq])
    with (
        raw_db(tmp_path / "outbox.sqlite3") as db,
        pytest.raises(sqlite3.IntegrityError, match="only outbox records the server acknowledged"),
    ):
        db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
    outbox.mark_acked_through(seq)
    with raw_db(tmp_path / "outbox.sqlite3") as db:
        with pytest.raises(sqlite3.IntegrityError, match="illegal outbox status transition"):
            db.execute("UPDATE outbox SET status = 'pending' WHERE seq = ?", (seq,))
        db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))


# ---------------------------------------------------------------------- schema migration

V1_DDL = """
CREATE TABLE outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      TEXT    NOT NULL UNIQUE,
    payload_type    TEXT    NOT NULL,
    envelope        TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending' CHECK (status IN ('inflight', 'pending', 'quarantined', 'sent')),
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_at      REAL    NOT NULL,
    next_attempt_at REAL    NOT NULL,
    claimed_at      REAL,
    sent_at         REAL,
    last_error      TEXT
);
CREATE INDEX outbox_by_status ON outbox (status, seq);
CREATE TABLE outbox_counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO outbox_counter (name, value) VALUES ('sent_total', 0);
CREATE TRIGGER outbox_legal_transition BEFORE UPDATE OF status ON outbox
WHEN OLD.status <> NEW.status AND OLD.status || '>' || NEW.status NOT IN ('inflight>pending', 'inflight>quarantined',
    'inflight>sent', 'pending>inflight')
BEGIN
    SELECT RAISE(ABORT, 'illegal outbox status transition');
END;
CREATE TRIGGER outbox_only_delivered_are_deleted BEFORE DELETE ON outbox
WHEN OLD.status <> 'sent'
BEGIN
    SELECT RAISE(ABORT, 'only delivered outbox records may be deleted');
END;
PRAGMA user_version = 1;
"""
"""The outbox DDL of schema version 1, verbatim as that software wrote it (copied, not imported: it is history)."""


def _v1_file(path: Path, clock: FakeClock) -> dict[int, str]:
    """A version-1 outbox as the old software left it: seq 1 and 6 delivered and pruned (so sqlite_sequence is
    above every row), 2..3 SENT, 4 INFLIGHT (a crash), 5 PENDING. Returns the stored envelope text by seq."""
    texts: dict[int, str] = {}
    ts = clock.now().timestamp()
    with raw_db(path) as db:
        db.executescript(V1_DDL)
        for seq, status in [(1, "sent"), (2, "sent"), (3, "sent"), (4, "inflight"), (5, "pending"), (6, "sent")]:
            env = Envelope(
                device_id=DEVICE_ID,
                seq=seq,
                message_id=uuid.uuid4(),
                payload_type=PayloadType.AUDIT_EVENT,
                device_time=clock.now(),
                boot_id=uuid.uuid4(),
                monotonic_ns=seq,
                payload=event(seq),
            )
            texts[seq] = env.model_dump_json()
            db.execute(
                "INSERT INTO outbox (seq, message_id, payload_type, envelope, status, created_at, next_attempt_at,"
                " sent_at) VALUES (?, ?, 'audit_event', ?, ?, ?, ?, ?)",
                (seq, str(env.message_id), texts[seq], status, ts, ts, ts if status == "sent" else None),
            )
        db.execute("UPDATE outbox_counter SET value = 4 WHERE name = 'sent_total'")
        db.execute("DELETE FROM outbox WHERE seq IN (1, 6)")
        assert db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()[0] == 6
    return {seq: text for seq, text in texts.items() if seq not in (1, 6)}


def test_version_1_file_is_migrated_keeping_every_row_and_the_sequence(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "v1.sqlite3"
    texts = _v1_file(path, clock)
    with open_outbox(path, clock) as outbox:
        assert statuses(outbox) == {
            2: OutboxStatus.SENT,
            3: OutboxStatus.SENT,
            4: OutboxStatus.PENDING,  # recovered from the crash, as always
            5: OutboxStatus.PENDING,
        }
        stats = outbox.stats()
        assert (stats.sent_total, stats.acked_total, stats.depth) == (4, 0, 4)
        assert outbox.enqueue(event(7)).seq == 7, "AUTOINCREMENT's high-water mark survived the rebuild"
        assert outbox.mark_acked_through(3) == 2, "the new status works on migrated rows"
        assert [r.seq for r in outbox.claim()] == [4, 5, 7]
        assert outbox.integrity_check() == ["ok"]
    with raw_db(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        stored = dict(db.execute("SELECT seq, envelope FROM outbox WHERE seq IN (2, 3, 4, 5)").fetchall())
        assert stored == texts, "envelopes kept byte for byte"
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type IN ('trigger', 'index', 'table')")}
        assert {"outbox_legal_transition", "outbox_only_acked_are_deleted", "outbox_by_status"} <= names
        assert "outbox_only_delivered_are_deleted" not in names
        assert "outbox_v2" not in names
        with pytest.raises(sqlite3.IntegrityError, match="only outbox records the server acknowledged"):
            db.execute("DELETE FROM outbox WHERE seq = 5")
    with open_outbox(path, clock) as again:
        assert again.enqueue(event(8)).seq == 8, "opening a migrated file again is a no-op"


# ---------------------------------------------------------------------- sequence numbers


def test_seq_is_monotonic_and_never_reused_after_pruning(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.sqlite3"
    with open_outbox(path, clock, sent_retention_s=0.0) as outbox:
        first = [outbox.enqueue(event(n)).seq for n in range(3)]
        assert first == [1, 2, 3]
        many = [e.seq for e in outbox.enqueue_many([event(n) for n in range(4)])]
        assert many == [4, 5, 6, 7]
        outbox.mark_sent(r.seq for r in outbox.claim(100))
        clock.advance(1)
        assert outbox.prune_acked() == 0, "PUBACKed is not enough to delete"
        outbox.mark_acked_through(7)
        clock.advance(1)
        assert outbox.prune_acked() == 7
        assert outbox.rows() == []
        assert outbox.enqueue(event(8)).seq == 8, "the highest seq was pruned but is not handed out again"
    with open_outbox(path, clock) as reopened:
        assert reopened.enqueue(event(9)).seq == 9
        assert reopened.stats().sent_total == 7, "the PUBACK count survives pruning and reopening"
        assert reopened.stats().acked_total == 7, "so does the server-acknowledged count"


def test_prune_keeps_recent_and_undelivered_records(outbox: Outbox, clock: FakeClock) -> None:
    seqs = [e.seq for e in outbox.enqueue_many([event(n) for n in range(4)])]
    outbox.claim(3)
    outbox.mark_sent(seqs[:3])
    outbox.mark_acked_through(seqs[1])
    clock.advance(3599)
    assert outbox.prune_acked() == 0, "retention is 3600 s"
    clock.advance(2)
    assert outbox.prune_acked() == 2, "only the acknowledged ones; the SENT one waits for its server ack"
    assert [r.seq for r in outbox.rows()] == seqs[2:]


def test_enqueue_many_is_all_or_nothing(outbox: Outbox) -> None:
    outbox.enqueue(event(0))
    # The contract bounds audit details, so build the oversized record the way a buggy caller could: unvalidated.
    oversized = AuditEvent.model_construct(
        category="system", action="test.record", outcome=AuditOutcome.INFO, detail={"blob": "x" * (300 * 1024)}
    )
    with pytest.raises(InvalidRecordError, match="envelope limit"):
        outbox.enqueue_many([event(2), oversized, event(3)])
    assert [r.seq for r in outbox.rows()] == [1]
    assert outbox.enqueue(event(4)).seq == 2, "a refused batch consumes no sequence numbers"


def test_envelope_carries_clock_boot_and_ids(outbox: Outbox, clock: FakeClock) -> None:
    a = outbox.enqueue(event(1))
    clock.advance(5)
    b = outbox.enqueue(event(2))
    assert a.boot_id == b.boot_id
    assert a.message_id != b.message_id
    assert b.device_time - a.device_time == timedelta(seconds=5)
    assert b.monotonic_ns - a.monotonic_ns == 5_000_000_000


# ---------------------------------------------------------------------- claiming


def test_claim_takes_lowest_seq_first_up_to_limit(outbox: Outbox) -> None:
    outbox.enqueue_many([event(n) for n in range(10)])
    assert [r.seq for r in outbox.claim(4)] == [1, 2, 3, 4]
    assert [r.seq for r in outbox.claim(4)] == [5, 6, 7, 8]
    assert outbox.claim(0) == []


def test_concurrent_claims_never_share_a_record(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    total = 600
    with open_outbox(path) as outbox:
        outbox.enqueue_many([event(n) for n in range(total)])
        claimers = 3
        got: list[list[int]] = [[] for _ in range(claimers)]
        start = threading.Barrier(claimers)

        def run(index: int) -> None:
            start.wait()
            while batch := outbox.claim(3):
                got[index].extend(r.seq for r in batch)
                time.sleep(0.001)  # let the other claimers in between our transactions

        threads = [threading.Thread(target=run, args=(i,)) for i in range(claimers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    everything = [seq for part in got for seq in part]
    assert len(everything) == len(set(everything)) == total
    assert sorted(everything) == list(range(1, total + 1))
    assert sum(1 for part in got if part) >= 2, "claims really interleaved"


def test_a_second_owner_is_refused_until_the_first_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with open_outbox(path) as first:
        first.enqueue(event(1))
        with pytest.raises(OutboxError, match="already in use"):
            open_outbox(path)
        assert [r.seq for r in first.rows()] == [1], "the refused opener touched nothing"
    # A holder that dies without closing releases the lock too (the kernel drops it with the process).
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_OUTBOX, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(OutboxError, match="already in use"):
        open_outbox(path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    with open_outbox(path) as again:
        assert [r.seq for r in again.rows()] == [1]


_HOLD_OUTBOX = """
import sys, time, uuid
from pathlib import Path
from protocol import SystemClock
from terminal.config import OutboxConfig
from terminal.outbox import Outbox
ob = Outbox.open(OutboxConfig(path=Path(sys.argv[1])), device_id="SIM-0001", boot_id=uuid.uuid4(), clock=SystemClock())
print("holding", flush=True)
time.sleep(60)
"""


# ---------------------------------------------------------------------- back-off


def test_backoff_doubles_then_caps(tmp_path: Path, clock: FakeClock) -> None:
    with open_outbox(tmp_path / "o.sqlite3", clock, retry_initial_s=1.0, retry_max_s=8.0) as outbox:
        seq = outbox.enqueue(event(1)).seq
        waits = []
        for _ in range(6):
            [record] = outbox.claim()
            outbox.release([record.seq], "no PUBACK")
            [row] = outbox.rows()
            wait = (row.next_attempt_at - clock.now()).total_seconds()
            waits.append(wait)
            clock.advance(wait - 0.01)
            assert outbox.claim() == [], "not due before its back-off has passed"
            clock.advance(0.01)
        assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
        assert outbox.rows()[0].attempts == 6
        assert outbox.claim()[0].seq == seq


def test_backoff_jitter_stays_within_bounds(tmp_path: Path, clock: FakeClock) -> None:
    rng = random.Random(7)
    with open_outbox(tmp_path / "o.sqlite3", clock, jitter=rng.random, retry_initial_s=2.0, retry_max_s=30.0) as ob:
        for attempts in range(1, 12):
            ceiling = min(30.0, 2.0 * 2 ** (attempts - 1))
            for _ in range(20):
                assert ceiling / 2 <= ob.retry_delay_s(attempts) <= ceiling


def test_release_without_backoff_is_due_at_once(outbox: Outbox) -> None:
    seq = outbox.enqueue(event(1)).seq
    outbox.claim()
    outbox.release([seq], "connection lost", backoff=False)
    assert [r.seq for r in outbox.claim()] == [seq]


def test_wall_clock_jumping_back_does_not_strand_records(outbox: Outbox, clock: FakeClock) -> None:
    seq = outbox.enqueue(event(1)).seq
    outbox.claim()
    outbox.release([seq], "no PUBACK")
    clock.set_wall(clock.now() - timedelta(hours=6))
    assert [r.seq for r in outbox.claim()] == [seq]


# ---------------------------------------------------------------------- crashes


def _child(command: str, db: Path, number: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.terminal.outbox_child", command, str(db), str(number)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    if proc.stdout is not None:
        proc.stdout.close()
    if proc.stderr is not None:
        proc.stderr.close()


def _read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr is not None else ""
        raise AssertionError(f"child ended early: {err[-2000:]}")
    return line.strip()


def test_crash_between_claim_and_ack_requeues_every_record(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite3"
    proc = _child("claim", db, 25)
    try:
        enqueued = [int(s) for s in _read_line(proc).split()[1:]]
        claimed = [int(s) for s in _read_line(proc).split()[1:]]
    finally:
        _kill(proc)
    assert claimed == enqueued == list(range(1, 26))
    with raw_db(db) as raw:
        in_flight = raw.execute("SELECT count(*) FROM outbox WHERE status = 'inflight'").fetchone()[0]
    assert in_flight == 25, "the child died holding its claim"

    with open_outbox(db) as reopened:
        assert set(statuses(reopened).values()) == {OutboxStatus.PENDING}
        again = reopened.claim(100)
        assert [r.seq for r in again] == enqueued
        assert [r.envelope.payload.detail["n"] for r in again if r.envelope.payload.type == "audit_event"] == list(
            range(25)
        )


def test_repeated_kills_mid_enqueue_lose_nothing_committed(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite3"
    rng = random.Random(2026)
    committed = 0
    for _round in range(5):
        proc = _child("fill", db, 40)
        try:
            for _ in range(rng.randint(1, 6)):
                committed = max(committed, int(_read_line(proc).split()[1]))
        finally:
            _kill(proc)  # almost certainly in the middle of the next transaction
        with open_outbox(db) as reopened:
            assert reopened.integrity_check() == ["ok"]
            seqs = [r.seq for r in reopened.rows()]
            assert seqs == list(range(1, len(seqs) + 1)), "seqs are contiguous: no hole, no half batch"
            assert len(seqs) % 40 == 0, "batches are all-or-nothing"
            assert len(seqs) >= committed, "every batch the child saw committed survived the kill"
        with raw_db(db) as raw:
            for seq, stored in raw.execute("SELECT seq, envelope FROM outbox"):
                assert decode_envelope(stored.encode()).seq == seq
    assert committed >= 5 * 40


# ---------------------------------------------------------------------- disk bound


def test_full_outbox_refuses_new_records_but_keeps_and_delivers_old_ones(tmp_path: Path, clock: FakeClock) -> None:
    with open_outbox(tmp_path / "small.sqlite3", clock, max_bytes=128 * 1024, high_water_ratio=0.5) as outbox:
        accepted = fill_until_full(outbox, lambda n: event(n, note="x" * 200))
        assert len(accepted) > 50
        stats = outbox.stats()
        assert ALARM_OUTBOX_FULL in stats.alarms
        assert ALARM_OUTBOX_HIGH_WATER in stats.alarms
        assert stats.depth == len(accepted)
        assert stats.used_bytes <= stats.capacity_bytes == 128 * 1024
        assert outbox.integrity_check() == ["ok"]
        with pytest.raises(OutboxFullError):
            outbox.enqueue(event(10_000, note="x" * 200))

        # Everything accepted is intact and deliverable (the bookkeeping reserve makes claim/ack possible).
        delivered = []
        while batch := outbox.claim(17):
            delivered.extend(batch)
            outbox.mark_sent(r.seq for r in batch)
        assert [r.envelope for r in delivered] == accepted
        assert outbox.mark_acked_through(accepted[-1].seq) == len(accepted), "acking fits in the reserve too"

        # Acknowledged rows are pruned before refusing, so the outbox accepts again and the alarm clears...
        later = outbox.enqueue(event(10_001))
        assert later.seq == accepted[-1].seq + 1
        assert ALARM_OUTBOX_FULL not in outbox.stats().alarms
        assert outbox.integrity_check() == ["ok"]
        # ...leaving a durable record of how many records were refused, right after the first one accepted again.
        [first_back, notice] = outbox.claim(10)
        assert first_back.envelope == later
        assert isinstance(notice.envelope.payload, AuditEvent)
        assert notice.envelope.payload.action == "outbox.full"
        assert notice.envelope.payload.detail == {"refused_records": 2, "max_bytes": 128 * 1024}


def test_high_water_alarm(tmp_path: Path, clock: FakeClock) -> None:
    with open_outbox(tmp_path / "o.sqlite3", clock, max_bytes=256 * 1024, high_water_ratio=0.3) as outbox:
        assert outbox.stats().alarms == ()
        while ALARM_OUTBOX_HIGH_WATER not in outbox.stats().alarms:
            outbox.enqueue_many([event(n, note="y" * 250) for n in range(12)])
        stats = outbox.stats()
        assert stats.used_bytes >= 0.3 * outbox.record_capacity_bytes
        assert ALARM_OUTBOX_FULL not in stats.alarms


# ---------------------------------------------------------------------- corrupt rows


def test_undecodable_rows_are_quarantined_and_reported(tmp_path: Path, outbox: Outbox) -> None:
    seqs = [e.seq for e in outbox.enqueue_many([event(n) for n in range(4)])]
    with raw_db(tmp_path / "outbox.sqlite3") as db:
        db.execute("UPDATE outbox SET envelope = '{not json' WHERE seq = ?", (seqs[1],))
        first = db.execute("SELECT envelope FROM outbox WHERE seq = ?", (seqs[0],)).fetchone()[0]
        # Valid JSON of another row: decodes, but is not this row's record.
        db.execute("UPDATE outbox SET envelope = ? WHERE seq = ?", (first, seqs[2]))

    claimed = outbox.claim(100)
    assert [r.seq for r in claimed] == [seqs[0], seqs[3]]
    rows = {r.seq: r for r in outbox.rows()}
    assert rows[seqs[1]].status is OutboxStatus.QUARANTINED
    assert rows[seqs[2]].status is OutboxStatus.QUARANTINED
    assert "does not match" in (rows[seqs[2]].last_error or "")

    stats = outbox.stats()
    assert stats.quarantined == 2
    assert ALARM_OUTBOX_QUARANTINED in stats.alarms
    assert stats.depth == 2 + 2, "the two good records in flight plus the two quarantine notices"

    notices = outbox.claim(100)
    assert [r.envelope.payload.type for r in notices] == ["audit_event", "audit_event"]
    details = [r.envelope.payload.detail for r in notices if isinstance(r.envelope.payload, AuditEvent)]
    assert sorted(d["seq"] for d in details if isinstance(d["seq"], int)) == [seqs[1], seqs[2]]


def test_closed_outbox_raises_outbox_error(tmp_path: Path) -> None:
    outbox = open_outbox(tmp_path / "o.sqlite3")
    outbox.close()
    outbox.close()
    with pytest.raises(OutboxError, match="closed"):
        outbox.enqueue(event(1))


@contextmanager
def small_filesystem(tmp_path: Path, size: str) -> Iterator[Path]:
    """A real size-limited tmpfs (root in a container that permits mounts, as CI is); skipped elsewhere."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


def test_a_full_disk_refuses_new_records_but_the_reserve_keeps_delivery_going(tmp_path: Path, clock: FakeClock) -> None:
    with small_filesystem(tmp_path, "4m") as disk, open_outbox(disk / "outbox.sqlite3", clock) as outbox:
        assert outbox.disk_reserve_path.stat().st_size == 1024 * 1024, "the ballast is made at open"
        kept = [outbox.enqueue(event(n)) for n in range(3)]
        filler = disk / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:  # something else fills the disk until the kernel says ENOSPC
                f.write(b"\0" * 65536)
                f.flush()
        accepted = fill_until_full(outbox, lambda n: event(n, note="x" * 250), limit=5_000)
        with pytest.raises(OutboxFullError, match="the disk holding it is full") as refused:
            outbox.enqueue(event(99_999, note="x" * 250))
        assert "byte bound" not in str(refused.value)

        # Bookkeeping hits the full disk once, releases the ballast, and then delivery goes on.
        delivered: list[Envelope] = []
        failures: list[str] = []
        for _attempt in range(3):
            try:
                while batch := outbox.claim(50):
                    outbox.mark_sent(r.seq for r in batch)
                    delivered.extend(r.envelope for r in batch)
                break
            except OutboxFullError as exc:
                failures.append(str(exc))
        assert len(failures) <= 1
        assert all("reserve released" in failure for failure in failures)
        assert delivered == [*kept, *accepted]
        assert not outbox.disk_reserve_path.exists()
        assert outbox.mark_acked_through(delivered[-1].seq) == len(delivered)
        with pytest.raises(OutboxFullError, match="reserve is in use"):
            outbox.enqueue(event(100_000))  # new records may not eat the room delivery needs

        filler.unlink()  # space is freed: the ballast comes back and records are accepted again
        outbox.stats()
        assert outbox.disk_reserve_path.exists()
        later = outbox.enqueue(event(100_001))
        assert later.seq > delivered[-1].seq
        assert outbox.integrity_check() == ["ok"]


def test_the_sequence_floor_moves_a_new_outbox_above_what_the_server_holds(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "outbox.sqlite3"
    with open_outbox(path, clock) as outbox:
        assert outbox.ensure_seq_above(500) is True
        assert outbox.enqueue(event(1)).seq == 501
        assert outbox.ensure_seq_above(100) is False, "never moves backwards"
    with open_outbox(path, clock) as reopened:
        assert reopened.ensure_seq_above(500) is False, "the floor is durable"
        assert reopened.enqueue(event(2)).seq == 502
        assert reopened.integrity_check() == ["ok"]
