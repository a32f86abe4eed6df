"""The whole stack as a newcomer runs it: real Mosquitto, the real server process, a simulated terminal process
that the demo registers and enrols through the real `yibao provision` CLI and that then sends only sealed frames."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from playwright.sync_api import sync_playwright
from sqlalchemy.engine import make_url

from protocol.secure import is_secure_frame
from yibao.demo import OPERATOR, DemoOptions, start_stack
from yibao.procs import is_alive

NEW_PASSWORD = "Demo-2026-operator"

pytestmark = pytest.mark.e2e


def _smoke(yibao_cmd: list[str], *extra: str, secret: str | None = None) -> dict[str, object]:
    proc = subprocess.run(
        [*yibao_cmd, "--log-level", "warning", "demo", "--smoke", *extra],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    if secret:
        assert secret not in proc.stdout + proc.stderr, "a database password reached the output"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"expected one JSON line; stdout={proc.stdout!r} stderr={proc.stderr[-3000:]!r}"
    result: dict[str, object] = json.loads(lines[0])
    assert proc.returncode == 0, f"smoke failed: {result} stderr={proc.stderr[-3000:]}"
    return result


def test_smoke_on_sqlite_stores_every_record_exactly_once(yibao_cmd: list[str]) -> None:
    result = _smoke(yibao_cmd)
    assert result["sent"] == 1000
    assert result["stored"] == 1000
    assert result["duplicates"] == 0
    assert result["lost"] == 0
    assert result["seq_contiguous"] is True
    assert result["server_acked"] is True, "the terminal reported every record acknowledged by the server"
    # the secure path: the server has the device enrolled with the key it made, and nothing went over the wire in
    # plaintext (the demo's broker observer saw every record and heartbeat sealed), and nothing was refused
    assert result["enrolled"] is True
    assert result["encrypted"] is True
    assert isinstance(result["key_fingerprint"], str)
    assert len(result["key_fingerprint"]) >= 16
    assert result["plaintext_seen"] == 0
    assert isinstance(result["sealed_frames_seen"], int)
    assert result["sealed_frames_seen"] > 0
    assert result["security_refused"] == 0
    assert result["leftover_processes"] == 0
    assert result["ok"] is True


@pytest.mark.postgres
def test_smoke_on_postgresql_stores_every_record_exactly_once(yibao_cmd: list[str], pg_database_url: str) -> None:
    password = make_url(pg_database_url).password
    result = _smoke(
        yibao_cmd, "--records", "1000", "--database-url", pg_database_url, secret=password and f":{password}@"
    )
    assert (result["sent"], result["stored"], result["duplicates"], result["lost"]) == (1000, 1000, 0, 0)
    assert result["server_acked"] is True
    assert (result["enrolled"], result["encrypted"], result["plaintext_seen"]) == (True, True, 0)
    assert result["leftover_processes"] == 0


def _children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="ascii").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_interactive_demo_prints_the_address_and_ctrl_c_leaves_nothing_running(yibao_cmd: list[str]) -> None:
    proc = subprocess.Popen(
        [*yibao_cmd, "--log-level", "warning", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "Press Ctrl-C" in line:
            break
    out = "".join(seen)
    assert "Press Ctrl-C" in out, out
    assert "http://127.0.0.1:" in out
    assert "SIM-0001 is online" in out
    assert "SIM-0001 registered and enrolled" in out
    assert "device key fingerprint" in out
    assert "traffic encrypted (SM4-GCM)" in out
    # the operator account for the pages, its generated password alone at the end of its line
    assert "Sign in    as demo-admin (device admin)" in out
    [password] = [line.split(None, 1)[1].strip() for line in seen if line.startswith("Password   ")]
    assert len(password) >= 10
    children = _children_of(proc.pid)
    assert len(children) == 3, f"expected broker, server and terminal, got {children}"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + rest
    assert "nothing left running" in rest
    assert not [pid for pid in children if is_alive(pid)]


def _sniff(host: str, port: int, seen: list[tuple[str, bytes]]) -> Client:
    """Our own onlooker on the demo's broker, independent of the demo's."""
    sniffer = Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    subscribed = threading.Event()
    sniffer.on_message = lambda c, u, m: seen.append((m.topic, bytes(m.payload)))
    sniffer.on_subscribe = lambda *a: subscribed.set()
    sniffer.connect(host, port)
    sniffer.subscribe("#", qos=0)
    sniffer.loop_start()
    assert subscribed.wait(10)
    return sniffer


@pytest.mark.browser
def test_demo_device_is_enrolled_sends_only_sealed_frames_and_shows_online_in_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian package 'chromium' is required (scripts/setup.sh --dev installs it)"
    workdir = tmp_path / "demo"
    stack = start_stack(DemoOptions(workdir=workdir, heartbeat_interval_s=0.5))
    seen: list[tuple[str, bytes]] = []
    sniffer = _sniff(stack.broker.host, stack.broker.port, seen)
    try:
        stack.wait_online(True)
        deadline = time.monotonic() + 30
        while len(seen) < 4 and time.monotonic() < deadline:  # heartbeats every 0.5 s
            time.sleep(0.1)
        with httpx.Client(base_url=stack.base_url, headers=stack.admin_headers, timeout=10) as http:
            device = http.get("/api/v1/devices/SIM-0001").json()
            provisioned = http.get("/api/v1/provisioning/devices/SIM-0001").json()
            refused = http.get("/api/v1/ingest/stats").json()["ingest"]["security_refused"]
        shots = {name: tmp_path / f"{name}.png" for name in ("devices", "device")}
        assert stack.operator_password  # generated by `yibao server account create` for this run
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 800}).new_page()
                # as the console tells a person to: open the page, sign in, change the initial password
                page.goto(f"{stack.base_url}/")
                page.wait_for_url(f"{stack.base_url}/login?next=%2F")
                page.locator("#login-username").fill(OPERATOR)
                page.locator("#login-password").fill(stack.operator_password)
                page.locator("#login-password").press("Enter")
                page.locator("#password-old").fill(stack.operator_password)
                page.locator("#password-new").fill(NEW_PASSWORD)
                page.locator("#password-confirm").fill(NEW_PASSWORD)
                page.locator("#password-confirm").press("Enter")
                page.wait_for_url(f"{stack.base_url}/")
                page.locator('tr[data-device-id="SIM-0001"]').wait_for()
                dom = page.content()
                page.screenshot(path=str(shots["devices"]), full_page=True)
                page.goto(f"{stack.base_url}/devices/SIM-0001")
                page.screenshot(path=str(shots["device"]), full_page=True)
            finally:
                browser.close()
        passphrase = stack.passphrase.encode()
        files_with_passphrase = [f for f in workdir.rglob("*") if f.is_file() and passphrase in f.read_bytes()]
        enrolment = dict(stack.enrolment)
    finally:
        sniffer.disconnect()
        sniffer.loop_stop()
        assert stack.close() == []
    # the server knows the device as enrolled, with the identity key the device generated
    assert device["registration"] == "enrolled"
    assert device["online"] is True
    assert provisioned["state"] == "enrolled"
    assert provisioned["key_epoch"] == 1
    assert provisioned["fingerprint"] == enrolment["device_fingerprint"]
    assert refused == 0
    # on the wire: the device's status and uplinks, and the server's downlinks, are all SM4-GCM frames
    device_traffic = [payload for topic, payload in seen if "/dev/SIM-0001/" in topic and payload]
    assert len(device_traffic) >= 4, seen
    assert all(is_secure_frame(payload) for payload in device_traffic), [p[:40] for p in device_traffic]
    # the device side as `provision enrol` left it: a private identity directory, the passphrase in no file
    identity = workdir / "terminal" / "identity"
    assert identity.stat().st_mode & 0o777 == 0o700
    assert (identity / "device_key.json").stat().st_mode & 0o777 == 0o600
    assert files_with_passphrase == []
    # and the web pages still show it online
    assert 'data-device-id="SIM-0001"' in dom
    assert 'data-online="true"' in dom
    assert "在线" in dom
    assert all(shot.stat().st_size > 10_000 for shot in shots.values())
