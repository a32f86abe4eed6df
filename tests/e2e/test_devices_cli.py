"""`yibao sim devices` and `yibao terminal run` as an installer meets them: the simulators come up on stable paths
with an e-voucher platform over HTTP, a terminal config made from the printed tables starts the real drivers, and a
port that is not there stops the terminal with exit 4 naming the device and the port."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from terminal.evoucher import CodeMalformedError, TerminalContext
from terminal.evoucher_http import HttpEVoucherPlatform

pytestmark = pytest.mark.e2e

BASE = (
    'schema_version = 1\nconfig_version = "devices-1"\ndevice_id = "SIM-0042"\n'
    '[mqtt]\nhost = "127.0.0.1"\nport = 9\n[outbox]\npath = "outbox.sqlite3"\n'
)


def test_sim_devices_then_terminal_run(yibao_cmd: list[str], tmp_path: Path) -> None:
    ports = tmp_path / "ports"
    sim = subprocess.Popen(
        [*yibao_cmd, "--log-level", "warning", "sim", "devices", "--dir", str(ports)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sim.stdout is not None
        line = sim.stdout.readline()
        described = json.loads(line)
        for name in ("id_card_reader", "ss_card_reader", "qr_scanner"):
            path = Path(described[name])
            assert path.parent == ports
            assert str(path.readlink()).startswith("/dev/pts/")
        # the platform answers over HTTP (a malformed code is refused by the platform, not by a dead socket)
        context = TerminalContext(described["org_code"], "SIM-0042")
        url = described["evoucher_url"]
        with HttpEVoucherPlatform(url, timeout_s=5) as platform, pytest.raises(CodeMalformedError):
            platform.decode("??", context)

        config = tmp_path / "terminal.toml"
        config.write_text(BASE + described["terminal_toml"], encoding="utf-8")
        run = [*yibao_cmd, "terminal", "run", "--config", str(config)]
        terminal = subprocess.Popen(run, stderr=subprocess.PIPE, text=True)
        early = _lines_until(terminal, "terminal SIM-0042 started", timeout_s=60.0)
        assert terminal.poll() is None, "the terminal should run on the simulators' ports"
        terminal.send_signal(signal.SIGINT)  # after its start: a clean stop (before it, Ctrl-C exits with 130)
        _, rest = terminal.communicate(timeout=30)
        err = "".join(early) + rest
        assert terminal.returncode == 0, err[-2000:]
        assert "qr_scanner=serial (simulated peer)" in err

        missing = ports / "qr-unplugged"
        config.write_text(BASE + described["terminal_toml"].replace(described["qr_scanner"], str(missing)), "utf-8")
        refused = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 4
        assert f"devices.qr_scanner on {missing}: cannot open the serial port" in refused.stderr
    finally:
        sim.send_signal(signal.SIGINT)
        sim.communicate(timeout=30)
    assert sim.returncode == 0
    assert list(ports.iterdir()) == [], "the port symlinks are removed when the simulators stop"


def _lines_until(process: subprocess.Popen[str], marker: str, *, timeout_s: float) -> list[str]:
    """The process's stderr lines up to the one containing `marker` (a slow start on a loaded machine is waited
    for, not guessed with a fixed sleep); fails after `timeout_s` or when the process exits first."""
    assert process.stderr is not None
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if marker in line:
                seen.set()
                return

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not seen.wait(0.1):
        assert process.poll() is None, "".join(lines)[-2000:]
        assert time.monotonic() < deadline, f"no {marker!r} within {timeout_s:.0f} s: " + "".join(lines)[-2000:]
    return lines
