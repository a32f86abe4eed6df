"""The terminal against a real Mosquitto, watched by a plain paho subscriber standing in for the server."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hardware_sim import SimulatedCamera, simulated_peripherals
from protocol import AuditEvent, AuditOutcome, Heartbeat, LinkState, PayloadType, PeripheralKind, PeripheralState
from terminal.config import TerminalConfig
from terminal.outbox import OutboxStatus
from terminal.runtime import TerminalRuntime, build_runtime, run_terminal
from tests.terminal.conftest import (
    DEVICE_ID,
    ReplyHoldingProxy,
    UplinkRecorder,
    retained_status,
    terminal_config,
    terminal_raw_config,
    to_toml,
    wait_until,
)
from yibao.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[2]


def demo_events(count: int, start: int = 0) -> list[AuditEvent]:
    return [
        AuditEvent(category="system", action="demo.record", outcome=AuditOutcome.INFO, detail={"n": n})
        for n in range(start, start + count)
    ]


@pytest.fixture
def runtime(tmp_path: Path, broker: MosquittoBroker, recorder: UplinkRecorder) -> Iterator[TerminalRuntime]:
    """A started terminal; the recorder is subscribed before it starts, so it sees every record."""
    rt = build_runtime(terminal_config(tmp_path, broker), simulated_peripherals())
    rt.start()
    yield rt
    rt.stop()


def statuses_of(rt: TerminalRuntime) -> set[OutboxStatus]:
    return {row.status for row in rt.outbox.rows([OutboxStatus.PENDING, OutboxStatus.INFLIGHT, OutboxStatus.SENT])}


def all_sent(rt: TerminalRuntime) -> bool:
    return statuses_of(rt) == {OutboxStatus.SENT}


def test_records_arrive_exactly_as_enqueued(runtime: TerminalRuntime, recorder: UplinkRecorder) -> None:
    started = runtime.record_audit("system", "terminal.started", AuditOutcome.INFO, boot="test")
    envelopes = [started, *runtime.record_audits(demo_events(500))]
    wanted = {e.seq for e in envelopes}
    assert wait_until(lambda: wanted <= recorder.seqs(), timeout_s=15)
    received = {e.seq: e for e in recorder.uplinks(PayloadType.AUDIT_EVENT)}
    assert [received[e.seq] for e in envelopes] == envelopes, "byte-for-byte the records the outbox built"
    assert wait_until(lambda: all_sent(runtime))
    assert runtime.outbox.stats().unpublished == 0
    assert runtime.outbox.stats().depth > 0, "no server: PUBACKed records wait for the server ack"
    # Every record, heartbeats included, carries one contiguous seq range.
    seqs = sorted(recorder.seqs())
    assert seqs == list(range(1, len(seqs) + 1))


def test_rows_become_sent_only_after_puback(tmp_path: Path, broker: MosquittoBroker, recorder: UplinkRecorder) -> None:
    proxy = ReplyHoldingProxy(broker)
    config = terminal_config(
        tmp_path, broker, mqtt={"port": proxy.port}, outbox={"publish_timeout_s": 30.0, "batch_size": 10}
    )
    rt = build_runtime(config, simulated_peripherals())
    try:
        rt.start()
        assert wait_until(lambda: LinkState.ONLINE in [s.state for s in recorder.statuses()])
        assert wait_until(lambda: rt.outbox.stats().unpublished == 0)
        sent_before = rt.outbox.stats().sent_total

        proxy.hold_replies()
        envelopes = rt.record_audits(demo_events(5))
        seqs = {e.seq for e in envelopes}
        assert wait_until(lambda: seqs <= recorder.seqs()), "the broker has every record..."
        time.sleep(0.3)
        rows = {r.seq: r.status for r in rt.outbox.rows() if r.seq in seqs}
        assert set(rows.values()) == {OutboxStatus.INFLIGHT}, "...but without a PUBACK none is SENT"
        assert rt.outbox.stats().sent_total == sent_before

        proxy.release_replies()
        assert wait_until(lambda: all_sent(rt))
        assert rt.outbox.stats().sent_total == sent_before + 5
    finally:
        proxy.release_replies()
        rt.stop()
        proxy.close()


def test_broker_crash_queues_records_and_restart_delivers_them(
    tmp_path: Path, broker: MosquittoBroker, recorder: UplinkRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="terminal.sync")
    # The terminal reaches the broker through a relay, so the test decides when it may reconnect: only after the
    # recorder has re-subscribed, since a crashed broker may have lost the recorder's session (and the server's).
    relay = ReplyHoldingProxy(broker)
    rt = build_runtime(terminal_config(tmp_path, broker, mqtt={"port": relay.port}), simulated_peripherals())
    try:
        rt.start()
        first = rt.record_audits(demo_events(20))
        assert wait_until(lambda: {e.seq for e in first} <= recorder.seqs())
        assert wait_until(lambda: all_sent(rt))

        relay.refuse_connections()
        broker.kill()
        assert wait_until(lambda: not rt.sync.link.is_connected(), timeout_s=10)
        sent_before = rt.outbox.stats().sent_total
        offline = rt.record_audits(demo_events(50, start=20))
        time.sleep(1.0)
        pending = {r.seq for r in rt.outbox.rows([OutboxStatus.PENDING])}
        assert {e.seq for e in offline} <= pending, "offline, records wait as PENDING"
        assert rt.outbox.rows([OutboxStatus.INFLIGHT]) == []
        assert rt.outbox.stats().sent_total == sent_before, "nothing is marked sent while the broker is down"

        subscribed_before = recorder.subscriptions
        broker.restart()
        assert wait_until(lambda: recorder.subscriptions > subscribed_before, timeout_s=15)
        relay.accept_connections()
        wanted = {e.seq for e in [*first, *offline]}
        assert wait_until(lambda: wanted <= recorder.seqs(), timeout_s=20)
        assert wait_until(lambda: all_sent(rt), timeout_s=10)
        received = {e.seq: e for e in recorder.uplinks(PayloadType.AUDIT_EVENT)}
        assert [received[e.seq] for e in offline] == offline
    finally:
        rt.stop()
        relay.close()
    lost = [r for r in caplog.records if r.name == "terminal.sync" and "records wait in the outbox" in r.getMessage()]
    restored = [r for r in caplog.records if r.name == "terminal.sync" and "connection restored" in r.getMessage()]
    assert len(lost) == 1, "connection loss is logged once, not once per reconnect attempt"
    assert len(restored) == 1


def test_heartbeats_carry_outbox_stats_and_peripheral_statuses(
    tmp_path: Path, broker: MosquittoBroker, recorder: UplinkRecorder
) -> None:
    camera = SimulatedCamera()
    peripherals = [camera, *simulated_peripherals()[1:]]
    rt = build_runtime(terminal_config(tmp_path, broker, heartbeat_s=0.2), peripherals)
    try:
        rt.start()
        assert wait_until(lambda: len(recorder.uplinks(PayloadType.HEARTBEAT)) >= 2)
        camera.inject_fault("lens covered")
        time.sleep(0.2)

        def faulted_beat() -> Heartbeat | None:
            for envelope in recorder.uplinks(PayloadType.HEARTBEAT):
                assert isinstance(envelope.payload, Heartbeat)
                if envelope.payload.peripherals[0].state is PeripheralState.FAULT:
                    return envelope.payload
            return None

        assert wait_until(lambda: faulted_beat() is not None)
    finally:
        rt.stop()
    first = recorder.uplinks(PayloadType.HEARTBEAT)[0].payload
    assert isinstance(first, Heartbeat)
    assert (first.software_version, first.config_version, first.config_schema_version) == ("0.1.0", "test-1", 1)
    assert first.interval_s == 0.2
    assert first.outbox_capacity_bytes == 16 * 1024 * 1024
    assert 0 < first.outbox_used_bytes <= first.outbox_capacity_bytes
    assert [p.kind for p in first.peripherals] == [
        PeripheralKind.CAMERA,
        PeripheralKind.QR_SCANNER,
        PeripheralKind.ID_CARD_READER,
        PeripheralKind.SS_CARD_READER,
    ]
    assert all(p.simulated and p.state is PeripheralState.OK for p in first.peripherals)
    faulted = faulted_beat()
    assert faulted is not None
    assert faulted.peripherals[0].detail == "lens covered"


def test_status_is_online_while_connected_and_offline_after_clean_stop(
    tmp_path: Path, broker: MosquittoBroker, recorder: UplinkRecorder
) -> None:
    stop = threading.Event()
    config = terminal_config(tmp_path, broker)
    runner = threading.Thread(target=run_terminal, args=(config, simulated_peripherals()), kwargs={"stop_event": stop})
    runner.start()
    try:
        assert wait_until(lambda: LinkState.ONLINE in [s.state for s in recorder.statuses()])
        online = retained_status(broker)
        assert online.state is LinkState.ONLINE
        assert online.at is not None

        def started_events() -> list[str]:
            return [
                e.payload.action
                for e in recorder.uplinks(PayloadType.AUDIT_EVENT)
                if isinstance(e.payload, AuditEvent) and e.payload.action == "terminal.started"
            ]

        assert wait_until(lambda: started_events() == ["terminal.started"])
    finally:
        stop.set()
        runner.join(15)
    assert not runner.is_alive()
    offline = retained_status(broker)
    assert offline.state is LinkState.OFFLINE
    assert offline.at is not None, "a clean stop publishes a stamped 'offline' (the will has no time)"
    assert offline.boot_id == online.boot_id


@pytest.mark.e2e
def test_killed_terminal_goes_offline_through_its_last_will(
    tmp_path: Path, broker: MosquittoBroker, recorder: UplinkRecorder
) -> None:
    path = tmp_path / "terminal.toml"
    path.write_text(to_toml(terminal_raw_config(tmp_path, broker)), encoding="utf-8")
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.terminal.terminal_child", str(path), "10"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_until(lambda: len(recorder.uplinks(PayloadType.AUDIT_EVENT)) >= 11, timeout_s=20), (
            "terminal.started and the ten demo records arrive"
        )
        assert retained_status(broker).state is LinkState.ONLINE
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        if child.stderr is not None:
            child.stderr.close()
    assert wait_until(lambda: recorder.statuses()[-1].state is LinkState.OFFLINE, timeout_s=10)
    will = retained_status(broker)
    assert will.state is LinkState.OFFLINE
    assert will.at is None, "the broker published our last will"
    assert will.device_id == DEVICE_ID


@pytest.mark.e2e
def test_sigterm_stops_the_terminal_cleanly(tmp_path: Path, broker: MosquittoBroker, recorder: UplinkRecorder) -> None:
    path = tmp_path / "terminal.toml"
    path.write_text(to_toml(terminal_raw_config(tmp_path, broker)), encoding="utf-8")
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.terminal.terminal_child", str(path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_until(lambda: LinkState.ONLINE in [s.state for s in recorder.statuses()], timeout_s=20)
        child.send_signal(signal.SIGTERM)
        assert child.wait(15) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stderr is not None:
            child.stderr.close()
    offline = retained_status(broker)
    assert offline.state is LinkState.OFFLINE
    assert offline.at is not None, "stopped cleanly: the terminal itself published 'offline'"


def test_terminal_starts_offline_and_connects_when_the_broker_appears(tmp_path: Path) -> None:
    with MosquittoBroker() as probe:
        port = probe.port
    late = MosquittoBroker(port=port)
    config: TerminalConfig = terminal_config(tmp_path, None, mqtt={"port": port})
    rt = build_runtime(config, simulated_peripherals())
    try:
        rt.start()
        envelopes = rt.record_audits(demo_events(3))
        time.sleep(0.5)
        assert not rt.sync.link.is_connected()
        assert rt.outbox.stats().depth >= 3, "the terminal works offline from its first second"
        late.start()
        assert wait_until(lambda: all_sent(rt), timeout_s=15), "PUBACKed by the broker that came up late"
        assert retained_status(late).state is LinkState.ONLINE
        assert {e.seq for e in envelopes} <= {r.seq for r in rt.outbox.rows([OutboxStatus.SENT])}
    finally:
        rt.stop()
        late.stop()


def test_stop_is_prompt_when_the_broker_never_answered(tmp_path: Path) -> None:
    with MosquittoBroker() as probe:
        closed_port = probe.port  # nothing listens here any more
    rt = build_runtime(terminal_config(tmp_path, None, mqtt={"port": closed_port}), simulated_peripherals())
    rt.start()
    rt.record_audit("system", "offline.record", AuditOutcome.INFO)
    time.sleep(0.3)
    began = time.monotonic()
    rt.stop()
    assert time.monotonic() - began < 3
    reopened = build_runtime(terminal_config(tmp_path, None), simulated_peripherals())
    try:
        assert {r.status for r in reopened.outbox.rows()} == {OutboxStatus.PENDING}, "kept for the next run"
    finally:
        reopened.stop()
