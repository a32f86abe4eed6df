"""SM4-GCM authenticated encryption (GB/T 32907 block cipher, GCM mode), on OpenSSL through `cryptography`.

Owns payload confidentiality and integrity under symmetric keys (per-device session keys, keys derived from a
passphrase). The wire form is `nonce (12) || ciphertext || tag (16)`. A fresh random 96-bit nonce is drawn for
every seal; this module must never accept a caller-chosen nonce on its public API (a repeated nonce under one key
breaks GCM completely) and must never return unauthenticated plaintext.

`open` shadows the built-in on purpose, so use it qualified: `sm4.open(key, sealed, aad)`.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocol.gm.errors import CryptoError, DecryptionFailedError

KEY_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
"""Bytes a sealed message has beyond its plaintext."""


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise CryptoError(f"SM4 key must be {KEY_SIZE} bytes, got {len(key)}")


def generate_key() -> bytes:
    """A fresh random 128-bit SM4 key."""
    return os.urandom(KEY_SIZE)


def _seal_with_nonce(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Seal under a given nonce. Private: only `seal` (random nonce) and known-answer tests call it."""
    _check_key(key)
    try:
        encryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
    except UnsupportedAlgorithm as exc:
        raise CryptoError("this OpenSSL build has no SM4-GCM") from exc
    encryptor.authenticate_additional_data(aad)
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    return nonce + ciphertext + encryptor.tag


def seal(key: bytes, plaintext: bytes, aad: bytes = b"") -> bytes:
    """Encrypt and authenticate `plaintext`, binding `aad` (authenticated, not encrypted).

    Returns `nonce || ciphertext || tag`. Keep the number of messages under one key well below 2**32 (random
    96-bit nonces); session keys are rotated long before that.
    """
    return _seal_with_nonce(key, os.urandom(NONCE_SIZE), plaintext, aad)


def open(key: bytes, sealed: bytes, aad: bytes = b"") -> bytes:
    """Check and decrypt what `seal` produced. Wrong key, wrong `aad` or any altered byte → `DecryptionFailedError`."""
    _check_key(key)
    if len(sealed) < OVERHEAD:
        raise DecryptionFailedError(f"sealed message too short: {len(sealed)} bytes, at least {OVERHEAD} expected")
    nonce, ciphertext, tag = sealed[:NONCE_SIZE], sealed[NONCE_SIZE:-TAG_SIZE], sealed[-TAG_SIZE:]
    try:
        decryptor = Cipher(algorithms.SM4(key), modes.GCM(nonce, tag)).decryptor()
    except UnsupportedAlgorithm as exc:
        raise CryptoError("this OpenSSL build has no SM4-GCM") from exc
    decryptor.authenticate_additional_data(aad)
    try:
        return decryptor.update(ciphertext) + decryptor.finalize()
    except InvalidTag as exc:
        raise DecryptionFailedError(
            "SM4-GCM authentication failed (wrong key, wrong associated data or altered bytes)"
        ) from exc
