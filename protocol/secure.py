"""Message security between a terminal and the server: the SM2-authenticated session handshake and SM4-GCM frames.

Owns the wire form of both, and the pure checks on them; where keys live and who may use them belong to the terminal
(`terminal.identity`) and the server (`sync_server.security`). See docs/identity.md for the whole flow.

Handshake (HTTPS, once per session key, low volume so SM2 is fine here):

    terminal                                                     server
    SessionRequest{device_id, key_epoch, eph_T, nonce, requested_at}
        signed with the device's SM2 identity key          --->  checks the signature against the enrolled key of
                                                                 that epoch, the time window and the nonce
                                                           <---  SessionGrant{key_id, eph_S, echo eph_T + nonce,
                                                                 issued_at, expires_at} signed with the server key
    checks the server's signature (pinned key from the signed config bundle) and the echo
    both: K = KDF(ECDH(eph_own, eph_peer) || Z_device || Z_server || info(device_id, key_id))   (protocol.gm.agreement)

Frames (MQTT payloads, every message, no SM2 on this path):

    magic "YBS1" | direction 1 byte ('U' uplink / 'D' downlink) | key_id 16 | counter 8 | sent_at_ms 8 | SM4-GCM box
    box = nonce 12 | ciphertext | tag 16, associated data = the 37 header bytes + UTF-8 device id (taken from the topic)

The uplink counter is the envelope's outbox seq (checked against the decrypted envelope); the downlink counter is the
server's per-key message count. `sent_at` is the sender's clock when it sealed the frame (re-sealed on every resend),
so a captured frame stops being accepted `max_age` after it was sealed. Binding the device id and the direction into
the associated data means a frame cannot be moved to another device's topic or reflected back to its sender.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from protocol.envelope import ContractError, DeviceId
from protocol.gm import sm4
from protocol.gm.agreement import Party, agree_session_key
from protocol.gm.errors import CryptoError, InvalidSignatureError, KeyFormatError
from protocol.gm.records import sign_record, verify_record
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey

SESSION_PURPOSE = "yibao-session-v1"
GRANT_PURPOSE = "yibao-session-grant-v1"
FRAME_MAGIC = b"YBS1"
_HEADER = struct.Struct(">4sc16sQq")
HEADER_SIZE = _HEADER.size  # 37
FRAME_OVERHEAD = HEADER_SIZE + sm4.NONCE_SIZE + sm4.TAG_SIZE
MAX_CLOCK_SKEW = timedelta(minutes=5)
"""How far a peer's clock may run ahead of ours, and how old a handshake request may be."""

PublicKeyHex = Annotated[str, Field(pattern=r"^04[0-9a-f]{128}$", description="Uncompressed SM2 public key, hex.")]
SignatureHex = Annotated[str, Field(pattern=r"^[0-9a-f]{128}$", description="SM2 signature r||s, hex.")]
NonceHex = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="16 random bytes, hex.")]


class FrameError(ContractError):
    """The bytes are not a well-formed secure frame (before any key is involved)."""


class HandshakeError(CryptoError):
    """A session request or grant is not acceptable; the text says why (never key material)."""


class Direction(Enum):
    UPLINK = b"U"
    DOWNLINK = b"D"


# ---------------------------------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class FrameHeader:
    direction: Direction
    key_id: uuid.UUID
    counter: int
    sent_at: datetime

    def pack(self) -> bytes:
        millis = int(self.sent_at.timestamp() * 1000)
        return _HEADER.pack(FRAME_MAGIC, self.direction.value, self.key_id.bytes, self.counter, millis)


@dataclass(frozen=True, slots=True)
class SessionKey:
    """A session key as both sides hold it. `repr` never shows the key."""

    key_id: uuid.UUID
    key: bytes = field(repr=False)
    issued_at: datetime
    expires_at: datetime

    def __post_init__(self) -> None:
        if len(self.key) != sm4.KEY_SIZE:
            raise KeyFormatError(f"a session key is {sm4.KEY_SIZE} bytes, got {len(self.key)}")

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at


def is_secure_frame(raw: bytes) -> bool:
    return raw[:4] == FRAME_MAGIC


def _aad(header_bytes: bytes, device_id: str) -> bytes:
    return header_bytes + device_id.encode("utf-8")


def seal_frame(
    key: SessionKey, device_id: str, direction: Direction, counter: int, plaintext: bytes, *, sent_at: datetime
) -> bytes:
    """Encrypt and authenticate `plaintext` for `device_id`'s topic under `key`."""
    if counter < 0:
        raise ValueError("frame counter must be >= 0")
    header = FrameHeader(direction, key.key_id, counter, sent_at).pack()
    return header + sm4.seal(key.key, plaintext, _aad(header, device_id))


def parse_frame(raw: bytes) -> FrameHeader:
    """The header of a frame, checked for form only (the caller finds the key by `key_id`, then `open_frame`)."""
    if len(raw) < FRAME_OVERHEAD:
        raise FrameError(f"secure frame of {len(raw)} bytes is shorter than the {FRAME_OVERHEAD}-byte minimum")
    magic, direction, key_id, counter, millis = _HEADER.unpack_from(raw)
    if magic != FRAME_MAGIC:
        raise FrameError("not a secure frame (bad magic)")
    try:
        parsed_direction = Direction(direction)
    except ValueError as exc:
        raise FrameError("secure frame has an unknown direction byte") from exc
    try:
        sent_at = datetime.fromtimestamp(millis / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise FrameError("secure frame's sent_at is out of range") from exc
    return FrameHeader(parsed_direction, uuid.UUID(bytes=key_id), counter, sent_at)


def open_frame(key: bytes, device_id: str, raw: bytes) -> bytes:
    """The plaintext of a frame whose header `parse_frame` accepted; `DecryptionFailedError` if it was forged,
    tampered with, sealed under another key, or moved to another device's topic or direction."""
    return sm4.open(key, raw[HEADER_SIZE:], _aad(raw[:HEADER_SIZE], device_id))


def freshness_problem(
    header: FrameHeader, key: SessionKey, *, now: datetime, max_age: timedelta, max_skew: timedelta = MAX_CLOCK_SKEW
) -> str | None:
    """Why a frame is outside the replay window, or None. Call only after `open_frame` succeeded (sent_at is then
    the sealer's own claim, which nobody without the key can change)."""
    if header.sent_at > now + max_skew:
        return "sent_at is in the future beyond the allowed clock skew"
    if now - header.sent_at > max_age:
        return f"sealed more than {max_age.total_seconds():g} s ago (stale or replayed)"
    if header.sent_at < key.issued_at - max_skew:
        return "sealed before its session key was issued"
    if header.sent_at > key.expires_at + max_skew:
        return "sealed after its session key expired"
    return None


# ---------------------------------------------------------------------------------------------------- handshake


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SessionRequest(_Msg):
    """The terminal asks for a session key; signed with its SM2 identity key of `key_epoch`."""

    device_id: DeviceId
    key_epoch: int = Field(ge=1, description="Which of the device's enrolled identity keys signed this.")
    ephemeral_public_key: PublicKeyHex
    nonce: NonceHex
    requested_at: AwareDatetime
    signature: SignatureHex

    def signed_part(self) -> dict[str, Any]:
        return _signed_part(self, SESSION_PURPOSE)


class SessionGrant(_Msg):
    """The server's answer; signed with the server's SM2 key, whose fingerprint the config bundle pins."""

    device_id: DeviceId
    key_id: uuid.UUID
    ephemeral_public_key: PublicKeyHex
    device_ephemeral_public_key: PublicKeyHex
    nonce: NonceHex
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    signature: SignatureHex

    def signed_part(self) -> dict[str, Any]:
        return _signed_part(self, GRANT_PURPOSE)


def _signed_part(message: BaseModel, purpose: str) -> dict[str, Any]:
    body = message.model_dump(mode="json", exclude={"signature"})
    body["purpose"] = purpose
    return body


def _info(device_id: str, key_id: uuid.UUID) -> bytes:
    return f"{SESSION_PURPOSE}|{device_id}|{key_id}".encode()


def start_session(
    identity_key: SM2PrivateKey, *, device_id: str, key_epoch: int, now: datetime
) -> tuple[SessionRequest, SM2PrivateKey]:
    """Terminal side: a signed request and the ephemeral private key to keep until the grant arrives."""
    ephemeral = SM2PrivateKey.generate()
    unsigned = {
        "device_id": device_id,
        "key_epoch": key_epoch,
        "ephemeral_public_key": ephemeral.public_key.to_bytes().hex(),
        "nonce": os.urandom(16).hex(),
        "requested_at": now,
        "signature": "0" * 128,
    }
    draft = SessionRequest.model_validate(unsigned)
    signature = sign_record(identity_key, draft.signed_part())
    return draft.model_copy(update={"signature": signature}), ephemeral


def grant_session(
    request: SessionRequest,
    *,
    device_key: SM2PublicKey,
    server_key: SM2PrivateKey,
    now: datetime,
    lifetime: timedelta,
    key_id: uuid.UUID | None = None,
) -> tuple[SessionGrant, SessionKey]:
    """Server side: check the request (signature by `device_key`, time window), answer it and derive the key.
    Whether the nonce was seen before and whether the device may have a session are the caller's checks."""
    try:
        verify_record(device_key, request.signed_part(), request.signature)
    except InvalidSignatureError as exc:
        raise HandshakeError("session request signature does not verify with the device's enrolled key") from exc
    if request.requested_at > now + MAX_CLOCK_SKEW:
        raise HandshakeError("session request is dated in the future beyond the allowed clock skew")
    if now - request.requested_at > MAX_CLOCK_SKEW:
        raise HandshakeError("session request is too old (stale or replayed)")
    device_ephemeral = SM2PublicKey.from_hex(request.ephemeral_public_key)
    ephemeral = SM2PrivateKey.generate()
    key_id = key_id or uuid.uuid4()
    unsigned = {
        "device_id": request.device_id,
        "key_id": key_id,
        "ephemeral_public_key": ephemeral.public_key.to_bytes().hex(),
        "device_ephemeral_public_key": request.ephemeral_public_key,
        "nonce": request.nonce,
        "issued_at": now,
        "expires_at": now + lifetime,
        "signature": "0" * 128,
    }
    draft = SessionGrant.model_validate(unsigned)
    grant = draft.model_copy(update={"signature": sign_record(server_key, draft.signed_part())})
    secret = agree_session_key(
        ephemeral,
        device_ephemeral,
        initiator=Party(device_key),
        responder=Party(server_key.public_key),
        info=_info(request.device_id, key_id),
    )
    return grant, SessionKey(key_id, secret, grant.issued_at, grant.expires_at)


def accept_grant(
    grant: SessionGrant,
    request: SessionRequest,
    ephemeral: SM2PrivateKey,
    *,
    device_key: SM2PublicKey,
    server_key: SM2PublicKey,
) -> SessionKey:
    """Terminal side: check the server's signature and the echo of our request, then derive the same key."""
    try:
        verify_record(server_key, grant.signed_part(), grant.signature)
    except InvalidSignatureError as exc:
        raise HandshakeError("session grant signature does not verify with the pinned server key") from exc
    if (
        grant.device_id != request.device_id
        or grant.nonce != request.nonce
        or grant.device_ephemeral_public_key != request.ephemeral_public_key
    ):
        raise HandshakeError("session grant answers another request")
    if grant.expires_at <= grant.issued_at:
        raise HandshakeError("session grant expires before it is issued")
    secret = agree_session_key(
        ephemeral,
        SM2PublicKey.from_hex(grant.ephemeral_public_key),
        initiator=Party(device_key),
        responder=Party(server_key),
        info=_info(grant.device_id, grant.key_id),
    )
    return SessionKey(grant.key_id, secret, grant.issued_at, grant.expires_at)


__all__ = [
    "FRAME_MAGIC",
    "FRAME_OVERHEAD",
    "HEADER_SIZE",
    "MAX_CLOCK_SKEW",
    "Direction",
    "FrameError",
    "FrameHeader",
    "HandshakeError",
    "NonceHex",
    "PublicKeyHex",
    "SessionGrant",
    "SessionKey",
    "SessionRequest",
    "SignatureHex",
    "accept_grant",
    "freshness_problem",
    "grant_session",
    "is_secure_frame",
    "open_frame",
    "parse_frame",
    "seal_frame",
    "start_session",
]
