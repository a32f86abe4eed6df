"""国密 primitives (SM2, SM3, SM4) for the terminal and the server, and what is built directly on them.

Owns: SM3 digests, HMAC-SM3 and the SM3 KDF (`sm3`); SM4-GCM sealing (`sm4`); SM2 keys and signatures (`sm2`);
session-key agreement (`agreement`); encrypted private-key files (`keystore`); canonical JSON and signed records
(`records`); the HMAC-SM3 hash-chained audit log (`audit_chain`). Every failure is a `CryptoError` (`errors`).

Like the rest of `protocol` it imports nothing of ours outside `protocol`. It must never log key material,
plaintext or passphrases, and never offer an unauthenticated cipher mode. The choice of libraries and the
measured speeds are in docs/crypto.md.
"""

from protocol.gm import sm4
from protocol.gm.agreement import Party, agree_session_key
from protocol.gm.audit_chain import AuditChainWriter, ChainReport, load_chain_key, verify_chain, write_chain_key
from protocol.gm.errors import (
    AuditChainError,
    CanonicalFormError,
    CryptoError,
    DecryptionFailedError,
    InvalidSignatureError,
    KeyFormatError,
    WrongPassphraseError,
)
from protocol.gm.keystore import load_private_key, save_private_key
from protocol.gm.records import canonical_json, sign_record, verify_record
from protocol.gm.sm2 import DEFAULT_USER_ID, SM2PrivateKey, SM2PublicKey, sign, verify
from protocol.gm.sm3 import hmac_sm3, mac_equal, sm3_digest, sm3_kdf

__all__ = [
    "DEFAULT_USER_ID",
    "AuditChainError",
    "AuditChainWriter",
    "CanonicalFormError",
    "ChainReport",
    "CryptoError",
    "DecryptionFailedError",
    "InvalidSignatureError",
    "KeyFormatError",
    "Party",
    "SM2PrivateKey",
    "SM2PublicKey",
    "WrongPassphraseError",
    "agree_session_key",
    "canonical_json",
    "hmac_sm3",
    "load_chain_key",
    "load_private_key",
    "mac_equal",
    "save_private_key",
    "sign",
    "sign_record",
    "sm3_digest",
    "sm3_kdf",
    "sm4",
    "verify",
    "verify_chain",
    "verify_record",
    "write_chain_key",
]
