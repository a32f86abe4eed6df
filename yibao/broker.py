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
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from yibao.procs import die_with_parent

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


def _says_running(log: Path, offset: int) -> bool:
    try:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return False
    return "mosquitto version" in text and " running" in text


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
            "log_type information",  # 'mosquitto version … running' is how start() knows the listener is ours
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
        # Mosquitto cannot listen on port 0 and report the port, so we pick a free one; another process may take it
        # before Mosquitto binds. Only then, and only for a port we picked, try again with a new one.
        we_pick = self.port == 0
        for attempt in range(1, 4):
            if we_pick:
                self.port = free_port(self.host)
            try:
                return self._start_once(binary, timeout_s)
            except BrokerError as exc:
                if not (we_pick and "in use" in str(exc) and attempt < 3):
                    self.stop()  # also removes a temporary workdir we made
                    raise
                logger.warning("port %d was taken before mosquitto bound it; trying another", self.port)
        raise BrokerError("unreachable")  # the loop either returns or raises

    def _start_once(self, binary: str, timeout_s: float) -> MosquittoBroker:
        if self.workdir is None:
            raise BrokerError("no workdir")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text(), encoding="utf-8")
        log = self.workdir / "mosquitto.log"
        log_start = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            # Even a SIGKILLed orchestrator (a benchmark cut short) leaves no broker behind.
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        # Ready means: this Mosquitto says it is running (an open port alone could be someone else's listener).
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._proc.poll() is None:
            if _says_running(log, log_start) and wait_for_port(self.host, self.port, 0.5):
                logger.info("mosquitto started on %s:%d (pid %d)", self.host, self.port, self._proc.pid)
                return self
            time.sleep(0.02)
        err = self._collect_error(log_start)
        self.stop(keep_workdir=True)
        raise BrokerError(f"mosquitto did not start on {self.host}:{self.port}: {err}")

    def _collect_error(self, log_start: int = 0) -> str:
        """What Mosquitto said about this start: its stderr and its log since `log_start`, warnings about running
        as root left out (we run it as root on purpose, see config_text)."""
        lines: list[str] = []
        if self._proc is not None and self._proc.poll() is not None and self._proc.stderr is not None:
            lines += self._proc.stderr.read().decode("utf-8", "replace").splitlines()
        log = (self.workdir / "mosquitto.log") if self.workdir else None
        if log is not None and log.exists():
            with log.open("rb") as f:
                f.seek(log_start)
                lines += f.read().decode("utf-8", "replace").splitlines()
        wanted = [line for line in lines if line.strip() and "should not be run as root" not in line]
        return " | ".join(wanted)[-2000:] or "no output"

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
