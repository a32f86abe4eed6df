"""The terminal's side of message security: the server's device API over HTTPS, enrolment and key rotation, the
session-key manager, and the sealer/opener the sync loop uses for every MQTT frame.

Owns:

* `DeviceApi` (Protocol) and `HttpDeviceApi` (httpx): enrol, rotate, open a session. httpx errors are translated
  once, here, into `ServerUnreachableError` / `ServerRefusedError` (with the HTTP status).
* `enrol_device` / `rotate_identity`: the device-side steps of docs/identity.md, on an `IdentityStore`.
* `SessionManager`: holds the current session key (sealed on disk through the store, so it survives a restart),
  runs the SM2-authenticated handshake (`protocol.secure.start_session` / `accept_grant`) on its own thread when
  there is no valid key, when `rotate_after_s` passed, on a `rotate_keys` command, or when the server stops
  acknowledging what we send (its refusal of a key is silent on MQTT); it backs off while the server is away.
  Offline-first: without a key nothing is published, and records wait in the outbox.
* `SessionSealer` / `SessionOpener`: the `terminal.sync.Sealer` and `FrameOpener` for an enrolled device.

It must never log or persist a key unsealed, never publish a plaintext record once enrolled, and never accept a
downlink frame that does not open under one of our session keys or is outside the replay window.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from protocol import Clock, ContractError
from protocol.enrolment import (
    EnrolCode,
    EnrolRequest,
    EnrolResponse,
    RotateRequest,
    make_enrol_request,
    make_rotate_request,
)
from protocol.gm.errors import CryptoError, DecryptionFailedError
from protocol.secure import (
    Direction,
    FrameError,
    SessionGrant,
    SessionKey,
    SessionRequest,
    accept_grant,
    freshness_problem,
    is_secure_frame,
    open_frame,
    parse_frame,
    seal_frame,
    start_session,
)
from terminal.config import IdentityConfig, TerminalConfig, load_terminal_config
from terminal.errors import SyncError, TerminalError
from terminal.identity import BundleRefusedError, DeviceIdentity, IdentityStore, SecurityLog, resolve_passphrase

logger = logging.getLogger(__name__)

API_PREFIX: Final = "/api/v1"
RETRY_MIN_S: Final = 1.0
RETRY_MAX_S: Final = 300.0
UNACKED_ROTATION_MIN_S: Final = 300.0
"""At most one rotation per this many seconds because the server stopped acknowledging (it may simply be down)."""
DOWNLINK_MAX_AGE: Final = timedelta(minutes=10)
"""A downlink frame sealed longer ago is refused; the server re-publishes pending commands freshly sealed."""

_M = TypeVar("_M", bound=BaseModel)


# ---------------------------------------------------------------------------------------------------- the API


class DeviceApiError(TerminalError):
    """A device-API call failed."""


class ServerUnreachableError(DeviceApiError):
    """No answer from the server (network, DNS, TLS, timeout)."""


class ServerRefusedError(DeviceApiError):
    """The server answered with an error status; `status` is the HTTP status code."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class DeviceApi(Protocol):
    """The server's device endpoints (tests pass an in-process implementation built on `protocol` functions)."""

    def enrol(self, request: EnrolRequest) -> EnrolResponse: ...

    def rotate(self, request: RotateRequest) -> EnrolResponse: ...

    def open_session(self, request: SessionRequest) -> SessionGrant: ...

    def close(self) -> None:
        """Release connections; idempotent."""
        ...


class HttpDeviceApi:
    """`DeviceApi` over HTTP(S) with httpx."""

    def __init__(self, base_url: str, *, timeout_s: float = 15.0, transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport)

    def enrol(self, request: EnrolRequest) -> EnrolResponse:
        return self._post(f"{API_PREFIX}/provisioning/enrol", request, EnrolResponse)

    def rotate(self, request: RotateRequest) -> EnrolResponse:
        return self._post(f"{API_PREFIX}/provisioning/devices/{request.device_id}/rotate", request, EnrolResponse)

    def open_session(self, request: SessionRequest) -> SessionGrant:
        return self._post(f"{API_PREFIX}/devices/{request.device_id}/sessions", request, SessionGrant)

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: BaseModel, answer: type[_M]) -> _M:
        try:
            resp = self._http.post(path, content=body.model_dump_json(), headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            raise ServerUnreachableError(f"cannot reach the server at {self._http.base_url}: {exc}") from exc
        if resp.status_code >= 400:
            raise ServerRefusedError(
                f"server refused {path} ({resp.status_code}): {_detail(resp)}", status=resp.status_code
            )
        try:
            return answer.model_validate_json(resp.content)
        except ValidationError as exc:
            raise ServerRefusedError(
                f"server sent an answer to {path} that is not a {answer.__name__}", status=502
            ) from exc


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return str(body)[:200]


# ---------------------------------------------------------------------------------------------------- enrolment


def enrol_device(
    store: IdentityStore,
    code: EnrolCode,
    api: DeviceApi,
    *,
    hardware_id: str,
    now: datetime,
    log: SecurityLog | None = None,
) -> DeviceIdentity:
    """Generate the key here, enrol it with the claim token, pin the server key and store everything.

    A key the server refused is removed at once; a key without a stored bundle (no answer, or an answer that failed
    its checks) is replaced by the next enrolment."""
    if store.is_enrolled():
        raise TerminalError(f"{store.directory} already holds an enrolled identity; retire it first (--force)")
    if store.has_key():
        store.discard_unenrolled_key()
    key = store.create_key()
    request = make_enrol_request(
        key, device_id=code.device_id, claim_token=code.claim_token, hardware_id=hardware_id, now=now
    )
    try:
        response = api.enrol(request)
    except ServerRefusedError:
        store.discard_unenrolled_key()
        raise
    identity = store.store_enrolment(
        key, response, device_id=code.device_id, server_fingerprint=code.server_fingerprint
    )
    if log is not None:
        log.record(
            "identity.enrolled",
            device_id=identity.device_id,
            key_epoch=identity.key_epoch,
            server_fingerprint=identity.server_key.fingerprint(),
            device_fingerprint=key.public_key.fingerprint(),
        )
    return identity


def rotate_identity(
    store: IdentityStore, api: DeviceApi, *, now: datetime, log: SecurityLog | None = None
) -> DeviceIdentity:
    """A new identity key (epoch + 1) signed over by the current one; new bundle and broker password stored."""
    current = store.load()
    new_key = store.begin_rotation()
    request = make_rotate_request(
        current.private_key, new_key, device_id=current.device_id, key_epoch=current.key_epoch, now=now
    )
    response = api.rotate(request)
    identity = store.complete_rotation(current, new_key, response)
    if log is not None:
        log.record(
            "identity.rotated",
            device_id=identity.device_id,
            key_epoch=identity.key_epoch,
            device_fingerprint=new_key.public_key.fingerprint(),
        )
    return identity


# ---------------------------------------------------------------------------------------------------- sessions


@dataclass(frozen=True, slots=True)
class SessionStats:
    handshakes: int
    failures: int
    key_id: str | None
    expires_at: datetime | None


class SessionManager:
    """The current session key and when to get a new one; see the module docstring."""

    def __init__(
        self,
        identity: DeviceIdentity,
        store: IdentityStore | None,
        api: DeviceApi,
        clock: Clock,
        *,
        log: SecurityLog | None = None,
        retry_min_s: float = RETRY_MIN_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        """`store` None keeps keys only in memory (the fleet simulator)."""
        self.identity = identity
        self._store = store
        self._api = api
        self._clock = clock
        self._log = log
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._lock = threading.Lock()
        self._current: SessionKey | None = None
        self._previous: SessionKey | None = None
        self._rotation_reason: str | None = None
        self._next_attempt = 0.0
        self._delay = retry_min_s
        self._last_unacked_rotation: float | None = None
        self._failing = False
        self._handshakes = 0
        self._failures = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_new_key: Callable[[SessionKey], None] | None = None
        if store is not None:
            self._current = store.load_session()

    def replace_api(self, api: DeviceApi) -> None:
        """Talk to the server through `api` from now on (the fleet simulator closes its enrolment clients)."""
        self._api = api

    @property
    def rotate_after(self) -> timedelta:
        return timedelta(seconds=self.identity.bundle.session.rotate_after_s)

    def current(self) -> SessionKey | None:
        """The key to seal with now, or None (expired or never agreed)."""
        with self._lock:
            key = self._current
        if key is None or key.expired(self._clock.now()):
            return None
        return key

    def key_for(self, key_id: object) -> SessionKey | None:
        """Our current or previous key with this id (downlink frames sealed just before a rotation still open)."""
        with self._lock:
            for key in (self._current, self._previous):
                if key is not None and key.key_id == key_id:
                    return key
        return None

    def due(self) -> str | None:
        """Why a handshake is needed now, or None."""
        now = self._clock.now()
        with self._lock:
            key, reason = self._current, self._rotation_reason
        if key is None:
            return "no session key"
        if key.expired(now):
            return "session key expired"
        if reason is not None:
            return reason
        if now - key.issued_at >= self.rotate_after:
            return "rotate_after_s reached"
        return None

    def request_rotation(self, reason: str) -> None:
        """Ask for a new key as soon as possible (a `rotate_keys` command, an operator)."""
        with self._lock:
            self._rotation_reason = reason
            self._next_attempt = 0.0
            self._delay = self._retry_min_s
        if self._log is not None:
            self._log.record("session.rotation_requested", reason=reason[:100])
        self._wake.set()

    def unacknowledged(self, count: int) -> None:
        """The server did not acknowledge `count` records in time: perhaps it refuses our key. Rotate, but not more
        than once per `UNACKED_ROTATION_MIN_S` (the server may just be down)."""
        now = self._clock.monotonic()
        if self.current() is None:
            return
        if self._last_unacked_rotation is not None and now - self._last_unacked_rotation < UNACKED_ROTATION_MIN_S:
            return
        self._last_unacked_rotation = now
        self.request_rotation(f"{count} record(s) not acknowledged by the server")

    def maintain(self) -> bool:
        """One step: handshake if one is due and the back-off allows. True when a valid key is held afterwards."""
        reason = self.due()
        if reason is None:
            return True
        if self._clock.monotonic() < self._next_attempt:
            return self.current() is not None
        try:
            self.handshake(reason)
        except (DeviceApiError, CryptoError) as exc:
            self._failures += 1
            self._next_attempt = self._clock.monotonic() + self._delay
            self._delay = min(self._retry_max_s, self._delay * 2)
            if not self._failing:
                self._failing = True
                logger.warning("session: handshake failed (%s); retrying with back-off", exc)
                if self._log is not None:
                    self._log.record("session.handshake_failed", reason=str(exc)[:200])
        return self.current() is not None

    def handshake(self, reason: str = "requested") -> SessionKey:
        identity = self.identity
        request, ephemeral = start_session(
            identity.private_key, device_id=identity.device_id, key_epoch=identity.key_epoch, now=self._clock.now()
        )
        grant = self._api.open_session(request)
        key = accept_grant(
            grant, request, ephemeral, device_key=identity.private_key.public_key, server_key=identity.server_key
        )
        if self._store is not None:
            self._store.save_session(key)
        with self._lock:
            self._previous, self._current = self._current, key
            self._rotation_reason = None
            self._delay = self._retry_min_s
            self._next_attempt = 0.0
            self._handshakes += 1
        if self._failing:
            self._failing = False
            logger.info("session: handshake works again")
        logger.info("session: new session key %s (%s), valid until %s", key.key_id, reason, key.expires_at)
        if self._log is not None:
            self._log.record("session.established", key_id=str(key.key_id), reason=reason[:100])
        if self.on_new_key is not None:
            self.on_new_key(key)
        return key

    def stats(self) -> SessionStats:
        with self._lock:
            key = self._current
        return SessionStats(
            self._handshakes,
            self._failures,
            None if key is None else str(key.key_id),
            None if key is None else key.expires_at,
        )

    # -- thread

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="session", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and close the API client (the manager is done)."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
        self._api.close()

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = self._clock.monotonic() + timeout_s
        while self.current() is None:
            if self._clock.monotonic() >= deadline:
                return False
            self._wake.set()
            self._stopping.wait(0.05)
        return True

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.maintain()
            except Exception:  # the key keeper must outlive a surprise; delivery waits meanwhile
                logger.exception("session: unexpected error")
            self._wake.wait(1.0)
            self._wake.clear()


# ---------------------------------------------------------------------------------------------------- frames


class NoSessionKeyError(SyncError):
    """No valid session key yet: the record stays in the outbox until the handshake succeeds."""


class SessionSealer:
    """`terminal.sync.Sealer` of an enrolled device: every uplink frame under the current session key, its counter
    the record's outbox seq, sealed at publish time (so a backlog goes out under a fresh key and `sent_at`)."""

    def __init__(self, manager: SessionManager, *, clock: Clock) -> None:
        self._manager = manager
        self._clock = clock
        self._device_id = manager.identity.device_id

    def ready(self) -> bool:
        return self._manager.current() is not None

    def seal(self, seq: int, wire: bytes) -> bytes:
        key = self._manager.current()
        if key is None:
            raise NoSessionKeyError("no valid session key yet")
        return seal_frame(key, self._device_id, Direction.UPLINK, seq, wire, sent_at=self._clock.now())

    def seal_status(self, status: bytes) -> bytes:
        """A status message ('online', the last will) as a frame; the server ignores its counter."""
        return self.seal(0, status)

    def unacknowledged(self, count: int) -> None:
        self._manager.unacknowledged(count)


class SessionOpener:
    """`terminal.sync.FrameOpener` of an enrolled device: plaintext is refused (downgrade), and a frame must open
    under one of our keys, be a downlink frame, and be fresh. Refusals raise `ContractError` and go to the log."""

    def __init__(
        self,
        manager: SessionManager,
        *,
        clock: Clock,
        log: SecurityLog | None = None,
        max_age: timedelta = DOWNLINK_MAX_AGE,
    ) -> None:
        self._manager = manager
        self._clock = clock
        self._log = log
        self._max_age = max_age
        self._device_id = manager.identity.device_id

    def open(self, raw: bytes) -> bytes:
        try:
            return self._open(raw)
        except ContractError as exc:
            if self._log is not None:
                self._log.record("downlink.refused", reason=str(exc)[:200], size=len(raw))
            raise

    def _open(self, raw: bytes) -> bytes:
        if not is_secure_frame(raw):
            raise ContractError("plaintext downlink refused: this device is enrolled, frames must be sealed")
        try:
            header = parse_frame(raw)
        except FrameError as exc:
            raise ContractError(str(exc)) from exc
        if header.direction is not Direction.DOWNLINK:
            raise ContractError("frame is not a downlink frame (reflected?)")
        key = self._manager.key_for(header.key_id)
        if key is None:
            raise ContractError(f"frame sealed under unknown session key {header.key_id}")
        try:
            plaintext = open_frame(key.key, self._device_id, raw)
        except DecryptionFailedError as exc:
            raise ContractError("frame does not open (tampered, or sealed for another device)") from exc
        problem = freshness_problem(header, key, now=self._clock.now(), max_age=self._max_age)
        if problem is not None:
            raise ContractError(f"stale downlink frame: {problem}")
        return plaintext


@dataclass
class TerminalSecurity:
    """What an enrolled terminal adds to its runtime: identity, session keys, the security log."""

    identity: DeviceIdentity
    sessions: SessionManager
    log: SecurityLog
    store: IdentityStore | None = None
    """The identity directory (for keys the runtime opens later, e.g. the face-template key)."""

    def sealer(self, clock: Clock) -> SessionSealer:
        return SessionSealer(self.sessions, clock=clock)

    def opener(self, clock: Clock) -> SessionOpener:
        return SessionOpener(self.sessions, clock=clock, log=self.log)

    def start(self) -> None:
        self.sessions.start()

    def stop(self) -> None:
        self.sessions.stop()
        self.log.close()


def load_terminal(
    config_path: Path,
    *,
    environ: Mapping[str, str],
    clock: Clock,
    api_factory: Callable[[str], DeviceApi] = HttpDeviceApi,
) -> tuple[TerminalConfig, TerminalSecurity | None]:
    """The terminal's config and, for an enrolled device (`[identity]`), its checked identity wired to the server's
    device API at the bundle's `server_url`. A bundle that fails its checks is recorded in the security log and
    raised (`IdentityError`): the terminal must not start on it."""
    loaded: list[tuple[IdentityStore, DeviceIdentity]] = []

    def overlay(section: IdentityConfig) -> Mapping[str, Any]:
        store = IdentityStore(section.dir, resolve_passphrase(section.passphrase_file, environ))
        try:
            identity = store.load()
        except BundleRefusedError as exc:
            refusal_log = SecurityLog.open(section.dir, clock)
            refusal_log.record("config.refused", reason=str(exc)[:300])
            refusal_log.close()
            raise
        loaded.append((store, identity))
        return identity.config_overlay()

    config = load_terminal_config(config_path, overlay=overlay)
    if not loaded:
        return config, None
    store, identity = loaded[0]
    log = SecurityLog.open(store.directory, clock)
    log.record("terminal.identity_loaded", device_id=identity.device_id, key_epoch=identity.key_epoch)
    sessions = SessionManager(identity, store, api_factory(identity.bundle.server_url), clock, log=log)
    return config, TerminalSecurity(identity, sessions, log, store)


__all__ = [
    "DeviceApi",
    "DeviceApiError",
    "HttpDeviceApi",
    "NoSessionKeyError",
    "ServerRefusedError",
    "ServerUnreachableError",
    "SessionManager",
    "SessionOpener",
    "SessionSealer",
    "SessionStats",
    "TerminalSecurity",
    "enrol_device",
    "load_terminal",
    "rotate_identity",
]
