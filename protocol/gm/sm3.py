"""SM3 digests, HMAC-SM3 and the GM/T 0003.3 key-derivation function, on OpenSSL through `cryptography`.

Owns hashing and message authentication. MACs are compared only with `mac_equal` (constant time); this module must
never compare MACs with `==` nor log keys or MACs of secrets.
"""

from __future__ import annotations

import hmac as _std_hmac

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, hmac

from protocol.gm.errors import CryptoError

SM3_DIGEST_SIZE = 32
MIN_MAC_KEY_BYTES = 16
"""HMAC-SM3 keys shorter than this are refused: a short key is a configuration mistake, not a choice."""


def sm3_digest(data: bytes) -> bytes:
    """SM3 (GB/T 32905) of `data`: 32 bytes."""
    try:
        h = hashes.Hash(hashes.SM3())
    except UnsupportedAlgorithm as exc:  # an OpenSSL build without SM3: fail loudly, never fall back
        raise CryptoError("this OpenSSL build has no SM3") from exc
    h.update(data)
    return h.finalize()


def hmac_sm3(key: bytes, data: bytes) -> bytes:
    """HMAC-SM3 (RFC 2104 with SM3) of `data` under `key` (at least 16 bytes): 32 bytes."""
    if len(key) < MIN_MAC_KEY_BYTES:
        raise CryptoError(f"HMAC-SM3 key too short: {len(key)} bytes, need at least {MIN_MAC_KEY_BYTES}")
    try:
        h = hmac.HMAC(key, hashes.SM3())
    except UnsupportedAlgorithm as exc:
        raise CryptoError("this OpenSSL build has no SM3") from exc
    h.update(data)
    return h.finalize()


def mac_equal(expected: bytes, actual: bytes) -> bool:
    """Constant-time comparison of two MACs (or digests of secrets)."""
    return _std_hmac.compare_digest(expected, actual)


def sm3_kdf(shared: bytes, length: int) -> bytes:
    """The SM2 key-derivation function KDF(Z, klen) of GM/T 0003.3 §5.4.3 (SM3 in counter mode), `length` bytes."""
    if not 0 < length <= 255 * SM3_DIGEST_SIZE:
        raise CryptoError(f"KDF output length out of range: {length}")
    out = bytearray()
    counter = 1
    while len(out) < length:
        out += sm3_digest(shared + counter.to_bytes(4, "big"))
        counter += 1
    return bytes(out[:length])
