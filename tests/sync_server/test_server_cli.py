"""`yibao server init`, `yibao server admin-token create` and the server's audit chain of admin actions, checked
offline with `yibao audit verify`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, select

from protocol.gm.audit_chain import load_chain_key, verify_chain
from sync_server.app import create_app
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.models import AdminToken
from sync_server.errors import ConfigurationError
from sync_server.identity import ServerIdentity, token_digest
from sync_server.settings import ServerSettings
from tests.sync_server.conftest import serving


def yibao(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "yibao", "--log-level", "warning", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_init_creates_the_server_key_once_and_prod_never_creates_it(sqlite_url: str, tmp_path: Path) -> None:
    data = tmp_path / "server-data"
    first = yibao("server", "init", "--database-url", sqlite_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("created server key")
    again = yibao("server", "init", "--database-url", sqlite_url)
    assert again.returncode == 0, again.stderr
    fingerprint = first.stdout.split("fingerprint ")[1].rstrip(")\n")
    assert again.stdout.strip().endswith(f"(fingerprint {fingerprint})")
    assert (data / "server_key.json").stat().st_mode & 0o077 == 0
    prod = ServerSettings(
        environment="prod",
        secret_key=SecretStr("s" * 40),
        server_key_passphrase=SecretStr("p" * 40),
        data_dir=tmp_path / "elsewhere",
    )
    with pytest.raises(ConfigurationError, match="yibao server init"):
        ServerIdentity(prod).private_key()
    assert not (tmp_path / "elsewhere").exists()


def test_admin_token_and_admin_actions_land_in_a_verifiable_audit_chain(
    sqlite_url: str, sqlite_engine: Engine, tmp_path: Path
) -> None:
    made = yibao("server", "admin-token", "create", "--name", "ops-bob", "--database-url", sqlite_url)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert len(token) >= 40
    engine = create_db_engine(sqlite_url)
    try:
        with session_factory(engine)() as session:
            row = session.scalar(select(AdminToken).where(AdminToken.sha256 == token_digest(token)))
            assert row is not None
            assert row.name == "ops-bob"
    finally:
        engine.dispose()

    app = create_app(ServerSettings(database_url=sqlite_url), engine=sqlite_engine, start_ingest=False)
    with serving(app, admin=False) as anonymous:
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=str(anonymous.base_url), headers=auth) as ops:
            assert ops.post("/api/v1/provisioning/devices", json={"device_id": "kiosk-555"}).status_code == 201
            assert ops.post("/api/v1/devices/kiosk-555/commands", json={"kind": "ping"}).status_code == 201
            assert ops.post("/api/v1/provisioning/devices/kiosk-555/revoke", json={"reason": "lost"}).status_code == 200
            assert ops.post("/api/v1/provisioning/devices/kiosk-555/reset", json={"reason": "found"}).status_code == 200

    audit_dir = tmp_path / "server-data" / "audit"
    chain, key = audit_dir / "server-audit.jsonl", audit_dir / "chain.key"
    verdict = yibao("audit", "verify", str(chain), "--key-file", str(key), "--json")
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert json.loads(verdict.stdout)["entries"] == 5
    entries = [json.loads(line)["event"] for line in chain.read_text().splitlines()]
    assert [e["type"] for e in entries] == [
        "admin_token.created",
        "device.registered",
        "command.issued",
        "device.revoked",
        "device.reset",
    ]
    assert {e.get("admin") for e in entries[1:]} == {"ops-bob"}
    assert token not in chain.read_text()
    # a changed byte is caught
    text = chain.read_text().replace('"reason":"lost"', '"reason":"LOST"')
    chain.write_text(text)
    report = verify_chain(chain, load_chain_key(key))
    assert (report.ok, report.reason, report.first_broken_line) == (False, "mac_mismatch", 4)
