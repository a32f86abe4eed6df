"""Message security in ingest (issue 3 "Done when"): forged, tampered, replayed, other-device, revoked, plaintext
downgrade, seq mismatch and bad signed records are refused, recorded in security_events and never stored, and what
was stored before stays untouched; downlinks to an enrolled device are sealed with its session key."""

from __future__ import annotations

import os
import secrets
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from protocol import Envelope, PayloadType, SignedRecordKind, Topics, UplinkAck, decode_downlink
from protocol.evidence import sign_device_record
from protocol.gm.audit_chain import load_chain_key, verify_chain
from protocol.gm.sm2 import SM2PrivateKey
from protocol.secure import (
    Direction,
    SessionKey,
    open_frame,
    parse_frame,
    seal_frame,
)
from sync_server.app import create_app
from sync_server.db.engine import session_factory
from sync_server.db.models import Event, SecurityEvent
from sync_server.identity import create_server_key
from sync_server.settings import ServerSettings
from tests.mqtt_probe import Probe
from tests.sync_server.conftest import BOOT, FakeClock, Publisher, audit, serving, wait_until
from tests.sync_server.signed_requests import Enrolled, enrol_with_session
from yibao.broker import MosquittoBroker

TOPICS = Topics()
A, B = "kiosk-801", "kiosk-802"


def env(device_id: str, seq: int, payload: Any = None) -> Envelope:
    return Envelope(
        device_id=device_id,
        seq=seq,
        message_id=uuid.uuid4(),
        payload_type=PayloadType(payload.type) if payload is not None else PayloadType.AUDIT_EVENT,
        device_time=datetime(2026, 3, 1, tzinfo=UTC),
        boot_id=BOOT,
        monotonic_ns=seq,
        payload=payload if payload is not None else audit(n=seq),
    )


def frame(dev: Enrolled, envelope: Envelope, clock: FakeClock, *, counter: int | None = None) -> bytes:
    return seal_frame(
        dev.session,
        dev.device_id,
        Direction.UPLINK,
        envelope.seq if counter is None else counter,
        envelope.to_bytes(),
        sent_at=clock.now(),
    )


@pytest.fixture
def stack(
    broker: MosquittoBroker, sqlite_engine: Engine, sqlite_url: str, publisher: Publisher
) -> Iterator[tuple[httpx.Client, FakeClock]]:
    settings = ServerSettings(
        database_url=sqlite_url,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_client_id=f"test-ingest-{secrets.token_hex(4)}",
        ingest_flush_interval_s=0.02,
    )
    create_server_key(settings, iterations=1000)
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    app = create_app(settings, engine=sqlite_engine, clock=clock)
    with serving(app) as client:
        wait_until(lambda: client.get("/healthz").json()["mqtt"] == "connected", what="ingest connected")
        yield client, clock


def stats(client: httpx.Client) -> dict[str, int]:
    body: dict[str, int] = client.get("/api/v1/ingest/stats").json()["ingest"]
    return body


def settle(client: httpx.Client, received: int) -> dict[str, int]:
    def done() -> bool:
        s = stats(client)
        return s["received"] >= received and s["stored"] + s["duplicates"] + s["rejected"] + s["statuses"] >= received

    wait_until(done, what=f"{received} messages processed")
    return stats(client)


def stored(engine: Engine) -> list[tuple[str, int, str]]:
    with session_factory(engine)() as session:
        rows = session.execute(select(Event.device_id, Event.seq, Event.message_id).order_by(Event.id))
        return [(d, s, str(m)) for d, s, m in rows]


def security_events(engine: Engine) -> list[tuple[str | None, str, int]]:
    with session_factory(engine)() as session:
        rows = session.execute(
            select(SecurityEvent.device_id, SecurityEvent.kind, SecurityEvent.count).order_by(SecurityEvent.id)
        )
        return [(d, k, c) for d, k, c in rows]


def test_frames_are_accepted_and_every_attack_is_refused_and_recorded(
    stack: tuple[httpx.Client, FakeClock], publisher: Publisher, broker: MosquittoBroker, sqlite_engine: Engine
) -> None:
    client, clock = stack
    a = enrol_with_session(client, clock, A)
    b = enrol_with_session(client, clock, B)
    downlinks = Probe(broker.host, broker.port)
    assert downlinks.wait_connected() == "Success"
    assert downlinks.subscribe(TOPICS.downlink(A)) == "Granted QoS 1"
    try:
        # a valid frame is stored, and the uplink_ack comes back sealed under A's session key
        first = env(A, 1)
        good = frame(a, first, clock)
        publisher.publish(TOPICS.uplink(A), good)
        publisher.publish(TOPICS.uplink(A), good)  # repeated inside the window: a duplicate, stored once
        settle(client, 2)
        before = stored(sqlite_engine)
        assert [(d, s) for d, s, _ in before] == [(A, 1)]
        _, raw_ack = downlinks.messages.get(timeout=10)
        header = parse_frame(raw_ack)
        assert (header.direction, header.key_id) == (Direction.DOWNLINK, a.session.key_id)
        ack = decode_downlink(open_frame(a.session.key, A, raw_ack))
        assert isinstance(ack, UplinkAck)
        assert ack.acked_through_seq == 1

        forged_key = SessionKey(uuid.uuid4(), os.urandom(16), clock.now(), clock.now() + timedelta(hours=1))
        tampered = bytearray(frame(a, env(A, 2), clock))
        tampered[-20] ^= 0x01
        header_flip = bytearray(frame(a, env(A, 2), clock))
        header_flip[30] ^= 0x01  # inside the counter
        attacks: list[tuple[str, bytes]] = [
            (
                TOPICS.uplink(A),
                seal_frame(forged_key, A, Direction.UPLINK, 2, env(A, 2).to_bytes(), sent_at=clock.now()),
            ),
            (TOPICS.uplink(A), b"YBS1U" + os.urandom(80)),  # random bytes with a plausible magic
            (TOPICS.uplink(A), bytes(tampered)),
            (TOPICS.uplink(A), bytes(header_flip)),
            (TOPICS.uplink(B), frame(a, env(A, 3), clock)),  # A's frame on B's topic
            (TOPICS.uplink(B), frame(a, env(B, 3), clock)),  # ...even claiming to be B inside
            (TOPICS.uplink(A), env(A, 4).to_bytes()),  # plaintext from an enrolled device (downgrade)
            (TOPICS.uplink(A), frame(a, env(A, 5), clock, counter=6)),  # counter != seq
            (
                TOPICS.uplink(A),
                seal_frame(a.session, A, Direction.DOWNLINK, 7, env(A, 7).to_bytes(), sent_at=clock.now()),
            ),
        ]
        bad_record = sign_device_record(
            SM2PrivateKey.generate(), device_id=A, key_epoch=1, record_type=SignedRecordKind.SIGN_IN, record={"x": 1}
        )
        good_record = sign_device_record(
            a.identity, device_id=A, key_epoch=1, record_type=SignedRecordKind.SIGN_IN, record={"operator": "op-7"}
        )
        attacks.append((TOPICS.uplink(A), frame(a, env(A, 8, bad_record), clock)))
        for topic, payload in attacks:
            publisher.publish(topic, payload)
        publisher.publish(TOPICS.uplink(A), frame(a, env(A, 9, good_record), clock))
        settle(client, 2 + len(attacks) + 1)
        assert [(d, s) for d, s, _ in stored(sqlite_engine)] == [(A, 1), (A, 9)]

        # replay after the window: the first frame again, 601 s later
        clock.advance(601)
        publisher.publish(TOPICS.uplink(A), good)
        # B's session still works; then B is revoked and its next frame refused
        publisher.publish(TOPICS.uplink(B), frame(b, env(B, 1), clock))
        settle(client, 2 + len(attacks) + 3)
        resp = client.post(f"/api/v1/provisioning/devices/{B}/revoke", json={"reason": "test"})
        assert resp.status_code == 200
        publisher.publish(TOPICS.uplink(B), frame(b, env(B, 2), clock))
        final = settle(client, 2 + len(attacks) + 4)
    finally:
        downlinks.close()

    after = stored(sqlite_engine)
    assert [(d, s) for d, s, _ in after] == [(A, 1), (A, 9), (B, 1)]
    assert after[0] == before[0]  # already-stored data untouched
    assert final["security_refused"] == len(attacks) + 2
    assert final["duplicates"] == 1
    # one row per device and kind per ingest batch: the attacks may have been split over batches
    totals: Counter[tuple[str | None, str]] = Counter()
    for d, k, c in security_events(sqlite_engine):
        totals[(d, k)] += c
    kinds = sorted((d, k, c) for (d, k), c in totals.items())
    assert kinds == sorted(
        [
            (A, "unknown_key", 1),
            (A, "tampered", 4),  # random bytes do not even parse as a frame: refused as tampered
            (B, "other_device", 2),
            (A, "plaintext_refused", 1),
            (A, "seq_mismatch", 1),
            (A, "bad_signature", 1),
            (A, "replayed", 1),
            (B, "revoked", 1),
        ]
    ), kinds


def test_refusals_reach_the_audit_chain(
    stack: tuple[httpx.Client, FakeClock], publisher: Publisher, sqlite_engine: Engine, tmp_path: Any
) -> None:
    client, clock = stack
    enrol_with_session(client, clock, A)
    publisher.publish(TOPICS.uplink(A), env(A, 1).to_bytes())  # plaintext from an enrolled device
    settle(client, 1)
    wait_until(lambda: len(security_events(sqlite_engine)) == 1, what="the refusal to be recorded")
    audit_dir = tmp_path / "server-data" / "audit"
    report = verify_chain(audit_dir / "server-audit.jsonl", load_chain_key(audit_dir / "chain.key"))
    assert report.ok
    lines = (audit_dir / "server-audit.jsonl").read_text().splitlines()
    types = [line.split('"type":"')[1].split('"')[0] for line in lines]
    assert types == ["device.registered", "device.enrolled", "security.refused"]
    assert "claim_token" not in (audit_dir / "server-audit.jsonl").read_text()


def test_required_uplink_security_refuses_plaintext_from_anyone(
    broker: MosquittoBroker, sqlite_engine: Engine, sqlite_url: str, publisher: Publisher
) -> None:
    settings = ServerSettings(
        database_url=sqlite_url,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_client_id=f"test-ingest-{secrets.token_hex(4)}",
        ingest_flush_interval_s=0.02,
        uplink_security="required",
    )
    app = create_app(settings, engine=sqlite_engine)
    with serving(app) as client:
        wait_until(lambda: client.get("/healthz").json()["mqtt"] == "connected", what="ingest connected")
        publisher.publish(TOPICS.uplink("kiosk-803"), env("kiosk-803", 1).to_bytes())
        final = settle(client, 1)
        assert final["security_refused"] == 1
        assert client.get("/api/v1/devices/kiosk-803").status_code == 404  # not even auto-registered
    assert stored(sqlite_engine) == []
    assert security_events(sqlite_engine) == [("kiosk-803", "plaintext_refused", 1)]
