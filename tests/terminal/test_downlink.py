"""The terminal's downlink: server acks arrive on the device's own topic (real Mosquitto), are decoded off paho's
thread, move every covered record to ACKED, and anything malformed or addressed to another device is refused."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from hardware_sim import simulated_peripherals
from protocol import AuditEvent, AuditOutcome, Topics, UplinkAck
from terminal.outbox import Outbox, OutboxStatus
from terminal.runtime import build_runtime
from terminal.sync import DownlinkReceiver
from tests.terminal.conftest import DEVICE_ID, FakeClock, UplinkRecorder, open_outbox, terminal_config, wait_until
from yibao.broker import MosquittoBroker

TOPICS = Topics()
NOW = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)


def event(n: int) -> AuditEvent:
    return AuditEvent(category="system", action="test.record", outcome=AuditOutcome.INFO, detail={"n": n})


def ack(through: int, device_id: str = DEVICE_ID) -> bytes:
    return UplinkAck(device_id=device_id, acked_through_seq=through, server_time=NOW).to_bytes()


@pytest.fixture
def outbox(tmp_path: Path, clock: FakeClock) -> Iterator[Outbox]:
    with open_outbox(tmp_path / "outbox.sqlite3", clock) as ob:
        yield ob


def test_receiver_applies_the_highest_ack_and_refuses_the_rest(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="terminal.sync")
    seqs = [e.seq for e in outbox.enqueue_many([event(n) for n in range(6)])]
    outbox.claim(4)
    outbox.mark_sent(seqs[:2])  # 1..2 SENT, 3..4 INFLIGHT (PUBACK bookkeeping not done yet), 5..6 PENDING
    receiver = DownlinkReceiver(outbox, device_id=DEVICE_ID, topics=TOPICS)
    own = TOPICS.downlink(DEVICE_ID)
    moved = receiver.process(
        [
            (own, ack(2)),
            (own, ack(4)),
            (own, ack(3)),  # older, arrived later: covered by 4
            (own, b"\x00 not json"),
            (own, ack(6, device_id="SIM-0002")),  # addressed to another device
            (TOPICS.downlink("SIM-0002"), ack(6)),  # on another device's topic
        ]
    )
    assert moved == 4, "an ack may overtake the PUBACK: INFLIGHT rows at or below it are ACKED too"
    assert {r.seq: r.status for r in outbox.rows()} == {
        **dict.fromkeys(seqs[:4], OutboxStatus.ACKED),
        **dict.fromkeys(seqs[4:], OutboxStatus.PENDING),
    }
    assert outbox.mark_sent(seqs[2:4]) == 0, "the late PUBACK bookkeeping changes nothing"
    stats = receiver.stats()
    assert (stats.received, stats.refused, stats.acks_applied, stats.highest_ack) == (6, 3, 1, 4)
    refusals = [r for r in caplog.records if "refused a message" in r.getMessage()]
    assert len(refusals) == 1, "logged once, counted always"
    assert receiver.process([(own, ack(4))]) == 0, "a repeated ack is harmless"


def test_an_ack_beyond_our_highest_seq_is_refused(outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    """A server that stored more than this outbox ever made talks about other records (a replaced outbox file or a
    cloned device id): applying its ack would drop records it does not have."""
    caplog.set_level(logging.WARNING, logger="terminal.sync")
    seqs = [e.seq for e in outbox.enqueue_many([event(n) for n in range(3)])]
    receiver = DownlinkReceiver(outbox, device_id=DEVICE_ID, topics=TOPICS)
    assert receiver.process([(TOPICS.downlink(DEVICE_ID), ack(500))]) == 0
    assert {r.status for r in outbox.rows()} == {OutboxStatus.PENDING}
    assert receiver.stats().refused == 1
    assert "beyond our highest seq 3" in caplog.text
    assert receiver.process([(TOPICS.downlink(DEVICE_ID), ack(seqs[-1]))]) == 3


def test_terminal_applies_acks_from_its_downlink_topic(
    tmp_path: Path, broker: MosquittoBroker, recorder: UplinkRecorder
) -> None:
    rt = build_runtime(terminal_config(tmp_path, broker), simulated_peripherals())
    server = Client(CallbackAPIVersion.VERSION2, client_id="fake-server", protocol=MQTTProtocolVersion.MQTTv5)
    server.connect(broker.host, broker.port)
    server.loop_start()
    try:
        rt.start()
        envelopes = rt.record_audits([event(n) for n in range(10)])
        assert wait_until(lambda: {e.seq for e in envelopes} <= recorder.seqs())
        assert wait_until(lambda: rt.outbox.stats().unpublished == 0)
        highest = max(recorder.seqs())
        forged = server.publish(TOPICS.downlink(DEVICE_ID), ack(highest, device_id="SIM-0009"), qos=1)
        forged.wait_for_publish(5)
        real = server.publish(TOPICS.downlink(DEVICE_ID), ack(highest), qos=1)
        real.wait_for_publish(5)
        downlink = rt.sync.downlink
        assert downlink is not None
        assert wait_until(lambda: downlink.stats().highest_ack == highest)
        assert downlink.stats().refused == 1
        assert wait_until(lambda: rt.outbox.stats().depth == 0)
        assert {r.seq for r in rt.outbox.rows([OutboxStatus.ACKED])} >= {e.seq for e in envelopes}
        assert rt.heartbeat().outbox_sent_total == highest
    finally:
        rt.stop()
        server.disconnect()
        server.loop_stop()
