"""`yibao provision enrol|rotate`: the device-side provisioning commands, run ON the terminal.

They compose `provisioning` (the admin CLI's output conventions and exit codes) with `terminal.identity` and
`terminal.session` (key generation, sealed storage, the device API). They live here, in the composition root,
because `provisioning` may only talk HTTP (import-linter) while these commands must own the device's keys.

Owns writing the terminal config that makes `yibao terminal run --config …` use the enrolled identity. It must
never print the private key, the passphrase or the broker password: only where they are sealed.
"""

from __future__ import annotations

import os
import tomllib
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from protocol import SystemClock
from protocol.enrolment import EnrolCode
from provisioning.cli import emit, fail, progress
from provisioning.client import EXIT_LOCAL, EXIT_NETWORK, EXIT_REFUSED, EXIT_USAGE
from terminal.errors import TerminalError
from terminal.identity import IdentityError, IdentityStore, SecurityLog, resolve_passphrase, write_atomic
from terminal.session import (
    DeviceApiError,
    HttpDeviceApi,
    ServerRefusedError,
    ServerUnreachableError,
    enrol_device,
    rotate_identity,
)

BUNDLE_DECIDES = ("device_id", "config_version")
BUNDLE_DECIDES_MQTT = ("host", "port", "username", "topic_prefix")


def default_hardware_id() -> str:
    """The board's machine id when there is one, else the MAC address (as hex)."""
    for candidate in (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id")):
        try:
            text = candidate.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if 4 <= len(text) <= 128 and text.isalnum():
            return text
    return f"mac-{uuid.getnode():012x}"


def render_toml(doc: Mapping[str, Any]) -> str:
    """A config dict (scalars and nested tables, e.g. `[devices.qr_scanner]`) as TOML."""
    return tomli_w.dumps(dict(doc))


def write_terminal_config(config: Path, identity_dir: Path, passphrase_file: Path | None) -> None:
    """Create or update `config` so it runs on the identity in `identity_dir`: `[identity]` set, and every key the
    signed bundle decides removed (the bundle is the one source of them)."""
    doc: dict[str, Any] = {}
    if config.exists():
        with config.open("rb") as fh:
            doc = tomllib.load(fh)
    doc.setdefault("schema_version", 1)
    for key in BUNDLE_DECIDES:
        doc.pop(key, None)
    mqtt = doc.get("mqtt")
    if isinstance(mqtt, dict):
        for key in BUNDLE_DECIDES_MQTT:
            mqtt.pop(key, None)
        if not mqtt:
            doc.pop("mqtt")
    doc.setdefault("outbox", {"path": "outbox.sqlite3"})
    identity: dict[str, Any] = {"dir": str(identity_dir.resolve())}
    if passphrase_file is not None:
        identity["passphrase_file"] = str(passphrase_file.resolve())
    doc["identity"] = identity
    config.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(config, render_toml(doc).encode("utf-8"))


def _store(identity_dir: Path, passphrase_file: Path | None) -> IdentityStore:
    try:
        return IdentityStore(identity_dir, resolve_passphrase(passphrase_file, os.environ))
    except IdentityError as exc:
        fail(str(exc), EXIT_USAGE)


def _exit_for(exc: Exception) -> int:
    if isinstance(exc, ServerRefusedError):
        return EXIT_REFUSED
    if isinstance(exc, ServerUnreachableError | DeviceApiError):
        return EXIT_NETWORK
    return EXIT_LOCAL


def enrol_command(
    code: EnrolCode,
    *,
    identity_dir: Path,
    hardware_id: str | None,
    passphrase_file: Path | None,
    config: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    clock = SystemClock()
    store = _store(identity_dir, passphrase_file)
    if store.is_enrolled():
        if not force:
            fail(
                f"{identity_dir} already holds an enrolled identity; --force retires it (after an admin reset)",
                EXIT_LOCAL,
            )
        retired = store.retire(clock.now())
        progress(f"retired the previous identity to {retired}")
    hardware = hardware_id or default_hardware_id()
    progress(f"generating the SM2 key pair for {code.device_id} on this device …")
    api = HttpDeviceApi(code.server_url)
    log = SecurityLog.open(identity_dir, clock)
    try:
        progress(f"enrolling at {code.server_url} (hardware id {hardware}) …")
        identity = enrol_device(store, code, api, hardware_id=hardware, now=clock.now(), log=log)
    except (TerminalError, ValueError) as exc:
        fail(str(exc), _exit_for(exc))
    finally:
        api.close()
        log.close()
    config_path = config if config is not None else identity_dir.parent / "terminal.toml"
    write_terminal_config(config_path, identity_dir, passphrase_file)
    progress(
        f"enrolled: key epoch {identity.key_epoch}, server key {identity.server_key.fingerprint()} pinned; private key "
        f"and broker password sealed in {identity_dir}; terminal config written to {config_path}"
    )
    result = {
        "device_id": identity.device_id,
        "key_epoch": identity.key_epoch,
        "device_fingerprint": identity.private_key.public_key.fingerprint(),
        "server_fingerprint": identity.server_key.fingerprint(),
        "identity_dir": str(identity_dir),
        "config": str(config_path),
        "mqtt": f"{identity.bundle.mqtt.host}:{identity.bundle.mqtt.port}",
    }
    emit(result, as_json=as_json, text=f"enrolled {identity.device_id} (key epoch {identity.key_epoch})")


def rotate_command(*, identity_dir: Path, passphrase_file: Path | None, as_json: bool) -> None:
    clock = SystemClock()
    store = _store(identity_dir, passphrase_file)
    try:
        current = store.load()
    except IdentityError as exc:
        fail(str(exc), EXIT_LOCAL)
    api = HttpDeviceApi(current.bundle.server_url)
    log = SecurityLog.open(identity_dir, clock)
    progress(f"rotating the identity key of {current.device_id} (epoch {current.key_epoch}) …")
    try:
        identity = rotate_identity(store, api, now=clock.now(), log=log)
    except (TerminalError, ValueError) as exc:
        fail(str(exc), _exit_for(exc))
    finally:
        api.close()
        log.close()
    progress(f"new key sealed in {identity_dir}; restart the terminal to use it")
    result = {
        "device_id": identity.device_id,
        "key_epoch": identity.key_epoch,
        "device_fingerprint": identity.private_key.public_key.fingerprint(),
    }
    emit(result, as_json=as_json, text=f"rotated {identity.device_id} to key epoch {identity.key_epoch}")
