"""The chaos harness's TCP proxy against a real echo server on loopback: bytes pass unchanged, cuts break the link
the way they claim to, and heal restores it."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from yibao.tcpproxy import CutMode, TcpProxy


class EchoServer:
    """Echoes every byte back on every connection, until stopped."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    echo = EchoServer()
    with TcpProxy("127.0.0.1", echo.port, name="test-proxy") as p:
        yield p
    echo.stop()


def connect(proxy: TcpProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.settimeout(5)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = sock.recv(min(65536, size - got))
        if not chunk:
            raise ConnectionError(f"closed after {got} of {size} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def dropped(sock: socket.socket, timeout_s: float = 5.0) -> bool:
    """True once the connection reads as closed or reset (within `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.1)
        if readable:
            try:
                if sock.recv(1024) == b"":
                    return True
            except OSError:
                return True
    return False


def test_bytes_pass_through_unchanged_both_ways(proxy: TcpProxy) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = recv_exactly(sock, len(payload))
        sender.join(10)
    assert echoed == payload
    # The proxy counts a chunk after forwarding it: the client can hold the last bytes a moment before the count.
    deadline = time.monotonic() + 5.0
    while min((stats := proxy.stats()).bytes_up, stats.bytes_down) < len(payload) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats.bytes_up == stats.bytes_down == len(payload)
    assert stats.connections == 1


def test_reset_cut_drops_open_connections_and_refuses_new_ones_until_heal(proxy: TcpProxy) -> None:
    with connect(proxy) as before:
        before.sendall(b"ping")
        assert recv_exactly(before, 4) == b"ping"
        proxy.cut(CutMode.RESET)
        assert dropped(before), "the open connection was not closed by the cut"
    try:
        during = connect(proxy)
    except ConnectionError:
        pass  # reset before connect() even returned: refused, as intended
    else:
        with during:
            assert dropped(during), "a connection made during the cut was not closed at once"
    proxy.heal()
    with connect(proxy) as after:
        after.sendall(b"pong")
        assert recv_exactly(after, 4) == b"pong"
    assert proxy.stats().refused >= 1


def test_blackhole_holds_bytes_without_closing_and_heal_delivers_them(proxy: TcpProxy) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"a")
        assert recv_exactly(sock, 1) == b"a"
        proxy.cut(CutMode.BLACKHOLE)
        sock.sendall(b"held bytes")
        readable, _, _ = select.select([sock], [], [], 0.5)
        assert readable == [], "bytes crossed a blackholed link (or it was closed)"
        with connect(proxy) as hanging:
            hanging.sendall(b"new")
            readable, _, _ = select.select([hanging], [], [], 0.3)
            assert readable == [], "a new connection was served during the blackhole"
            proxy.heal()
            assert recv_exactly(hanging, 3) == b"new"
        assert recv_exactly(sock, 10) == b"held bytes"


def test_upstream_down_closes_the_client() -> None:
    # A proxy to a port where nothing listens behaves like a broker that is down: connect, then get dropped.
    port = socket.create_server(("127.0.0.1", 0))
    dead_port = int(port.getsockname()[1])
    port.close()
    with TcpProxy("127.0.0.1", dead_port, name="dead") as dead, connect(dead) as sock:
        assert dropped(sock)
