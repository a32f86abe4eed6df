"""Start `yibao server run` as a child process and wait until it is serving.

Shared by the demo and the benchmarks. The server binds its HTTP port itself (0 = the OS chooses) and writes the
address to a ready file, so no other process can take the port in between; then we wait for `/healthz` to say
the MQTT subscriptions are granted. This module starts and watches the process only.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from yibao.procs import spawn, stop, yibao_argv

logger = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """The server process exited, or did not bind or become healthy in time; the text names its log."""


@dataclass(frozen=True)
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin_token: str
    """The child's bootstrap admin token (YIBAO_SERVER_BOOTSTRAP_ADMIN_TOKEN), for the admin API."""

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server_process(
    *,
    database_url: str,
    mqtt_host: str,
    mqtt_port: int,
    workdir: Path,
    http_port: int = 0,
    timeout_s: float = 60.0,
    ingest_workers: int = 0,
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Spawn the server (log in `workdir/server.log`, its data dir `workdir/server-data`, a fresh bootstrap admin
    token, `env` on top of ours, e.g. YIBAO_SERVER_* settings), learn its port, wait until healthy; stop it on
    failure."""
    workdir.mkdir(parents=True, exist_ok=True)
    admin_token = secrets.token_urlsafe(32)
    child_env = {
        **os.environ,
        **(env or {}),
        "YIBAO_SERVER_BOOTSTRAP_ADMIN_TOKEN": admin_token,
        "YIBAO_SERVER_DATA_DIR": str(workdir / "server-data"),
    }
    ready = workdir / "server.ready"
    log = workdir / "server.log"
    ready.unlink(missing_ok=True)
    proc = spawn(
        yibao_argv(
            "server",
            "run",
            "--database-url",
            database_url,
            "--http-port",
            str(http_port),
            "--mqtt-host",
            mqtt_host,
            "--mqtt-port",
            str(mqtt_port),
            "--ready-file",
            str(ready),
            "--ingest-workers",
            str(ingest_workers),
        ),
        log_path=log,
        env=child_env,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            _check_alive(proc, log)
            if time.monotonic() > deadline:
                raise ServerStartError(f"the server did not bind its port in {timeout_s:.0f} s; see {log}")
            time.sleep(0.05)
        port = int(json.loads(ready.read_text(encoding="utf-8"))["port"])
        server = ServerProcess(proc=proc, port=port, admin_token=admin_token)
        with httpx.Client(base_url=server.base_url, timeout=2.0) as http:
            while time.monotonic() < deadline:
                _check_alive(proc, log)
                try:
                    if http.get("/healthz").json().get("mqtt") == "connected":
                        return server
                except (httpx.HTTPError, ValueError):
                    logger.debug("server not answering yet")
                time.sleep(0.1)
        raise ServerStartError(f"the server did not become healthy in {timeout_s:.0f} s; see {log}")
    except BaseException:
        stop(proc, name="server")
        raise


def _check_alive(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is not None:
        raise ServerStartError(f"the server exited with {proc.returncode}; see {log}")
