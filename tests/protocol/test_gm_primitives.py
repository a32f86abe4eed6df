"""SM3, HMAC-SM3, the SM3 KDF and SM4-GCM: published vectors, an independent implementation, refusals."""

from __future__ import annotations

import gmssl_pyx
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.gm import CryptoError, DecryptionFailedError, hmac_sm3, mac_equal, sm3_digest, sm3_kdf, sm4
from protocol.gm.sm4 import _seal_with_nonce


def test_sm3_published_vectors() -> None:
    # GB/T 32905-2016 Annex A, examples 1 and 2
    assert sm3_digest(b"abc").hex() == "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
    assert sm3_digest(b"abcd" * 16).hex() == "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"


def test_hmac_sm3_matches_rfc2104_construction_and_gmssl() -> None:
    key = bytes(range(32))
    data = b"audit entry"
    ipad = bytes(b ^ 0x36 for b in key.ljust(64, b"\0"))
    opad = bytes(b ^ 0x5C for b in key.ljust(64, b"\0"))
    by_hand = sm3_digest(opad + sm3_digest(ipad + data))
    assert hmac_sm3(key, data) == by_hand == gmssl_pyx.sm3_hmac(key, data)


def test_hmac_sm3_refuses_short_keys() -> None:
    with pytest.raises(CryptoError, match="too short"):
        hmac_sm3(b"short", b"x")


def test_mac_equal_is_exact() -> None:
    mac = hmac_sm3(b"k" * 16, b"x")
    assert mac_equal(mac, bytes(mac))
    assert not mac_equal(mac, mac[:-1] + bytes([mac[-1] ^ 1]))
    assert not mac_equal(mac, mac[:-1])


@pytest.mark.parametrize("length", [1, 16, 32, 33, 100])
def test_sm3_kdf_matches_gmssl(length: int) -> None:
    z = bytes(range(64))
    assert sm3_kdf(z, length) == gmssl_pyx.sm3_kdf(z, length)


def test_sm4_block_vector_gbt_32907() -> None:
    # GB/T 32907-2016 Annex A example 1: the backend's SM4 is the standard one
    key = bytes.fromhex("0123456789abcdeffedcba9876543210")
    encryptor = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()  # noqa: S305 - one block, a known-answer test
    assert (encryptor.update(key) + encryptor.finalize()).hex() == "681edf34d206965e86b3e94f536e4246"


def test_sm4_gcm_vector_rfc_8998() -> None:
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    nonce = bytes.fromhex("00001234567800000000ABCD")
    aad = bytes.fromhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2")
    plaintext = bytes.fromhex(
        "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD"
        "EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA"
    )
    sealed = _seal_with_nonce(key, nonce, plaintext, aad)
    assert sealed[12:-16].hex().upper() == (
        "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
        "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
    )
    assert sealed[-16:].hex().upper() == "83DE3541E4C2B58177E065A9BF7B62EC"
    assert sm4.open(key, sealed, aad) == plaintext


def test_seal_uses_a_fresh_nonce_each_time() -> None:
    key = sm4.generate_key()
    a, b = sm4.seal(key, b"same", b""), sm4.seal(key, b"same", b"")
    assert a[:12] != b[:12]
    assert len(a) == len(b"same") + sm4.OVERHEAD


def test_open_refuses_wrong_key_wrong_aad_and_short_input() -> None:
    key = sm4.generate_key()
    sealed = sm4.seal(key, b"payload", b"device-1")
    with pytest.raises(DecryptionFailedError):
        sm4.open(sm4.generate_key(), sealed, b"device-1")
    with pytest.raises(DecryptionFailedError):
        sm4.open(key, sealed, b"device-2")
    with pytest.raises(DecryptionFailedError, match="too short"):
        sm4.open(key, sealed[:20], b"device-1")
    with pytest.raises(CryptoError, match="16 bytes"):
        sm4.seal(b"short", b"x", b"")


@settings(max_examples=200, deadline=None)
@given(plaintext=st.binary(max_size=2048), aad=st.binary(max_size=64))
def test_open_inverts_seal(plaintext: bytes, aad: bytes) -> None:
    key = bytes(range(16))
    assert sm4.open(key, sm4.seal(key, plaintext, aad), aad) == plaintext


@settings(max_examples=300, deadline=None)
@given(plaintext=st.binary(max_size=256), aad=st.binary(max_size=32), data=st.data())
def test_any_flipped_bit_is_refused(plaintext: bytes, aad: bytes, data: st.DataObject) -> None:
    key = bytes(range(16))
    sealed = bytearray(sm4.seal(key, plaintext, aad))
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DecryptionFailedError):
        sm4.open(key, bytes(sealed), aad)


@settings(max_examples=100, deadline=None)
@given(aad=st.binary(min_size=1, max_size=32), data=st.data())
def test_any_flipped_aad_bit_is_refused(aad: bytes, data: st.DataObject) -> None:
    key = bytes(range(16))
    sealed = sm4.seal(key, b"payload", aad)
    bit = data.draw(st.integers(0, len(aad) * 8 - 1))
    altered = bytearray(aad)
    altered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DecryptionFailedError):
        sm4.open(key, sealed, bytes(altered))
