"""Fixtures for the kiosk UI under a real X server: a private Xvfb (started here on a free display; CI has none),
and one run of the screen tour (`yibao kiosk screens`) shared by the tests that read its report and screenshots.

Kivy opens one window per process, so the tour runs in a child process (the same command that regenerates
docs/screens/); DISPLAY is set for the children only, never for this test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.face_data import faces_dir
from ui.xvfb import Xvfb, start_xvfb

TOUR_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def xvfb() -> Iterator[Xvfb]:
    with start_xvfb() as display:
        yield display


def display_env(xvfb: Xvfb) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"WAYLAND_DISPLAY", "KIVY_HOME"}}
    env["DISPLAY"] = xvfb.display
    return env


@dataclass
class TourRun:
    returncode: int
    report: dict[str, Any]
    out_dir: Path
    stdout: str
    stderr: str

    def shots(self, mode: str | None = None) -> list[dict[str, Any]]:
        return [s for s in self.report["shots"] if mode is None or s["mode"] == mode]


@pytest.fixture(scope="session")
def tour(xvfb: Xvfb, tmp_path_factory: pytest.TempPathFactory) -> TourRun:
    base = tmp_path_factory.mktemp("kiosk-tour")
    out_dir, report = base / "screens", base / "report.json"
    argv = [sys.executable, "-m", "yibao", "--log-level", "warning", "kiosk", "screens"]
    argv += ["--out", str(out_dir), "--report", str(report), "--faces", str(faces_dir()), "--workdir", str(base / "w")]
    done = subprocess.run(argv, env=display_env(xvfb), capture_output=True, text=True, timeout=TOUR_TIMEOUT_S)
    if not report.is_file():
        pytest.fail(f"the tour wrote no report (exit {done.returncode}):\n{done.stderr[-4000:]}", pytrace=False)
    return TourRun(done.returncode, json.loads(report.read_text("utf-8")), out_dir, done.stdout, done.stderr)
