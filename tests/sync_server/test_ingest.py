"""The ingest worker against a real Mosquitto: exactly-once storage, rejection of bad messages, acknowledgement only
after commit, queueing while the server is down, presence from retained statuses and heartbeats, broker loss."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from protocol import DeviceStatusMessage, Envelope, LinkState, Topics
from sync_server.db.engine import session_factory
from sync_server.db.models import Device, Event, LinkStateColumn
from sync_server.ingest import IngestStats, IngestWorker, StoreBatch
from sync_server.presence import PresenceSweeper
from sync_server.settings import ServerSettings
from sync_server.store import StoreResult, register_devices, store_envelopes
from tests.sync_server.conftest import BOOT, T0, FakeClock, Publisher, envelope, heartbeat, wait_until
from yibao.broker import MosquittoBroker

TOPICS = Topics()


def make_settings(broker: MosquittoBroker, db_url: str, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "mqtt_host": broker.host,
        "mqtt_port": broker.port,
        "mqtt_client_id": f"test-ingest-{secrets.token_hex(4)}",
        "ingest_retry_delay_s": 0.05,
        "ingest_flush_interval_s": 0.02,
    }
    values.update(overrides)
    return ServerSettings.model_validate(values)


@contextmanager
def running(
    settings: ServerSettings, engine: Engine, *, store: StoreBatch = store_envelopes, clock: FakeClock | None = None
) -> Iterator[IngestWorker]:
    worker = IngestWorker(settings, engine, store=store, clock=clock)
    worker.start()
    try:
        wait_until(lambda: worker.ready, what="the ingest worker to subscribe")
        yield worker
    finally:
        worker.stop()


def events_of(engine: Engine, device_id: str) -> list[tuple[int, str]]:
    with session_factory(engine)() as session:
        rows = session.execute(
            select(Event.seq, Event.message_id).where(Event.device_id == device_id).order_by(Event.seq)
        )
        return [(seq, str(mid)) for seq, mid in rows]


def device(engine: Engine, device_id: str) -> Device | None:
    with session_factory(engine)() as session:
        return session.get(Device, device_id)


def publish_all(publisher: Publisher, envelopes: Sequence[Envelope]) -> None:
    for env in envelopes:
        publisher.publish(TOPICS.uplink(env.device_id), env.to_bytes())


def settled(worker: IngestWorker, *, received: int) -> IngestStats:
    """Wait until `received` messages arrived and all of them were committed (stored, duplicate or rejected)."""

    def done() -> bool:
        s = worker.stats()
        return s.received >= received and s.stored + s.duplicates + s.rejected + s.statuses >= received

    wait_until(done, what=f"{received} messages to be processed (now {worker.stats()})")
    return worker.stats()


def test_each_envelope_is_stored_exactly_once_and_bad_messages_are_rejected(
    broker: MosquittoBroker, publisher: Publisher, engine: Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sync_server")
    good = [envelope("kiosk-001", seq) for seq in range(1, 6)] + [envelope("kiosk-002", 1, heartbeat())]
    with running(make_settings(broker, db_url), engine) as worker:
        publish_all(publisher, good)
        publish_all(publisher, [good[0], good[3]])  # redelivered by a terminal that missed the PUBACK
        publisher.publish(TOPICS.uplink("kiosk-001"), envelope("kiosk-001", 2).to_bytes())  # seq reused
        publisher.publish(TOPICS.uplink("kiosk-001"), b"\xff\xfe not json at all")
        publisher.publish(TOPICS.uplink("kiosk-001"), b'{"schema_version": 1, "device_id": "kiosk-001"}')
        publisher.publish(TOPICS.uplink("kiosk-003"), envelope("kiosk-001", 99).to_bytes())  # forged device
        publisher.publish(TOPICS.status("kiosk-001"), b"[]")
        stats = settled(worker, received=13)
    assert (stats.stored, stats.duplicates, stats.conflicts, stats.rejected) == (6, 3, 1, 4)
    assert events_of(engine, "kiosk-001") == [(e.seq, str(e.message_id)) for e in good[:5]]
    assert events_of(engine, "kiosk-002") == [(1, str(good[5].message_id))]
    assert device(engine, "kiosk-003") is None
    assert events_of(engine, "kiosk-003") == []
    kiosk2 = device(engine, "kiosk-002")
    assert kiosk2 is not None
    assert kiosk2.software_version == "1.2.3"
    assert kiosk2.last_heartbeat is not None
    rejections = [r.getMessage() for r in caplog.records if "rejected message" in r.getMessage()]
    assert len(rejections) == 4
    assert any("yibao/v1/dev/kiosk-003/up" in line and "topic names kiosk-003" in line for line in rejections)
    log_text = caplog.text
    assert "terminal.started" not in log_text  # payload contents never reach the log


def test_uplinks_published_while_the_server_is_down_are_queued_by_the_broker(
    broker: MosquittoBroker, publisher: Publisher, sqlite_engine: Engine, sqlite_url: str
) -> None:
    settings = make_settings(broker, sqlite_url)
    with running(settings, sqlite_engine):
        pass  # first run creates the persistent session and its subscriptions
    queued = [envelope("kiosk-010", seq) for seq in range(1, 21)]
    publish_all(publisher, queued)
    with running(settings, sqlite_engine) as worker:
        stats = settled(worker, received=20)
    assert stats.stored == 20
    assert [seq for seq, _ in events_of(sqlite_engine, "kiosk-010")] == list(range(1, 21))


def _broken_store(session: Session, envelopes: Sequence[Envelope], *, received_at: datetime) -> StoreResult:
    raise OperationalError("INSERT INTO events …", None, ConnectionError("database went away"))


def test_a_message_is_acknowledged_only_after_commit(
    broker: MosquittoBroker, publisher: Publisher, engine: Engine, db_url: str
) -> None:
    settings = make_settings(broker, db_url)
    sent = [envelope("kiosk-020", seq) for seq in range(1, 4)]
    with running(settings, engine, store=_broken_store) as crashed:
        publish_all(publisher, sent)
        wait_until(lambda: crashed.stats().store_failures >= 1, what="a failed store")
        assert crashed.stats().received == 3
    # the worker went away between receive and commit: nothing stored, nothing acknowledged
    assert events_of(engine, "kiosk-020") == []
    with running(settings, engine) as restarted:
        stats = settled(restarted, received=3)
        assert stats.stored == 3
    assert [seq for seq, _ in events_of(engine, "kiosk-020")] == [1, 2, 3]
    with running(settings, engine) as again:
        time.sleep(0.5)
        assert again.stats().received == 0, "acknowledged messages must not be redelivered"


def test_a_transient_database_failure_is_retried_then_acknowledged(
    broker: MosquittoBroker,
    publisher: Publisher,
    sqlite_engine: Engine,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sync_server.ingest")
    calls = 0

    def flaky(session: Session, envelopes: Sequence[Envelope], *, received_at: datetime) -> StoreResult:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise OperationalError("INSERT INTO events …", None, TimeoutError("database is locked"))
        return store_envelopes(session, envelopes, received_at=received_at)

    settings = make_settings(broker, sqlite_url, ingest_batch_size=50, ingest_flush_interval_s=0.2)
    with running(settings, sqlite_engine, store=flaky) as worker:
        publish_all(publisher, [envelope("kiosk-030", seq) for seq in range(1, 6)])
        stats = settled(worker, received=5)
    assert stats.stored == 5
    assert stats.store_failures == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "sync_server.ingest"]
    assert sum("retrying" in m and "unacknowledged" in m for m in messages) == 1  # logged once, not per attempt
    assert sum("recovered after 2 failed attempts" in m for m in messages) == 1
    with running(settings, sqlite_engine) as again:
        time.sleep(0.5)
        assert again.stats().received == 0


def test_a_message_the_database_refuses_is_isolated_and_the_rest_are_stored(
    broker: MosquittoBroker, publisher: Publisher, sqlite_engine: Engine, sqlite_url: str
) -> None:
    def poisoned(session: Session, envelopes: Sequence[Envelope], *, received_at: datetime) -> StoreResult:
        if any(e.seq == 13 for e in envelopes):
            raise IntegrityError("INSERT INTO events …", None, ValueError("value refused by the database"))
        return store_envelopes(session, envelopes, received_at=received_at)

    settings = make_settings(broker, sqlite_url, ingest_batch_size=50, ingest_flush_interval_s=0.3)
    with running(settings, sqlite_engine, store=poisoned) as worker:
        publish_all(publisher, [envelope("kiosk-040", seq) for seq in range(11, 16)])
        stats = settled(worker, received=5)
    assert (stats.stored, stats.rejected) == (4, 1)
    assert [seq for seq, _ in events_of(sqlite_engine, "kiosk-040")] == [11, 12, 14, 15]
    with running(settings, sqlite_engine) as again:
        time.sleep(0.5)
        came_back = again.stats().received
        after = settled(again, received=came_back)
    # The poison message was acknowledged, so it cannot loop: nothing is rejected again. A stored message may come
    # back when its PUBACK was still unsent as the first session closed (seen twice in CI under load; the broker
    # redelivers it to the session): it is a duplicate, stored once (the exactly-once path).
    assert after.rejected == 0, "the poison message is acknowledged so it cannot loop"
    assert after.duplicates == came_back
    assert after.stored == 0
    assert [seq for seq, _ in events_of(sqlite_engine, "kiosk-040")] == [11, 12, 14, 15]


def test_presence_follows_retained_status_and_heartbeat_timeout(
    broker: MosquittoBroker, publisher: Publisher, engine: Engine, db_url: str, clock: FakeClock
) -> None:
    settings = make_settings(broker, db_url, heartbeat_timeout_factor=3.0)
    online = DeviceStatusMessage(device_id="kiosk-050", state=LinkState.ONLINE, boot_id=BOOT, at=T0)
    publisher.publish(TOPICS.status("kiosk-050"), online.to_bytes(), retain=True)  # before the server starts

    def state() -> tuple[LinkStateColumn | None, bool | None]:
        d = device(engine, "kiosk-050")
        return (d.link_state, d.online) if d is not None else (None, None)

    sweeper = PresenceSweeper(engine, interval_s=0.05, clock=clock)
    with running(settings, engine, clock=clock):
        sweeper.start()
        try:
            wait_until(lambda: state() == (LinkStateColumn.ONLINE, False), what="the retained status")
            publish_all(publisher, [envelope("kiosk-050", 1, heartbeat(interval_s=2.0))])
            wait_until(lambda: state() == (LinkStateColumn.ONLINE, True), what="online after a heartbeat")
            clock.advance(5.9)
            time.sleep(0.2)
            assert state() == (LinkStateColumn.ONLINE, True)
            clock.advance(0.2)  # 6.1 s > 3 x 2 s without a heartbeat
            wait_until(lambda: state() == (LinkStateColumn.ONLINE, False), what="the sweeper to time it out")
            publish_all(publisher, [envelope("kiosk-050", 2, heartbeat(interval_s=2.0))])
            wait_until(lambda: state() == (LinkStateColumn.ONLINE, True), what="online again")
            will = DeviceStatusMessage(device_id="kiosk-050", state=LinkState.OFFLINE, boot_id=BOOT)
            publisher.publish(TOPICS.status("kiosk-050"), will.to_bytes(), retain=True)
            wait_until(lambda: state() == (LinkStateColumn.OFFLINE, False), what="offline after the last will")
        finally:
            sweeper.stop()


def test_broker_loss_and_recovery_are_logged_once_each(
    broker: MosquittoBroker,
    publisher: Publisher,
    sqlite_engine: Engine,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sync_server.ingest")
    with running(make_settings(broker, sqlite_url), sqlite_engine) as worker:
        # stop, not kill(): MosquittoBroker.kill() leaves its stderr pipe open (a ResourceWarning, an error here)
        broker.stop(keep_workdir=True)
        wait_until(lambda: not worker.connected, what="the worker to notice the broker is gone")
        time.sleep(1.5)  # paho retries meanwhile; each failure must not log again
        broker.start()
        wait_until(lambda: worker.ready, timeout_s=15, what="the worker to reconnect")
        publisher.client.reconnect()
        wait_until(publisher.client.is_connected, what="the publisher to reconnect")
        publish_all(publisher, [envelope("kiosk-060", 1)])
        settled(worker, received=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "sync_server.ingest"]
    lost = [m for m in messages if "lost MQTT broker" in m or "cannot reach MQTT broker" in m]
    back = [m for m in messages if "reachable again" in m]
    assert len(lost) == 1, messages
    assert len(back) == 1, messages


def test_unknown_devices_are_rejected_when_auto_registration_is_off(
    broker: MosquittoBroker, publisher: Publisher, sqlite_engine: Engine, sqlite_url: str
) -> None:
    settings = make_settings(broker, sqlite_url, auto_register_devices=False)
    with running(settings, sqlite_engine) as worker:
        publish_all(publisher, [envelope("kiosk-070", 1)])
        assert settled(worker, received=1).rejected == 1
        assert device(sqlite_engine, "kiosk-070") is None
        with session_factory(sqlite_engine, write_intent=True).begin() as session:
            register_devices(session, ["kiosk-070"], now=T0)
        publish_all(publisher, [envelope("kiosk-070", 2)])
        assert settled(worker, received=2).stored == 1
    assert [seq for seq, _ in events_of(sqlite_engine, "kiosk-070")] == [2]
