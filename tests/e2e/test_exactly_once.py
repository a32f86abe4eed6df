"""The loss scenario end to end, in one process with the real pieces: real Mosquitto, the real terminal runtime (outbox,
MQTT link, downlink receiver) and the real server ingest worker on SQLite.

A terminal publishes to a brand-new broker on which no server session has ever subscribed: the broker PUBACKs every
record and routes it nowhere. Before server acknowledgements that was loss. Now the rows stay SENT, go back to
PENDING after `server_ack_timeout_s`, are published again once the server is there, are stored exactly once, and end
ACKED on the terminal."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from hardware_sim import simulated_peripherals
from protocol import AuditEvent, AuditOutcome
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.migrate import upgrade
from sync_server.db.models import Device, Event
from sync_server.ingest import IngestWorker
from sync_server.settings import ServerSettings
from terminal.outbox import OutboxStatus
from terminal.runtime import TerminalRuntime, build_runtime
from tests.terminal.conftest import DEVICE_ID, terminal_config, wait_until
from yibao.broker import MosquittoBroker

pytestmark = pytest.mark.e2e

RECORDS = 200


@pytest.fixture
def server_engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'server.sqlite3'}"
    upgrade(url)
    engine = create_db_engine(url)
    yield engine
    engine.dispose()


def start_ingest(broker: MosquittoBroker, engine: Engine) -> IngestWorker:
    settings = ServerSettings(
        database_url=str(engine.url),
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_client_id=f"e2e-ingest-{secrets.token_hex(4)}",
        ingest_flush_interval_s=0.02,
    )
    worker = IngestWorker(settings, engine)
    worker.start()
    assert wait_until(lambda: worker.ready, timeout_s=10), "the ingest worker did not subscribe"
    return worker


def stored_seqs(engine: Engine) -> list[int]:
    with session_factory(engine)() as session:
        return list(session.scalars(select(Event.seq).where(Event.device_id == DEVICE_ID).order_by(Event.seq)))


def start_terminal(tmp_path: Path, broker: MosquittoBroker) -> TerminalRuntime:
    config = terminal_config(
        tmp_path,
        broker,
        outbox={"server_ack_timeout_s": 1.0, "retry_initial_s": 0.2, "retry_max_s": 0.5, "batch_size": 100},
    )
    rt = build_runtime(config, simulated_peripherals())
    rt.start()
    return rt


def demo_events(count: int) -> list[AuditEvent]:
    return [
        AuditEvent(category="system", action="demo.record", outcome=AuditOutcome.INFO, detail={"n": n})
        for n in range(count)
    ]


def test_records_published_before_any_server_subscribed_are_stored_exactly_once(
    tmp_path: Path, broker: MosquittoBroker, server_engine: Engine
) -> None:
    rt = start_terminal(tmp_path, broker)
    worker: IngestWorker | None = None
    try:
        envelopes = rt.record_audits(demo_events(RECORDS))
        # The broker acknowledges everything (no subscriber: it routes the records nowhere).
        assert wait_until(lambda: rt.outbox.stats().unpublished == 0, timeout_s=15)
        assert rt.outbox.rows([OutboxStatus.ACKED]) == []
        assert rt.outbox.stats().depth == RECORDS + 1, "PUBACKed but unacknowledged by the server: all kept"

        worker = start_ingest(broker, server_engine)
        assert wait_until(lambda: rt.outbox.stats().depth == 0, timeout_s=30), (
            f"terminal still waits for acks: {rt.outbox.stats()}, server stored {len(stored_seqs(server_engine))}"
        )
        highest = max(e.seq for e in envelopes)
        assert stored_seqs(server_engine) == list(range(1, highest + 1)), "every record once, no hole"
        stats = worker.stats()
        assert stats.stored == highest
        assert stats.acks_sent >= 1
        with session_factory(server_engine)() as session:
            device = session.get(Device, DEVICE_ID)
            assert device is not None
            assert (device.acked_through_seq, device.seq_gap_from) == (highest, None)
            assert session.scalar(select(func.count()).select_from(Event)) == highest
        rows = rt.outbox.rows()
        assert {r.status for r in rows} == {OutboxStatus.ACKED}
        assert [r.seq for r in rows] == list(range(1, highest + 1))
        assert rt.outbox.stats().acked_total == highest
    finally:
        rt.stop()
        if worker is not None:
            worker.stop()


def test_with_the_server_up_first_every_record_ends_acked(
    tmp_path: Path, broker: MosquittoBroker, server_engine: Engine
) -> None:
    worker = start_ingest(broker, server_engine)
    rt = start_terminal(tmp_path, broker)
    try:
        envelopes = rt.record_audits(demo_events(RECORDS))
        assert wait_until(lambda: rt.outbox.stats().depth == 0, timeout_s=30)
        assert stored_seqs(server_engine) == list(range(1, max(e.seq for e in envelopes) + 1))
        assert rt.heartbeat().outbox_sent_total == RECORDS + 1
        assert rt.heartbeat().outbox_depth == 0
    finally:
        rt.stop()
        worker.stop()
