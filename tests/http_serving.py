"""Real HTTP for tests: an ASGI app under uvicorn on a free loopback port, in a thread.

Real sockets instead of starlette's TestClient (whose import warns: it wants the `httpx2` package), so clients,
timeouts and connection errors behave as they do in production.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import uvicorn
from fastapi import FastAPI

from sync_server.service import bind_socket


@contextmanager
def serving_url(app: FastAPI, *, lifespan: Literal["on", "off"] = "off", start_s: float = 10.0) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL (`http://127.0.0.1:PORT`)."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan=lifespan, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_s
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "the app failed to start; see the log"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
