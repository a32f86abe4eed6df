"""A private X display (Xvfb) for running the kiosk where there is no screen: CI, the screenshot command, tests.

Owns starting Xvfb on a free display number (it picks one whose lock file and socket are absent and lets Xvfb's
`-displayfd` confirm it) and stopping it. It must never import Kivy (the display must exist before Kivy opens its
window) and never touch a display it did not start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Final

START_TIMEOUT_S: Final = 15.0


class XvfbError(RuntimeError):
    """Xvfb is missing or did not start (install the Debian package xvfb; scripts/setup.sh does)."""


@dataclass
class Xvfb:
    display: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> Xvfb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_xvfb(width: int = 1280, height: int = 800) -> Xvfb:
    """Start Xvfb on a free display; returns it once it accepts connections."""
    binary = shutil.which("Xvfb")
    if binary is None:
        raise XvfbError("Xvfb not found: install the Debian package xvfb (scripts/setup.sh --dev does)")
    read_fd, write_fd = os.pipe()
    try:
        process = subprocess.Popen(
            [binary, "-displayfd", str(write_fd), "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp"],
            pass_fds=(write_fd,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    finally:
        os.close(write_fd)
    try:
        number = _read_display(read_fd, process)
    except BaseException:
        process.kill()
        process.wait(5)
        raise
    finally:
        os.close(read_fd)
    return Xvfb(f":{number}", process)


def _read_display(read_fd: int, process: subprocess.Popen[bytes]) -> int:
    import select

    chunks = b""
    while not chunks.endswith(b"\n"):
        ready, _, _ = select.select([read_fd], [], [], START_TIMEOUT_S)
        if not ready:
            raise XvfbError("Xvfb did not report its display in time")
        data = os.read(read_fd, 64)
        if not data:
            raise XvfbError(f"Xvfb exited (code {process.poll()}) before reporting a display")
        chunks += data
    return int(chunks.strip())
