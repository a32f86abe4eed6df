"""Run a simulated serial device on a pseudo-terminal, so the real pyserial drivers talk to it byte for byte.

Owns `PtyDevice`: it opens a pty pair (`os.openpty`), puts the slave in raw mode, and serves the master side from
one thread: every byte the driver writes is handed to the device model one at a time (`SerialDeviceModel.on_byte`),
and whatever the model sends is written back. The slave's path (or a stable symlink to it, like a udev
`/dev/ttyUSB-idcard` rule) is what a driver opens with pyserial. `unplug()` closes the pty, which the driver sees
exactly as a vanished USB-serial adapter; `replug()` makes a fresh pty behind the same symlink. Used only by tests,
demos and benches; never imported by production code, and it holds no personal data of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import tty
from pathlib import Path
from types import TracebackType
from typing import Protocol

logger = logging.getLogger(__name__)


class DeviceLine(Protocol):
    """What a device model may do to its line: send bytes, or be unplugged."""

    def send(self, data: bytes) -> None: ...

    def unplug(self) -> None: ...


class SerialDeviceModel(Protocol):
    """A device's behaviour: consumes the host's bytes one by one and answers through the line."""

    def attach(self, line: DeviceLine) -> None:
        """Called when the pty starts (and after a replug): devices that talk unprompted keep the line."""
        ...

    def on_byte(self, byte: int, line: DeviceLine) -> None: ...


class PtyDevice:
    """A device model served on a pty. Use as a context manager, or `start()` / `stop()`."""

    def __init__(self, model: SerialDeviceModel, *, link_path: Path | None = None, name: str = "pty-device") -> None:
        self._model = model
        self._link_path = link_path
        self._name = name
        self._lock = threading.Lock()
        self._outgoing = bytearray()
        self._master: int | None = None
        self._slave: int | None = None
        self._slave_path = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._transcript: list[tuple[str, bytearray]] = []
        self._wake_r: int | None = None
        self._wake_w: int | None = None

    @property
    def path(self) -> str:
        """What the driver opens: the stable symlink if one was asked for, else the slave's /dev/pts path."""
        return str(self._link_path) if self._link_path is not None else self._slave_path

    @property
    def plugged(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> PtyDevice:
        if self.plugged:
            return self
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line discipline before the driver configures the port itself
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self._slave_path = os.ttyname(slave)
        if self._link_path is not None:
            self._link_path.unlink(missing_ok=True)
            self._link_path.symlink_to(self._slave_path)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        with self._lock:
            self._outgoing.clear()
            self._wake_r, self._wake_w = wake_r, wake_w
        self._stop.clear()
        self._model.attach(self)
        self._thread = threading.Thread(target=self._serve, name=f"{self._name}-pty", daemon=True)
        self._thread.start()
        logger.debug("%s serving on %s", self._name, self._slave_path)
        return self

    def send(self, data: bytes) -> None:
        """Queue bytes for the host (from the model, or from a test thread: a scanner 'scanning')."""
        with self._lock:
            self._outgoing += data
            self._record("<", data)
            # Wake the serving thread's select now rather than at its next 20 ms tick. Written under the lock so
            # `_close_fds` cannot close (and the OS reuse) the descriptor in between.
            if self._wake_w is not None and threading.current_thread() is not self._thread:
                with contextlib.suppress(BlockingIOError):  # a full pipe already holds enough wake-ups
                    os.write(self._wake_w, b"\x00")

    def transcript(self) -> list[tuple[str, bytes]]:
        """Bytes exchanged so far as ('>' host to device | '<' device to host, bytes) runs, for fixture checks."""
        with self._lock:
            return [(direction, bytes(data)) for direction, data in self._transcript]

    def clear_transcript(self) -> None:
        with self._lock:
            self._transcript.clear()

    def _record(self, direction: str, data: bytes) -> None:
        # Caller holds the lock.
        if self._transcript and self._transcript[-1][0] == direction:
            self._transcript[-1][1].extend(data)
        else:
            self._transcript.append((direction, bytearray(data)))

    def pending(self) -> int:
        """Bytes queued and not yet written to the pty."""
        with self._lock:
            return len(self._outgoing)

    def unplug(self) -> None:
        """Close the pty (and remove the symlink): the driver's next read or write fails like an unplugged adapter."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        if thread is None:
            self._close_fds()

    def replug(self) -> None:
        """A fresh pty behind the same symlink (the device came back); the model keeps its state."""
        self.unplug()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread = None
        self.start()

    def stop(self) -> None:
        self.unplug()

    def __enter__(self) -> PtyDevice:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        master = self._master
        if master is None:
            return
        try:
            while not self._stop.is_set():
                with self._lock:
                    want_write = bool(self._outgoing)
                wake = self._wake_r
                watched = [master] if wake is None else [master, wake]
                readable, writable, _ = select.select(watched, [master] if want_write else [], [], 0.02)
                if wake is not None and wake in readable:
                    os.read(wake, 4096)
                    readable.remove(wake)
                if writable:
                    with self._lock:
                        written = os.write(master, bytes(self._outgoing[:4096]))
                        del self._outgoing[:written]
                if readable:
                    try:
                        chunk = os.read(master, 1)  # byte by byte: the model sees the host's bytes as a UART would
                    except BlockingIOError:
                        continue
                    if not chunk:
                        break
                    with self._lock:
                        self._record(">", chunk)
                    self._model.on_byte(chunk[0], self)
        except OSError:
            logger.debug("%s pty failed", self._name, exc_info=True)
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        with self._lock:
            wake_fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), None, None
        for fd in (self._master, self._slave, *wake_fds):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    logger.debug("closing pty fd failed", exc_info=True)
        self._master = self._slave = None
        if self._link_path is not None:
            self._link_path.unlink(missing_ok=True)
