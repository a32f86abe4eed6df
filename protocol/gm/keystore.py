"""SM2 private keys at rest: encrypted with SM4-GCM under a key derived from a passphrase (PBKDF2-HMAC-SM3).

Owns the key-file format and its permissions. The file is one JSON object:

    {"format": "yibao-sm2-private-key", "version": 1, "kdf": "pbkdf2-hmac-sm3", "iterations": 600000,
     "salt": hex(16), "public_key": hex(65), "sealed": hex(SM4-GCM(d))}

The associated data of the seal is the canonical JSON of every other field, so a swapped public key, a lowered
iteration count or another salt makes the file refuse to open. Files are created 0600 (never widened by the umask
race: created with that mode, written, fsynced, then renamed into place) and a file readable by group or others is
refused on load. This module must never write a private key unencrypted, never log a passphrase, and never
accept a passphrase shorter than `MIN_PASSPHRASE_CHARS`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from protocol.gm import sm4
from protocol.gm.errors import DecryptionFailedError, KeyFormatError, WrongPassphraseError
from protocol.gm.records import canonical_json
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey

KEY_FILE_FORMAT = "yibao-sm2-private-key"
KEY_FILE_VERSION = 1
DEFAULT_ITERATIONS = 600_000
"""About 0.3 s on the 2-core reference machine: paid once per process start, hard on a guesser."""
MIN_ITERATIONS = 1_000
"""Only tests go this low; the floor stops a file from declaring a trivially weak KDF."""
MIN_PASSPHRASE_CHARS = 12


def _derive(passphrase: str, salt: bytes, iterations: int) -> bytes:
    kdf = PBKDF2HMAC(algorithm=hashes.SM3(), length=sm4.KEY_SIZE, salt=salt, iterations=iterations)
    return kdf.derive(passphrase.encode("utf-8"))


def encrypt_private_key(key: SM2PrivateKey, passphrase: str, *, iterations: int = DEFAULT_ITERATIONS) -> bytes:
    """The key-file bytes for `key` (see the module docstring)."""
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise KeyFormatError(f"passphrase too short: at least {MIN_PASSPHRASE_CHARS} characters")
    if iterations < MIN_ITERATIONS:
        raise KeyFormatError(f"iterations below {MIN_ITERATIONS}")
    salt = os.urandom(16)
    header: dict[str, Any] = {
        "format": KEY_FILE_FORMAT,
        "version": KEY_FILE_VERSION,
        "kdf": "pbkdf2-hmac-sm3",
        "iterations": iterations,
        "salt": salt.hex(),
        "public_key": key.public_key.hex(),
    }
    sealed = sm4.seal(_derive(passphrase, salt, iterations), key.secret_bytes(), canonical_json(header))
    return canonical_json({**header, "sealed": sealed.hex()}) + b"\n"


def decrypt_private_key(data: bytes, passphrase: str) -> SM2PrivateKey:
    """Open key-file bytes; `WrongPassphraseError` if the passphrase is wrong or the file was altered."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise KeyFormatError("key file is not JSON") from exc
    if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
        raise KeyFormatError("not a yibao SM2 private-key file")
    if doc.get("version") != KEY_FILE_VERSION or doc.get("kdf") != "pbkdf2-hmac-sm3":
        raise KeyFormatError("unsupported key-file version or KDF")
    try:
        iterations = int(doc["iterations"])
        salt = bytes.fromhex(doc["salt"])
        sealed = bytes.fromhex(doc.pop("sealed"))
        public_key = SM2PublicKey.from_hex(doc["public_key"])
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyFormatError("key file is missing fields or has malformed ones") from exc
    if iterations < MIN_ITERATIONS:
        raise KeyFormatError(f"key file declares fewer than {MIN_ITERATIONS} KDF iterations")
    try:
        secret = sm4.open(_derive(passphrase, salt, iterations), sealed, canonical_json(doc))
    except DecryptionFailedError as exc:
        raise WrongPassphraseError("wrong passphrase, or the key file was altered") from exc
    return SM2PrivateKey.from_bytes(secret, public_key)


def save_private_key(
    path: Path, key: SM2PrivateKey, passphrase: str, *, iterations: int = DEFAULT_ITERATIONS, overwrite: bool = False
) -> None:
    """Write the encrypted key file with mode 0600, atomically (temp file, fsync, link/rename, fsync directory).

    Without `overwrite`, an existing file is never replaced, even by a concurrent writer (hard link, not rename).
    """
    data = encrypt_private_key(key, passphrase, iterations=iterations)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            tmp.replace(path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError as exc:
                raise KeyFormatError(f"{path} exists; refusing to overwrite a key file") from exc
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_private_key(path: Path, passphrase: str) -> SM2PrivateKey:
    """Read and open a key file; refuses a file that group or others may read or write."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFormatError(f"{path} is accessible to group/others (mode {stat.S_IMODE(mode):04o}); chmod 600")
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFormatError(f"cannot read key file {path}: {exc.strerror}") from exc
    return decrypt_private_key(data, passphrase)
