"""Enrolment, rotation and config-bundle signatures: each one verifies, and any change or wrong key is refused."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from protocol.enrolment import (
    BundleMqtt,
    BundleSession,
    ConfigBundle,
    EnrolCode,
    check_enrol_proof,
    check_rotate_request,
    make_enrol_request,
    make_rotate_request,
    sign_bundle,
    verify_bundle,
)
from protocol.envelope import ContractError
from protocol.gm.errors import InvalidSignatureError
from protocol.gm.sm2 import SM2PrivateKey

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
TOKEN = "c1aim-t0ken-0123456789abcdef"


@pytest.fixture(scope="module")
def server_key() -> SM2PrivateKey:
    return SM2PrivateKey.generate()


@pytest.fixture(scope="module")
def device_key() -> SM2PrivateKey:
    return SM2PrivateKey.generate()


def test_enrol_proof_verifies_and_binds_every_field(device_key: SM2PrivateKey) -> None:
    request = make_enrol_request(device_key, device_id="SIM-0001", claim_token=TOKEN, hardware_id="board-1", now=NOW)
    assert check_enrol_proof(request) == device_key.public_key
    for change in ({"hardware_id": "board-2"}, {"claim_token": TOKEN + "x"}, {"device_id": "SIM-0002"}):
        with pytest.raises(InvalidSignatureError):
            check_enrol_proof(request.model_copy(update=change))
    other = SM2PrivateKey.generate().public_key.to_bytes().hex()
    with pytest.raises(InvalidSignatureError):
        check_enrol_proof(request.model_copy(update={"public_key": other}))


def test_rotation_needs_both_keys(device_key: SM2PrivateKey) -> None:
    new = SM2PrivateKey.generate()
    request = make_rotate_request(device_key, new, device_id="SIM-0001", key_epoch=1, now=NOW)
    assert check_rotate_request(request, device_key.public_key) == new.public_key
    with pytest.raises(InvalidSignatureError, match="current key"):
        check_rotate_request(request, SM2PrivateKey.generate().public_key)
    thief = make_rotate_request(SM2PrivateKey.generate(), new, device_id="SIM-0001", key_epoch=1, now=NOW)
    with pytest.raises(InvalidSignatureError, match="current key"):
        check_rotate_request(thief, device_key.public_key)
    no_possession = request.model_copy(update={"signature_new": request.signature_current})
    with pytest.raises(InvalidSignatureError, match="possession"):
        check_rotate_request(no_possession, device_key.public_key)


def bundle(server_key: SM2PrivateKey, device_key: SM2PrivateKey) -> ConfigBundle:
    return ConfigBundle(
        device_id="SIM-0001",
        key_epoch=1,
        device_public_key=device_key.public_key.to_bytes().hex(),
        issued_at=NOW,
        config_version="2026.11.23-1",
        server_url="https://yibao.example.cn",
        server_public_key=server_key.public_key.to_bytes().hex(),
        mqtt=BundleMqtt(host="mqtt.example.cn", port=8883, username="SIM-0001", tls=True),
        session=BundleSession(lifetime_s=86400, rotate_after_s=43200),
    )


def test_bundle_signed_by_the_pinned_key_verifies(server_key: SM2PrivateKey, device_key: SM2PrivateKey) -> None:
    raw = sign_bundle(server_key, bundle(server_key, device_key)).to_bytes()
    assert verify_bundle(raw, pinned_server_key=server_key.public_key, device_id="SIM-0001").mqtt.port == 8883


def test_tampered_or_foreign_bundles_are_refused(server_key: SM2PrivateKey, device_key: SM2PrivateKey) -> None:
    raw = sign_bundle(server_key, bundle(server_key, device_key)).to_bytes()
    with pytest.raises(InvalidSignatureError):
        verify_bundle(raw.replace(b"mqtt.example.cn", b"evil.example.cn"), pinned_server_key=server_key.public_key)
    with pytest.raises(InvalidSignatureError, match="not SIM-0002"):
        verify_bundle(raw, pinned_server_key=server_key.public_key, device_id="SIM-0002")
    rogue = SM2PrivateKey.generate()
    rogue_raw = sign_bundle(rogue, bundle(rogue, device_key)).to_bytes()
    with pytest.raises(InvalidSignatureError, match="pinned"):
        verify_bundle(rogue_raw, pinned_server_key=server_key.public_key)
    with pytest.raises(ContractError, match="invalid config bundle"):
        verify_bundle(b'{"bundle": 1}', pinned_server_key=server_key.public_key)


def test_enrol_code_round_trip_and_refusals(server_key: SM2PrivateKey) -> None:
    code = EnrolCode(
        server_url="http://127.0.0.1:8000",
        device_id="SIM-0001",
        claim_token=TOKEN,
        server_fingerprint=server_key.public_key.fingerprint(),
    )
    text = code.encode()
    assert text.startswith("YB1:")
    assert EnrolCode.decode(text) == code
    for bad in ("YB2:abc", "YB1:!!!", "YB1:" + "e30"):  # wrong prefix, not base64, {} (missing fields)
        with pytest.raises(ContractError):
            EnrolCode.decode(bad)
