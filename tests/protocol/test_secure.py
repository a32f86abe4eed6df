"""The session handshake and SM4-GCM frames: both sides derive one key; forged, tampered, moved, reflected and stale
frames are refused."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from protocol.gm.errors import DecryptionFailedError
from protocol.gm.sm2 import SM2PrivateKey
from protocol.secure import (
    FRAME_OVERHEAD,
    Direction,
    FrameError,
    HandshakeError,
    SessionKey,
    accept_grant,
    freshness_problem,
    grant_session,
    is_secure_frame,
    open_frame,
    parse_frame,
    seal_frame,
    start_session,
)

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
DEVICE = "SIM-0001"


@pytest.fixture(scope="module")
def keys() -> tuple[SM2PrivateKey, SM2PrivateKey]:
    return SM2PrivateKey.generate(), SM2PrivateKey.generate()


def handshake(device_key: SM2PrivateKey, server_key: SM2PrivateKey) -> tuple[SessionKey, SessionKey]:
    request, ephemeral = start_session(device_key, device_id=DEVICE, key_epoch=1, now=NOW)
    grant, server_side = grant_session(
        request, device_key=device_key.public_key, server_key=server_key, now=NOW, lifetime=timedelta(hours=24)
    )
    device_side = accept_grant(
        grant, request, ephemeral, device_key=device_key.public_key, server_key=server_key.public_key
    )
    return device_side, server_side


def test_both_sides_derive_the_same_fresh_key(keys: tuple[SM2PrivateKey, SM2PrivateKey]) -> None:
    device_side, server_side = handshake(*keys)
    assert device_side == server_side
    assert server_side.expires_at == NOW + timedelta(hours=24)
    again, _ = handshake(*keys)
    assert again.key != device_side.key, "ephemeral keys: a new key each time"
    assert again.key_id != device_side.key_id
    assert "key=" not in repr(device_side)


def test_request_signed_by_another_key_is_refused(keys: tuple[SM2PrivateKey, SM2PrivateKey]) -> None:
    device_key, server_key = keys
    impostor = SM2PrivateKey.generate()
    request, _ = start_session(impostor, device_id=DEVICE, key_epoch=1, now=NOW)
    with pytest.raises(HandshakeError, match="signature"):
        grant_session(request, device_key=device_key.public_key, server_key=server_key, now=NOW, lifetime=timedelta(1))


def test_request_altered_after_signing_is_refused(keys: tuple[SM2PrivateKey, SM2PrivateKey]) -> None:
    device_key, server_key = keys
    request, _ = start_session(device_key, device_id=DEVICE, key_epoch=1, now=NOW)
    moved = request.model_copy(update={"device_id": "SIM-0002"})
    with pytest.raises(HandshakeError, match="signature"):
        grant_session(moved, device_key=device_key.public_key, server_key=server_key, now=NOW, lifetime=timedelta(1))


def test_stale_or_future_request_is_refused(keys: tuple[SM2PrivateKey, SM2PrivateKey]) -> None:
    device_key, server_key = keys
    request, _ = start_session(device_key, device_id=DEVICE, key_epoch=1, now=NOW)
    for when, reason in ((NOW + timedelta(minutes=6), "too old"), (NOW - timedelta(minutes=6), "future")):
        with pytest.raises(HandshakeError, match=reason):
            grant_session(
                request, device_key=device_key.public_key, server_key=server_key, now=when, lifetime=timedelta(1)
            )


def test_grant_from_a_server_without_the_pinned_key_is_refused(keys: tuple[SM2PrivateKey, SM2PrivateKey]) -> None:
    device_key, server_key = keys
    request, ephemeral = start_session(device_key, device_id=DEVICE, key_epoch=1, now=NOW)
    rogue = SM2PrivateKey.generate()
    grant, _ = grant_session(
        request, device_key=device_key.public_key, server_key=rogue, now=NOW, lifetime=timedelta(1)
    )
    with pytest.raises(HandshakeError, match="pinned server key"):
        accept_grant(grant, request, ephemeral, device_key=device_key.public_key, server_key=server_key.public_key)


def test_grant_for_another_request_is_refused(keys: tuple[SM2PrivateKey, SM2PrivateKey]) -> None:
    device_key, server_key = keys
    first, _ = start_session(device_key, device_id=DEVICE, key_epoch=1, now=NOW)
    second, ephemeral = start_session(device_key, device_id=DEVICE, key_epoch=1, now=NOW)
    grant, _ = grant_session(
        first, device_key=device_key.public_key, server_key=server_key, now=NOW, lifetime=timedelta(1)
    )
    with pytest.raises(HandshakeError, match="another request"):
        accept_grant(grant, second, ephemeral, device_key=device_key.public_key, server_key=server_key.public_key)


def session_key() -> SessionKey:
    return SessionKey(uuid.uuid4(), bytes(range(16)), NOW, NOW + timedelta(hours=24))


def test_frame_round_trip_and_header() -> None:
    key = session_key()
    frame = seal_frame(key, DEVICE, Direction.UPLINK, 42, b'{"seq":42}', sent_at=NOW)
    assert is_secure_frame(frame)
    assert not is_secure_frame(b'{"seq":42}')
    assert len(frame) == FRAME_OVERHEAD + len(b'{"seq":42}')
    header = parse_frame(frame)
    assert (header.direction, header.key_id, header.counter, header.sent_at) == (Direction.UPLINK, key.key_id, 42, NOW)
    assert open_frame(key.key, DEVICE, frame) == b'{"seq":42}'
    assert b"seq" not in frame, "the payload is encrypted"


def test_tampered_moved_reflected_and_wrong_key_frames_are_refused() -> None:
    key = session_key()
    frame = seal_frame(key, DEVICE, Direction.UPLINK, 7, b"payload", sent_at=NOW)
    for position in (5, 21, 30, len(frame) - 20, len(frame) - 1):  # key id, counter, sent_at, ciphertext, tag
        tampered = bytearray(frame)
        tampered[position] ^= 0x01
        with pytest.raises(DecryptionFailedError):
            open_frame(key.key, DEVICE, bytes(tampered))
    with pytest.raises(DecryptionFailedError):
        open_frame(key.key, "SIM-0002", frame)  # published on another device's topic
    reflected = frame[:4] + Direction.DOWNLINK.value + frame[5:]
    with pytest.raises(DecryptionFailedError):
        open_frame(key.key, DEVICE, reflected)
    with pytest.raises(DecryptionFailedError):
        open_frame(bytes(16), DEVICE, frame)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(b"YBS1", "shorter"), (b"XXXX" + bytes(80), "magic"), (b"YBS1X" + bytes(80), "direction")],
)
def test_malformed_frames_are_refused_before_any_key(raw: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        parse_frame(raw)


def test_replay_window() -> None:
    key = session_key()
    header = parse_frame(seal_frame(key, DEVICE, Direction.UPLINK, 1, b"x", sent_at=NOW))
    age = timedelta(minutes=10)
    assert freshness_problem(header, key, now=NOW + timedelta(minutes=9), max_age=age) is None
    assert "stale" in str(freshness_problem(header, key, now=NOW + timedelta(minutes=11), max_age=age))
    assert "future" in str(freshness_problem(header, key, now=NOW - timedelta(minutes=6), max_age=age))
    late = parse_frame(seal_frame(key, DEVICE, Direction.UPLINK, 1, b"x", sent_at=NOW + timedelta(hours=25)))
    assert "expired" in str(freshness_problem(late, key, now=NOW + timedelta(hours=25), max_age=age))
    early = parse_frame(seal_frame(key, DEVICE, Direction.UPLINK, 1, b"x", sent_at=NOW - timedelta(hours=1)))
    assert "before" in str(freshness_problem(early, key, now=NOW - timedelta(minutes=55), max_age=age))
