"""A private Mosquitto broker on a free port, for the demo, the benchmarks and the tests.

Owns the broker process it starts: a generated config in a temporary directory (loopback listener, persistence so a
restart keeps queued QoS 1 messages), start-up that waits until the port accepts connections, and a stop that never
leaves the process behind. It must never touch the machine's own Mosquitto service or its config.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """Mosquitto could not be found or did not start."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def find_mosquitto() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError("mosquitto is not installed (Debian package 'mosquitto'; scripts/setup.sh installs it)")


@dataclass
class MosquittoBroker:
    """Start with `start()` or as a context manager; `stop()` is idempotent. `restart()` keeps the same port and
    persistence directory, as a broker crash and restart would."""

    host: str = "127.0.0.1"
    port: int = 0
    workdir: Path | None = None
    persistence: bool = True
    max_inflight_messages: int = 1000
    max_queued_messages: int = 100_000
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def config_text(self) -> str:
        if self.workdir is None:
            raise BrokerError("config_text() needs a workdir; call start()")
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_queued_messages {self.max_queued_messages}",
            "persistent_client_expiration 7d",
            f"log_dest file {self.workdir}/mosquitto.log",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # Run as the invoking user rather than dropping to 'mosquitto', which could not write our workdir.
            lines.append("user root")
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 10.0) -> MosquittoBroker:
        if self._proc is not None:
            return self
        binary = find_mosquitto()
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="yibao-mosquitto-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.host)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text(), encoding="utf-8")
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        if not wait_for_port(self.host, self.port, timeout_s) or self._proc.poll() is not None:
            err = self._collect_error()
            self.stop()
            raise BrokerError(f"mosquitto did not start on {self.host}:{self.port}: {err}")
        logger.info("mosquitto started on %s:%d (pid %d)", self.host, self.port, self._proc.pid)
        return self

    def _collect_error(self) -> str:
        text = ""
        if self._proc is not None and self._proc.poll() is not None and self._proc.stderr is not None:
            text = self._proc.stderr.read().decode("utf-8", "replace").strip()
        log = (self.workdir / "mosquitto.log") if self.workdir else None
        if not text and log is not None and log.exists():
            text = log.read_text(encoding="utf-8", errors="replace")[-2000:]
        return text or "no output"

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would; queued messages survive only through persistence."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()

    def restart(self, timeout_s: float = 10.0) -> None:
        self.stop(keep_workdir=True)
        self.start(timeout_s)

    def stop(self, keep_workdir: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        if not keep_workdir and self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.workdir = None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
