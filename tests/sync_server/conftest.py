"""Layered fixtures for the sync server tests.

* `pg_database` (session, from tests/conftest.py): the session's PostgreSQL database.
* `db_url` (per test, parametrised over SQLite and PostgreSQL): an empty database; on PostgreSQL a fresh schema
  inside the session database, selected through `search_path`.
* `engine`: `db_url` migrated to head, with an engine that is disposed afterwards.
* `broker` (from tests/conftest.py): a private Mosquitto on a free port.
* `clock`: a `protocol.Clock` whose wall time tests set and advance.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from fastapi import FastAPI
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL

from protocol import (
    AuditEvent,
    AuditOutcome,
    CommandResult,
    Envelope,
    Heartbeat,
    PayloadType,
    PeripheralKind,
    PeripheralState,
    PeripheralStatus,
)
from sync_server.db.engine import create_db_engine
from sync_server.db.migrate import upgrade
from tests.http_serving import serving_url
from yibao.broker import MosquittoBroker

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)


# ---------------------------------------------------------------- hermetic settings


TEST_ADMIN_TOKEN = "test-admin-token-" + secrets.token_urlsafe(16)
ADMIN_HEADERS = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


@pytest.fixture(autouse=True)
def _no_server_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ServerSettings reads YIBAO_SERVER_* from the environment; tests must not depend on the caller's shell. Every
    test gets the bootstrap admin token `TEST_ADMIN_TOKEN` (which `serving` sends) and a data dir of its own."""
    for key in list(os.environ):
        if key.startswith("YIBAO_SERVER_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("YIBAO_SERVER_BOOTSTRAP_ADMIN_TOKEN", TEST_ADMIN_TOKEN)
    monkeypatch.setenv("YIBAO_SERVER_DATA_DIR", str(tmp_path / "server-data"))


# ---------------------------------------------------------------- databases


@contextmanager
def pg_schema(pg_database: URL) -> Iterator[str]:
    """An empty schema in the session's PostgreSQL database, as a URL whose search_path selects it."""
    schema = f"s_{secrets.token_hex(5)}"
    admin = create_engine(pg_database, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = pg_database.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        admin.dispose()


@pytest.fixture
def pg_url(pg_database: URL) -> Iterator[str]:
    with pg_schema(pg_database) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'server.sqlite3'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    upgrade(db_url)
    eng = create_db_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    upgrade(sqlite_url)
    eng = create_db_engine(sqlite_url)
    try:
        yield eng
    finally:
        eng.dispose()


# ---------------------------------------------------------------- time


class FakeClock:
    """Wall time set by the test; monotonic time is real (worker threads wait on it)."""

    def __init__(self, start: datetime = T0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = when

    def monotonic(self) -> float:
        return time.monotonic()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---------------------------------------------------------------- envelopes

BOOT = uuid.UUID("00000000-0000-4000-8000-000000000001")


def heartbeat(
    *,
    interval_s: float = 10.0,
    outbox_depth: int = 0,
    oldest_age_s: float | None = None,
    software_version: str = "1.2.3",
    alarms: list[str] | None = None,
    peripherals: list[PeripheralStatus] | None = None,
) -> Heartbeat:
    return Heartbeat(
        software_version=software_version,
        config_version="cfg-7",
        config_schema_version=1,
        interval_s=interval_s,
        uptime_s=12.5,
        outbox_depth=outbox_depth,
        outbox_oldest_age_s=oldest_age_s,
        outbox_used_bytes=4096,
        outbox_capacity_bytes=1 << 28,
        alarms=alarms or [],
        peripherals=peripherals
        if peripherals is not None
        else [
            PeripheralStatus(name="camera0", kind=PeripheralKind.CAMERA, state=PeripheralState.OK, simulated=True),
            PeripheralStatus(
                name="qr0",
                kind=PeripheralKind.QR_SCANNER,
                state=PeripheralState.FAULT,
                simulated=True,
                detail="no answer",
            ),
        ],
    )


def audit(action: str = "terminal.started", n: int = 0) -> AuditEvent:
    return AuditEvent(category="system", action=action, outcome=AuditOutcome.INFO, detail={"n": n})


def envelope(
    device_id: str,
    seq: int,
    payload: Heartbeat | AuditEvent | CommandResult | None = None,
    *,
    message_id: uuid.UUID | None = None,
    device_time: datetime | None = None,
) -> Envelope:
    body = payload if payload is not None else audit(n=seq)
    return Envelope(
        device_id=device_id,
        seq=seq,
        message_id=message_id or uuid.uuid4(),
        payload_type=PayloadType(body.type),
        device_time=device_time or T0 + timedelta(seconds=seq),
        boot_id=BOOT,
        monotonic_ns=seq * 1_000_000,
        payload=body,
    )


# ---------------------------------------------------------------- MQTT


class Publisher:
    """A plain paho client standing in for terminals: QoS 1 publishes that wait for the broker's PUBACK."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"pub-{secrets.token_hex(4)}", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=5)
        assert info.is_published(), f"broker did not acknowledge a publish on {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker: MosquittoBroker) -> Iterator[Publisher]:
    pub = Publisher(broker)
    try:
        yield pub
    finally:
        pub.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# ---------------------------------------------------------------- a small fleet for API and page tests

INSTITUTION_CODE = "H31011500001"
FLEET_NOW = T0 + timedelta(seconds=5)
"""Wall time of the fleet tests: kiosk-001 is online (heartbeat at T0, 10 s interval, factor 3)."""


def seed_fleet(engine: Engine) -> None:
    """kiosk-001 online at an institution with alarms; kiosk-002 offline (stale heartbeat); kiosk-003 with 250
    events (every 10th a heartbeat) and no status."""
    from protocol import DeviceStatusMessage, LinkState
    from sync_server.db.engine import session_factory
    from sync_server.db.models import Device, Institution, InstitutionKind
    from sync_server.store import apply_statuses, record_device_activity, store_envelopes

    sessions = session_factory(engine, write_intent=True)
    with sessions.begin() as session:
        inst = Institution(
            code=INSTITUTION_CODE,
            name="浦东新区示例大药房",
            kind=InstitutionKind.PHARMACY,
            region_code="310115",
            created_at=T0,
        )
        session.add(inst)
        session.flush()
        hb1 = envelope("kiosk-001", 1, heartbeat(outbox_depth=7, oldest_age_s=125.0, alarms=["outbox_high"]))
        hb2 = envelope("kiosk-002", 1, heartbeat(software_version="1.0.0"))
        early = T0 - timedelta(hours=2)
        store_envelopes(session, [hb2], received_at=early)
        record_device_activity(session, [hb2], received_at=early, heartbeat_timeout_factor=3.0)
        store_envelopes(session, [hb1], received_at=T0)
        record_device_activity(session, [hb1], received_at=T0, heartbeat_timeout_factor=3.0)
        statuses = [
            DeviceStatusMessage(device_id=d, state=LinkState.ONLINE, boot_id=BOOT, at=early)
            for d in ("kiosk-001", "kiosk-002")
        ]
        apply_statuses(session, statuses, received_at=early)
        kiosk1 = session.get(Device, "kiosk-001")
        assert kiosk1 is not None
        kiosk1.institution_id = inst.id
        many = [envelope("kiosk-003", seq, heartbeat() if seq % 10 == 0 else audit(n=seq)) for seq in range(1, 251)]
        store_envelopes(session, many, received_at=T0)
        record_device_activity(session, many, received_at=T0, heartbeat_timeout_factor=3.0)


# ---------------------------------------------------------------- HTTP


@contextmanager
def serving(app: FastAPI, *, admin: bool = True) -> Iterator[httpx.Client]:
    """Run `app` (lifespan included) under uvicorn on a free loopback port in a thread; yield an httpx client
    (sending `ADMIN_HEADERS` unless `admin=False`)."""
    headers = ADMIN_HEADERS if admin else {}
    with serving_url(app, lifespan="on") as url, httpx.Client(base_url=url, timeout=10.0, headers=headers) as client:
        yield client
