"""The delivery loop's decisions, driven through a scripted `UplinkLink` on fake time (no broker)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from protocol import AuditEvent, AuditOutcome, Heartbeat, decode_envelope
from terminal.errors import PublishError
from terminal.outbox import Outbox, OutboxStatus
from terminal.sync import Delivery, DeliveryState, HeartbeatTimer, UplinkDelivery
from tests.terminal.conftest import FakeClock, fill_until_full, open_outbox
from tests.terminal.fakes import TOPIC, ScriptedLink


def event(n: int) -> AuditEvent:
    return AuditEvent(category="system", action="test.record", outcome=AuditOutcome.INFO, detail={"n": n})


@pytest.fixture
def outbox(tmp_path: Path, clock: FakeClock) -> Iterator[Outbox]:
    with open_outbox(tmp_path / "outbox.sqlite3", clock, batch_size=10, publish_timeout_s=2.0) as ob:
        yield ob


def delivery(outbox: Outbox, link: ScriptedLink, clock: FakeClock) -> UplinkDelivery:
    return UplinkDelivery(outbox, link, topic=TOPIC, batch_size=10, publish_timeout_s=2.0, clock=clock)


def by_status(outbox: Outbox) -> dict[OutboxStatus, list[int]]:
    result: dict[OutboxStatus, list[int]] = {}
    for row in outbox.rows():
        result.setdefault(row.status, []).append(row.seq)
    return result


def test_acked_records_are_sent_with_the_stored_bytes(outbox: Outbox, clock: FakeClock) -> None:
    envelopes = outbox.enqueue_many([event(n) for n in range(5)])
    link = ScriptedLink(clock)
    assert delivery(outbox, link, clock).deliver_batch() == 5
    assert [decode_envelope(p) for p in link.published] == envelopes
    assert by_status(outbox) == {OutboxStatus.SENT: [1, 2, 3, 4, 5]}


def test_only_acked_records_become_sent(outbox: Outbox, clock: FakeClock) -> None:
    outbox.enqueue_many([event(n) for n in range(6)])

    def decide(i: int, payload: bytes) -> Delivery | None:
        if i == 1:
            return Delivery(DeliveryState.REJECTED, "rejected by broker: Quota exceeded")
        if i == 4:
            return None  # the broker never answers this one
        return Delivery(DeliveryState.ACKED)

    delivery(outbox, ScriptedLink(clock, decide), clock).deliver_batch()
    assert by_status(outbox) == {OutboxStatus.SENT: [1, 3, 4, 6], OutboxStatus.PENDING: [2, 5]}
    rows = {r.seq: r for r in outbox.rows()}
    assert rows[2].last_error == "rejected by broker: Quota exceeded"
    assert rows[5].last_error == "no PUBACK within 2 s"
    for seq in (2, 5):
        assert rows[seq].attempts == 1
        assert rows[seq].next_attempt_at > clock.now(), "a real failure backs off"


def test_link_lost_mid_batch_requeues_without_backoff(outbox: Outbox, clock: FakeClock) -> None:
    outbox.enqueue_many([event(n) for n in range(6)])
    link = ScriptedLink(clock)

    def decide(i: int, payload: bytes) -> Delivery | None:
        if i == 2:
            link.connected = False  # the connection drops right after the third publish
            return None
        return Delivery(DeliveryState.ACKED)

    link.decide = decide
    delivery(outbox, link, clock).deliver_batch()
    assert len(link.published) == 3
    assert by_status(outbox) == {OutboxStatus.SENT: [1, 2], OutboxStatus.PENDING: [3, 4, 5, 6]}
    for row in outbox.rows([OutboxStatus.PENDING]):
        assert row.next_attempt_at <= clock.now(), "link loss is paced by reconnects, not by record back-off"
    assert {r.last_error for r in outbox.rows([OutboxStatus.PENDING])} == {"connection lost", "not connected"}


def test_publish_error_backs_off(outbox: Outbox, clock: FakeClock) -> None:
    outbox.enqueue_many([event(n) for n in range(2)])
    link = ScriptedLink(clock)
    link.fail_publish_with = PublishError("MQTT client queue is full")
    delivery(outbox, link, clock).deliver_batch()
    rows = outbox.rows()
    assert {r.status for r in rows} == {OutboxStatus.PENDING}
    assert {r.last_error for r in rows} == {"MQTT client queue is full"}
    assert all(r.next_attempt_at > clock.now() for r in rows)


def test_corrupt_row_does_not_stop_delivery(tmp_path: Path, outbox: Outbox, clock: FakeClock) -> None:
    outbox.enqueue_many([event(n) for n in range(3)])
    with closing(sqlite3.connect(tmp_path / "outbox.sqlite3", isolation_level=None)) as db:
        db.execute("UPDATE outbox SET envelope = 'garbage' WHERE seq = 2")
    link = ScriptedLink(clock)
    worker = delivery(outbox, link, clock)
    assert worker.deliver_batch() == 2
    assert worker.deliver_batch() == 1, "the quarantine notice is delivered like any record"
    statuses = by_status(outbox)
    assert statuses == {OutboxStatus.SENT: [1, 3, 4], OutboxStatus.QUARANTINED: [2]}
    notice = decode_envelope(link.published[-1])
    assert isinstance(notice.payload, AuditEvent)
    assert notice.payload.action == "outbox.record_quarantined"
    assert notice.payload.detail["seq"] == 2


def test_worker_waits_offline_without_spinning_then_delivers(outbox: Outbox, clock: FakeClock) -> None:
    outbox.enqueue_many([event(n) for n in range(3)])
    link = ScriptedLink(clock, connected=False)
    worker = delivery(outbox, link, clock)
    worker.start()
    try:
        time.sleep(0.6)
        assert link.wait_calls <= 4, "offline, the worker sleeps on the connection event"
        assert link.published == []
        assert by_status(outbox) == {OutboxStatus.PENDING: [1, 2, 3]}
        link.connected = True
        deadline = time.monotonic() + 5
        while by_status(outbox) != {OutboxStatus.SENT: [1, 2, 3]} and time.monotonic() < deadline:
            time.sleep(0.02)
        assert by_status(outbox) == {OutboxStatus.SENT: [1, 2, 3]}
        outbox.enqueue(event(4))  # wakes the idle worker at once
        deadline = time.monotonic() + 2
        while len(link.published) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(link.published) == 4
    finally:
        worker.stop()


def test_stop_requeues_a_batch_awaiting_acks(outbox: Outbox, clock: FakeClock) -> None:
    outbox.enqueue_many([event(n) for n in range(3)])
    link = ScriptedLink(clock, lambda i, p: None, time_passes=False)
    worker = delivery(outbox, link, clock)
    worker.start()
    deadline = time.monotonic() + 5
    while len(link.published) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert by_status(outbox) == {OutboxStatus.INFLIGHT: [1, 2, 3]}
    worker.stop()
    rows = outbox.rows()
    assert {r.status for r in rows} == {OutboxStatus.PENDING}
    assert {r.last_error for r in rows} == {"terminal stopping"}
    assert all(r.next_attempt_at <= clock.now() for r in rows)


def test_heartbeat_timer_beats_at_start_and_survives_a_full_outbox(tmp_path: Path, clock: FakeClock) -> None:
    beats: list[int] = []

    def compose() -> Heartbeat:
        beats.append(1)
        return Heartbeat(
            software_version="0.1.0",
            config_version="t",
            config_schema_version=1,
            interval_s=0.05,
            uptime_s=0,
            outbox_depth=0,
            outbox_oldest_age_s=None,
            outbox_used_bytes=0,
            outbox_capacity_bytes=1,
        )

    with open_outbox(tmp_path / "hb.sqlite3", clock, max_bytes=128 * 1024) as outbox:
        timer = HeartbeatTimer(outbox, compose, interval_s=0.05)
        timer.start()
        assert len(outbox.rows()) == 1, "the first heartbeat is enqueued before start() returns"
        time.sleep(0.3)
        timer.stop()
        assert len(outbox.rows()) >= 3
        fill_until_full(outbox, event)
        assert timer.beat() is None, "a refused heartbeat is skipped, not raised"


def test_unexpected_error_releases_the_claimed_batch(outbox: Outbox, clock: FakeClock) -> None:
    outbox.enqueue_many([event(n) for n in range(3)])
    link = ScriptedLink(clock)
    link.fail_publish_with = RuntimeError("bug in a transport")
    delivery(outbox, link, clock).deliver_batch()
    rows = outbox.rows()
    assert {r.status for r in rows} == {OutboxStatus.PENDING}, "nothing stranded INFLIGHT"
    assert {r.last_error for r in rows} == {"internal error"}
