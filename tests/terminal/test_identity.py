"""The device identity directory: enrolment storage, loading checks, sealed secrets, atomic writes, rotation."""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import pytest

from protocol.gm.audit_chain import load_chain_key, verify_chain
from protocol.secure import SessionKey
from terminal.config import parse_terminal_config
from terminal.errors import ConfigError
from terminal.identity import (
    AUDIT_KEY,
    BUNDLE,
    DEVICE_KEY,
    NEXT_DEVICE_KEY,
    SECRETS,
    SERVER_KEY,
    BundleRefusedError,
    IdentityStore,
    NotEnrolledError,
    PassphraseError,
    SecurityLog,
    resolve_passphrase,
    write_atomic,
)
from terminal.session import ServerRefusedError, enrol_device, rotate_identity
from tests.terminal.conftest import FakeClock
from tests.terminal.identity_server import PlayedServer

PASSPHRASE = "correct horse battery staple"
ITERATIONS = 1000  # the keystore's floor: tests only


def store_at(path: Path, passphrase: str = PASSPHRASE) -> IdentityStore:
    return IdentityStore(path, passphrase, iterations=ITERATIONS)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> PlayedServer:
    return PlayedServer(clock)


def enrolled(tmp_path: Path, server: PlayedServer, device_id: str = "SIM-0001") -> IdentityStore:
    store = store_at(tmp_path / "identity")
    enrol_device(store, server.register(device_id), server, hardware_id=f"board-{device_id}", now=server.now())
    return store


def test_enrolment_stores_private_files_and_loads_back(tmp_path: Path, server: PlayedServer) -> None:
    store = enrolled(tmp_path, server)
    identity = store.load()
    assert identity.device_id == "SIM-0001"
    assert identity.key_epoch == 1
    assert identity.server_key == server.server_key.public_key
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    for name in (DEVICE_KEY, SERVER_KEY, BUNDLE, SECRETS):
        assert stat.S_IMODE((store.directory / name).stat().st_mode) == 0o600, name
    secrets_text = (store.directory / SECRETS).read_text()
    assert identity.broker_password not in secrets_text  # sealed, not stored in clear
    assert identity.private_key.secret_bytes().hex() not in (store.directory / DEVICE_KEY).read_text()
    assert "broker_password" not in repr(identity)
    assert identity.broker_password not in repr(identity)
    assert identity.config_overlay()["mqtt"]["username"] == "SIM-0001"


def test_wrong_passphrase_is_refused(tmp_path: Path, server: PlayedServer) -> None:
    enrolled(tmp_path, server)
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        store_at(tmp_path / "identity", "another long passphrase").load()


@pytest.mark.parametrize("offset", [30, -40])
def test_a_tampered_bundle_byte_is_refused(tmp_path: Path, server: PlayedServer, offset: int) -> None:
    store = enrolled(tmp_path, server)
    path = store.directory / BUNDLE
    raw = bytearray(path.read_bytes())
    # flip one character of a value (never a structural one) so the JSON stays well-formed where possible
    index = offset % len(raw)
    while not chr(raw[index]).isalnum():
        index += 1
    raw[index] = ord("1") if raw[index] != ord("1") else ord("2")
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleRefusedError):
        store.load()


def test_another_devices_bundle_is_refused(tmp_path: Path, server: PlayedServer) -> None:
    mine = enrolled(tmp_path / "a", server, "SIM-0001")
    other = enrolled(tmp_path / "b", server, "SIM-0002")
    (mine.directory / BUNDLE).write_bytes((other.directory / BUNDLE).read_bytes())  # validly signed, not ours
    with pytest.raises(BundleRefusedError, match="another device key"):
        mine.load()


def test_secrets_of_another_epoch_are_refused(tmp_path: Path, server: PlayedServer) -> None:
    store = enrolled(tmp_path, server)
    old_secrets = (store.directory / SECRETS).read_bytes()
    rotate_identity(store, server, now=server.now())
    write_atomic(store.directory / SECRETS, old_secrets)
    with pytest.raises(BundleRefusedError, match="key epoch"):
        store.load()


def test_a_bundle_signed_by_another_server_key_is_refused(tmp_path: Path, server: PlayedServer) -> None:
    store = enrolled(tmp_path, server)
    impostor = PlayedServer(server.clock)
    (store.directory / SERVER_KEY).write_text(impostor.server_key.public_key.hex() + "\n")
    with pytest.raises(BundleRefusedError, match="pinned"):
        store.load()


def test_enrolment_refuses_a_server_key_other_than_the_codes(tmp_path: Path, server: PlayedServer) -> None:
    code = server.register("SIM-0001")
    forged = code.model_copy(update={"server_fingerprint": "0" * 16})
    store = store_at(tmp_path / "identity")
    with pytest.raises(BundleRefusedError, match="refusing to pin"):
        enrol_device(store, forged, server, hardware_id="board-1", now=server.now())
    assert not store.is_enrolled()


def test_a_refused_enrolment_leaves_no_key_behind(tmp_path: Path, server: PlayedServer) -> None:
    code = server.register("SIM-0001")
    store = store_at(tmp_path / "identity")
    enrol_device(store, code, server, hardware_id="board-1", now=server.now())
    other = store_at(tmp_path / "other")
    with pytest.raises(ServerRefusedError) as refused:
        enrol_device(other, code, server, hardware_id="board-2", now=server.now())  # token already used
    assert refused.value.status == 401
    assert not other.has_key()


def test_not_enrolled_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(NotEnrolledError, match="not enrolled"):
        store_at(tmp_path / "nothing").load()


def test_session_key_is_sealed_and_survives_a_new_store(tmp_path: Path, server: PlayedServer) -> None:
    store = enrolled(tmp_path, server)
    key = SessionKey(uuid.uuid4(), os.urandom(16), server.now(), server.now())
    store.save_session(key)
    assert key.key.hex() not in (store.directory / SECRETS).read_text()
    again = store_at(store.directory).load_session()
    assert again == key


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.json"
    write_atomic(target, b"old")

    class BoomError(Exception):
        pass

    def failing_fsync(fd: int) -> None:
        raise BoomError

    monkeypatch.setattr(os, "fsync", failing_fsync)  # the disk fails before the rename
    with pytest.raises(BoomError):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left


def test_rotation_moves_to_the_next_epoch(tmp_path: Path, server: PlayedServer) -> None:
    store = enrolled(tmp_path, server)
    before = store.load()
    after = rotate_identity(store, server, now=server.now())
    assert after.key_epoch == 2
    assert after.private_key.public_key != before.private_key.public_key
    assert not (store.directory / NEXT_DEVICE_KEY).exists()
    loaded = store.load()
    assert loaded.key_epoch == 2
    assert loaded.private_key.public_key == after.private_key.public_key
    assert loaded.broker_password == after.broker_password != before.broker_password


def test_a_rotation_interrupted_after_the_bundle_is_finished_on_load(tmp_path: Path, server: PlayedServer) -> None:
    store = enrolled(tmp_path, server)
    current = store.load()
    new_key = store.begin_rotation()
    from protocol.enrolment import make_rotate_request

    response = server.rotate(
        make_rotate_request(current.private_key, new_key, device_id="SIM-0001", key_epoch=1, now=server.now())
    )
    # the crash: new bundle and secrets written, the key not yet moved into place
    write_atomic(store.directory / BUNDLE, response.bundle.to_bytes())
    store._write_secrets(
        store._read_secrets().model_copy(update={"key_epoch": 2, "broker_password": response.broker_password})
    )
    loaded = store.load()
    assert loaded.key_epoch == 2
    assert loaded.private_key.public_key == new_key.public_key
    assert not (store.directory / NEXT_DEVICE_KEY).exists()


def test_passphrase_sources(tmp_path: Path) -> None:
    with pytest.raises(PassphraseError, match="YIBAO_DEVICE_KEY_PASSPHRASE"):
        resolve_passphrase(None, {})
    with pytest.raises(PassphraseError, match="shorter"):
        resolve_passphrase(None, {"YIBAO_DEVICE_KEY_PASSPHRASE": "short"})
    assert resolve_passphrase(None, {"YIBAO_DEVICE_KEY_PASSPHRASE": PASSPHRASE}) == PASSPHRASE
    file = tmp_path / "pass"
    file.write_text(PASSPHRASE + "\n")
    file.chmod(0o644)
    with pytest.raises(Exception, match="group/others"):
        resolve_passphrase(file, {})
    file.chmod(0o600)
    assert resolve_passphrase(file, {}) == PASSPHRASE


def test_security_log_is_a_verifiable_chain(tmp_path: Path, clock: FakeClock) -> None:
    log = SecurityLog.open(tmp_path, clock)
    log.record("identity.enrolled", device_id="SIM-0001", key_epoch=1)
    log.record("session.established", key_id="k")
    path = log.path
    log.close()
    assert path is not None
    report = verify_chain(path, load_chain_key(tmp_path / AUDIT_KEY))
    assert report.ok
    assert report.entries == 2
    lines = path.read_text().splitlines()
    doc = json.loads(lines[1])
    doc["event"]["key_id"] = "other"
    path.write_text(lines[0] + "\n" + json.dumps(doc) + "\n")
    assert not verify_chain(path, load_chain_key(tmp_path / AUDIT_KEY)).ok
    # reopening continues the chain in a new segment instead of appending after the broken tail
    again = SecurityLog.open(tmp_path, clock)
    again.record("terminal.identity_loaded")
    assert again.path is not None
    assert again.path.name == "audit-0001.jsonl"
    again.close()


def test_the_bundle_decides_identity_keys_and_a_contradiction_is_refused(tmp_path: Path, server: PlayedServer) -> None:
    identity = enrolled(tmp_path, server).load()
    raw = {"schema_version": 1, "outbox": {"path": "box.sqlite3"}, "identity": {"dir": "identity"}}
    with pytest.raises(ConfigError, match="needs its identity loaded"):
        parse_terminal_config(dict(raw), source="t.toml")
    config = parse_terminal_config(
        dict(raw), source="t.toml", base_dir=tmp_path, overlay=lambda _s: identity.config_overlay()
    )
    assert config.device_id == "SIM-0001"
    assert config.mqtt.username == "SIM-0001"
    assert config.identity is not None
    assert config.identity.dir == tmp_path / "identity"
    contradicting = {**raw, "device_id": "SIM-0009"}
    with pytest.raises(ConfigError, match="device_id: the file says 'SIM-0009' but the signed identity bundle says"):
        parse_terminal_config(contradicting, source="t.toml", overlay=lambda _s: identity.config_overlay())
