"""The fleet simulator against the real pieces: real Mosquitto, the real terminal core, the real ingest worker.

Twenty terminals in one process, driven by two network threads (each terminal with its own threads as on a kiosk,
or the same terminal-core calls on shared worker threads), each put 50 audit records into its own outbox; every
record must be stored exactly once and end ACKED on its terminal (so the server's acks travel back through the
fleet's links), each terminal must hold its own broker session (retained 'online', then 'offline' on stop), and the
`yibao bench sync` JSON line must account for every record."""

from __future__ import annotations

import json
import resource
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine, func, select

from hardware_sim.fleet import Fleet, FleetOptions, raise_open_file_limit
from protocol import Topics, decode_status
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.migrate import upgrade
from sync_server.db.models import Event
from sync_server.ingest import IngestWorker
from sync_server.settings import ServerSettings
from terminal.outbox import OutboxStatus
from yibao.bench import SyncBenchOptions, bench_sync
from yibao.broker import MosquittoBroker

pytestmark = pytest.mark.e2e

TERMINALS = 20
PER_TERMINAL = 50


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def server_engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'server.sqlite3'}"
    upgrade(url)
    engine = create_db_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def ingest(broker: MosquittoBroker, server_engine: Engine) -> Iterator[IngestWorker]:
    settings = ServerSettings(
        database_url=str(server_engine.url),
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_client_id=f"fleet-ingest-{secrets.token_hex(4)}",
        ingest_flush_interval_s=0.02,
    )
    worker = IngestWorker(settings, server_engine)
    worker.start()
    assert wait_until(lambda: worker.ready, timeout_s=10), "the ingest worker did not subscribe"
    yield worker
    worker.stop()


@pytest.fixture(params=["threads", "pooled"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path, broker: MosquittoBroker) -> Iterator[Fleet]:
    fleet = Fleet(
        FleetOptions(
            scheduling=request.param,
            sweep_s=1.0,
            terminals=TERMINALS,
            broker_host=broker.host,
            broker_port=broker.port,
            workdir=tmp_path / "fleet",
            heartbeat_interval_s=0.5,
            batch_size=20,
            network_threads=2,
        )
    )
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


def test_every_record_of_a_fleet_is_stored_exactly_once_and_ends_acked(
    # `ingest` before `fleet`: the first heartbeats must find the server subscribed, or (routed nowhere) they would
    # wait out the terminal's 120 s server-ack timeout before being sent again.
    ingest: IngestWorker,
    fleet: Fleet,
    server_engine: Engine,
) -> None:
    assert fleet.wait_connected(20) == TERMINALS
    fleet.enqueue_audits(PER_TERMINAL, action="fleet.record")
    # Heartbeats keep arriving every 0.5 s, so "nothing unacked" is never true at one instant; the records up to here
    # are what must end ACKED.
    through = {t.link.device_id: t.runtime.outbox.highest_seq() for t in fleet.terminals}

    def stored() -> int:
        with session_factory(server_engine)() as session:
            query = select(func.count()).select_from(Event).where(Event.payload_type == "audit_event")
            return int(session.scalar(query) or 0)

    assert wait_until(lambda: stored() == TERMINALS * PER_TERMINAL, timeout_s=60), f"stored {stored()}"
    with session_factory(server_engine)() as session:
        rows = session.execute(select(Event.device_id, Event.payload).where(Event.payload_type == "audit_event")).all()
    keys = [(device_id, payload["detail"]["n"]) for device_id, payload in rows]
    assert len(set(keys)) == len(keys) == TERMINALS * PER_TERMINAL
    assert {device_id for device_id, _n in keys} == {fleet.device_id(i) for i in range(TERMINALS)}

    def all_acked() -> bool:
        unacked = [OutboxStatus.PENDING, OutboxStatus.INFLIGHT, OutboxStatus.SENT]
        return not any(
            row.seq <= through[t.link.device_id] for t in fleet.terminals for row in t.runtime.outbox.rows(unacked)
        )

    assert wait_until(all_acked, timeout_s=60), "server acks did not reach every terminal's outbox"
    # Heartbeats flowed too (0.5 s interval) and not one network thread hit an unexpected error.
    with session_factory(server_engine)() as session:
        beats = session.scalar(select(func.count()).select_from(Event).where(Event.payload_type == "heartbeat"))
    assert (beats or 0) >= TERMINALS
    assert fleet.network is not None
    assert fleet.network.loop_errors == 0


def test_each_terminal_holds_its_own_session_with_retained_status(fleet: Fleet, broker: MosquittoBroker) -> None:
    assert fleet.wait_connected(20) == TERMINALS
    topics = Topics()
    seen: dict[str, str] = {}
    lock = threading.Lock()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        status = decode_status(bytes(message.payload))
        with lock:
            seen[status.device_id] = status.state.value

    watcher = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="fleet-test-watcher")
    watcher.on_message = on_message
    watcher.connect(broker.host, broker.port)
    watcher.subscribe(topics.all_statuses, qos=1)
    watcher.loop_start()
    try:
        # Retained: a subscriber arriving after the connects still learns every terminal is online.
        assert wait_until(lambda: len(seen) == TERMINALS and set(seen.values()) == {"online"}, 10), seen
        fleet.stop()
        assert wait_until(lambda: set(seen.values()) == {"offline"}, 10), seen
    finally:
        watcher.disconnect()
        watcher.loop_stop()


def test_open_file_limit_is_raised_but_never_above_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new_soft, new_hard = raise_open_file_limit(soft + 16)
    assert new_hard == hard
    assert new_soft >= min(soft + 16, hard)
    if hard != resource.RLIM_INFINITY:
        assert raise_open_file_limit(hard * 2)[0] == hard


def test_bench_sync_accounts_for_every_record() -> None:
    line = bench_sync(SyncBenchOptions(terminals=10, events=500, duration_s=60, heartbeat_interval_s=1.0))
    figures = json.loads(line)
    assert figures["bench"] == "sync"
    assert (figures["events"], figures["stored"], figures["lost"], figures["duplicated"]) == (500, 500, 0, 0)
    assert figures["connected_peak"] == 10
    assert figures["records_per_s"] > 0
    assert figures["p99_ms"] >= figures["p50_ms"] > 0
    assert set(figures["cpu_s_during_drain"]) == {"server", "ingest_workers", "broker", "fleet", "postgres"}
