"""Test helpers for the server's machine callers: an enrolled device with a session key (the device API signs with
it), a HIS client created through the admin API, and signed requests for both (`protocol.request_signing`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from protocol import Clock
from protocol.enrolment import make_enrol_request
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey
from protocol.request_signing import signed_headers
from protocol.secure import SessionGrant, SessionKey, accept_grant, start_session
from tests.sync_server.conftest import ADMIN_HEADERS

HIS_PREFIX = "X-HIS-"
DEVICE_PREFIX = "X-Device-"


@dataclass
class Enrolled:
    device_id: str
    identity: SM2PrivateKey
    session: SessionKey


def enrol_with_session(
    client: httpx.Client, clock: Clock, device_id: str, *, admin_headers: dict[str, str] | None = None
) -> Enrolled:
    """Register (as admin), enrol (as the device) and open a session, over the real HTTP API."""
    headers = ADMIN_HEADERS if admin_headers is None else admin_headers
    claim = client.post("/api/v1/provisioning/devices", json={"device_id": device_id}, headers=headers).json()
    key = SM2PrivateKey.generate()
    request = make_enrol_request(
        key, device_id=device_id, claim_token=claim["claim_token"], hardware_id=f"hw-{device_id}", now=clock.now()
    )
    assert client.post("/api/v1/provisioning/enrol", json=request.model_dump(mode="json")).status_code == 200
    server_key = SM2PublicKey.from_hex(client.get("/api/v1/server-identity").json()["public_key"])
    handshake, ephemeral = start_session(key, device_id=device_id, key_epoch=1, now=clock.now())
    resp = client.post(f"/api/v1/devices/{device_id}/sessions", json=handshake.model_dump(mode="json"))
    assert resp.status_code == 200, resp.text
    grant = SessionGrant.model_validate(resp.json())
    return Enrolled(
        device_id, key, accept_grant(grant, handshake, ephemeral, device_key=key.public_key, server_key=server_key)
    )


@dataclass(frozen=True)
class HisSigner:
    client_id: str
    secret: bytes
    institution_code: str

    def headers(self, method: str, target: str, body: bytes, *, now: float) -> dict[str, str]:
        return signed_headers(HIS_PREFIX, self.client_id, self.secret, method, target, body, now=now)


@dataclass(frozen=True)
class DeviceSigner:
    device_id: str
    session: SessionKey

    def headers(self, method: str, target: str, body: bytes, *, now: float) -> dict[str, str]:
        headers = signed_headers(
            DEVICE_PREFIX, str(self.session.key_id), self.session.key, method, target, body, now=now
        )
        headers["X-Device-Id"] = self.device_id
        return headers


Signer = HisSigner | DeviceSigner


def make_his_client(
    client: httpx.Client, institution_code: str, *, admin_headers: dict[str, str] | None = None, label: str = "测试HIS"
) -> HisSigner:
    resp = client.post(
        "/api/v1/his-clients",
        json={"institution_code": institution_code, "label": label},
        headers=ADMIN_HEADERS if admin_headers is None else admin_headers,
    )
    assert resp.status_code == 201, resp.text
    answer = resp.json()
    return HisSigner(answer["client_id"], bytes.fromhex(answer["secret"]), institution_code)


def signed(
    client: httpx.Client,
    signer: Signer,
    method: str,
    target: str,
    *,
    clock: Clock,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One signed request; `target` is the path with its query string, exactly as sent."""
    body = b"" if json_body is None else json.dumps(json_body, ensure_ascii=False).encode()
    sent = {**(headers or {}), **signer.headers(method, target, body, now=clock.now().timestamp())}
    if json_body is not None:
        sent["Content-Type"] = "application/json"
    return client.request(method, target, content=body, headers=sent)
