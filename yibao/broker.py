"""A private Mosquitto broker on a free port, for the demo, the benchmarks and the tests.

Owns the broker process it starts: a generated config in a temporary directory (loopback listener, persistence so a
restart keeps queued QoS 1 messages), start-up that waits until the port accepts connections, and a stop that never
leaves the process behind. It must never touch the machine's own Mosquitto service or its config.

With `dynsec=True` the broker runs Mosquitto's dynamic-security plugin with anonymous access off: the initial
`dynamic-security.json` (written once per workdir; the plugin keeps its own changes in it across restarts) holds an
admin user for `$CONTROL/dynamic-security/v1` and the server's own user, whose role lets it subscribe every device's
`up` (also through the `$share/…` subscription) and `status` and publish every `down`. Device users are created by
the server (`sync_server.broker_admin`) when devices enrol.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
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

DYNSEC_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
DYNSEC_ITERATIONS = 101


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


def find_dynsec_plugin() -> str:
    for candidate in DYNSEC_PLUGIN_PATHS:
        if Path(candidate).exists():
            return candidate
    raise BrokerError("Mosquitto's dynamic-security plugin is not installed (mosquitto_dynamic_security.so)")


def dynsec_client(username: str, password: str, roles: list[str]) -> dict[str, object]:
    """A dynamic-security client entry as the plugin stores it (PBKDF2-SHA512 of the password, base64)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, DYNSEC_ITERATIONS)
    return {
        "username": username,
        "password": base64.b64encode(digest).decode("ascii"),
        "salt": base64.b64encode(salt).decode("ascii"),
        "iterations": DYNSEC_ITERATIONS,
        "roles": [{"rolename": r} for r in roles],
    }


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
    dynsec: bool = False
    """Run the dynamic-security plugin, anonymous access off (see the module docstring)."""
    topic_prefix: str = "yibao/v1"
    """Topics the server's user is allowed (dynsec only)."""
    admin_username: str = "yibao-dynsec-admin"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    server_username: str = "yibao-server"
    server_password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
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
            f"allow_anonymous {'false' if self.dynsec else 'true'}",
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
        if self.dynsec:
            lines += [
                f"plugin {find_dynsec_plugin()}",
                f"plugin_opt_config_file {self.workdir / 'dynamic-security.json'}",
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
        if self.dynsec:
            self._write_dynsec_config()
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

    def _write_dynsec_config(self) -> None:
        """The initial dynamic-security.json: the admin and the server's user. Kept if it exists (a restart)."""
        if self.workdir is None:
            raise BrokerError("no workdir")
        path = self.workdir / "dynamic-security.json"
        if path.exists():
            return
        from protocol import Topics
        from sync_server.broker_admin import server_acls  # the server's own ACL, stated once

        control = "$CONTROL/dynamic-security/#"
        doc = {
            "defaultACLAccess": {
                "publishClientSend": False,
                "publishClientReceive": True,
                "subscribe": False,
                "unsubscribe": True,
            },
            "clients": [
                dynsec_client(self.admin_username, self.admin_password, ["admin"]),
                dynsec_client(self.server_username, self.server_password, ["yibao-server"]),
            ],
            "groups": [],
            "roles": [
                {
                    "rolename": "admin",
                    "acls": [
                        {"acltype": "publishClientSend", "topic": control, "allow": True},
                        {"acltype": "publishClientReceive", "topic": control, "allow": True},
                        {"acltype": "subscribePattern", "topic": control, "allow": True},
                    ],
                },
                {"rolename": "yibao-server", "acls": server_acls(Topics(prefix=self.topic_prefix))},
            ],
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)

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
