"""`serve(settings)`: run the sync server in the foreground until SIGINT or SIGTERM (what `yibao server run` calls).

Owns the process-level sequence: migrate the database to head, bind the HTTP socket (so the real URL, also for
port 0, is logged before serving), start `http_workers` extra HTTP processes on that socket
(`sync_server.http_pool`), run uvicorn with the app from `create_app`, and on SIGINT/SIGTERM let uvicorn
shut down gracefully (the lifespan stops ingest, which keeps its broker session, and disposes the engine), then
return normally. It must never call `sys.exit` or leave its signal handlers installed after returning.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from sync_server.app import create_app
from sync_server.db.migrate import upgrade
from sync_server.errors import ConfigurationError, ServerError
from sync_server.http_pool import HttpPool, tune_gc, uvicorn_config
from sync_server.settings import ServerSettings

logger = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (IPv4 or IPv6); OS errors become `ConfigurationError`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot resolve HTTP host {host!r}: {exc}") from exc
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def write_ready_file(path: Path, sock: socket.socket) -> None:
    """Tell a supervisor where we listen: `{"url": ..., "port": ..., "pid": ...}`, written atomically (a reader never
    sees half a file). With `http_port = 0` this is how the chosen port is learnt without a bind race."""
    doc = {"url": _url(sock), "port": sock.getsockname()[1], "pid": os.getpid()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot write the ready file {path}: {exc.strerror or exc}") from exc


def serve(settings: ServerSettings, *, ready_file: Path | None = None) -> None:
    """Migrate, then serve HTTP + ingest until SIGINT/SIGTERM; returns after a graceful shutdown.

    With `ready_file`, the bound address is written there before serving (see `write_ready_file`).

    Raises `ServerError` (or a subclass) when start-up fails: the database cannot be migrated, the address cannot
    be bound, or the app's start-up failed."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    upgrade(settings.database_url)
    sock = bind_socket(settings.http_host, settings.http_port)
    if ready_file is not None:
        try:
            write_ready_file(ready_file, sock)
        except ConfigurationError:
            sock.close()
            raise
    server = uvicorn.Server(uvicorn_config(create_app(settings)))
    pool = HttpPool(settings, count=settings.http_workers, fd=sock.fileno()) if settings.http_workers > 0 else None
    received: list[int] = []

    def _after_shutdown(signum: int, _frame: FrameType | None) -> None:
        # uvicorn handles the signal itself (graceful shutdown), then re-raises it to the handler that was installed
        # before it started: this one. The shutdown is done by then, so only remember it.
        received.append(signum)

    previous = _install(_after_shutdown)
    try:
        logger.info("yibao server listening on %s (environment %s)", _url(sock), settings.environment)
        if pool is not None:
            pool.start()
        tune_gc()
        server.run(sockets=[sock])
    finally:
        if pool is not None:
            pool.stop()
        sock.close()
        _restore(previous)
    if not server.started:
        raise ServerError("the server did not start; see the log above")
    how = signal.Signals(received[-1]).name if received else "shutdown"
    logger.info("yibao server stopped (%s)", how)


def _install(handler: Callable[[int, FrameType | None], None]) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers; uvicorn likewise skips them then
    return {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}


def _restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
