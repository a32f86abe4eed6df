"""Signed machine requests over real HTTP (`sync_server.signed_requests`): HIS clients on /his/v1 and terminals on
the device API (/device/v1), on SQLite and PostgreSQL. A forged, tampered, stale, replayed, unknown or revoked
request gets 401 with a machine-readable code and changes nothing; the terminal's `ServerApi` client signs what the
server accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select

from protocol.gm import sm4
from protocol.request_signing import RequestAuthError, sign_request, verify_signed_request
from sync_server.app import create_app
from sync_server.audit import ServerAudit
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.migrate import upgrade
from sync_server.db.models import HisClient, RequestNonce
from sync_server.identity import ServerIdentity, create_server_key
from sync_server.security import SecurityGate
from sync_server.settings import ServerSettings
from sync_server.signed_requests import RequestAuthority
from terminal.server_api import ServerApi
from terminal.session import NoSessionKeyError, ServerRefusedError
from tests.sync_server.conftest import INSTITUTION_CODE, T0, FakeClock, seed_fleet, serving
from tests.sync_server.signed_requests import (
    DeviceSigner,
    Enrolled,
    HisSigner,
    enrol_with_session,
    make_his_client,
    signed,
)


@dataclass
class Stack:
    client: httpx.Client
    clock: FakeClock
    engine: Engine
    his: HisSigner
    device: Enrolled


@pytest.fixture
def stack(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[Stack]:
    seed_fleet(engine)
    settings = ServerSettings(database_url=db_url, data_dir=tmp_path)
    create_server_key(settings, iterations=1000)
    clock = FakeClock(T0)
    app = create_app(settings, engine=engine, clock=clock, start_ingest=False)
    with serving(app) as client:
        his = make_his_client(client, INSTITUTION_CODE)
        device = enrol_with_session(client, clock, "kiosk-api-1")
        yield Stack(client, clock, engine, his, device)


def _code(resp: httpx.Response) -> str:
    assert resp.status_code == 401, resp.text
    code: str = resp.json()["detail"]["code"]
    return code


def test_a_his_client_is_who_its_signature_says(stack: Stack) -> None:
    resp = signed(stack.client, stack.his, "GET", "/his/v1/ping", clock=stack.clock, headers={"Authorization": ""})
    assert resp.status_code == 200, resp.text
    assert resp.json()["client_id"] == stack.his.client_id
    assert resp.json()["institution_code"] == INSTITUTION_CODE
    # the secret is stored sealed, never in clear
    with session_factory(stack.engine)() as session:
        row = session.get(HisClient, stack.his.client_id)
        assert row is not None
        assert stack.his.secret not in row.sealed_secret
    listed = stack.client.get("/api/v1/his-clients").json()["items"]
    assert [c["client_id"] for c in listed] == [stack.his.client_id]
    assert "secret" not in listed[0]


def test_forged_tampered_stale_replayed_and_unknown_requests_are_refused(stack: Stack) -> None:
    client, clock, his = stack.client, stack.clock, stack.his
    anonymous = httpx.Client(base_url=str(client.base_url))
    ok = his.headers("GET", "/his/v1/ping", b"", now=clock.now().timestamp())
    assert anonymous.get("/his/v1/ping", headers=ok).status_code == 200
    assert _code(anonymous.get("/his/v1/ping", headers=ok)) == "replayed_nonce"
    assert anonymous.get("/his/v1/ping").status_code == 401  # no headers at all
    forged = HisSigner(his.client_id, b"\x01" * 32, his.institution_code)
    assert _code(signed(anonymous, forged, "GET", "/his/v1/ping", clock=clock)) == "bad_signature"
    unknown = HisSigner("his-doesnotexist00", his.secret, his.institution_code)
    assert _code(signed(anonymous, unknown, "GET", "/his/v1/ping", clock=clock)) == "unknown_client"
    # signed for another path (the query string is part of what is signed)
    headers = his.headers("GET", "/his/v1/ping?x=1", b"", now=clock.now().timestamp())
    assert _code(anonymous.get("/his/v1/ping", headers=headers)) == "bad_signature"
    # a body other than the one signed
    headers = his.headers("POST", "/api/v1/his-clients", b"{}", now=clock.now().timestamp())
    resp = anonymous.post("/api/v1/his-clients", content=b'{"a":1}', headers=headers)
    assert _code(resp) == "bad_signature"
    stale = his.headers("GET", "/his/v1/ping", b"", now=clock.now().timestamp() - 61)
    assert _code(anonymous.get("/his/v1/ping", headers=stale)) == "stale_timestamp"
    # a HIS client reaches no operator route
    resp = signed(anonymous, his, "GET", "/api/v1/devices", clock=clock)
    assert resp.status_code == 403
    anonymous.close()


def test_a_revoked_his_client_is_refused_at_once(stack: Stack) -> None:
    client, clock, his = stack.client, stack.clock, stack.his
    assert signed(client, his, "GET", "/his/v1/ping", clock=clock).status_code == 200
    resp = client.post(f"/api/v1/his-clients/{his.client_id}/revoke")
    assert resp.status_code == 200
    assert resp.json()["revoked_at"] is not None
    assert _code(signed(client, his, "GET", "/his/v1/ping", clock=clock)) == "unknown_client"
    assert client.post("/api/v1/his-clients/his-nosuchclient/revoke").status_code == 404
    assert client.post("/api/v1/his-clients", json={"institution_code": "NOPE", "label": "x"}).status_code == 404


class SteppingClock(FakeClock):
    """Wall and monotonic time both move only when the test says so."""

    def __init__(self) -> None:
        super().__init__(T0)
        self.tick = 1000.0

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        self.tick += seconds

    def monotonic(self) -> float:
        return self.tick


def test_nonces_are_kept_for_twice_the_window_then_pruned(engine: Engine, tmp_path: Path) -> None:
    clock = SteppingClock()
    settings = ServerSettings(data_dir=tmp_path)
    sessions = session_factory(engine)
    identity = ServerIdentity(settings)
    gate = SecurityGate(settings, engine, identity, clock=clock, audit=ServerAudit(tmp_path, clock))
    authority = RequestAuthority(sessions, engine, identity, gate, clock)

    def count() -> int:
        with sessions() as session:
            return session.scalar(select(func.count()).select_from(RequestNonce)) or 0

    authority.claim_nonce("his:a", "nonce-000000000001")
    clock.advance(30)
    authority.claim_nonce("his:a", "nonce-000000000002")
    with pytest.raises(RequestAuthError, match="already used"):
        authority.claim_nonce("his:a", "nonce-000000000001")  # still inside the window: a replay
    authority.claim_nonce("his:b", "nonce-000000000001")  # another caller's nonce space
    assert count() == 3
    clock.advance(100)  # the first nonce is now 130 s old (> 2 x 60 + 1), the others 100 s
    authority.claim_nonce("his:a", "nonce-000000000003")
    assert count() == 3


def test_the_device_api_accepts_the_session_key_and_refuses_everything_else(stack: Stack) -> None:
    client, clock, device = stack.client, stack.clock, stack.device
    me = DeviceSigner(device.device_id, device.session)
    resp = signed(client, me, "GET", "/device/v1/whoami", clock=clock, headers={"Authorization": ""})
    assert resp.status_code == 200, resp.text
    assert resp.json()["device_id"] == device.device_id
    assert resp.json()["key_id"] == str(device.session.key_id)
    other = enrol_with_session(client, clock, "kiosk-api-2")
    # the other device's key, claimed for this device: refused
    impostor = DeviceSigner(device.device_id, other.session)
    assert _code(signed(client, impostor, "GET", "/device/v1/whoami", clock=clock)) == "unknown_client"
    # an operator token is no device
    assert client.get("/device/v1/whoami").status_code == 401
    # revoking the device stops its requests
    assert client.post(f"/api/v1/provisioning/devices/{device.device_id}/revoke", json={"reason": "stolen"}).is_success
    assert _code(signed(client, me, "GET", "/device/v1/whoami", clock=clock)) == "unknown_client"


def test_the_terminal_client_signs_what_the_server_accepts(stack: Stack) -> None:
    device = stack.device
    api = ServerApi(str(stack.client.base_url), device.device_id, lambda: device.session, stack.clock)
    try:
        answer = api.get_json("/device/v1/whoami", {"unused": "参数"})
        assert answer["device_id"] == device.device_id
        # sealed answers open with the key the request was signed with, and only with it
        sealed = sm4.seal(device.session.key, b"template", b"aad").hex()
        assert api.open_sealed(sealed, key_id=str(device.session.key_id), aad=b"aad") == b"template"
        with pytest.raises(NoSessionKeyError):
            api.open_sealed(sealed, key_id="00000000-0000-0000-0000-000000000000", aad=b"aad")
        with pytest.raises(ServerRefusedError) as refused:
            api.get_json("/device/v1/nowhere")
        assert refused.value.status == 404
    finally:
        api.close()
    keyless = ServerApi(str(stack.client.base_url), device.device_id, lambda: None, stack.clock)
    with pytest.raises(NoSessionKeyError):
        keyless.get_json("/device/v1/whoami")
    keyless.close()


def test_the_signing_scheme_is_stable() -> None:
    """A worked example for docs/his-integration.md: these inputs must always give this signature."""
    secret = bytes.fromhex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
    signature = sign_request(secret, "POST", "/his/v1/purchases", "1767225600", "n0nce-0000000000", b'{"a":1}')
    assert len(signature) == 64
    headers = {
        "X-HIS-Client": "his-1",
        "X-HIS-Timestamp": "1767225600",
        "X-HIS-Nonce": "n0nce-0000000000",
        "X-HIS-Signature": signature,
    }
    got = verify_signed_request(
        "X-HIS-",
        headers,
        method="POST",
        path="/his/v1/purchases",
        body=b'{"a":1}',
        secret_of=lambda _c: secret,
        now=1767225600.0,
    )
    assert got.client_id == "his-1"
    with pytest.raises(RequestAuthError, match="Nonce"):
        verify_signed_request(
            "X-HIS-",
            {**headers, "X-HIS-Nonce": "short"},
            method="POST",
            path="/his/v1/purchases",
            body=b'{"a":1}',
            secret_of=lambda _c: secret,
            now=1767225600.0,
        )


def test_the_cli_creates_a_his_client_whose_secret_the_server_accepts(sqlite_url: str, tmp_path: Path) -> None:
    upgrade(sqlite_url)
    engine = create_db_engine(sqlite_url)
    seed_fleet(engine)

    def yibao(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "yibao", "--log-level", "warning", "server", "his-client", "create", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "YIBAO_SERVER_DATABASE_URL": sqlite_url},
        )

    made = yibao("--institution", INSTITUTION_CODE, "--label", "某HIS厂商")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert yibao("--institution", "NO-SUCH", "--label", "x").returncode == 2
    clock = FakeClock(T0)
    app = create_app(ServerSettings(database_url=sqlite_url), engine=engine, clock=clock, start_ingest=False)
    signer = HisSigner(created["client_id"], bytes.fromhex(created["secret"]), INSTITUTION_CODE)
    try:
        with serving(app, admin=False) as client:
            resp = signed(client, signer, "GET", "/his/v1/ping", clock=clock)
            assert resp.status_code == 200, resp.text
            assert resp.json()["institution_code"] == INSTITUTION_CODE
    finally:
        engine.dispose()


def test_a_nul_character_is_refused_before_anything_else(stack: Stack) -> None:
    """No field of ours may hold NUL (PostgreSQL text cannot): refused with 422 on every route, escaped or raw."""
    json_header = {"Content-Type": "application/json"}
    escaped = '{"institution_code": "A\\u0000", "label": "x"}'
    resp = stack.client.post("/api/v1/his-clients", content=escaped.encode(), headers=json_header)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["msg"] == "NUL characters are not accepted"
    raw = '{"institution_code": "A", "label": "x\x00"}'  # not even JSON: a control character in a string
    assert stack.client.post("/api/v1/his-clients", content=raw.encode(), headers=json_header).status_code == 422
    assert stack.client.get("/api/v1/his-clients").json()["items"][0]["client_id"] == stack.his.client_id
    assert len(stack.client.get("/api/v1/his-clients").json()["items"]) == 1
