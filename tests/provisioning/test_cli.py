"""`yibao provision …` and `yibao terminal run` on the device side: exit codes, --json, refusal messages.

The server is played in-process (tests/terminal/identity_server.py) where a command only needs the local identity;
commands that need the HTTP server run against a closed loopback port here (network: exit 4) and against the real
server in tests/e2e."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from protocol.enrolment import EnrolCode
from terminal.identity import BUNDLE, IdentityStore
from terminal.session import enrol_device
from tests.terminal.conftest import FakeClock
from tests.terminal.identity_server import PlayedServer
from yibao.cli import app
from yibao.device_provision import write_terminal_config

PASSPHRASE = "correct horse battery staple"
runner = CliRunner()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in ("YIBAO_ADMIN_TOKEN", "YIBAO_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("YIBAO_DEVICE_KEY_PASSPHRASE", PASSPHRASE)
    return {"YIBAO_DEVICE_KEY_PASSPHRASE": PASSPHRASE}


def test_help_documents_the_exit_codes(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["provision", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for code in ("2 usage", "3 refused by the server", "4 network", "5 local key/bundle problem"):
        assert code in text


def test_register_without_a_token_is_a_usage_error(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["provision", "register", "KS-0001"])
    assert result.exit_code == 2
    assert "admin token" in result.output


def test_unreachable_server_is_exit_4(env: dict[str, str]) -> None:
    server = f"http://127.0.0.1:{closed_port()}"
    result = runner.invoke(app, ["provision", "register", "KS-0001", "--server", server, "--token", "t" * 32])
    assert result.exit_code == 4
    assert "cannot reach the server" in result.output


def test_a_bad_enrol_code_is_a_usage_error(env: dict[str, str], tmp_path: Path) -> None:
    result = runner.invoke(app, ["provision", "enrol", "YB1:not-a-code", "--identity-dir", str(tmp_path / "id")])
    assert result.exit_code == 2
    assert "invalid enrolment code" in result.output


def test_enrol_against_an_unreachable_server_is_exit_4_and_keeps_no_bundle(env: dict[str, str], tmp_path: Path) -> None:
    code = EnrolCode(
        server_url=f"http://127.0.0.1:{closed_port()}",
        device_id="KS-0001",
        claim_token="x" * 32,
        server_fingerprint="0" * 16,
    ).encode()
    result = runner.invoke(app, ["provision", "enrol", code, "--identity-dir", str(tmp_path / "id"), "--json"])
    assert result.exit_code == 4
    assert not (tmp_path / "id" / BUNDLE).exists()


def enrolled_device(tmp_path: Path) -> tuple[Path, Path]:
    """An identity enrolled against the played server, and a terminal config written the way `enrol` writes it."""
    server = PlayedServer(FakeClock())
    identity_dir = tmp_path / "identity"
    store = IdentityStore(identity_dir, PASSPHRASE, iterations=1000)
    enrol_device(store, server.register("KS-0001"), server, hardware_id="board-1", now=server.now())
    config = tmp_path / "terminal.toml"
    write_terminal_config(config, identity_dir, None)
    return identity_dir, config


def test_rotate_with_a_wrong_passphrase_is_exit_5(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity_dir, _ = enrolled_device(tmp_path)
    monkeypatch.setenv("YIBAO_DEVICE_KEY_PASSPHRASE", "a different passphrase")
    result = runner.invoke(app, ["provision", "rotate", "--identity-dir", str(identity_dir), "--json"])
    assert result.exit_code == 5
    assert "wrong passphrase" in result.output
    assert PASSPHRASE not in result.output


def test_check_config_reads_the_identity_from_the_bundle(env: dict[str, str], tmp_path: Path) -> None:
    _, config = enrolled_device(tmp_path)
    result = runner.invoke(app, ["terminal", "check-config", str(config)])
    assert result.exit_code == 0, result.output
    assert "device KS-0001" in result.output
    assert "key epoch 1" in result.output


def test_terminal_run_refuses_a_tampered_bundle(env: dict[str, str], tmp_path: Path) -> None:
    identity_dir, config = enrolled_device(tmp_path)
    bundle = identity_dir / BUNDLE
    raw = bytearray(bundle.read_bytes())
    index = raw.index(b'"config_version": "cfg-1"') + len(b'"config_version": "cfg-')
    raw[index] = ord("2")  # one byte: cfg-1 -> cfg-2
    bundle.write_bytes(bytes(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "yibao", "terminal", "run", "--simulated", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == 5
    assert "refusing to start" in proc.stderr
    assert "signature does not verify with the pinned server key" in proc.stderr
    # and the refusal is in the device's security log
    log_text = "".join(p.read_text() for p in identity_dir.glob("audit-*.jsonl"))
    assert "config.refused" in log_text


def test_written_config_keeps_local_settings_and_drops_what_the_bundle_decides(tmp_path: Path) -> None:
    config = tmp_path / "terminal.toml"
    config.write_text(
        'schema_version = 1\nconfig_version = "old"\ndevice_id = "KS-0001"\n'
        '[mqtt]\nhost = "old"\nport = 1\nkeepalive_s = 45\n[outbox]\npath = "box.sqlite3"\n',
        encoding="utf-8",
    )
    write_terminal_config(config, tmp_path / "identity", tmp_path / "pass")
    text = config.read_text()
    assert "keepalive_s = 45" in text
    assert 'path = "box.sqlite3"' in text
    assert "device_id" not in text
    assert "host" not in text
    assert json.dumps(str((tmp_path / "identity").resolve())) in text


def test_written_config_keeps_nested_device_tables(tmp_path: Path) -> None:
    config = tmp_path / "terminal.toml"
    config.write_text(
        'schema_version = 1\n[outbox]\npath = "box.sqlite3"\n'
        '[devices.qr_scanner]\nbackend = "serial"\nport = "/dev/ttyACM0"\nbaudrate = 9600\n'
        '[devices.camera]\nbackend = "simulated"\n',
        encoding="utf-8",
    )
    write_terminal_config(config, tmp_path / "identity", None)
    with config.open("rb") as fh:
        doc = tomllib.load(fh)
    assert doc["devices"]["qr_scanner"] == {"backend": "serial", "port": "/dev/ttyACM0", "baudrate": 9600}
    assert doc["devices"]["camera"] == {"backend": "simulated"}
    assert doc["identity"]["dir"] == str((tmp_path / "identity").resolve())
