"""Revocation bites within 10 s (issue 3): on a dynamic-security broker, an enrolled device connected with its own
credentials and publishing valid frames is revoked through the API; the broker closes its connection, and a frame
sealed with its still-unexpired session key, injected by another authorised client, is refused and recorded.

The API and the ingest worker run with separate security caches, as two server processes would, so the ingest side
learns of the revocation only through its cache TTL: the measured time is the real cross-process bound."""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, func, select

from protocol import Envelope, PayloadType, SystemClock, Topics
from protocol.enrolment import EnrolResponse, make_enrol_request
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey
from protocol.secure import Direction, SessionGrant, SessionKey, accept_grant, seal_frame, start_session
from sync_server.app import create_app
from sync_server.audit import ServerAudit
from sync_server.broker_admin import DynsecAdmin
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.migrate import upgrade
from sync_server.db.models import Event, SecurityEvent
from sync_server.identity import ServerIdentity, create_server_key
from sync_server.ingest import IngestWorker
from sync_server.security import SecurityGate
from sync_server.settings import ServerSettings
from tests.mqtt_probe import PUBLISH_OK, Probe
from tests.sync_server.conftest import BOOT, audit, serving, wait_until
from yibao.broker import MosquittoBroker

logger = logging.getLogger(__name__)
TOPICS = Topics()
DEVICE = "kiosk-990"
ADMIN_TOKEN = "revocation-test-admin-" + secrets.token_urlsafe(12)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'server.sqlite3'}"
    upgrade(url)
    eng = create_db_engine(url)
    try:
        yield eng
    finally:
        eng.dispose()


def settings_for(broker: MosquittoBroker, engine: Engine, data_dir: Path) -> ServerSettings:
    return ServerSettings(
        database_url=str(engine.url),
        data_dir=data_dir,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_client_id=f"test-ingest-{secrets.token_hex(4)}",
        mqtt_username=broker.server_username,
        mqtt_password=SecretStr(broker.server_password),
        broker_admin_username=broker.admin_username,
        broker_admin_password=SecretStr(broker.admin_password),
        bootstrap_admin_token=SecretStr(ADMIN_TOKEN),
        ingest_flush_interval_s=0.02,
        uplink_security="required",
    )


def envelope(seq: int) -> bytes:
    return Envelope(
        device_id=DEVICE,
        seq=seq,
        message_id=uuid.uuid4(),
        payload_type=PayloadType.AUDIT_EVENT,
        device_time=datetime.now(UTC),
        boot_id=BOOT,
        monotonic_ns=seq,
        payload=audit(n=seq),
    ).to_bytes()


def sealed(key: SessionKey, seq: int) -> bytes:
    return seal_frame(key, DEVICE, Direction.UPLINK, seq, envelope(seq), sent_at=datetime.now(UTC))


def count(engine: Engine, model: type[Event] | type[SecurityEvent], **where: str) -> int:
    with session_factory(engine)() as session:
        stmt = select(func.count()).select_from(model)
        for column, value in where.items():
            stmt = stmt.where(getattr(model, column) == value)
        return session.scalar(stmt) or 0


def test_a_revoked_device_is_kicked_and_its_frames_refused_within_10_s(
    secure_broker: MosquittoBroker, engine: Engine, tmp_path: Path
) -> None:
    settings = settings_for(secure_broker, engine, tmp_path / "server-data")
    create_server_key(settings, iterations=1000)
    clock = SystemClock()
    # the ingest side: its own SecurityGate (own cache), as in another server process
    gate = SecurityGate(
        settings, engine, ServerIdentity(settings), clock=clock, audit=ServerAudit(tmp_path / "ingest-data", clock)
    )
    worker = IngestWorker(settings, engine, clock=clock, security=gate)
    worker.start()
    app = create_app(settings, engine=engine, start_ingest=False)
    device: Probe | None = None
    injector: Probe | None = None
    try:
        wait_until(lambda: worker.ready, what="ingest subscribed with the server's broker user")
        with serving(app, admin=False) as http:
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            claim = http.post("/api/v1/provisioning/devices", json={"device_id": DEVICE}, headers=admin).json()
            key = SM2PrivateKey.generate()
            request = make_enrol_request(
                key, device_id=DEVICE, claim_token=claim["claim_token"], hardware_id="hw-990", now=clock.now()
            )
            answer = EnrolResponse.model_validate(
                http.post("/api/v1/provisioning/enrol", json=request.model_dump(mode="json")).json()
            )
            session_key = _session(http, key, clock)

            device = Probe(secure_broker.host, secure_broker.port, DEVICE, answer.broker_password)
            assert device.wait_connected() == "Success"
            for seq in (1, 2):
                assert device.publish(TOPICS.uplink(DEVICE), sealed(session_key, seq)) in PUBLISH_OK
            wait_until(lambda: count(engine, Event, device_id=DEVICE) == 2, what="the valid frames to be stored")

            dynsec = DynsecAdmin(
                secure_broker.host,
                secure_broker.port,
                secure_broker.admin_username,
                secure_broker.admin_password,
                topics=TOPICS,
            )
            acl = [{"acltype": "publishClientSend", "topic": TOPICS.all_uplinks, "priority": 0, "allow": True}]
            dynsec.add_client("injector", "injector-password-0123", "injector", acl)
            injector = Probe(secure_broker.host, secure_broker.port, "injector", "injector-password-0123")
            assert injector.wait_connected() == "Success"

            started = time.monotonic()
            resp = http.post(f"/api/v1/provisioning/devices/{DEVICE}/revoke", json={"reason": "stolen"}, headers=admin)
            assert resp.status_code == 200
            assert resp.json()["broker"] == "deleted"
            assert device.gone.wait(10), "the broker did not close the revoked device's connection"
            assert device.disconnected_at is not None
            kicked_after = device.disconnected_at - started

            seq = 3
            refused_after: float | None = None
            while time.monotonic() - started < 15:
                assert injector.publish(TOPICS.uplink(DEVICE), sealed(session_key, seq)) in PUBLISH_OK
                seq += 1
                if count(engine, SecurityEvent, device_id=DEVICE, kind="revoked"):
                    refused_after = time.monotonic() - started
                    break
                time.sleep(0.2)  # pacing of the injected frames, not an assertion
            assert refused_after is not None, "frames of the revoked device were still accepted after 15 s"
            stored_at_refusal = count(engine, Event, device_id=DEVICE)
            # from now on nothing of the device is stored
            assert injector.publish(TOPICS.uplink(DEVICE), sealed(session_key, seq)) in PUBLISH_OK
            wait_until(lambda: worker.stats().security_refused >= 2, what="the next frame to be refused too")
            assert count(engine, Event, device_id=DEVICE) == stored_at_refusal
            logger.warning(
                "revocation: broker kick after %.2f s, ingest refusal after %.2f s", kicked_after, refused_after
            )
            assert kicked_after < 10
            assert refused_after < 10
    finally:
        for probe in (device, injector):
            if probe is not None:
                probe.close()
        worker.stop()


def _session(http: httpx.Client, key: SM2PrivateKey, clock: SystemClock) -> SessionKey:
    server_key = SM2PublicKey.from_hex(http.get("/api/v1/server-identity").json()["public_key"])
    request, ephemeral = start_session(key, device_id=DEVICE, key_epoch=1, now=clock.now())
    grant = SessionGrant.model_validate(
        http.post(f"/api/v1/devices/{DEVICE}/sessions", json=request.model_dump(mode="json")).json()
    )
    return accept_grant(grant, request, ephemeral, device_key=key.public_key, server_key=server_key)
