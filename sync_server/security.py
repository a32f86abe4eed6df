"""Message security in ingest: which MQTT payloads are accepted, refusals recorded, downlinks sealed.

Owns the per-message decision of docs/identity.md ("Frames and replay protection"):

* a secure frame is parsed, its session key found by key id, the key's device checked against the topic's, the
  device and the key checked for revocation, the frame opened (SM4-GCM, associated data = header + the topic's device
  id) and its `sent_at` checked against `uplink_max_age_s` and the key's lifetime; the decrypted envelope's seq must
  equal the frame counter;
* a plaintext envelope is accepted only from a device that is not enrolled, and only when uplink security is
  'optional' (dev);
* a `signed_record` payload is verified against the device's identity key of the record's epoch (retired keys
  included) before it is stored.

Status messages (retained 'online', last will 'offline') follow the same rules except the age limit: a will is sealed
when the terminal connects and published by the broker whenever the connection dies, so only the key's lifetime
bounds it. A replayed status can only repeat a link state the device itself announced.

Lookups go through a snapshot, reloaded when older than `security_cache_ttl_s` (≤ 5 s): the state of every enrolled
or revoked device (any other device is "not enrolled", which is all screening needs) and every session key that has
not expired, opened once per process. Two queries per TTL per worker whatever the message rate, and a revocation made
by any server process is enforced by every ingest worker within the TTL; the process that revokes reloads at once
(`forget_device`). A key id missing from the snapshot (forged, or long expired) is looked up on its own and that
answer cached for the TTL too, so a flood of forged frames costs one query per key id per TTL. Identity keys (for
signed records) never change and are cached for good.

Refusals are returned to ingest as `SecurityRefusal`, recorded in `security_events` in the batch's own transaction
(one row per device and kind per batch, with a count) and appended to the server's audit chain after the commit.
When the database cannot be read, lookups raise `IngestError` (transient): ingest keeps the batch unacknowledged
and classifies it again later, never accepting or refusing a message on a guess. This module must never log or
record plaintext, keys, or a payload's contents.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from protocol import Clock, Envelope
from protocol.evidence import verify_device_record
from protocol.gm.errors import CryptoError, DecryptionFailedError, InvalidSignatureError
from protocol.gm.sm2 import SM2PublicKey
from protocol.payloads import SignedRecord
from protocol.secure import (
    Direction,
    FrameError,
    SessionKey,
    freshness_problem,
    is_secure_frame,
    open_frame,
    parse_frame,
    seal_frame,
)
from sync_server.audit import ServerAudit
from sync_server.db.engine import session_factory
from sync_server.db.models import Device, DeviceKey, DeviceSession, RegistrationState, SecurityEvent
from sync_server.errors import IngestError
from sync_server.identity import ServerIdentity
from sync_server.settings import ServerSettings

logger = logging.getLogger(__name__)

RefusalKind = Literal[
    "unknown_key",
    "other_device",
    "tampered",
    "replayed",
    "stale",
    "revoked",
    "plaintext_refused",
    "seq_mismatch",
    "bad_signature",
]
KEY_LIFETIME_ONLY = timedelta(days=3650)
"""The 'max age' used for status frames: only the key's lifetime limits them (see the module docstring)."""


class SecurityRefusal(Exception):  # noqa: N818 - a verdict carried to ingest, not an error of the server
    """A message refused for security reasons; `kind` is one of docs/identity.md's refusal kinds."""

    def __init__(self, kind: RefusalKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Refused:
    """One refused message, as ingest hands it back for recording."""

    device_id: str | None
    topic: str
    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class Screened:
    """A message that passed: the plaintext to decode, and the frame counter (None for plaintext)."""

    payload: bytes
    counter: int | None


@dataclass(frozen=True, slots=True)
class _KeyInfo:
    device_id: str
    key: SessionKey
    revoked: bool


@dataclass(frozen=True, slots=True)
class _Snapshot:
    states: dict[str, RegistrationState]
    """Enrolled and revoked devices; every other device is treated as not enrolled."""
    keys: dict[uuid.UUID, _KeyInfo]
    """Session keys that have not expired (revoked ones included, flagged)."""
    newest: dict[str, _KeyInfo]
    """Each device's newest unrevoked session key."""
    taken_at: float


class SecurityGate:
    """Thread-safe: the ingest thread screens, the dispatcher thread seals, request threads forget."""

    def __init__(
        self, settings: ServerSettings, engine: Engine, identity: ServerIdentity, *, clock: Clock, audit: ServerAudit
    ) -> None:
        self._settings = settings
        self._sessions = session_factory(engine)
        self._identity = identity
        self._clock = clock
        self._audit = audit
        self._ttl = settings.security_cache_ttl_s
        self._max_age = timedelta(seconds=settings.uplink_max_age_s)
        self._required = settings.effective_uplink_security == "required"
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._opened: dict[uuid.UUID, bytes] = {}
        self._keys: dict[uuid.UUID, tuple[_KeyInfo | None, float]] = {}
        self._identity_keys: dict[tuple[str, int], SM2PublicKey] = {}
        self._downlink_counter = itertools.count(1)

    @classmethod
    def for_settings(cls, settings: ServerSettings, engine: Engine, *, clock: Clock) -> SecurityGate:
        """A gate of its own (own cache, own audit writer): what every ingest worker process has."""
        return cls(settings, engine, ServerIdentity(settings), clock=clock, audit=ServerAudit(settings.data_dir, clock))

    # ------------------------------------------------------------------ cache

    def forget_device(self, device_id: str) -> None:
        """Reload before the next lookup (after a revoke, reset, enrolment or rotation of `device_id`)."""
        with self._lock:
            self._snapshot = None
            self._keys = {k: v for k, v in self._keys.items() if v[0] is None or v[0].device_id != device_id}

    def _fresh(self, taken_at: float) -> bool:
        return self._clock.monotonic() - taken_at < self._ttl

    def _current(self) -> _Snapshot:
        snapshot = self._snapshot
        if snapshot is not None and self._fresh(snapshot.taken_at):
            return snapshot
        with self._reload_lock:  # one reload at a time; the others wait for it
            snapshot = self._snapshot
            if snapshot is not None and self._fresh(snapshot.taken_at):
                return snapshot
            try:
                snapshot = self._load()
            except SQLAlchemyError as exc:
                raise IngestError(f"cannot load device states and session keys: {type(exc).__name__}") from exc
            with self._lock:
                self._snapshot = snapshot
            return snapshot

    def _load(self) -> _Snapshot:
        taken_at = self._clock.monotonic()
        now = self._clock.now()
        with self._sessions() as session:
            found = session.execute(
                select(Device.device_id, Device.registration).where(
                    Device.registration.in_([RegistrationState.ENROLLED, RegistrationState.REVOKED])
                )
            )
            states = {row[0]: row[1] for row in found}
            rows = session.scalars(select(DeviceSession).where(DeviceSession.expires_at > now)).all()
            keys = {info.key.key_id: info for row in rows if (info := self._key_info(row)) is not None}
        with self._lock:  # keep opened secrets only of keys still alive
            self._opened = {key_id: info.key.key for key_id, info in keys.items()}
        newest: dict[str, _KeyInfo] = {}
        for info in keys.values():
            best = newest.get(info.device_id)
            if not info.revoked and (best is None or info.key.issued_at > best.key.issued_at):
                newest[info.device_id] = info
        return _Snapshot(states, keys, newest, taken_at)

    def _state(self, device_id: str) -> RegistrationState | None:
        return self._current().states.get(device_id)

    def _key_info(self, row: DeviceSession) -> _KeyInfo | None:
        secret = self._opened.get(row.key_id)
        if secret is None:
            try:
                secret = self._identity.open_session_key(row.key_id, row.sealed_key)
            except CryptoError:
                logger.error("session key %s does not open under this server's secret_key; ignoring it", row.key_id)
                return None
            self._opened[row.key_id] = secret
        return _KeyInfo(
            row.device_id, SessionKey(row.key_id, secret, row.issued_at, row.expires_at), row.revoked_at is not None
        )

    def _session_key(self, key_id: uuid.UUID) -> _KeyInfo | None:
        found = self._current().keys.get(key_id)
        if found is not None:
            return found
        with self._lock:
            hit = self._keys.get(key_id)
            if hit is not None and self._fresh(hit[1]):
                return hit[0]
        try:
            with self._sessions() as session:  # not in the snapshot: forged, or expired
                row = session.get(DeviceSession, key_id)
                info = self._key_info(row) if row is not None else None
        except SQLAlchemyError as exc:
            raise IngestError(f"cannot look up a session key: {type(exc).__name__}") from exc
        with self._lock:
            self._keys[key_id] = (info, self._clock.monotonic())
            if len(self._keys) > 100_000:  # a flood of forged key ids must not grow memory without bound
                self._keys.clear()
        return info

    def _identity_key(self, device_id: str, epoch: int) -> SM2PublicKey | None:
        with self._lock:
            hit = self._identity_keys.get((device_id, epoch))
        if hit is not None:
            return hit  # identity keys never change; retired ones still verify old records
        try:
            with self._sessions() as session:
                text = session.scalar(
                    select(DeviceKey.public_key).where(DeviceKey.device_id == device_id, DeviceKey.key_epoch == epoch)
                )
        except SQLAlchemyError as exc:
            raise IngestError(f"cannot look up an identity key: {type(exc).__name__}") from exc
        if text is None:
            return None
        key = SM2PublicKey.from_hex(text)
        with self._lock:
            self._identity_keys[(device_id, epoch)] = key
        return key

    def request_key(self, device_id: str, key_id: uuid.UUID) -> SessionKey | None:
        """The session key a device signs its device-API requests with (`sync_server.signed_requests`): the device
        is enrolled (not revoked) and the key is its own, unrevoked and unexpired; None otherwise. Raises
        `IngestError` when the database cannot be read."""
        if self._state(device_id) is not RegistrationState.ENROLLED:
            return None
        info = self._session_key(key_id)
        if info is None or info.revoked or info.device_id != device_id or info.key.expired(self._clock.now()):
            return None
        return info.key

    # ------------------------------------------------------------------ uplinks

    def screen(self, device_id: str, raw: bytes, *, status: bool = False) -> Screened:
        """The plaintext of a message on `device_id`'s uplink (or status) topic, or `SecurityRefusal`."""
        if not is_secure_frame(raw):
            state = self._state(device_id)
            if state is RegistrationState.REVOKED:
                raise SecurityRefusal("revoked", "device is revoked")
            if state is RegistrationState.ENROLLED:
                raise SecurityRefusal("plaintext_refused", "enrolled devices must send secure frames")
            if self._required:
                raise SecurityRefusal("plaintext_refused", "uplink security is required on this server")
            return Screened(raw, None)
        try:
            header = parse_frame(raw)
        except FrameError as exc:
            raise SecurityRefusal("tampered", str(exc)) from exc
        if header.direction is not Direction.UPLINK:
            raise SecurityRefusal("tampered", "a downlink frame on an uplink topic")
        info = self._session_key(header.key_id)
        if info is None:
            raise SecurityRefusal("unknown_key", "key id unknown to the server")
        if info.device_id != device_id:
            raise SecurityRefusal("other_device", f"key belongs to device {info.device_id}")
        if info.revoked or self._state(device_id) is not RegistrationState.ENROLLED:
            raise SecurityRefusal("revoked", "device or session key revoked")
        try:
            plaintext = open_frame(info.key.key, device_id, raw)
        except DecryptionFailedError as exc:
            raise SecurityRefusal("tampered", "authentication tag does not verify") from exc
        problem = freshness_problem(
            header, info.key, now=self._clock.now(), max_age=KEY_LIFETIME_ONLY if status else self._max_age
        )
        if problem is not None:
            kind: RefusalKind = "replayed" if "ago" in problem else "stale"
            raise SecurityRefusal(kind, problem)
        return Screened(plaintext, header.counter)

    def check_envelope(self, envelope: Envelope, counter: int | None) -> None:
        """Checks that need the decoded envelope: counter == seq, and a signed record's signature."""
        if counter is not None and envelope.seq != counter:
            raise SecurityRefusal("seq_mismatch", f"frame counter {counter} but envelope seq {envelope.seq}")
        payload = envelope.payload
        if isinstance(payload, SignedRecord):
            key = self._identity_key(envelope.device_id, payload.key_epoch)
            if key is None:
                raise SecurityRefusal("bad_signature", f"signed record names key epoch {payload.key_epoch}, unknown")
            try:
                verify_device_record(payload, device_id=envelope.device_id, device_key=key)
            except InvalidSignatureError as exc:
                raise SecurityRefusal("bad_signature", "signed record does not verify") from exc

    # ------------------------------------------------------------------ recording

    def record(self, session: Session, refused: Sequence[Refused]) -> None:
        """Add the batch's refusals to `security_events` (one row per device and kind), in the caller's txn."""
        now = self._clock.now()
        for (device_id, kind, topic, detail), count in _aggregate(refused).items():
            session.add(
                SecurityEvent(
                    at=now, device_id=device_id, kind=kind, detail=detail[:300], topic=topic[:200], count=count
                )
            )

    def after_commit(self, refused: Sequence[Refused]) -> None:
        """Audit-chain entries and log lines for the batch's refusals (after they were stored)."""
        for (device_id, kind, topic, detail), count in _aggregate(refused).items():
            self._audit.record(
                "security.refused", device_id=device_id, kind=kind, topic=topic, count=count, detail=detail
            )
            logger.warning("refused %d message(s) on %s: %s: %s", count, topic, kind, detail)

    # ------------------------------------------------------------------ downlinks

    def seal_downlink(self, device_id: str, payload: bytes) -> bytes | None:
        """What to publish on `device_id`'s downlink: a frame under its newest valid session key if it is enrolled,
        the plaintext if it is not, None (hold it) if it is enrolled without a valid key, or revoked."""
        snapshot = self._current()
        state = snapshot.states.get(device_id)
        if state is RegistrationState.REVOKED:
            return None
        if state is not RegistrationState.ENROLLED:
            return payload
        info = snapshot.newest.get(device_id)
        now = self._clock.now()
        if info is None or info.revoked or info.key.expired(now):
            return None
        return seal_frame(info.key, device_id, Direction.DOWNLINK, next(self._downlink_counter), payload, sent_at=now)


def _aggregate(refused: Sequence[Refused]) -> Counter[tuple[str | None, str, str, str]]:
    """(device, kind) → count, keeping the first topic and detail seen for the pair."""
    first: dict[tuple[str | None, str], tuple[str, str]] = {}
    counts: Counter[tuple[str | None, str]] = Counter()
    for r in refused:
        pair = (r.device_id, r.kind)
        first.setdefault(pair, (r.topic, r.detail))
        counts[pair] += 1
    return Counter({(d, k, *first[(d, k)]): n for (d, k), n in counts.items()})
