"""`yibao terminal run --ui kiosk` opens the kiosk window on a display and stops cleanly on SIGTERM; with no display
`--ui auto` stays headless (what every existing caller of `terminal run` relies on)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.terminal.conftest import terminal_raw_config, to_toml
from tests.ui.conftest import display_env
from ui.xvfb import Xvfb

START_S = 60.0


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "terminal.toml"
    path.write_text(to_toml(terminal_raw_config(tmp_path)), encoding="utf-8")
    return path


def _run_until(argv: list[str], env: dict[str, str], marker: str, log_path: Path) -> tuple[int, str]:
    """Run `argv` until `marker` shows in its log (or it exits), then SIGTERM it; returns (exit code, log)."""
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + START_S
            while time.monotonic() < deadline and proc.poll() is None:
                if marker in log_path.read_text("utf-8", errors="replace"):
                    break
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, log_path.read_text("utf-8", errors="replace")


def test_terminal_run_opens_the_kiosk_window_and_stops_on_sigterm(xvfb: Xvfb, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "yibao", "terminal", "run", "--simulated", "--ui", "kiosk", "--config"]
    code, log = _run_until([*argv, str(_config(tmp_path))], display_env(xvfb), "kiosk window open", tmp_path / "log")
    assert "kiosk window open (1280x800)" in log, log[-3000:]
    assert code == 0, log[-3000:]
    assert "terminal SIM-0001 stopped" in log


def test_without_a_display_auto_stays_headless(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"DISPLAY", "WAYLAND_DISPLAY"}}
    argv = [sys.executable, "-m", "yibao", "terminal", "run", "--simulated", "--config", str(_config(tmp_path))]
    code, log = _run_until(argv, env, "started: software", tmp_path / "log")
    assert code == 0, log[-3000:]
    assert "kiosk window" not in log
    assert "Kivy" not in log
