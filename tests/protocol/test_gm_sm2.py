"""SM2: the published GM/T 0003.5 example, interop with pure-Python gmssl, refusals, key files, key agreement."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from gmssl import sm2 as pure_sm2
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.gm import (
    InvalidSignatureError,
    KeyFormatError,
    Party,
    SM2PrivateKey,
    SM2PublicKey,
    WrongPassphraseError,
    agree_session_key,
    load_private_key,
    save_private_key,
    sign,
    sm3_kdf,
    verify,
)
from protocol.gm import sm2 as gm_sm2
from protocol.gm.agreement import shared_point

# GM/T 0003.5-2012 Annex A.2 (= GB/T 32918.5-2017 Annex A): signature on the recommended curve
D = "3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8"
PUB = (
    "04"
    "09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020"
    "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13"
)
K = "59276E27D506861A16680F3AD9C02DCCEF3CC1FA3CDBE4CE6D54B80DEAC1BC21"
Z = "B2E14C5C79C6DF5B85F4FE7ED8DB7A262B9DA7E07CCB0EA9F4747B8CCDA8A4F3"
SIG = (
    "F5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3"
    "B1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA"
)
MSG = b"message digest"


@pytest.fixture(scope="module")
def key() -> SM2PrivateKey:
    return SM2PrivateKey.generate()


def _pure(key: SM2PrivateKey) -> pure_sm2.CryptSM2:
    return pure_sm2.CryptSM2(private_key=key.secret_bytes().hex(), public_key=key.public_key.raw_xy.hex(), mode=1)


def test_published_example_public_key_and_user_hash() -> None:
    private = SM2PrivateKey.from_bytes(bytes.fromhex(D))
    assert private.public_key == SM2PublicKey.from_hex(PUB)
    assert gm_sm2.user_hash(private.public_key).hex().upper() == Z


def test_published_example_signature_verifies() -> None:
    verify(SM2PublicKey.from_hex(PUB), MSG, bytes.fromhex(SIG))


def test_published_example_fixed_k_signature_reproduced_by_the_reference() -> None:
    # GmSSL draws k itself, so the fixed-k signing step is checked on the reference, then verified by ours above
    crypt = pure_sm2.CryptSM2(private_key=D, public_key=PUB[2:], mode=1)
    assert crypt.sign_with_sm3(MSG, K).upper() == SIG


def test_published_signature_refused_for_other_message_id_or_key() -> None:
    public = SM2PublicKey.from_hex(PUB)
    with pytest.raises(InvalidSignatureError):
        verify(public, MSG + b".", bytes.fromhex(SIG))
    with pytest.raises(InvalidSignatureError):
        verify(public, MSG, bytes.fromhex(SIG), user_id=b"ALICE123@YAHOO.COM")
    with pytest.raises(InvalidSignatureError):
        verify(SM2PrivateKey.generate().public_key, MSG, bytes.fromhex(SIG))


def test_ours_signs_pure_gmssl_verifies(key: SM2PrivateKey) -> None:
    signature = sign(key, b"pharmacist review #42")
    assert len(signature) == 64
    assert _pure(key).verify_with_sm3(signature.hex(), b"pharmacist review #42")


def test_pure_gmssl_signs_ours_verifies(key: SM2PrivateKey) -> None:
    crypt = _pure(key)
    signature = crypt.sign_with_sm3(b"checkpoint", os.urandom(32).hex())
    verify(key.public_key, b"checkpoint", bytes.fromhex(signature))


@pytest.mark.parametrize("position", [0, 31, 32, 63])
def test_flipped_signature_bits_are_refused(key: SM2PrivateKey, position: int) -> None:
    signature = bytearray(sign(key, b"m"))
    signature[position] ^= 0x01
    with pytest.raises(InvalidSignatureError):
        verify(key.public_key, b"m", bytes(signature))


@pytest.mark.parametrize(
    "signature", [b"", b"\x00" * 64, b"\x01" * 63, bytes.fromhex("FF" * 64), b"\x00" * 32 + b"\x01" * 32]
)
def test_malformed_signatures_are_refused(key: SM2PrivateKey, signature: bytes) -> None:
    with pytest.raises(InvalidSignatureError):
        verify(key.public_key, b"m", signature)


def test_der_round_trip(key: SM2PrivateKey) -> None:
    signature = sign(key, b"m")
    der = gm_sm2.signature_to_der(signature)
    assert der[0] == 0x30
    assert gm_sm2.signature_from_der(der) == signature
    with pytest.raises(InvalidSignatureError):
        gm_sm2.signature_from_der(der + b"\x00")
    r_body = (1).to_bytes(2, "big")  # 00 01: a non-minimal INTEGER
    non_minimal = b"\x30\x07\x02\x02" + r_body + b"\x02\x01\x01"
    with pytest.raises(InvalidSignatureError):
        gm_sm2.signature_from_der(non_minimal)


def test_public_key_encoding_and_validation(key: SM2PrivateKey) -> None:
    encoded = key.public_key.to_bytes()
    assert len(encoded) == 65
    assert encoded[0] == 4
    assert SM2PublicKey.from_bytes(encoded) == key.public_key
    off_curve = bytearray(encoded)
    off_curve[-1] ^= 1
    with pytest.raises(KeyFormatError, match="not a point"):
        SM2PublicKey.from_bytes(bytes(off_curve))
    with pytest.raises(KeyFormatError):
        SM2PublicKey.from_bytes(encoded[1:])
    with pytest.raises(KeyFormatError):
        SM2PublicKey.from_hex("zz")


def test_private_key_range_and_pair_check(key: SM2PrivateKey) -> None:
    with pytest.raises(KeyFormatError, match="range"):
        SM2PrivateKey.from_bytes(b"\x00" * 32)
    with pytest.raises(KeyFormatError, match="range"):
        SM2PrivateKey.from_bytes(b"\xff" * 32)
    with pytest.raises(KeyFormatError, match="does not belong"):
        SM2PrivateKey.from_bytes(key.secret_bytes(), SM2PrivateKey.generate().public_key)
    assert key.secret_bytes().hex() not in repr(key)


# ---------------------------------------------------------------- key files

PASS = "correct horse battery staple"


def test_key_file_round_trip_with_mode_0600(tmp_path: Path, key: SM2PrivateKey) -> None:
    path = tmp_path / "device.key"
    save_private_key(path, key, PASS, iterations=1000)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.secret_bytes().hex() not in path.read_text()
    loaded = load_private_key(path, PASS)
    assert loaded.secret_bytes() == key.secret_bytes()
    assert loaded.public_key == key.public_key
    with pytest.raises(KeyFormatError, match="exists"):
        save_private_key(path, SM2PrivateKey.generate(), PASS, iterations=1000)
    assert load_private_key(path, PASS).public_key == key.public_key
    replacement = SM2PrivateKey.generate()
    save_private_key(path, replacement, PASS, iterations=1000, overwrite=True)
    assert load_private_key(path, PASS).public_key == replacement.public_key
    assert [p.name for p in tmp_path.iterdir()] == ["device.key"]  # no temp files left behind


def test_key_file_wrong_passphrase_and_tampering(tmp_path: Path, key: SM2PrivateKey) -> None:
    path = tmp_path / "device.key"
    save_private_key(path, key, PASS, iterations=1000)
    with pytest.raises(WrongPassphraseError):
        load_private_key(path, PASS + "!")
    weakened = path.read_text().replace('"iterations":1000', '"iterations":1001')
    path.write_text(weakened)
    with pytest.raises(WrongPassphraseError):
        load_private_key(path, PASS)


def test_key_file_refused_when_group_readable_or_passphrase_short(tmp_path: Path, key: SM2PrivateKey) -> None:
    path = tmp_path / "device.key"
    save_private_key(path, key, PASS, iterations=1000)
    path.chmod(0o644)
    with pytest.raises(KeyFormatError, match="chmod 600"):
        load_private_key(path, PASS)
    with pytest.raises(KeyFormatError, match="passphrase too short"):
        save_private_key(tmp_path / "other.key", key, "short")


# ---------------------------------------------------------------- key agreement


def test_both_sides_agree_and_bindings_matter() -> None:
    device, server = SM2PrivateKey.generate(), SM2PrivateKey.generate()  # long-term identities
    device_eph, server_eph = SM2PrivateKey.generate(), SM2PrivateKey.generate()
    a, b = Party(device.public_key, b"DEV-0001"), Party(server.public_key)
    k_device = agree_session_key(device_eph, server_eph.public_key, initiator=a, responder=b, info=b"s1")
    k_server = agree_session_key(server_eph, device_eph.public_key, initiator=a, responder=b, info=b"s1")
    assert k_device == k_server
    assert len(k_device) == 16
    assert agree_session_key(device_eph, server_eph.public_key, initiator=a, responder=b, info=b"s2") != k_device
    swapped = agree_session_key(device_eph, server_eph.public_key, initiator=b, responder=a, info=b"s1")
    assert swapped != k_device
    other = Party(device.public_key, b"DEV-0002")
    assert agree_session_key(device_eph, server_eph.public_key, initiator=other, responder=b, info=b"s1") != k_device


def test_ecdh_point_matches_pure_gmssl_and_kdf_is_gm_t_0003() -> None:
    mine, peer = SM2PrivateKey.generate(), SM2PrivateKey.generate()
    ours = shared_point(mine, peer.public_key)
    reference = pure_sm2.CryptSM2(private_key=mine.secret_bytes().hex(), public_key="", mode=1)
    assert ours.hex() == reference._kg(mine.scalar, peer.public_key.raw_xy.hex())
    a, b = Party(mine.public_key), Party(peer.public_key)
    z = ours + gm_sm2.user_hash(mine.public_key) + gm_sm2.user_hash(peer.public_key) + b"i"
    assert agree_session_key(mine, peer.public_key, initiator=a, responder=b, info=b"i") == sm3_kdf(z, 16)


@settings(max_examples=40, deadline=None)
@given(message=st.binary(min_size=1, max_size=512), data=st.data())
def test_any_message_signs_and_any_flipped_message_bit_is_refused(
    key: SM2PrivateKey, message: bytes, data: st.DataObject
) -> None:
    signature = sign(key, message)
    verify(key.public_key, message, signature)
    bit = data.draw(st.integers(0, len(message) * 8 - 1))
    altered = bytearray(message)
    altered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(InvalidSignatureError):
        verify(key.public_key, bytes(altered), signature)
