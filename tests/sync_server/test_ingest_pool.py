"""Ingest as several worker processes on the shared subscription: real Mosquitto, real PostgreSQL, `yibao server run
--ingest-workers 2` as a child process. Records of every device are spread over both workers (the broker splits by
message, not by device), redelivered copies go to whichever worker the broker picks, and one worker is killed
mid-stream: every record must be stored exactly once, every device acknowledged through its last seq, no hole left.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import SecretStr
from sqlalchemy import create_engine, text

from protocol import Envelope, Topics, UplinkAck, decode_downlink
from sync_server.ingest_pool import IngestPool, settings_document, worker_client_id
from sync_server.settings import ServerSettings
from tests.sync_server.conftest import Publisher, envelope, wait_until
from yibao.broker import MosquittoBroker
from yibao.procs import stop
from yibao.server_proc import start_server_process

DEVICES = 30
PER_DEVICE = 30


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text(encoding="ascii").split()]
    return found


class _AckListener:
    """Every `uplink_ack` the server publishes, per device, in arrival order."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.acks: dict[str, list[int]] = defaultdict(list)
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="ack-listener", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"{Topics().prefix}/dev/+/down", qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(5), "no SUBACK"

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        decoded = decode_downlink(bytes(message.payload))
        if isinstance(decoded, UplinkAck):
            with self._lock:
                self.acks[decoded.device_id].append(decoded.acked_through_seq)

    def highest(self, device_id: str) -> int:
        with self._lock:
            return max(self.acks.get(device_id, [0]))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _publish_all(publisher: Publisher, envelopes: list[Envelope]) -> None:
    """QoS 1 publishes without waiting for each PUBACK in turn; returns once the broker acknowledged them all."""
    topics = Topics()
    infos = [publisher.client.publish(topics.uplink(e.device_id), e.to_bytes(), qos=1) for e in envelopes]
    for info in infos:
        info.wait_for_publish(timeout=30)
        assert info.is_published()


@pytest.mark.parametrize("database", [pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"])
def test_two_worker_processes_store_each_record_once_with_redeliveries_and_a_crash(
    broker: MosquittoBroker, database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On SQLite too: correct (one writer at a time through BEGIN IMMEDIATE and the busy timeout), not faster."""
    db_url: str = request.getfixturevalue("pg_url") if database == "postgresql" else f"sqlite:///{tmp_path / 's.db'}"
    server = start_server_process(
        database_url=db_url,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        workdir=tmp_path,
        ingest_workers=2,
        timeout_s=180,  # three interpreters starting on a loaded 2-core machine
    )
    listener = _AckListener(broker)
    publisher = Publisher(broker)
    engine = create_engine(db_url)
    try:
        workers = _children(server.proc.pid)
        assert len(workers) == 2, f"expected 2 ingest worker processes, found {workers}"
        rng = random.Random(7)
        records = [envelope(f"pool-{d:02d}", seq) for d in range(DEVICES) for seq in range(1, PER_DEVICE + 1)]
        order = list(records)
        rng.shuffle(order)  # out of order per device: holes open and close while both workers store
        half = len(order) // 2
        first = [env for i, env in enumerate(order[:half]) for _copy in range(2 if i % 5 == 0 else 1)]
        _publish_all(publisher, first)  # every 5th twice in a row: both workers may hold the same record at once
        os.kill(workers[0], signal.SIGKILL)  # its unacknowledged messages come back to its restarted session
        # The rest, then late re-publishes of 150 records, as a terminal does after its ack timeout.
        _publish_all(publisher, order[half:] + rng.sample(records, 150))

        def all_acked() -> bool:
            return all(listener.highest(f"pool-{d:02d}") == PER_DEVICE for d in range(DEVICES))

        wait_until(all_acked, timeout_s=120, what="every device acknowledged through its last seq")
        with engine.connect() as conn:
            stored = conn.execute(
                text("SELECT count(*), count(DISTINCT device_id || '/' || CAST(seq AS VARCHAR(20))) FROM events")
            ).one()
            devices = conn.execute(
                text("SELECT device_id, acked_through_seq, last_seq, seq_gap_from FROM devices ORDER BY device_id")
            ).all()
        assert tuple(stored) == (DEVICES * PER_DEVICE, DEVICES * PER_DEVICE)
        assert [tuple(row) for row in devices] == [
            (f"pool-{d:02d}", PER_DEVICE, PER_DEVICE, None) for d in range(DEVICES)
        ]
        wait_until(lambda: len(_children(server.proc.pid)) == 2, timeout_s=30, what="the killed worker restarted")
        assert workers[0] not in _children(server.proc.pid)
    finally:
        publisher.close()
        listener.close()
        engine.dispose()
        stop(server.proc, name="server")
    log = (tmp_path / "server.log").read_text(encoding="utf-8")
    stopped = re.findall(r"ingest worker (\d) stopped: received (\d+), stored (\d+), duplicates (\d+)", log)
    assert sorted(i for i, *_ in stopped) == ["0", "1"], log[-3000:]
    assert all(int(received) > 0 for _i, received, _s, _d in stopped), stopped  # the broker used both workers
    assert "restarting it" in log


def test_pool_worker_identity_and_settings_round_trip() -> None:
    settings = ServerSettings(
        mqtt_client_id="srv-a",
        ingest_workers=3,
        secret_key=SecretStr("s" * 40),
        server_key_passphrase=SecretStr("p" * 40),
        broker_admin_username="yibao-admin",
        broker_admin_password=SecretStr("b" * 24),
        environment="prod",
    )
    assert [worker_client_id(settings, i) for i in range(3)] == ["srv-a-ingest-0", "srv-a-ingest-1", "srv-a-ingest-2"]
    again = ServerSettings.model_validate_json(settings_document(settings))
    assert again == settings
    assert again.secret_key.get_secret_value() == "s" * 40
    assert again.server_key_passphrase.get_secret_value() == "p" * 40, "every secret reaches the worker"
    assert again.broker_admin_password is not None
    assert again.broker_admin_password.get_secret_value() == "b" * 24
    with pytest.raises(ValueError, match="at least one"):
        IngestPool(settings, count=0)


def test_a_worker_exits_when_its_parent_is_gone(tmp_path: Path, broker: MosquittoBroker) -> None:
    """A worker started for a parent that no longer exists (or whose parent dies) does not keep running."""
    import subprocess
    import sys

    settings = ServerSettings(database_url=f"sqlite:///{tmp_path / 'x.sqlite3'}", mqtt_port=broker.port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sync_server.ingest_pool", "--index", "0", "--parent-pid", "1"],
        stdin=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(settings_document(settings))
    proc.stdin.close()
    t0 = time.monotonic()
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - t0 < 30
