"""Provisioning over HTTP: admin auth, register, enrol, rotate, sessions, reset, revoke; refusals are recorded."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from protocol.enrolment import (
    EnrolCode,
    EnrolResponse,
    make_enrol_request,
    make_rotate_request,
    verify_bundle,
)
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey
from protocol.secure import SessionGrant, accept_grant, start_session
from sync_server.app import create_app
from sync_server.db.engine import session_factory
from sync_server.db.models import AdminToken, ClaimToken, DeviceKey, DeviceSession, SecurityEvent
from sync_server.identity import ServerIdentity, create_server_key, token_digest
from sync_server.provisioning import create_admin_token
from sync_server.settings import ServerSettings
from tests.sync_server.conftest import FakeClock, serving

DEVICE = "kiosk-700"
HW = "board-SN-0001"


@pytest.fixture
def settings(db_url: str) -> ServerSettings:
    s = ServerSettings(database_url=db_url)
    create_server_key(s, iterations=1000)
    return s


@pytest.fixture
def now_clock() -> FakeClock:
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def client(settings: ServerSettings, engine: Engine, now_clock: FakeClock) -> Iterator[httpx.Client]:
    app = create_app(settings, engine=engine, start_ingest=False, clock=now_clock)
    with serving(app) as c:
        yield c


def register(client: httpx.Client, device_id: str = DEVICE, **extra: Any) -> dict[str, Any]:
    resp = client.post("/api/v1/provisioning/devices", json={"device_id": device_id, **extra})
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


def enrol(
    client: httpx.Client, claim: dict[str, Any], key: SM2PrivateKey, clock: FakeClock, *, hw: str = HW
) -> httpx.Response:
    request = make_enrol_request(
        key, device_id=claim["device_id"], claim_token=claim["claim_token"], hardware_id=hw, now=clock.now()
    )
    return client.post("/api/v1/provisioning/enrol", json=request.model_dump(mode="json"))


def server_key(client: httpx.Client) -> SM2PublicKey:
    return SM2PublicKey.from_hex(client.get("/api/v1/server-identity").json()["public_key"])


def events(engine: Engine, device_id: str = DEVICE) -> list[tuple[str, int]]:
    with session_factory(engine).begin() as session:
        rows = session.execute(
            select(SecurityEvent.kind, SecurityEvent.count)
            .where(SecurityEvent.device_id == device_id)
            .order_by(SecurityEvent.id)
        )
        return [(k, c) for k, c in rows]


def test_admin_routes_need_a_valid_bearer_token(client: httpx.Client, engine: Engine) -> None:
    base = str(client.base_url)
    with httpx.Client(base_url=base) as anonymous:
        for method, path in [
            ("POST", "/api/v1/provisioning/devices"),
            ("GET", "/api/v1/provisioning/devices"),
            ("POST", f"/api/v1/provisioning/devices/{DEVICE}/revoke"),
            ("GET", "/api/v1/devices"),
            ("GET", f"/api/v1/devices/{DEVICE}/commands"),
            ("POST", f"/api/v1/devices/{DEVICE}/commands"),
            ("GET", f"/api/v1/commands/{uuid.uuid4()}"),
            ("GET", "/api/v1/institutions"),
        ]:
            resp = anonymous.request(method, path, json={})
            assert resp.status_code == 401, (method, path, resp.text)
            assert "admin authentication required" in resp.json()["detail"]
            assert resp.headers["www-authenticate"] == "Bearer"
            bad = anonymous.request(method, path, json={}, headers={"Authorization": "Bearer nope-" + "x" * 30})
            assert bad.status_code == 401
            assert bad.json()["detail"] == "admin token is not valid (unknown or revoked)"
        # open: health, server identity
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/api/v1/server-identity").status_code == 200
        # a token from the database works until it is revoked
        with session_factory(engine, write_intent=True).begin() as session:
            token = create_admin_token(session, name="ops-alice", now=datetime.now(UTC))
        auth = {"Authorization": f"Bearer {token}"}
        assert anonymous.get("/api/v1/provisioning/devices", headers=auth).status_code == 200
        with session_factory(engine, write_intent=True).begin() as session:
            row = session.scalar(select(AdminToken).where(AdminToken.sha256 == token_digest(token)))
            assert row is not None
            assert row.name == "ops-alice"
            row.revoked_at = datetime.now(UTC)
        assert anonymous.get("/api/v1/provisioning/devices", headers=auth).status_code == 401


def test_register_enrol_and_the_signed_bundle(
    client: httpx.Client, engine: Engine, now_clock: FakeClock, settings: ServerSettings
) -> None:
    claim = register(client, hardware_id=HW)
    assert claim["state"] == "registered"
    assert claim["server_fingerprint"] == server_key(client).fingerprint()
    # the enrol code the CLI prints round-trips
    code = EnrolCode(
        server_url=str(client.base_url),
        device_id=DEVICE,
        claim_token=claim["claim_token"],
        server_fingerprint=claim["server_fingerprint"],
    )
    assert EnrolCode.decode(code.encode()).claim_token == claim["claim_token"]
    assert client.post("/api/v1/provisioning/devices", json={"device_id": DEVICE}).status_code == 409

    key = SM2PrivateKey.generate()
    resp = enrol(client, claim, key, now_clock)
    assert resp.status_code == 200, resp.text
    answer = EnrolResponse.model_validate(resp.json())
    bundle = verify_bundle(answer.bundle.to_bytes(), pinned_server_key=server_key(client), device_id=DEVICE)
    assert bundle.key_epoch == 1
    assert bundle.device_public_key == key.public_key.hex()
    assert (bundle.mqtt.host, bundle.mqtt.port, bundle.mqtt.username) == ("127.0.0.1", 1883, DEVICE)
    assert bundle.session.lifetime_s == settings.session_lifetime_s
    assert bundle.server_url == str(client.base_url).rstrip("/")
    assert len(answer.broker_password) >= 16

    shown = client.get(f"/api/v1/provisioning/devices/{DEVICE}").json()
    assert shown["state"] == "enrolled"
    assert (shown["key_epoch"], shown["fingerprint"], shown["hardware_id"]) == (1, key.public_key.fingerprint(), HW)
    assert shown["online"] is False
    listing = client.get("/api/v1/provisioning/devices").json()
    assert [d["device_id"] for d in listing["items"]] == [DEVICE]

    # the token is single-use: the same message as for an unknown token, and the refusal is recorded
    again = enrol(client, claim, SM2PrivateKey.generate(), now_clock)
    assert again.status_code == 401
    assert again.json() == {"detail": "claim token invalid, expired or already used"}
    forged = enrol(client, {**claim, "claim_token": "A" * 43}, key, now_clock)
    assert forged.json() == {"detail": "claim token invalid, expired or already used"}
    assert events(engine) == [("enrol_refused", 1), ("enrol_refused", 1)]
    with session_factory(engine).begin() as session:
        stored = session.scalars(select(ClaimToken.sha256)).all()
    assert claim["claim_token"] not in stored  # only the digest


def test_enrol_refusals(client: httpx.Client, engine: Engine, now_clock: FakeClock) -> None:
    claim = register(client)
    # expired
    now_clock.advance(86400 + 1)
    assert enrol(client, claim, SM2PrivateKey.generate(), now_clock).status_code == 401
    claim = client.post(f"/api/v1/provisioning/devices/{DEVICE}/reset", json={"reason": "token expired"}).json()
    # bad proof: signed by another key than the one presented
    request = make_enrol_request(
        SM2PrivateKey.generate(),
        device_id=DEVICE,
        claim_token=claim["claim_token"],
        hardware_id=HW,
        now=now_clock.now(),
    )
    tampered = request.model_copy(update={"public_key": SM2PrivateKey.generate().public_key.hex()})
    resp = client.post("/api/v1/provisioning/enrol", json=tampered.model_dump(mode="json"))
    assert resp.status_code == 400
    # the token was not used up by the failed attempt
    assert enrol(client, claim, SM2PrivateKey.generate(), now_clock).status_code == 200
    # already enrolled
    claim2 = register(client, "kiosk-701")
    assert enrol(client, claim2, SM2PrivateKey.generate(), now_clock, hw=HW).status_code == 409  # hardware taken
    assert enrol(client, claim2, SM2PrivateKey.generate(), now_clock, hw="board-SN-0002").status_code == 200
    # bound to other hardware at registration
    claim3 = register(client, "kiosk-702", hardware_id="board-SN-0003")
    assert enrol(client, claim3, SM2PrivateKey.generate(), now_clock, hw="board-SN-0009").status_code == 409
    kinds = [k for k, _ in events(engine)]
    assert kinds == ["enrol_refused", "enrol_refused"]


def handshake(
    client: httpx.Client, key: SM2PrivateKey, clock: FakeClock, *, epoch: int = 1, device_id: str = DEVICE
) -> tuple[httpx.Response, Any]:
    request, ephemeral = start_session(key, device_id=device_id, key_epoch=epoch, now=clock.now())
    resp = client.post(f"/api/v1/devices/{device_id}/sessions", json=request.model_dump(mode="json"))
    return resp, (request, ephemeral)


def test_sessions_rotation_reset_and_revoke(
    client: httpx.Client, engine: Engine, now_clock: FakeClock, settings: ServerSettings
) -> None:
    # not enrolled yet: 403, recorded
    key = SM2PrivateKey.generate()
    claim = register(client)
    resp, _ = handshake(client, key, now_clock)
    assert resp.status_code == 403
    assert enrol(client, claim, key, now_clock).status_code == 200

    resp, (request, ephemeral) = handshake(client, key, now_clock)
    assert resp.status_code == 200, resp.text
    grant = SessionGrant.model_validate(resp.json())
    session_key = accept_grant(grant, request, ephemeral, device_key=key.public_key, server_key=server_key(client))
    # the server stored the same key, sealed
    identity = ServerIdentity(settings)
    with session_factory(engine).begin() as session:
        row = session.get(DeviceSession, grant.key_id)
        assert row is not None
        assert session_key.key not in row.sealed_key
        assert identity.open_session_key(row.key_id, row.sealed_key) == session_key.key
    # the same nonce again: 409
    replay = client.post(f"/api/v1/devices/{DEVICE}/sessions", json=request.model_dump(mode="json"))
    assert replay.status_code == 409
    # signed by another key: 401
    resp, _ = handshake(client, SM2PrivateKey.generate(), now_clock)
    assert resp.status_code == 401

    # rotation: epoch 2, old key retired but kept; sessions with the old key refused
    new_key = SM2PrivateKey.generate()
    rotate = make_rotate_request(key, new_key, device_id=DEVICE, key_epoch=1, now=now_clock.now())
    resp = client.post(f"/api/v1/provisioning/devices/{DEVICE}/rotate", json=rotate.model_dump(mode="json"))
    assert resp.status_code == 200, resp.text
    bundle = verify_bundle(
        EnrolResponse.model_validate(resp.json()).bundle.to_bytes(), pinned_server_key=server_key(client)
    )
    assert bundle.key_epoch == 2
    assert handshake(client, key, now_clock, epoch=1)[0].status_code == 401
    assert handshake(client, new_key, now_clock, epoch=2)[0].status_code == 200
    replayed_rotation = client.post(
        f"/api/v1/provisioning/devices/{DEVICE}/rotate", json=rotate.model_dump(mode="json")
    )
    assert replayed_rotation.status_code == 409

    # revoke: sessions refused (403), every session row revoked
    resp = client.post(f"/api/v1/provisioning/devices/{DEVICE}/revoke", json={"reason": "stolen"})
    assert resp.status_code == 200
    body = resp.json()
    assert (body["state"], body["broker"]) == ("revoked", "not managed")
    assert handshake(client, new_key, now_clock, epoch=2)[0].status_code == 403
    with session_factory(engine).begin() as session:
        assert all(r.revoked_at is not None for r in session.scalars(select(DeviceSession)))

    # reset: registered again, new claim, keys retired; re-enrolment gets the next epoch
    claim = client.post(f"/api/v1/provisioning/devices/{DEVICE}/reset", json={"reason": "repaired"}).json()
    assert claim["state"] == "registered"
    assert enrol(client, claim, SM2PrivateKey.generate(), now_clock).status_code == 200
    shown = client.get(f"/api/v1/provisioning/devices/{DEVICE}").json()
    assert (shown["state"], shown["key_epoch"]) == ("enrolled", 3)
    with session_factory(engine).begin() as session:
        epochs = [(k.key_epoch, k.retired_at is not None) for k in session.scalars(select(DeviceKey))]
    assert sorted(epochs) == [(1, True), (2, True), (3, False)]
    assert [k for k, _ in events(engine)] == [
        "not_enrolled",
        "nonce_reused",
        "bad_signature",
        "bad_signature",
        "rotate_refused",
        "not_enrolled",
    ]


def test_unknown_device_operations_are_404(client: httpx.Client) -> None:
    assert client.post("/api/v1/provisioning/devices/nobody-1/revoke", json={"reason": "x"}).status_code == 404
    assert client.post("/api/v1/provisioning/devices/nobody-1/reset", json={"reason": "x"}).status_code == 404
    assert client.get("/api/v1/provisioning/devices/nobody-1").status_code == 404
