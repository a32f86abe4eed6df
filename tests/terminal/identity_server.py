"""The server's side of enrolment, rotation and the session handshake, played in-process with the real `protocol`
functions (`check_enrol_proof`, `sign_bundle`, `check_rotate_request`, `grant_session`), so device-side tests run
without the HTTP server. It keeps only what those checks need: claim tokens, enrolled keys by epoch, granted keys."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from protocol import Clock
from protocol.enrolment import (
    BundleMqtt,
    BundleSession,
    ConfigBundle,
    EnrolCode,
    EnrolRequest,
    EnrolResponse,
    RotateRequest,
    check_enrol_proof,
    check_rotate_request,
    sign_bundle,
)
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey
from protocol.secure import SessionGrant, SessionKey, SessionRequest, grant_session
from terminal.session import ServerRefusedError

SERVER_URL = "http://127.0.0.1:9"


@dataclass
class PlayedServer:
    clock: Clock
    server_key: SM2PrivateKey = field(default_factory=SM2PrivateKey.generate)
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    lifetime_s: int = 3600
    rotate_after_s: int = 1800
    tokens: dict[str, str] = field(default_factory=dict)
    keys: dict[str, dict[int, SM2PublicKey]] = field(default_factory=dict)
    granted: dict[uuid.UUID, SessionKey] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    refuse_sessions: bool = False
    handshakes: int = 0

    def register(self, device_id: str) -> EnrolCode:
        token = secrets.token_urlsafe(24)
        self.tokens[token] = device_id
        return EnrolCode(
            server_url=SERVER_URL,
            device_id=device_id,
            claim_token=token,
            server_fingerprint=self.server_key.public_key.fingerprint(),
        )

    def _answer(self, device_id: str, epoch: int, key: SM2PublicKey) -> EnrolResponse:
        bundle = ConfigBundle(
            device_id=device_id,
            key_epoch=epoch,
            device_public_key=key.hex(),
            issued_at=self.clock.now(),
            config_version=f"cfg-{epoch}",
            server_url=SERVER_URL,
            server_public_key=self.server_key.public_key.hex(),
            mqtt=BundleMqtt(host=self.mqtt_host, port=self.mqtt_port, username=device_id),
            session=BundleSession(lifetime_s=self.lifetime_s, rotate_after_s=self.rotate_after_s),
        )
        return EnrolResponse(bundle=sign_bundle(self.server_key, bundle), broker_password=secrets.token_urlsafe(24))

    def enrol(self, request: EnrolRequest) -> EnrolResponse:
        if self.tokens.pop(request.claim_token, None) != request.device_id:
            raise ServerRefusedError("claim token invalid, expired or used", status=401)
        if request.device_id in self.keys:
            raise ServerRefusedError("already enrolled", status=409)
        key = check_enrol_proof(request)
        self.keys[request.device_id] = {1: key}
        return self._answer(request.device_id, 1, key)

    def rotate(self, request: RotateRequest) -> EnrolResponse:
        epochs = self.keys[request.device_id]
        new_key = check_rotate_request(request, epochs[request.key_epoch])
        epochs[request.key_epoch + 1] = new_key
        return self._answer(request.device_id, request.key_epoch + 1, new_key)

    def open_session(self, request: SessionRequest) -> SessionGrant:
        if self.refuse_sessions or request.device_id in self.revoked:
            raise ServerRefusedError("device revoked", status=403)
        device_key = self.keys[request.device_id][request.key_epoch]
        grant, key = grant_session(
            request,
            device_key=device_key,
            server_key=self.server_key,
            now=self.clock.now(),
            lifetime=timedelta(seconds=self.lifetime_s),
        )
        self.granted[key.key_id] = key
        self.handshakes += 1
        return grant

    def close(self) -> None:
        """Nothing to release: the played server lives in this process."""

    def now(self) -> datetime:
        return self.clock.now()
