"""Machine callers of the server's HTTP API: HIS clients (`/his/v1`) and terminals (`/device/v1`).

Both sign every request with HMAC-SM3 (`protocol.request_signing`): a HIS client under the secret it was given at
creation (`create_his_client`, shown once, kept sealed), a terminal under its current MQTT session key (the one
ingest already trusts; `SecurityGate.request_key`), so the device API costs no SM2 operation per request.

Owns:

* `create_his_client` / `revoke_his_client` / `list_his_clients` in the caller's transaction;
* `RequestAuthority`: per-process lookups (a HIS client's secret and institution cached for `CACHE_TTL_S`, so a
  revocation is enforced within that time by every process), `authenticate_his_async` (on the event loop) /
  `authenticate_device`, and `claim_nonce`; nonces are spent in
  `sync_server.nonces.NonceStore` (a replay finds the row, whichever process it reaches).

Errors are `RequestAuthError` (401 at the API), `NonceStoreUnavailableError` (503). It must never log a secret, a
signature or a request body.
"""

from __future__ import annotations

import logging
import secrets
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from protocol import Clock
from protocol.gm import sm4
from protocol.gm.errors import CryptoError
from protocol.request_signing import DEFAULT_WINDOW_S, RequestAuthError, SignedRequest, verify_signed_request
from sync_server.db.async_pg import AsyncPostgres
from sync_server.db.models import Device, HisClient, Institution
from sync_server.identity import ServerIdentity
from sync_server.nonces import NonceStore, ReplayedNonceError
from sync_server.security import SecurityGate

logger = logging.getLogger(__name__)

HIS_PREFIX: Final = "X-HIS-"
HIS_CLIENT_HEADER: Final = f"{HIS_PREFIX}Client"
DEVICE_PREFIX: Final = "X-Device-"
DEVICE_ID_HEADER: Final = "X-Device-Id"
"""The device API signs with the session key id as `X-Device-Client`; this header names the device it belongs to."""
HIS_SECRET_PURPOSE: Final = "his-client"  # noqa: S105 - a label bound into the seal, not a secret
CACHE_TTL_S: Final = 5.0
SECRET_BYTES: Final = 32


class UnknownInstitutionError(LookupError):
    """No institution has that code."""


class UnknownHisClientError(LookupError):
    """No HIS client has that id."""


@dataclass(frozen=True, slots=True)
class HisCaller:
    client_id: str
    institution_id: int
    institution_code: str


@dataclass(frozen=True, slots=True)
class DeviceCaller:
    """A terminal authenticated on the device API. `session_key` is the key it signed with: seal anything secret
    in the answer under it (SM4-GCM), and only this device can open it."""

    device_id: str
    key_id: uuid.UUID
    session_key: bytes
    institution_id: int | None

    def seal(self, secret: bytes, aad: bytes = b"") -> str:
        """`secret` sealed (SM4-GCM, hex) for this device only; it opens it with `ServerApi.open_sealed` and the
        key id (send `str(key_id)` along)."""
        return sm4.seal(self.session_key, secret, aad).hex()


@dataclass(frozen=True, slots=True)
class HisClientView:
    client_id: str
    institution_code: str
    label: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None


def create_his_client(
    session: Session, identity: ServerIdentity, *, institution_code: str, label: str, actor: str, now: datetime
) -> tuple[HisClientView, str]:
    """A new HIS client of the institution and its secret (64 hex characters, shown once, never stored in clear)."""
    institution = session.scalar(select(Institution).where(Institution.code == institution_code))
    if institution is None:
        raise UnknownInstitutionError(f"no institution with code {institution_code}")
    client_id = "his-" + secrets.token_hex(8)
    secret = secrets.token_bytes(SECRET_BYTES)
    session.add(
        HisClient(
            client_id=client_id,
            institution_id=institution.id,
            label=label,
            sealed_secret=identity.seal_secret(HIS_SECRET_PURPOSE, client_id, secret),
            created_at=now,
            created_by=actor,
        )
    )
    view = HisClientView(client_id, institution.code, label, now, actor, None)
    return view, secret.hex()


def revoke_his_client(session: Session, client_id: str, *, now: datetime) -> HisClientView:
    row = session.get(HisClient, client_id)
    if row is None:
        raise UnknownHisClientError(f"no HIS client {client_id}")
    if row.revoked_at is None:
        row.revoked_at = now
    return _view(session, row)


def list_his_clients(session: Session) -> list[HisClientView]:
    rows = session.scalars(select(HisClient).order_by(HisClient.created_at, HisClient.client_id)).all()
    return [_view(session, row) for row in rows]


def _view(session: Session, row: HisClient) -> HisClientView:
    code = session.scalar(select(Institution.code).where(Institution.id == row.institution_id)) or ""
    return HisClientView(row.client_id, code, row.label, row.created_at, row.created_by, row.revoked_at)


@dataclass(frozen=True, slots=True)
class _HisClientEntry:
    """What the cache keeps of an unrevoked HIS client (an institution's code never changes)."""

    secret: bytes
    institution_id: int
    institution_code: str


class RequestAuthority:
    """Authenticates signed machine requests for one server process. Thread-safe."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        engine: Engine,
        identity: ServerIdentity,
        security: SecurityGate,
        clock: Clock,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        hot: AsyncPostgres | None = None,
    ) -> None:
        self._sessions = sessions
        self._nonces = NonceStore(engine, clock, keep_s=2 * window_s + 1, hot=hot)
        self._identity = identity
        self._security = security
        self._clock = clock
        self._window_s = window_s
        self._lock = threading.Lock()
        self._his: dict[str, tuple[_HisClientEntry | None, float]] = {}

    # ------------------------------------------------------------------ HIS clients

    def _cached_his_client(self, client_id: str) -> tuple[_HisClientEntry | None] | None:
        """The cached lookup of `client_id` (a 1-tuple: the entry, or None for an unknown or revoked client), or
        None when the cache has no fresh answer."""
        with self._lock:
            hit = self._his.get(client_id)
        if hit is not None and self._clock.monotonic() - hit[1] < CACHE_TTL_S:
            return (hit[0],)
        return None

    def _his_client(self, client_id: str) -> _HisClientEntry | None:
        """The client's secret and institution: cached, else looked up (blocking: from a worker thread)."""
        cached = self._cached_his_client(client_id)
        if cached is not None:
            return cached[0]
        now = self._clock.monotonic()
        with self._sessions() as session:
            hit_row = session.execute(
                select(HisClient, Institution.code)
                .join(Institution, Institution.id == HisClient.institution_id)
                .where(HisClient.client_id == client_id)
            ).first()
            found: _HisClientEntry | None = None
            if hit_row is not None and hit_row[0].revoked_at is None:
                row, code = hit_row
                try:
                    found = _HisClientEntry(
                        self._identity.open_secret(HIS_SECRET_PURPOSE, client_id, row.sealed_secret),
                        row.institution_id,
                        code,
                    )
                except CryptoError:
                    logger.error("the secret of HIS client %s does not open under this server's secret_key", client_id)
        with self._lock:
            if len(self._his) > 10_000:  # forged client ids must not grow memory without bound
                self._his.clear()
            self._his[client_id] = (found, now)
        return found

    def forget_his_client(self, client_id: str) -> None:
        with self._lock:
            self._his.pop(client_id, None)

    async def authenticate_his_async(
        self, headers: Mapping[str, str], *, method: str, path: str, body: bytes
    ) -> HisCaller:
        """Verify a signed HIS request and spend its nonce, on the event loop: a cached client and the nonce claim
        need no worker thread (only a client not seen for `CACHE_TTL_S` is looked up in one)."""
        client_id = headers.get(HIS_CLIENT_HEADER)
        entry: _HisClientEntry | None = None
        if client_id:
            hit = self._cached_his_client(client_id)
            entry = hit[0] if hit is not None else await run_in_threadpool(self._his_client, client_id)
        signed = self._verify_his(headers, entry, method=method, path=path, body=body)
        try:
            await self._nonces.claim_async(f"his:{signed.client_id}", signed.nonce)
        except ReplayedNonceError:
            raise RequestAuthError("replayed_nonce", "the request nonce was already used") from None
        return self._his_caller(signed, entry)

    def _verify_his(
        self, headers: Mapping[str, str], entry: _HisClientEntry | None, *, method: str, path: str, body: bytes
    ) -> SignedRequest:
        """The checks that need no database (shape, time, signature) against the client `entry` looked up for the
        request's client header; the nonce is still unspent."""
        return verify_signed_request(
            HIS_PREFIX,
            headers,
            method=method,
            path=path,
            body=body,
            secret_of=lambda _client_id: None if entry is None else entry.secret,
            now=self._clock.now().timestamp(),
            window_s=self._window_s,
        )

    @staticmethod
    def _his_caller(signed: SignedRequest, entry: _HisClientEntry | None) -> HisCaller:
        if entry is None:  # verify_signed_request refuses a client without a secret; this is its belt
            raise RequestAuthError("unknown_client", "unknown HIS client")
        return HisCaller(signed.client_id, entry.institution_id, entry.institution_code)

    # ------------------------------------------------------------------ devices

    def authenticate_device(self, headers: Mapping[str, str], *, method: str, path: str, body: bytes) -> DeviceCaller:
        device_id = headers.get(DEVICE_ID_HEADER)
        if not device_id:
            raise RequestAuthError("missing_header", f"{DEVICE_ID_HEADER} header is required")
        keys: dict[str, bytes] = {}

        def secret_of(client_id: str) -> bytes | None:
            try:
                key_id = uuid.UUID(client_id)
            except ValueError:
                return None
            key = self._security.request_key(device_id, key_id)
            if key is None:
                return None
            keys[client_id] = key.key
            return key.key

        signed = verify_signed_request(
            DEVICE_PREFIX,
            headers,
            method=method,
            path=path,
            body=body,
            secret_of=secret_of,
            now=self._clock.now().timestamp(),
            window_s=self._window_s,
        )
        self.claim_nonce(f"device:{signed.client_id}", signed.nonce)
        with self._sessions() as session:
            institution_id = session.scalar(select(Device.institution_id).where(Device.device_id == device_id))
        return DeviceCaller(device_id, uuid.UUID(signed.client_id), keys[signed.client_id], institution_id)

    # ------------------------------------------------------------------ nonces

    def claim_nonce(self, caller: str, nonce: str) -> None:
        """Spend a nonce once; `RequestAuthError("replayed_nonce")` when it was already spent."""
        try:
            self._nonces.claim(caller, nonce)
        except ReplayedNonceError:
            raise RequestAuthError("replayed_nonce", "the request nonce was already used") from None
