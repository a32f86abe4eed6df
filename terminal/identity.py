"""The device's identity on disk: its sealed SM2 key, the pinned server key, the signed config bundle and the sealed
secrets (broker password, current session key), plus the terminal's local hash-chained security log.

Owns the identity directory (docs/identity.md, "Files on the device"):

    <dir>/                    mode 0700
      device_key.json         SM2 private key, sealed by `protocol.gm.keystore` (PBKDF2-HMAC-SM3 + SM4-GCM)
      device_key.next.json    only during a key rotation: the new key, sealed the same way
      server_key.pub          the pinned server public key (hex), checked against the enrol code's fingerprint
      bundle.json             the server-signed config bundle (`protocol.enrolment.SignedBundle`)
      secrets.json            broker password and current session key, SM4-GCM under a key derived from the passphrase
      audit.key, audit-NNNN.jsonl   the security log (HMAC-SM3 chain, `yibao audit verify`)

Every file is written 0600 and atomically (temp file created 0600, written, fsynced, renamed, directory fsynced), so
a crash leaves either the old or the new file, never half of one. Loading checks everything that ties the files
together (the bundle's signature against the pinned key, the device id and key epoch in the bundle against the key
and the secrets) and raises a typed `IdentityError` naming the file and what is wrong, so a terminal never runs on an
identity that is not its own.

It must never write a private key, the broker password or a session key unsealed, never log or print them, and
never talk to the network (enrolment and rotation requests travel through `terminal.session.DeviceApi`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from protocol import Clock
from protocol.enrolment import ConfigBundle, EnrolResponse, verify_bundle
from protocol.envelope import ContractError
from protocol.gm import sm4
from protocol.gm.audit_chain import AuditChainWriter, load_chain_key, verify_chain, write_chain_key
from protocol.gm.errors import (
    AuditChainError,
    CryptoError,
    DecryptionFailedError,
    InvalidSignatureError,
    KeyFormatError,
    WrongPassphraseError,
)
from protocol.gm.keystore import DEFAULT_ITERATIONS, MIN_PASSPHRASE_CHARS, load_private_key, save_private_key
from protocol.gm.records import canonical_json
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey
from protocol.secure import SessionKey
from terminal.errors import TerminalError

logger = logging.getLogger(__name__)

PASSPHRASE_ENV: Final = "YIBAO_DEVICE_KEY_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret
DEVICE_KEY: Final = "device_key.json"
NEXT_DEVICE_KEY: Final = "device_key.next.json"
SERVER_KEY: Final = "server_key.pub"
BUNDLE: Final = "bundle.json"
SECRETS: Final = "secrets.json"
AUDIT_KEY: Final = "audit.key"
AUDIT_GLOB: Final = "audit-*.jsonl"
SECRETS_FORMAT: Final = "yibao-device-secrets"
TEMPLATE_KEY: Final = "templates.key"
TEMPLATE_KEY_FORMAT: Final = "yibao-template-key"


# ---------------------------------------------------------------------------------------------------- errors


class IdentityError(TerminalError):
    """The device identity cannot be used; the message names the file and the problem (never a secret)."""


class NotEnrolledError(IdentityError):
    """The identity directory holds no enrolment (no bundle): run `yibao provision enrol` first."""


class PassphraseError(IdentityError):
    """No passphrase, an unsafe passphrase file, or the passphrase does not open the sealed files."""


class BundleRefusedError(IdentityError):
    """The config bundle or pinned key does not check out: bad signature, other device, other key epoch."""


# ---------------------------------------------------------------------------------------------------- files


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data`: temp file created 0600, written, fsynced, renamed, directory fsynced."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_private(path: Path) -> bytes:
    """Read a file that must not be accessible to group or others."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(f"{path} is accessible to group/others (mode {stat.S_IMODE(mode):04o}); chmod 600")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise NotEnrolledError(f"{path} is missing: this device is not enrolled (run `yibao provision enrol`)") from exc
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from exc


def resolve_passphrase(passphrase_file: Path | None, environ: Mapping[str, str]) -> str:
    """The key passphrase: from `passphrase_file` (first line; refused if group/others may read it) or else from
    `YIBAO_DEVICE_KEY_PASSPHRASE`."""
    if passphrase_file is not None:
        try:
            text = _read_private(passphrase_file).decode("utf-8")
        except NotEnrolledError as exc:
            raise PassphraseError(f"passphrase file {passphrase_file} does not exist") from exc
        except UnicodeDecodeError as exc:
            raise PassphraseError(f"passphrase file {passphrase_file} is not UTF-8 text") from exc
        passphrase = text.splitlines()[0] if text.strip() else ""
        source = f"passphrase file {passphrase_file}"
    else:
        passphrase = environ.get(PASSPHRASE_ENV, "")
        source = PASSPHRASE_ENV
        if not passphrase:
            raise PassphraseError(f"no key passphrase: set {PASSPHRASE_ENV} or [identity] passphrase_file")
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise PassphraseError(f"the passphrase from {source} is shorter than {MIN_PASSPHRASE_CHARS} characters")
    return passphrase


# ---------------------------------------------------------------------------------------------------- secrets


class _StoredSession(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: uuid.UUID
    key: str = Field(pattern=r"^[0-9a-f]{32}$")
    issued_at: AwareDatetime
    expires_at: AwareDatetime


class _Secrets(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str
    key_epoch: int = Field(ge=1)
    broker_password: str = Field(repr=False)
    session: _StoredSession | None = Field(default=None, repr=False)


def _derive(passphrase: str, salt: bytes, iterations: int) -> bytes:
    kdf = PBKDF2HMAC(algorithm=hashes.SM3(), length=sm4.KEY_SIZE, salt=salt, iterations=iterations)
    return kdf.derive(passphrase.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class DeviceIdentity:
    """A loaded, checked identity. `repr` shows no secret."""

    directory: Path
    private_key: SM2PrivateKey = field(repr=False)
    server_key: SM2PublicKey
    bundle: ConfigBundle
    broker_password: str = field(repr=False)

    @property
    def device_id(self) -> str:
        return self.bundle.device_id

    @property
    def key_epoch(self) -> int:
        return self.bundle.key_epoch

    def config_overlay(self) -> dict[str, Any]:
        """What the bundle decides in the terminal config (merged by `terminal.config`)."""
        mqtt = self.bundle.mqtt
        return {
            "device_id": self.bundle.device_id,
            "config_version": self.bundle.config_version,
            "mqtt": {
                "host": mqtt.host,
                "port": mqtt.port,
                "username": mqtt.username,
                "topic_prefix": mqtt.topic_prefix,
            },
        }


def identity_from_enrolment(
    key: SM2PrivateKey, response: EnrolResponse, *, device_id: str, server_fingerprint: str, directory: Path
) -> DeviceIdentity:
    """Check an enrolment answer without storing it: the server key it names must have the enrol code's
    fingerprint (then it is pinned), the bundle must verify with it and name this device and `key`."""
    signed = response.bundle
    try:
        server_key = SM2PublicKey.from_hex(signed.bundle.server_public_key)
    except KeyFormatError as exc:
        raise BundleRefusedError(f"the enrolment answer names a malformed server key: {exc}") from exc
    if server_key.fingerprint() != server_fingerprint:
        raise BundleRefusedError(
            f"the server key (fingerprint {server_key.fingerprint()}) is not the one the enrol code names "
            f"({server_fingerprint}): refusing to pin it"
        )
    bundle = IdentityStore.check_bundle(signed.to_bytes(), server_key, key, source="the enrolment answer")
    if bundle.device_id != device_id:
        raise BundleRefusedError(f"the enrolment answer is for device {bundle.device_id}, not {device_id}")
    return DeviceIdentity(directory, key, server_key, bundle, response.broker_password)


class IdentityStore:
    """The identity directory of one device. Not thread-safe for writers except `save_session` (locked)."""

    def __init__(self, directory: Path, passphrase: str, *, iterations: int = DEFAULT_ITERATIONS) -> None:
        self.directory = directory
        self._passphrase = passphrase
        self._iterations = iterations
        self._derived: dict[tuple[bytes, int], bytes] = {}
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.directory / name

    def ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)

    def is_enrolled(self) -> bool:
        return self.path(BUNDLE).exists()

    def has_key(self) -> bool:
        return self.path(DEVICE_KEY).exists()

    # -- enrolment

    def create_key(self) -> SM2PrivateKey:
        """Generate the device key pair here and store the private key sealed; refuses to replace a key."""
        self.ensure_directory()
        key = SM2PrivateKey.generate()
        try:
            save_private_key(self.path(DEVICE_KEY), key, self._passphrase, iterations=self._iterations)
        except KeyFormatError as exc:
            raise IdentityError(f"cannot store the device key: {exc}") from exc
        return key

    def discard_unenrolled_key(self) -> None:
        """Remove a key that never got enrolled (the server refused it); never touches an enrolled identity."""
        if not self.is_enrolled():
            self.path(DEVICE_KEY).unlink(missing_ok=True)

    def retire(self, now: datetime) -> Path | None:
        """Move every identity file into `retired/<time>/` (re-enrolment after an admin reset). Returns where."""
        names = [n for n in (DEVICE_KEY, NEXT_DEVICE_KEY, SERVER_KEY, BUNDLE, SECRETS) if self.path(n).exists()]
        if not names:
            return None
        target = self.directory / "retired" / now.strftime("%Y%m%dT%H%M%S%fZ")
        target.mkdir(mode=0o700, parents=True)
        for name in names:
            shutil.move(str(self.path(name)), str(target / name))
        _fsync_dir(self.directory)
        return target

    def store_enrolment(
        self, key: SM2PrivateKey, response: EnrolResponse, *, device_id: str, server_fingerprint: str
    ) -> DeviceIdentity:
        """Pin the server key the bundle names (its fingerprint must be the enrol code's), check the bundle, and
        store bundle, pinned key and sealed secrets."""
        identity = identity_from_enrolment(
            key, response, device_id=device_id, server_fingerprint=server_fingerprint, directory=self.directory
        )
        self.ensure_directory()
        write_atomic(self.path(SERVER_KEY), (identity.server_key.hex() + "\n").encode("ascii"))
        write_atomic(self.path(BUNDLE), response.bundle.to_bytes())
        self._write_secrets(
            _Secrets(device_id=device_id, key_epoch=identity.key_epoch, broker_password=response.broker_password)
        )
        return identity

    # -- rotation

    def begin_rotation(self) -> SM2PrivateKey:
        """A new key pair, sealed as `device_key.next.json` (a leftover from an unfinished rotation is replaced)."""
        key = SM2PrivateKey.generate()
        try:
            save_private_key(
                self.path(NEXT_DEVICE_KEY), key, self._passphrase, iterations=self._iterations, overwrite=True
            )
        except KeyFormatError as exc:
            raise IdentityError(f"cannot store the new device key: {exc}") from exc
        return key

    def complete_rotation(
        self, current: DeviceIdentity, new_key: SM2PrivateKey, response: EnrolResponse
    ) -> DeviceIdentity:
        """Check the new bundle (pinned key, same device, epoch + 1, the new key), then store bundle and secrets and
        make the new key current. A crash between the steps is finished by the next `load()`."""
        bundle = self.check_bundle(
            response.bundle.to_bytes(), current.server_key, new_key, source="the rotation answer"
        )
        if bundle.device_id != current.device_id:
            raise BundleRefusedError(f"the rotation answer is for device {bundle.device_id}, not {current.device_id}")
        if bundle.key_epoch != current.key_epoch + 1:
            raise BundleRefusedError(
                f"the rotation answer is for key epoch {bundle.key_epoch}, expected {current.key_epoch + 1}"
            )
        write_atomic(self.path(BUNDLE), response.bundle.to_bytes())
        self._write_secrets(
            _Secrets(device_id=bundle.device_id, key_epoch=bundle.key_epoch, broker_password=response.broker_password)
        )
        self.path(NEXT_DEVICE_KEY).replace(self.path(DEVICE_KEY))
        _fsync_dir(self.directory)
        return DeviceIdentity(self.directory, new_key, current.server_key, bundle, response.broker_password)

    # -- loading

    def load(self) -> DeviceIdentity:
        """Open and cross-check every file; `IdentityError` (a subclass saying which) if anything is off."""
        bundle_raw = _read_private(self.path(BUNDLE))
        try:
            server_key = SM2PublicKey.from_hex(_read_private(self.path(SERVER_KEY)).decode("ascii").strip())
        except (KeyFormatError, UnicodeDecodeError) as exc:
            raise BundleRefusedError(f"{self.path(SERVER_KEY)} does not hold a valid SM2 public key") from exc
        key = self._open_key(self.path(DEVICE_KEY))
        next_path = self.path(NEXT_DEVICE_KEY)
        if next_path.exists():
            key = self._finish_interrupted_rotation(bundle_raw, key, next_path)
        bundle = self.check_bundle(bundle_raw, server_key, key, source=str(self.path(BUNDLE)))
        secrets = self._read_secrets()
        if secrets.device_id != bundle.device_id:
            raise BundleRefusedError(
                f"{self.path(BUNDLE)} is for device {bundle.device_id} but the sealed secrets are device "
                f"{secrets.device_id}'s"
            )
        if secrets.key_epoch != bundle.key_epoch:
            raise BundleRefusedError(
                f"{self.path(BUNDLE)} is for key epoch {bundle.key_epoch} but the sealed secrets for epoch "
                f"{secrets.key_epoch}"
            )
        return DeviceIdentity(self.directory, key, server_key, bundle, secrets.broker_password)

    def _finish_interrupted_rotation(self, bundle_raw: bytes, key: SM2PrivateKey, next_path: Path) -> SM2PrivateKey:
        new_key = self._open_key(next_path)
        try:
            names = json.loads(bundle_raw)["bundle"]["device_public_key"]
        except (ValueError, KeyError, TypeError):
            return key  # the bundle check below names the problem
        if names == new_key.public_key.hex():
            next_path.replace(self.path(DEVICE_KEY))
            _fsync_dir(self.directory)
            logger.warning("identity: finished a key rotation that was interrupted after the new bundle was stored")
            return new_key
        return key

    def _open_key(self, path: Path) -> SM2PrivateKey:
        if not path.exists():
            raise NotEnrolledError(f"{path} is missing: this device has no key (run `yibao provision enrol`)")
        try:
            return load_private_key(path, self._passphrase)
        except WrongPassphraseError as exc:
            raise PassphraseError(f"{path}: wrong passphrase, or the key file was altered") from exc
        except KeyFormatError as exc:
            raise IdentityError(f"{path}: {exc}") from exc

    @staticmethod
    def check_bundle(raw: bytes, server_key: SM2PublicKey, key: SM2PrivateKey, *, source: str) -> ConfigBundle:
        try:
            bundle = verify_bundle(raw, pinned_server_key=server_key)
        except ContractError as exc:
            raise BundleRefusedError(f"{source}: {exc}") from exc
        except InvalidSignatureError as exc:
            raise BundleRefusedError(
                f"{source}: the config bundle's signature does not verify with the pinned server key ({exc})"
            ) from exc
        if bundle.device_public_key != key.public_key.hex():
            raise BundleRefusedError(
                f"{source}: the config bundle names another device key (key epoch {bundle.key_epoch}) than this "
                "device's"
            )
        return bundle

    # -- secrets

    def save_session(self, session: SessionKey | None) -> None:
        """Keep the current session key (sealed) so it survives a restart; None forgets it."""
        with self._lock:
            secrets = self._read_secrets()
            stored = (
                None
                if session is None
                else _StoredSession(
                    key_id=session.key_id,
                    key=session.key.hex(),
                    issued_at=session.issued_at,
                    expires_at=session.expires_at,
                )
            )
            self._write_secrets(secrets.model_copy(update={"session": stored}))

    def load_session(self) -> SessionKey | None:
        stored = self._read_secrets().session
        if stored is None:
            return None
        return SessionKey(stored.key_id, bytes.fromhex(stored.key), stored.issued_at, stored.expires_at)

    def template_key(self) -> bytes:
        """The SM4 key that seals face templates at rest (`terminal.face_templates`), created on first use.

        A random key, itself sealed under the passphrase-derived key in `templates.key`, so it survives key
        rotation and re-enrolment (the templates do not depend on the SM2 identity) and never sits on disk in clear.
        """
        path = self.path(TEMPLATE_KEY)
        with self._lock:
            if not path.exists():
                self.ensure_directory()
                salt = os.urandom(16)
                header: dict[str, Any] = {
                    "format": TEMPLATE_KEY_FORMAT,
                    "version": 1,
                    "kdf": "pbkdf2-hmac-sm3",
                    "iterations": self._iterations,
                    "salt": salt.hex(),
                }
                sealed = sm4.seal(self._key_for(salt, self._iterations), sm4.generate_key(), canonical_json(header))
                write_atomic(path, canonical_json({**header, "sealed": sealed.hex()}) + b"\n")
            raw = _read_private(path)
        try:
            doc = json.loads(raw)
            header = {k: doc[k] for k in ("format", "version", "kdf", "iterations", "salt")}
            if header["format"] != TEMPLATE_KEY_FORMAT or header["version"] != 1:
                raise IdentityError(f"{path} is not a version-1 template key file")
            salt, iterations, sealed = (
                bytes.fromhex(header["salt"]),
                int(header["iterations"]),
                bytes.fromhex(doc["sealed"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise IdentityError(f"{path} is malformed") from exc
        try:
            return sm4.open(self._key_for(salt, iterations), sealed, canonical_json(header))
        except DecryptionFailedError as exc:
            raise PassphraseError(f"{path} does not open with this passphrase (or was altered)") from exc

    def _key_for(self, salt: bytes, iterations: int) -> bytes:
        cached = self._derived.get((salt, iterations))
        if cached is None:
            cached = _derive(self._passphrase, salt, iterations)
            self._derived = {(salt, iterations): cached}
        return cached

    def _write_secrets(self, secrets: _Secrets) -> None:
        existing = self._secrets_header()
        if existing is not None and existing["iterations"] == self._iterations:
            salt = bytes.fromhex(existing["salt"])  # keep the salt so the derived key stays cached
        else:
            salt = os.urandom(16)
        header: dict[str, Any] = {
            "format": SECRETS_FORMAT,
            "version": 1,
            "kdf": "pbkdf2-hmac-sm3",
            "iterations": self._iterations,
            "salt": salt.hex(),
        }
        plaintext = canonical_json(secrets.model_dump(mode="json"))
        sealed = sm4.seal(self._key_for(salt, self._iterations), plaintext, canonical_json(header))
        write_atomic(self.path(SECRETS), canonical_json({**header, "sealed": sealed.hex()}) + b"\n")

    def _secrets_header(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.path(SECRETS).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("format") != SECRETS_FORMAT:
            return None
        return {k: v for k, v in doc.items() if k != "sealed"}

    def _read_secrets(self) -> _Secrets:
        path = self.path(SECRETS)
        try:
            doc = json.loads(_read_private(path))
            if not isinstance(doc, dict) or doc.get("format") != SECRETS_FORMAT or doc.get("version") != 1:
                raise IdentityError(f"{path} is not a yibao device-secrets file")
            sealed = bytes.fromhex(doc.pop("sealed"))
            salt = bytes.fromhex(doc["salt"])
            iterations = int(doc["iterations"])
        except (ValueError, KeyError, TypeError) as exc:
            raise IdentityError(f"{path} is malformed") from exc
        if iterations < 1000:
            raise IdentityError(f"{path} declares fewer than 1000 KDF iterations")
        try:
            plaintext = sm4.open(self._key_for(salt, iterations), sealed, canonical_json(doc))
        except DecryptionFailedError as exc:
            raise PassphraseError(f"{path}: wrong passphrase, or the file was altered") from exc
        try:
            return _Secrets.model_validate_json(plaintext)
        except ValidationError as exc:
            raise IdentityError(f"{path}: sealed contents are not device secrets") from exc


# ---------------------------------------------------------------------------------------------------- security log


class SecurityLog:
    """The terminal's local hash-chained log of security events (enrolment, rotation, refusals, commands).

    Appends never raise: a failing log is reported once and the terminal keeps serving (the outbox still holds the
    business records); `yibao audit verify <dir>/audit-NNNN.jsonl --key-file <dir>/audit.key` checks it."""

    def __init__(self, writer: AuditChainWriter | None) -> None:
        self._writer = writer
        self._failed = False

    @classmethod
    def open(cls, directory: Path, clock: Clock) -> SecurityLog:
        """Open (creating key and first segment if needed) the newest segment in `directory`; a broken newest
        segment is left as it is and the chain continues in a new one."""
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            key_path = directory / AUDIT_KEY
            if not key_path.exists():
                write_chain_key(key_path, os.urandom(32))
            key = load_chain_key(key_path)
            segments = sorted(directory.glob(AUDIT_GLOB))
            if not segments:
                return cls(AuditChainWriter.open(directory / "audit-0000.jsonl", key, clock))
            newest = segments[-1]
            if verify_chain(newest, key).ok:
                return cls(AuditChainWriter.open(newest, key, clock))
            number = int(newest.stem.split("-")[-1]) + 1
            logger.error("security log: %s is broken; continuing the chain in a new segment", newest.name)
            return cls(
                AuditChainWriter.start_segment(directory / f"audit-{number:04d}.jsonl", key, clock, after=newest)
            )
        except (OSError, ValueError, CryptoError) as exc:
            logger.error("security log: cannot open the audit chain in %s: %s", directory, exc)
            return cls(None)

    @property
    def path(self) -> Path | None:
        return None if self._writer is None else self._writer.path

    def record(self, event_type: str, **fields: str | int | bool | None) -> None:
        if self._writer is None:
            return
        try:
            self._writer.append({"type": event_type, **fields})
        except (AuditChainError, ValueError) as exc:
            if not self._failed:
                self._failed = True
                logger.error("security log: cannot append %s: %s", event_type, exc)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


__all__ = [
    "PASSPHRASE_ENV",
    "BundleRefusedError",
    "DeviceIdentity",
    "IdentityError",
    "IdentityStore",
    "NotEnrolledError",
    "PassphraseError",
    "SecurityLog",
    "identity_from_enrolment",
    "resolve_passphrase",
    "write_atomic",
]
