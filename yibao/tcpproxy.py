"""A loopback TCP proxy the chaos harness controls: it forwards bytes unchanged until told to break the link.

`yibao bench sync --chaos` puts one of these in front of the broker for every terminal and one for the server, so a
network fault can isolate one side without touching the others. Two ways to break a link, as networks fail:

* `cut(CutMode.RESET)`: every open connection is closed at once (both ends see the connection drop) and new
  connections are accepted and closed immediately, until `heal()`;
* `cut(CutMode.BLACKHOLE)`: nothing is forwarded any more, in either direction, but nothing is closed either; new
  connections are accepted and left hanging. The endpoints only notice through their own timeouts (MQTT keep-alive).
  On `heal()`, whatever was held back is forwarded, as after a partition shorter than TCP's retransmission timeout,
  and the hanging new connections are connected upstream.

It owns its listening socket, its connections and their threads; `stop()` closes all of them. It never inspects,
reorders or alters the bytes it forwards, and it listens on loopback only.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

logger = logging.getLogger(__name__)

_CHUNK = 65536
_POLL_S = 0.1
"""How often a forwarding thread looks up from a quiet socket to notice a cut or stop."""


class CutMode(Enum):
    RESET = "reset"
    """Close every connection now; accept-and-close new ones."""
    BLACKHOLE = "blackhole"
    """Forward nothing, close nothing; new connections hang."""


@dataclass(frozen=True)
class ProxyStats:
    connections: int
    """Connections accepted since start."""
    open_connections: int
    bytes_up: int
    """Client to upstream."""
    bytes_down: int
    """Upstream to client."""
    cuts: int
    refused: int
    """Connections closed on arrival during a RESET cut, or because the upstream refused them."""


class _Connection:
    """One client connection and, once forwarding, its upstream socket."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                # Linger 0: the peer gets a RST at once, as when a middlebox drops the flow.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Forward `listen_host:port` (port 0: the OS picks; read `.port`) to `upstream_host:upstream_port`."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        name: str = "proxy",
        connect_timeout_s: float = 2.0,
    ) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._listen = (listen_host, listen_port)
        self.name = name
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._mode: CutMode | None = None
        self._stopping = threading.Event()
        self._server: socket.socket | None = None
        self._conns: set[_Connection] = set()
        self._threads: list[threading.Thread] = []
        self._accepted = 0
        self._bytes_up = 0
        self._bytes_down = 0
        self._cuts = 0
        self._refused = 0
        self.port = 0

    # ------------------------------------------------------------------ control

    def start(self) -> TcpProxy:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(self._listen)
        server.listen(64)
        server.settimeout(_POLL_S)
        self._server = server
        self.port = int(server.getsockname()[1])
        self._spawn(self._accept_loop, f"{self.name}-accept")
        return self

    @property
    def cut_mode(self) -> CutMode | None:
        """None while the link is healthy."""
        return self._mode

    def cut(self, mode: CutMode) -> None:
        with self._lock:
            self._mode = mode
            self._cuts += 1
            self._flowing.clear()
            doomed = list(self._conns) if mode is CutMode.RESET else []
        for conn in doomed:
            conn.close()
        logger.info("%s: cut (%s), %d connection(s) closed", self.name, mode.value, len(doomed))

    def heal(self) -> None:
        with self._lock:
            self._mode = None
            self._flowing.set()
        logger.info("%s: healed", self.name)

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(
                connections=self._accepted,
                open_connections=sum(1 for c in self._conns if not c.closed.is_set()),
                bytes_up=self._bytes_up,
                bytes_down=self._bytes_down,
                cuts=self._cuts,
                refused=self._refused,
            )

    def stop(self) -> None:
        self._stopping.set()
        self._flowing.set()  # wake forwarding threads held by a blackhole so they can see the stop
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close()
        for thread in self._threads:
            thread.join(5.0)
        self._threads = [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ threads

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            server = self._server
            if server is None:
                return
            try:
                client, _addr = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(client)
            with self._lock:
                self._accepted += 1
                refuse = self._mode is CutMode.RESET
                if refuse:
                    self._refused += 1
                else:
                    self._conns.add(conn)
            if refuse:
                conn.close()
                continue
            self._spawn(self._open_upstream, f"{self.name}-conn", conn)

    def _open_upstream(self, conn: _Connection) -> None:
        # During a blackhole a new connection hangs here, as a SYN into a partition would, until heal or close.
        while not self._flowing.wait(_POLL_S):
            if conn.closed.is_set() or self._stopping.is_set():
                self._forget(conn)
                return
        try:
            upstream = socket.create_connection(self._upstream, timeout=self._connect_timeout_s)
        except OSError:
            with self._lock:
                self._refused += 1
            conn.close()
            self._forget(conn)
            return
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.settimeout(None)
        conn.upstream = upstream
        if conn.closed.is_set():  # reset while we were connecting
            with contextlib.suppress(OSError):
                upstream.close()
            self._forget(conn)
            return
        self._spawn(self._pump, f"{self.name}-down", conn, upstream, conn.client, False)
        self._pump(conn, conn.client, upstream, True)

    def _pump(self, conn: _Connection, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while not conn.closed.is_set() and not self._stopping.is_set():
                if not self._flowing.wait(_POLL_S):
                    continue
                try:
                    readable, _, _ = select.select([src], [], [], _POLL_S)
                except (OSError, ValueError):
                    break
                if not readable:
                    continue
                try:
                    data = src.recv(_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                # A blackhole that began after recv holds these bytes until heal (or the connection dies).
                while not self._flowing.wait(_POLL_S):
                    if conn.closed.is_set() or self._stopping.is_set():
                        return
                try:
                    dst.sendall(data)
                except OSError:
                    break
                with self._lock:
                    if up:
                        self._bytes_up += len(data)
                    else:
                        self._bytes_down += len(data)
        finally:
            conn.close()
            self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
