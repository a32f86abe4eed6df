"""Device identity end to end against a real `yibao server run` (SQLite and PostgreSQL) and Mosquitto: the admin
registers a device, the device enrols with the printed code (key made on the device, server key pinned by the
code's fingerprint), opens a session, rotates its identity key; a used code is refused, a second enrolment needs an
admin reset, and a revoked device can no longer open a session."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from protocol import SystemClock
from terminal.session import ServerRefusedError, load_terminal
from yibao.broker import MosquittoBroker
from yibao.cli import app
from yibao.procs import stop
from yibao.server_proc import ServerProcess, start_server_process

pytestmark = pytest.mark.e2e

PASSPHRASE = "e2e device passphrase"
runner = CliRunner()


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path: Path, broker: MosquittoBroker) -> Iterator[ServerProcess]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'server.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_database_url")
    proc = start_server_process(database_url=url, mqtt_host=broker.host, mqtt_port=broker.port, workdir=tmp_path)
    try:
        yield proc
    finally:
        stop(proc.proc, name="server")


@pytest.fixture(autouse=True)
def device_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YIBAO_DEVICE_KEY_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("YIBAO_ADMIN_TOKEN", raising=False)


def cli(*args: str) -> tuple[int, dict[str, object]]:
    result = runner.invoke(app, list(args))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return result.exit_code, json.loads(lines[-1]) if lines else {"output": result.output}


def test_register_enrol_session_rotate_reset_revoke(server: ServerProcess, tmp_path: Path) -> None:
    admin = ["--server", server.base_url, "--token", server.admin_token, "--json"]
    code, claim = cli("provision", "register", "KS-0001", *admin)
    assert code == 0, claim
    enrol_code = str(claim["enrol_code"])
    assert enrol_code.startswith("YB1:")

    identity_dir = tmp_path / "device" / "identity"
    code, enrolled = cli("provision", "enrol", enrol_code, "--identity-dir", str(identity_dir), "--json")
    assert code == 0, enrolled
    assert enrolled["key_epoch"] == 1
    assert enrolled["server_fingerprint"] == claim["server_fingerprint"]
    assert identity_dir.stat().st_mode & 0o777 == 0o700

    # the code is single use: a second device with the same code is refused (exit 3)
    code, again = cli("provision", "enrol", enrol_code, "--identity-dir", str(tmp_path / "other"), "--json")
    assert code == 3, again
    # and this device cannot enrol twice without an admin reset (its identity is there: exit 5 locally) ...
    code, twice = cli("provision", "enrol", enrol_code, "--identity-dir", str(identity_dir), "--json")
    assert code == 5, twice

    # the terminal config `enrol` wrote runs on the bundle; the device opens a session with its identity key
    config_path = tmp_path / "device" / "terminal.toml"
    config, security = load_terminal(config_path, environ=os.environ, clock=SystemClock())
    assert security is not None
    assert config.device_id == "KS-0001"
    assert config.mqtt.username == "KS-0001"
    assert config.mqtt.port == security.identity.bundle.mqtt.port
    key = security.sessions.handshake("e2e")
    security.stop()
    assert key.key_id

    code, rotated = cli("provision", "rotate", "--identity-dir", str(identity_dir), "--json")
    assert code == 0, rotated
    assert rotated["key_epoch"] == 2
    _, security = load_terminal(config_path, environ=os.environ, clock=SystemClock())
    assert security is not None
    assert security.identity.key_epoch == 2
    security.sessions.handshake("after rotation")
    security.stop()

    code, shown = cli("provision", "show", "KS-0001", *admin)
    assert code == 0, shown
    provisioning = shown["provisioning"]
    assert isinstance(provisioning, dict)
    assert provisioning["key_epoch"] == 2
    assert provisioning["state"] == "enrolled"

    # reset: a new code, and the device re-enrols (retiring its old identity) with --force
    code, reclaim = cli("provision", "reset", "KS-0001", "--reason", "board replaced", *admin)
    assert code == 0, reclaim
    code, reenrolled = cli(
        "provision", "enrol", str(reclaim["enrol_code"]), "--identity-dir", str(identity_dir), "--force", "--json"
    )
    assert code == 0, reenrolled
    assert (identity_dir / "retired").is_dir()

    code, revoked = cli("provision", "revoke", "KS-0001", "--reason", "stolen", *admin)
    assert code == 0, revoked
    assert revoked["state"] == "revoked"
    _, security = load_terminal(config_path, environ=os.environ, clock=SystemClock())
    assert security is not None
    with pytest.raises(ServerRefusedError) as refused:
        security.sessions.handshake("after revocation")
    security.stop()
    assert refused.value.status == 403


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_admin_commands_need_a_valid_token(server: ServerProcess) -> None:
    code, out = cli("provision", "register", "KS-0002", "--server", server.base_url, "--token", "x" * 40, "--json")
    assert code == 3, out
    code, out = cli("provision", "list", "--server", server.base_url, "--token", server.admin_token, "--json")
    assert code == 0, out
    assert "items" in out
