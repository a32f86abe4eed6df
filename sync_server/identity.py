"""The server's own identity and secrets: its SM2 signing key, the seal of session keys at rest, bearer tokens.

Owns the server key file (`protocol.gm.keystore`, passphrase from settings; created by `yibao server init`, or on
first use when environment is 'dev'), the key that seals session keys in `device_sessions` (SM3-KDF of `secret_key`,
so every worker process derives the same one), and how tokens are made and stored (random URL-safe text; only the
SHA-256 is kept). It must never log a key, a passphrase or a token.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import uuid
from dataclasses import dataclass

from protocol.gm import sm4
from protocol.gm.errors import CryptoError
from protocol.gm.keystore import load_private_key, save_private_key
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey
from protocol.gm.sm3 import sm3_kdf
from sync_server.errors import ConfigurationError
from sync_server.settings import ServerSettings

logger = logging.getLogger(__name__)

SESSION_SEAL_INFO = b"|yibao-session-seal-v1"
TOKEN_BYTES = 32


def new_token() -> str:
    """A fresh bearer or claim token (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> str:
    """What is stored instead of a token: SHA-256, hex (`protocol.enrolment.claim_token_digest` for claim tokens)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_broker_password() -> str:
    return secrets.token_urlsafe(24)


def create_server_key(settings: ServerSettings, *, iterations: int | None = None) -> SM2PublicKey:
    """Create the server key file (never overwrites); `ConfigurationError` if it exists or cannot be written."""
    path = settings.server_key_path
    key = SM2PrivateKey.generate()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if iterations is None:
            save_private_key(path, key, settings.server_key_passphrase.get_secret_value())
        else:
            save_private_key(path, key, settings.server_key_passphrase.get_secret_value(), iterations=iterations)
    except (OSError, CryptoError) as exc:
        raise ConfigurationError(f"cannot create the server key {path}: {exc}") from exc
    logger.info("created the server SM2 key %s (fingerprint %s)", path, key.public_key.fingerprint())
    return key.public_key


@dataclass(frozen=True, slots=True)
class SealedSessionKey:
    key_id: uuid.UUID
    sealed: bytes


class ServerIdentity:
    """The server key (loaded once, on first use) and the session-key seal. Thread-safe."""

    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings
        self._key: SM2PrivateKey | None = None
        self._lock = threading.Lock()
        self._seal_key = sm3_kdf(settings.secret_key.get_secret_value().encode("utf-8") + SESSION_SEAL_INFO, 16)

    def private_key(self) -> SM2PrivateKey:
        """The server's signing key; created first when absent and environment is 'dev'."""
        with self._lock:
            if self._key is None:
                self._key = self._load()
            return self._key

    def public_key(self) -> SM2PublicKey:
        return self.private_key().public_key

    def _load(self) -> SM2PrivateKey:
        path = self._settings.server_key_path
        if not path.exists():
            if self._settings.environment != "dev":
                raise ConfigurationError(f"the server key {path} does not exist; create it with `yibao server init`")
            create_server_key(self._settings)
        try:
            return load_private_key(path, self._settings.server_key_passphrase.get_secret_value())
        except CryptoError as exc:
            raise ConfigurationError(f"cannot open the server key {path}: {exc}") from exc

    def seal_session_key(self, key_id: uuid.UUID, key: bytes) -> bytes:
        return sm4.seal(self._seal_key, key, key_id.bytes)

    def seal_secret(self, purpose: str, ref: str, secret: bytes) -> bytes:
        """Seal a stored secret (a HIS client's MAC key) at rest; `purpose` and `ref` are bound as associated data."""
        return sm4.seal(self._seal_key, secret, f"{purpose}|{ref}".encode())

    def open_secret(self, purpose: str, ref: str, sealed: bytes) -> bytes:
        """`DecryptionFailedError` if the row was altered, moved to another ref, or sealed under another secret_key."""
        return sm4.open(self._seal_key, sealed, f"{purpose}|{ref}".encode())

    def open_session_key(self, key_id: uuid.UUID, sealed: bytes) -> bytes:
        """`DecryptionFailedError` if the row was altered or sealed under another secret_key."""
        return sm4.open(self._seal_key, sealed, key_id.bytes)
