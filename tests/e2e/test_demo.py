"""The whole stack as a newcomer runs it: real Mosquitto, the real server process, a simulated terminal process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from yibao.demo import DemoOptions, start_stack
from yibao.procs import is_alive

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
    children = _children_of(proc.pid)
    assert len(children) == 3, f"expected broker, server and terminal, got {children}"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + rest
    assert "nothing left running" in rest
    assert not [pid for pid in children if is_alive(pid)]


@pytest.mark.browser
def test_web_page_shows_the_simulated_terminal_online_in_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian package 'chromium' is required (scripts/setup.sh --dev installs it)"
    stack = start_stack(DemoOptions(workdir=tmp_path / "demo"))
    try:
        stack.wait_online(True)
        shot = tmp_path / "devices.png"
        base = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--window-size=1280,800",
        ]
        env = {**os.environ, "LANG": "zh_CN.UTF-8"}
        dom = subprocess.run(
            [*base, "--dump-dom", f"{stack.base_url}/"], capture_output=True, text=True, timeout=60, env=env, check=True
        ).stdout
        subprocess.run(
            [*base, f"--screenshot={shot}", f"{stack.base_url}/"], capture_output=True, timeout=60, env=env, check=True
        )
    finally:
        assert stack.close() == []
    assert 'data-device-id="SIM-0001"' in dom
    assert 'data-online="true"' in dom
    assert "在线" in dom
    assert shot.stat().st_size > 10_000
