"""Device identity end to end against a real `yibao server run` (SQLite and PostgreSQL) and Mosquitto: the admin
registers a device, the device enrols with the printed code (key made on the device, server key pinned by the
code's fingerprint), opens a session, rotates its identity key; a used code is refused, a second enrolment needs an
admin reset, and a revoked device can no longer open a session."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from typer.testing import CliRunner

from hardware_sim.fleet import Fleet, FleetOptions, enrol_fleet, fleet_device_id
from protocol import SystemClock
from protocol.gm.audit_chain import load_chain_key, verify_chain
from protocol.payloads import SignedRecordKind
from protocol.secure import is_secure_frame
from terminal.session import ServerRefusedError, load_terminal
from yibao.broker import MosquittoBroker
from yibao.cli import app
from yibao.procs import spawn, stop, yibao_argv
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


def events_total(http: httpx.Client, device_id: str, payload_type: str) -> int:
    resp = http.get(f"/api/v1/devices/{device_id}/events", params={"payload_type": payload_type, "limit": 1})
    if resp.status_code == 404:
        return 0
    resp.raise_for_status()
    return int(resp.json()["total"])


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_an_enrolled_terminal_sends_only_sealed_frames_that_the_server_stores_then_revocation_cuts_it_off(
    server: ServerProcess, broker: MosquittoBroker, tmp_path: Path
) -> None:
    admin = ["--server", server.base_url, "--token", server.admin_token, "--json"]
    device = "KS-0100"
    code, claim = cli("provision", "register", device, *admin)
    assert code == 0, claim
    identity_dir = tmp_path / "device" / "identity"
    config_path = tmp_path / "device" / "terminal.toml"
    config_path.parent.mkdir(parents=True)
    config_path.write_text("schema_version = 1\n[heartbeat]\ninterval_s = 0.5\n", encoding="utf-8")
    code, enrolled = cli("provision", "enrol", str(claim["enrol_code"]), "--identity-dir", str(identity_dir), "--json")
    assert code == 0, enrolled

    seen: list[bytes] = []
    sniffer = Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    subscribed = threading.Event()
    sniffer.on_message = lambda c, u, m: seen.append(bytes(m.payload))
    sniffer.on_subscribe = lambda *a: subscribed.set()
    sniffer.connect(broker.host, broker.port)
    sniffer.subscribe([(f"yibao/v1/dev/{device}/up", 0), (f"yibao/v1/dev/{device}/status", 0)])
    sniffer.loop_start()
    assert subscribed.wait(10)

    env = {**os.environ, "YIBAO_DEVICE_KEY_PASSPHRASE": PASSPHRASE}
    log = tmp_path / "terminal.log"
    terminal = spawn(
        yibao_argv("terminal", "run", "--simulated", "--config", str(config_path), "--emit", "40"),
        env=env,
        log_path=log,
    )
    http = httpx.Client(base_url=server.base_url, headers=server.admin_headers, timeout=10)
    try:
        assert wait_until(lambda: events_total(http, device, "audit_event") >= 41, 60), log.read_text()[-3000:]
        assert wait_until(lambda: http.get(f"/api/v1/devices/{device}").json()["online"], 20)  # sealed 'online'
        assert seen
        assert all(is_secure_frame(payload) for payload in seen if payload)  # nothing on the wire in plaintext
        assert events_total(http, device, "audit_event") == 41  # stored once each
        assert http.get("/api/v1/ingest/stats").json()["ingest"]["security_refused"] == 0

        # a rotate_keys command reaches the terminal sealed, is carried out, and records keep flowing
        resp = http.post(f"/api/v1/devices/{device}/commands", json={"kind": "rotate_keys", "ttl_s": 600})
        assert resp.status_code == 201, resp.text
        command_id = resp.json()["command_id"]

        def answered() -> bool:
            return bool(http.get(f"/api/v1/commands/{command_id}").json()["state"] == "acknowledged")

        assert wait_until(answered, 30)
        assert http.get(f"/api/v1/commands/{command_id}").json()["result_outcome"] == "applied"
        beats = events_total(http, device, "heartbeat")
        assert wait_until(lambda: events_total(http, device, "heartbeat") > beats + 2, 20)
        assert http.get("/api/v1/ingest/stats").json()["ingest"]["security_refused"] == 0

        code, revoked = cli("provision", "revoke", device, "--reason", "stolen", *admin)
        assert code == 0, revoked

        def refused() -> int:
            return int(http.get("/api/v1/ingest/stats").json()["ingest"]["security_refused"])

        assert wait_until(lambda: refused() > 0, 20)  # its heartbeats (every 0.5 s) are refused now
        beats = events_total(http, device, "heartbeat")
        time.sleep(2)  # four more heartbeat intervals: nothing more may be stored
        assert events_total(http, device, "heartbeat") == beats
    finally:
        http.close()
        stop(terminal, name="terminal")
        sniffer.disconnect()
        sniffer.loop_stop()
    chain = sorted(identity_dir.glob("audit-*.jsonl"))[-1]
    assert verify_chain(chain, load_chain_key(identity_dir / "audit.key")).ok
    events = [json.loads(line)["event"]["type"] for line in chain.read_text().splitlines()]
    assert {"identity.enrolled", "terminal.identity_loaded", "command.applied", "session.rotation_requested"} <= set(
        events
    )
    assert events.count("session.established") >= 2  # the first key and the one the command asked for


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_an_enrolled_fleet_is_stored_through_the_real_server(
    server: ServerProcess, broker: MosquittoBroker, tmp_path: Path
) -> None:
    device_ids = [fleet_device_id("ENC", i) for i in range(4)]
    enrolment = enrol_fleet(server.base_url, server.admin_token, device_ids, workers=2)
    assert sorted(enrolment.sessions) == device_ids
    fleet = Fleet(
        FleetOptions(
            terminals=len(device_ids),
            broker_host=broker.host,
            broker_port=broker.port,
            workdir=tmp_path / "fleet",
            device_prefix="ENC",
            scheduling="pooled",
            sweep_s=0.5,
            heartbeat_interval_s=60,
            sessions=enrolment.sessions,
        )
    )
    http = httpx.Client(base_url=server.base_url, headers=server.admin_headers, timeout=10)
    try:
        fleet.start()
        assert fleet.wait_connected(20) == len(device_ids)
        fleet.enqueue_audits(25)
        first = fleet.terminals[0]
        first.runtime.record_signed(SignedRecordKind.SIGN_IN, {"pharmacist": "ph-7f3a", "method": "face"})
        assert fleet.scheduler is not None
        fleet.scheduler.schedule(first)
        assert wait_until(lambda: all(events_total(http, d, "audit_event") == 25 for d in device_ids), 60)
        # the signed record passed the server's signature check (identity key of epoch 1) and was stored
        assert wait_until(lambda: events_total(http, device_ids[0], "signed_record") == 1, 30)
        assert wait_until(lambda: fleet.outbox_depth() == 0, 30)  # sealed acks came back and opened
        assert http.get("/api/v1/ingest/stats").json()["ingest"]["security_refused"] == 0
    finally:
        fleet.stop()
        http.close()


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)
def test_a_reenrolled_terminal_with_a_new_outbox_numbers_above_what_the_server_holds(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A board replaced with a blank disk: after an admin reset and a new enrolment its records must not reuse seqs
    the server already stored under this device id (they would be taken for those and acknowledged: lost)."""
    admin = ["--server", server.base_url, "--token", server.admin_token, "--json"]
    device = "KS-0200"
    env = {**os.environ, "YIBAO_DEVICE_KEY_PASSPHRASE": PASSPHRASE}
    http = httpx.Client(base_url=server.base_url, headers=server.admin_headers, timeout=10)

    def one_life(home: Path, enrol_code: str, records: int, *extra: str) -> int:
        config_path = home / "terminal.toml"
        home.mkdir(parents=True)
        config_path.write_text("schema_version = 1\n[heartbeat]\ninterval_s = 60\n", encoding="utf-8")
        code, enrolled = cli("provision", "enrol", enrol_code, "--identity-dir", str(home / "identity"), *extra)
        assert code == 0, enrolled
        before = events_total(http, device, "audit_event")
        terminal = spawn(
            yibao_argv("terminal", "run", "--simulated", "--config", str(config_path), "--emit", str(records)),
            env=env,
            log_path=home / "terminal.log",
        )
        try:
            want = before + records + 1  # and its 'terminal.started' event
            assert wait_until(lambda: events_total(http, device, "audit_event") >= want, 60), (
                home / "terminal.log"
            ).read_text()[-3000:]
        finally:
            stop(terminal, name="terminal")
        return events_total(http, device, "audit_event")

    try:
        code, claim = cli("provision", "register", device, *admin)
        assert code == 0, claim
        first = one_life(tmp_path / "life-1", str(claim["enrol_code"]), 20, "--json")
        code, reclaim = cli("provision", "reset", device, "--reason", "board replaced, blank disk", *admin)
        assert code == 0, reclaim
        second = one_life(tmp_path / "life-2", str(reclaim["enrol_code"]), 15, "--json")
        assert second == first + 16, "every record of the new life is stored, none mistaken for an old one"
        stats = http.get("/api/v1/ingest/stats").json()["ingest"]
        assert stats["conflicts"] == 0
    finally:
        http.close()
