"""Server acknowledgements: `acked_through_seq` advances over out-of-order arrival, is published to the device only
after its batch committed (one ack per device per batch, again for duplicates and on 'online'), gap alarms are raised
after their delay and cleared when the hole fills, and the daily reconciliation endpoint adds it all up."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterator, Sequence
from datetime import date, datetime, timedelta

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy import Engine

from protocol import DeviceStatusMessage, Envelope, LinkState, Topics, UplinkAck, decode_downlink
from sync_server.api.schemas import DeviceOut
from sync_server.app import create_app
from sync_server.db.engine import session_factory
from sync_server.db.models import Device
from sync_server.presence import PresenceSweeper
from sync_server.settings import ServerSettings
from sync_server.store import (
    ACK_WALK_CHUNK,
    ALARM_SEQ_GAP,
    AckState,
    advance_acks,
    log_seq_gap_changes,
    record_device_activity,
    store_envelopes,
)
from tests.sync_server.conftest import BOOT, T0, FakeClock, Publisher, envelope, heartbeat, serving, wait_until
from tests.sync_server.test_ingest import _broken_store, make_settings, publish_all, running, settled
from yibao.broker import MosquittoBroker

TOPICS = Topics()


def store_and_ack(
    engine: Engine, envelopes: Sequence[Envelope], *, now: datetime = T0, after_s: float = 300.0
) -> list[AckState]:
    """What one ingest batch does to the database, then (after the commit) what it logs."""
    with session_factory(engine, write_intent=True).begin() as session:
        store_envelopes(session, envelopes, received_at=now)
        record_device_activity(session, envelopes, received_at=now, heartbeat_timeout_factor=3.0)
        states = advance_acks(session, {e.device_id for e in envelopes}, now=now, gap_alarm_after_s=after_s)
    log_seq_gap_changes(states)
    return states


def device_out(engine: Engine, device_id: str) -> DeviceOut:
    with session_factory(engine)() as session:
        row = session.get(Device, device_id)
        assert row is not None
        return DeviceOut.of(row, now=T0)


# ---------------------------------------------------------------------- store level


def test_acked_through_advances_over_out_of_order_arrival(engine: Engine) -> None:
    [state] = store_and_ack(engine, [envelope("kiosk-001", s) for s in (2, 5, 4)])
    assert (state.acked_through_seq, state.gap_from, state.gap_to, state.gap_opened) == (0, 1, 1, True)
    [state] = store_and_ack(engine, [envelope("kiosk-001", 1)])
    assert (state.acked_through_seq, state.gap_from, state.gap_to) == (2, 3, 3), "1..2 stored, 3 missing, 4..5 held"
    out = device_out(engine, "kiosk-001")
    assert out.acked_through_seq == 2
    assert out.seq_gap is not None
    assert (out.seq_gap.missing_from, out.seq_gap.missing_to, out.seq_gap.alarm) == (3, 3, False)
    [state] = store_and_ack(engine, [envelope("kiosk-001", 3)])
    assert (state.acked_through_seq, state.gap_from) == (5, None)
    assert device_out(engine, "kiosk-001").seq_gap is None


def test_acked_through_walks_past_more_than_one_chunk(engine: Engine) -> None:
    n = ACK_WALK_CHUNK * 2 + 17
    [state] = store_and_ack(engine, [envelope("kiosk-002", s) for s in range(1, n + 1)])
    assert state.acked_through_seq == n
    [state] = store_and_ack(engine, [envelope("kiosk-002", s) for s in (n + 1, n + 2)])
    assert state.acked_through_seq == n + 2, "advanced from the stored value"


def test_gap_alarm_is_raised_after_its_delay_and_cleared_when_the_hole_fills(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sync_server")
    clock = FakeClock(T0)
    sweeper = PresenceSweeper(engine, interval_s=3600, clock=clock, gap_alarm_after_s=300)
    store_and_ack(engine, [envelope("kiosk-003", s) for s in (1, 2, 4)], now=T0)
    clock.advance(299)
    sweeper.sweep_once()
    assert device_out(engine, "kiosk-003").alarms == [], "not yet: the hole is 299 s old"
    [state] = store_and_ack(engine, [envelope("kiosk-003", 5)], now=T0 + timedelta(seconds=299))
    assert not state.alarm_raised
    assert not state.gap_opened, "the same hole keeps its first-seen time"
    clock.advance(1)
    sweeper.sweep_once()
    out = device_out(engine, "kiosk-003")
    assert out.alarms == [ALARM_SEQ_GAP]
    assert out.seq_gap is not None
    assert (out.seq_gap.missing_from, out.seq_gap.alarm, out.seq_gap.since) == (3, True, T0)
    sweeper.sweep_once()
    raised = [r for r in caplog.records if "seq gap alarm:" in r.getMessage()]
    assert len(raised) == 1, "logged once when raised"
    assert "kiosk-003" in raised[0].getMessage()
    assert "3..3" in raised[0].getMessage()

    [state] = store_and_ack(engine, [envelope("kiosk-003", 3)], now=T0 + timedelta(seconds=400))
    assert (state.acked_through_seq, state.alarm_cleared) == (5, True)
    out = device_out(engine, "kiosk-003")
    assert (out.alarms, out.seq_gap) == ([], None)
    store_and_ack(engine, [envelope("kiosk-003", 6)], now=T0 + timedelta(seconds=500))
    cleared = [r for r in caplog.records if "seq gap alarm cleared" in r.getMessage()]
    assert len(cleared) == 1, "logged once when cleared"


def test_ingest_raises_the_alarm_itself_when_a_batch_arrives_after_the_delay(engine: Engine) -> None:
    store_and_ack(engine, [envelope("kiosk-004", 2)], now=T0)
    [state] = store_and_ack(engine, [envelope("kiosk-004", 3)], now=T0 + timedelta(seconds=301))
    assert state.alarm_raised
    assert device_out(engine, "kiosk-004").alarms == [ALARM_SEQ_GAP]


# ---------------------------------------------------------------------- published acks


class AckListener:
    """A plain paho subscriber on the downlink topics: what a terminal would receive."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self._lock = threading.Lock()
        self._acks: list[UplinkAck] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"acks-{secrets.token_hex(4)}", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"{TOPICS.prefix}/dev/+/down", qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(5)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        ack = decode_downlink(bytes(message.payload))
        if not isinstance(ack, UplinkAck):
            return  # commands share the topic; this listener counts acks
        assert message.topic == TOPICS.downlink(ack.device_id)
        with self._lock:
            self._acks.append(ack)

    def acks(self, device_id: str) -> list[int]:
        with self._lock:
            return [a.acked_through_seq for a in self._acks if a.device_id == device_id]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def listener(broker: MosquittoBroker) -> Iterator[AckListener]:
    lst = AckListener(broker)
    yield lst
    lst.close()


def test_acks_are_published_after_commit_once_per_device_per_batch(
    broker: MosquittoBroker, publisher: Publisher, listener: AckListener, engine: Engine, db_url: str
) -> None:
    # A long flush interval puts everything in one batch, so the ack is coalesced.
    settings = make_settings(broker, db_url, ingest_flush_interval_s=1.0)
    with running(settings, engine) as worker:
        publish_all(publisher, [envelope("kiosk-010", s) for s in (1, 2, 3, 5)])
        publish_all(publisher, [envelope("kiosk-011", 1)])
        settled(worker, received=5)
        wait_until(lambda: bool(listener.acks("kiosk-010") and listener.acks("kiosk-011")), what="acks")
        assert worker.stats().batches == 1
        assert listener.acks("kiosk-010") == [3], "one ack, through the highest contiguous seq"
        assert listener.acks("kiosk-011") == [1]
        assert worker.stats().acks_sent == 2


def test_a_duplicate_or_an_online_status_brings_the_current_ack_again(
    broker: MosquittoBroker, publisher: Publisher, listener: AckListener, engine: Engine, db_url: str
) -> None:
    first = [envelope("kiosk-012", s) for s in (1, 2)]
    with running(make_settings(broker, db_url), engine) as worker:
        publish_all(publisher, first)
        settled(worker, received=2)
        wait_until(lambda: 2 in listener.acks("kiosk-012"), what="the first ack")
        before = len(listener.acks("kiosk-012"))
        publish_all(publisher, [first[1]])  # the terminal missed the ack and published again
        wait_until(lambda: len(listener.acks("kiosk-012")) == before + 1, what="the ack re-sent for a duplicate")
        status = DeviceStatusMessage(device_id="kiosk-012", state=LinkState.ONLINE, boot_id=BOOT, at=T0)
        publisher.publish(TOPICS.status("kiosk-012"), status.to_bytes(), retain=True)
        wait_until(lambda: len(listener.acks("kiosk-012")) == before + 2, what="the ack re-sent on 'online'")
        assert listener.acks("kiosk-012")[-2:] == [2, 2]


def test_no_ack_is_published_when_the_store_fails(
    broker: MosquittoBroker, publisher: Publisher, listener: AckListener, engine: Engine, db_url: str
) -> None:
    settings = make_settings(broker, db_url)
    with running(settings, engine, store=_broken_store) as crashed:
        publish_all(publisher, [envelope("kiosk-013", s) for s in (1, 2)])
        wait_until(lambda: crashed.stats().store_failures >= 2, what="failed stores")
        assert crashed.stats().acks_sent == 0
    assert listener.acks("kiosk-013") == [], "nothing committed, nothing acknowledged"
    with running(settings, engine) as restarted:
        settled(restarted, received=2)
        # The redelivery may come in one batch or two (ack 1, then 2): acks are cumulative.
        wait_until(lambda: max(listener.acks("kiosk-013"), default=0) == 2, what="the ack after the real commit")


# ---------------------------------------------------------------------- reconciliation


def test_reconciliation_of_one_device_and_one_local_day(engine: Engine, db_url: str) -> None:
    day = date(2026, 3, 1)
    # Asia/Shanghai is UTC+8: 2026-03-01 local runs from 2026-02-28T16:00Z to 2026-03-01T16:00Z.
    start = T0.replace(hour=0) - timedelta(hours=8)
    records = [
        envelope("kiosk-020", 1, heartbeat(), device_time=start - timedelta(seconds=1)),  # the day before
        envelope("kiosk-020", 2, device_time=start),
        envelope("kiosk-020", 3, device_time=start + timedelta(hours=1)),
        envelope("kiosk-020", 5, device_time=start + timedelta(hours=2)),
        envelope("kiosk-020", 6, device_time=start + timedelta(hours=23, minutes=59)),
        envelope("kiosk-020", 7, device_time=start + timedelta(hours=24)),  # the day after
    ]
    hb_first = heartbeat(outbox_depth=3)
    hb_last = heartbeat(outbox_depth=1)
    records.insert(
        2,
        envelope(
            "kiosk-020",
            8,
            hb_first.model_copy(update={"outbox_sent_total": 10}),
            device_time=start + timedelta(minutes=5),
        ),
    )
    records.append(
        envelope(
            "kiosk-020",
            9,
            hb_last.model_copy(update={"outbox_sent_total": 14}),
            device_time=start + timedelta(hours=20),
        )
    )
    store_and_ack(engine, records)
    app = create_app(ServerSettings(database_url=db_url), engine=engine, start_ingest=False, clock=FakeClock(T0))
    with serving(app) as client:
        body = client.get("/api/v1/devices/kiosk-020/reconciliation", params={"day": "2026-03-01"}).json()
        assert client.get("/api/v1/devices/kiosk-020/reconciliation").status_code == 422
        assert client.get("/api/v1/devices/kiosk-020/reconciliation", params={"day": "yesterday"}).status_code == 422
        assert client.get("/api/v1/devices/nobody-1/reconciliation", params={"day": "2026-03-01"}).status_code == 404
    assert body["day"] == day.isoformat()
    assert body["timezone"] == "Asia/Shanghai"
    assert body["stored"] == {"count": 6, "min_seq": 2, "max_seq": 9, "missing_in_range": 2}
    assert body["terminal"] == {
        "heartbeats": 2,
        "first_sent_total": 10,
        "last_sent_total": 14,
        "acked_during_day": 4,
        "last_outbox_depth": 1,
    }
    assert (body["acked_through_seq"], body["last_seq"]) == (3, 9)
    assert body["open_gap"]["missing_from"] == 4
    assert body["open_gap"]["missing_to"] == 4
    assert body["alarms"] == []


def test_device_api_and_pages_show_the_gap_alarm_in_words(engine: Engine, db_url: str) -> None:
    store_and_ack(engine, [envelope("kiosk-030", s) for s in (1, 2, 5)], now=T0)
    store_and_ack(engine, [envelope("kiosk-030", 6)], now=T0 + timedelta(seconds=301))
    app = create_app(
        ServerSettings(database_url=db_url),
        engine=engine,
        start_ingest=False,
        clock=FakeClock(T0 + timedelta(seconds=302)),
    )
    with serving(app) as client:
        body = client.get("/api/v1/devices/kiosk-030").json()
        detail = client.get("/devices/kiosk-030").text
        listing = client.get("/").text
    assert body["acked_through_seq"] == 2
    assert body["alarms"] == ["seq_gap"]
    assert body["seq_gap"]["missing_from"] == 3
    assert body["seq_gap"]["missing_to"] == 4
    assert body["seq_gap"]["alarm"] is True
    for page in (detail, listing):
        assert "序号缺口告警" in page
        assert "records 3–4 missing while later ones arrived" in page
        assert 'data-alarm="seq_gap"' in page
    assert "every record 1..2 is stored" in detail


def test_two_workers_sharing_the_stream_agree_on_acked_through(
    broker: MosquittoBroker, publisher: Publisher, listener: AckListener, engine: Engine, db_url: str
) -> None:
    """Two ingest workers split one device's out-of-order records (shared subscription, small batches): the device
    row lock serialises the ack computation, so the stored ack ends at the top and no hole is left behind."""
    records = [envelope("kiosk-040", s) for s in range(1, 121)]
    order = records[1::2] + records[0::2]  # every even seq first, then the odd ones
    first = make_settings(broker, db_url, ingest_batch_size=5)
    second = make_settings(broker, db_url, ingest_batch_size=5)
    with running(first, engine) as a, running(second, engine) as b:
        publish_all(publisher, order)
        wait_until(lambda: a.stats().stored + b.stats().stored == len(records), timeout_s=20, what="all records stored")
        wait_until(lambda: max(listener.acks("kiosk-040"), default=0) == 120, what="the final ack")
        assert a.stats().stored > 0
        assert b.stats().stored > 0, "the shared subscription gave both workers a share"
    out = device_out(engine, "kiosk-040")
    assert (out.acked_through_seq, out.seq_gap) == (120, None)
