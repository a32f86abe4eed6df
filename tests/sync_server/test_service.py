"""serve(): migrate, listen (the real URL is logged), ingest, and stop gracefully on SIGINT/SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from protocol.request_signing import signed_headers
from sync_server.errors import ConfigurationError
from sync_server.service import serve
from sync_server.settings import ServerSettings
from tests.sync_server.conftest import wait_until
from yibao.broker import MosquittoBroker, free_port
from yibao.procs import stop
from yibao.server_proc import start_server_process

SERVE = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(levelname)s %(name)s: %(message)s')\n"
    "from sync_server.service import serve\n"
    "from sync_server.settings import ServerSettings\n"
    "serve(ServerSettings())\n"
    "print('serve returned', flush=True)\n"
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_runs_until_a_signal_then_shuts_down_cleanly(
    broker: MosquittoBroker, tmp_path: Path, sig: signal.Signals
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "YIBAO_SERVER_DATABASE_URL": f"sqlite:///{tmp_path / 'var' / 'server.sqlite3'}",
        "YIBAO_SERVER_HTTP_PORT": str(port),
        "YIBAO_SERVER_MQTT_HOST": broker.host,
        "YIBAO_SERVER_MQTT_PORT": str(broker.port),
        "YIBAO_SERVER_MQTT_CLIENT_ID": f"test-serve-{port}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2.0) as http:

            def healthy() -> bool:
                assert proc.poll() is None, "serve() exited early"
                try:
                    return bool(http.get("/healthz").json().get("mqtt") == "connected")
                except httpx.HTTPError:
                    return False

            wait_until(healthy, timeout_s=30, what="the server to be healthy")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert f"yibao server listening on http://127.0.0.1:{port}" in out
    assert "database migrated from empty to" in out
    assert "ingest stopped" in out
    assert f"yibao server stopped ({sig.name})" in out
    assert "serve returned" in out
    assert "Traceback" not in out


def test_serve_refuses_a_port_in_use_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = ServerSettings(
            database_url=f"sqlite:///{tmp_path / 'server.sqlite3'}", http_port=busy.getsockname()[1]
        )
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(ConfigurationError, match=re.escape("cannot listen on 127.0.0.1")):
            serve(settings)
        assert signal.getsignal(signal.SIGTERM) is before


def test_http_workers_share_the_socket_and_answer_signed_his_requests(tmp_path: Path, broker: MosquittoBroker) -> None:
    """`http_workers`: extra processes accept on the main process's socket; each one authenticates signed requests
    against the shared database (a nonce spent in one process is refused by the others)."""
    server = start_server_process(
        database_url=f"sqlite:///{tmp_path / 'server.sqlite3'}",
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        workdir=tmp_path / "server",
        env={"YIBAO_SERVER_HTTP_WORKERS": "2"},
    )
    try:
        with httpx.Client(base_url=server.base_url, headers=server.admin_headers, timeout=10) as admin:
            admin.put(
                "/api/v1/institutions/H32058300001",
                json={"name": "昆山示例药房", "kind": "pharmacy", "region_code": "320583"},
            ).raise_for_status()
            made = admin.post(
                "/api/v1/his-clients", json={"institution_code": "H32058300001", "label": "pool test"}
            ).json()
        secret = bytes.fromhex(made["secret"])
        pids: set[int] = set()
        answered: dict[int, dict[str, str]] = {}
        deadline = time.monotonic() + 60
        while len(pids) < 3 and time.monotonic() < deadline:
            with httpx.Client(base_url=server.base_url, timeout=10) as fresh:  # a new connection each time
                body = fresh.get("/healthz").json()
                pids.add(body["pid"])
                headers = signed_headers(
                    "X-HIS-", made["client_id"], secret, "GET", "/his/v1/ping", b"", now=time.time()
                )
                assert fresh.get("/his/v1/ping", headers=headers).status_code == 200
                answered.setdefault(body["pid"], headers)
        assert len(pids) == 3, f"only processes {pids} answered"  # the main process and both workers
        for headers in answered.values():  # replayed to whichever process: refused
            with httpx.Client(base_url=server.base_url, timeout=10) as fresh:
                assert fresh.get("/his/v1/ping", headers=headers).status_code == 401
    finally:
        stop(server.proc, name="server")
