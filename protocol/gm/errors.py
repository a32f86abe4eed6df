"""The one exception tree of `protocol.gm`.

Every failure of a 国密 primitive surfaces as a `CryptoError`. Errors of the vendor libraries (`cryptography`,
`gmssl_pyx`) are translated here, once, at the boundary (`raise … from exc`); callers never catch a vendor type.
The messages never contain key material, plaintext or passphrases.
"""

from __future__ import annotations


class CryptoError(Exception):
    """Base of every error raised by `protocol.gm`."""


class InvalidSignatureError(CryptoError):
    """An SM2 signature does not verify: wrong key, wrong user id, altered message or a malformed signature."""


class DecryptionFailedError(CryptoError):
    """SM4-GCM refused to open a sealed message: wrong key, wrong associated data, or altered bytes."""


class KeyFormatError(CryptoError, ValueError):
    """Key bytes or a key file are malformed, off the curve, out of range or unsafely stored."""


class WrongPassphraseError(KeyFormatError):
    """An encrypted private-key file could not be opened with the given passphrase (or was altered)."""


class CanonicalFormError(CryptoError, ValueError):
    """An object cannot be written as canonical JSON (NaN/infinity, non-string keys, unsupported types)."""


class AuditChainError(CryptoError):
    """An audit chain cannot be appended to (its tail is broken, or the file is not a chain)."""
