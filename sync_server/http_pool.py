"""HTTP worker processes: `http_workers` extra children serving the REST API, the HIS interfaces and the web pages
on the SAME listening socket as the main process.

One Python process answers HTTP on one core at most (the GIL); the HIS interfaces must keep p95 ≤ 100 ms at
200 requests/s (docs/benchmarks.md), and a kiosk fleet's device-API calls come on top. The main process binds the
socket (`sync_server.service.serve`) and passes it to each child (`pass_fds`); the kernel hands each new connection
to whichever process accepts first. A child runs `create_app(settings, start_ingest=False)`: no broker session, no
command dispatcher, no sweeper (the main process keeps those singletons; a command a child queues is published by
the main process's dispatcher within `command_dispatch_interval_s`). Everything a request needs to share with other
processes lives in the database (nonces of signed requests, sessions, the audit chain per process).

Lifetime as for `sync_server.ingest_pool` (same `WorkerPool`): restarted when it exits, SIGTERM when the main process
dies (PR_SET_PDEATHSIG), a graceful uvicorn shutdown on SIGTERM. This module must not ingest or dispatch.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import socket
import sys
import threading
import time
from typing import Final

import uvicorn
from fastapi import FastAPI

from sync_server.ingest_pool import WorkerPool, die_with_parent
from sync_server.settings import ServerSettings

logger = logging.getLogger(__name__)

READY_LINE = "yibao-http-worker-ready"


class HttpPool(WorkerPool):
    """`http_workers` HTTP worker processes on the inherited listening socket `fd`."""

    kind = "http"
    module = "sync_server.http_pool"
    ready_line = READY_LINE

    def __init__(self, settings: ServerSettings, *, count: int, fd: int) -> None:
        super().__init__(settings, count=count, extra_argv=("--fd", str(fd)), pass_fds=(fd,))


GC_THRESHOLDS: Final = (50_000, 20, 20)
"""The cyclic collector's generation thresholds while serving: Python's default (700, 10, 10) runs a young
collection every 700 net allocations, several per request here (docs/benchmarks.md, "HIS interfaces under load")."""


def tune_gc() -> None:
    """Before serving: move what start-up made (modules, the app, its routes) out of the collector's sight and
    collect the young generation less often. Request garbage is freed by reference counting; cycles are still
    collected, in larger batches."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def uvicorn_config(app: FastAPI) -> uvicorn.Config:
    """How every server process runs uvicorn (the main one and the workers)."""
    return uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )


def run_http_worker(settings: ServerSettings, fd: int) -> None:
    """The body of one HTTP worker: serve the inherited socket until SIGTERM (uvicorn's graceful shutdown)."""
    from sync_server.app import create_app

    sock = socket.socket(fileno=fd)
    server = uvicorn.Server(uvicorn_config(create_app(settings, start_ingest=False)))

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            sys.stdout.write(READY_LINE + "\n")
            sys.stdout.flush()

    threading.Thread(target=announce, name="http-worker-ready", daemon=True).start()
    tune_gc()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One HTTP worker process (started by the server, not by hand).")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s %(levelname)-7s %(name)s[http-{args.index}]: %(message)s",
        stream=sys.stderr,
    )
    settings = ServerSettings.model_validate(json.loads(sys.stdin.read()))
    settings = settings.model_copy(update={"http_process_index": args.index + 1})  # its own national msgid range
    sys.stdin.close()
    run_http_worker(settings, args.fd)


if __name__ == "__main__":
    main()
