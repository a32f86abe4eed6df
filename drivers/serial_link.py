"""The byte link every serial kiosk device sits on, and the link layer's exception tree.

Owns `ByteLink` (the Protocol seam device drivers talk through), `SerialLink` (its pyserial implementation: open,
read with a deadline, write, reopen after an unplug) and the errors below. pyserial's exceptions are translated
here, once, with `raise ... from exc`; nothing above this module ever sees `serial.SerialException` or `OSError`
from a port. This module knows no device protocol and must never log payload bytes (ID cards and e-voucher codes
pass through it).

    SerialLinkError
    ├── PortUnavailableError     the port cannot be opened, or vanished (USB-serial unplugged, pty closed)
    ├── LinkTimeoutError         nothing (or not enough) arrived before the deadline
    └── FrameError               bytes arrived but do not form a valid frame (raised by device codecs)
        ├── BadChecksumError     the frame's checksum does not match its bytes
        ├── TruncatedFrameError  the frame stopped before its announced length
        ├── GarbageError         bytes that are no frame at all (no preamble, impossible length, bad trailer)
        └── OversizedFrameError  a frame or line longer than the codec accepts
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import serial

logger = logging.getLogger(__name__)

_PORT_ERRORS: tuple[type[Exception], ...] = (serial.SerialException, OSError)
if sys.platform != "win32":
    import termios

    # pyserial lets termios.error (not an OSError) escape from flush/tcflush on a vanished tty.
    _PORT_ERRORS += (termios.error,)

_OPEN_ERRORS: tuple[type[Exception], ...] = (*_PORT_ERRORS, ValueError)  # ValueError: bad settings or path

Clock = Callable[[], float]
"""Monotonic seconds; injected so tests can reason about deadlines."""


class SerialLinkError(Exception):
    """Root of the link layer's errors."""


class PortUnavailableError(SerialLinkError):
    """The port could not be opened or disappeared while in use."""


class LinkTimeoutError(SerialLinkError):
    """The deadline passed before the expected bytes arrived; `received` holds what did arrive."""

    def __init__(self, message: str, received: bytes = b"") -> None:
        super().__init__(message)
        self.received = received


class FrameError(SerialLinkError):
    """Bytes arrived but are not a valid frame."""


class BadChecksumError(FrameError):
    """The frame's checksum does not match its content."""


class TruncatedFrameError(FrameError):
    """The frame ended (the line went quiet) before its announced length."""


class GarbageError(FrameError):
    """Bytes that are not a frame of the expected protocol."""


class OversizedFrameError(FrameError):
    """A frame or line longer than the codec's limit."""


@runtime_checkable
class ByteLink(Protocol):
    """A bidirectional byte stream to one device. Implementations raise only `SerialLinkError` subclasses."""

    @property
    def port(self) -> str:
        """Where the link goes (a device path); for status detail, never secret."""
        ...

    def open(self) -> None:
        """Open the port now (reads and writes otherwise open it on first use); idempotent."""
        ...

    def write(self, data: bytes) -> None:
        """Send all of `data`; raises PortUnavailableError if the device is gone."""
        ...

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        """Up to `max_bytes` bytes, waiting at most `timeout_s` for the first; b"" when nothing came in time."""
        ...

    def discard_input(self) -> None:
        """Drop bytes already received and not read (stale replies after a timeout or garbage)."""
        ...

    def close(self) -> None:
        """Release the port; a later read or write reopens it."""
        ...


class SerialLink:
    """`ByteLink` over pyserial, 8N1 at a given baud rate; opens lazily and reopens after the device comes back.

    The link is not thread-safe: one driver owns it and calls it from one thread.
    """

    def __init__(self, port: str, *, baudrate: int = 115200, write_timeout_s: float = 1.0) -> None:
        self._port = port
        self._baudrate = baudrate
        self._write_timeout_s = write_timeout_s
        self._serial: serial.Serial | None = None
        self._timeout_s: float | None = None

    @property
    def port(self) -> str:
        return self._port

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def open(self) -> None:
        """Open the port now (otherwise the first read or write does); idempotent."""
        if self._serial is not None:
            return
        try:
            self._serial = serial.Serial(
                self._port,
                baudrate=self._baudrate,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE,
                timeout=0,
                write_timeout=self._write_timeout_s,
            )
        except _OPEN_ERRORS as exc:
            raise PortUnavailableError(f"cannot open {self._port}: {exc}") from exc
        self._timeout_s = 0.0
        logger.info("opened serial port %s at %d baud", self._port, self._baudrate)

    def close(self) -> None:
        ser, self._serial = self._serial, None
        if ser is None:
            return
        try:
            ser.close()
        except _PORT_ERRORS:
            # Closing a port whose device vanished can fail; the handle is gone either way.
            logger.debug("closing %s failed; dropped", self._port, exc_info=True)

    def _ready(self) -> serial.Serial:
        if self._serial is None:
            self.open()
        ser = self._serial
        if ser is None:  # open() sets it or raises; kept for the type checker without an assert
            raise PortUnavailableError(f"{self._port} is not open")
        return ser

    def _lost(self, exc: BaseException) -> PortUnavailableError:
        # A port that failed mid-use is closed so the next call tries to reopen it (device replugged).
        self.close()
        return PortUnavailableError(f"{self._port} went away: {exc}")

    def write(self, data: bytes) -> None:
        ser = self._ready()
        try:
            ser.write(data)
            ser.flush()
        except serial.SerialTimeoutException as exc:
            raise LinkTimeoutError(f"write to {self._port} timed out") from exc
        except _PORT_ERRORS as exc:
            raise self._lost(exc) from exc

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        ser = self._ready()
        timeout_s = max(0.0, timeout_s)
        try:
            if timeout_s != self._timeout_s:
                ser.timeout = timeout_s
                self._timeout_s = timeout_s
            # Whatever is already buffered, else block for the first byte up to the timeout.
            waiting = ser.in_waiting
            return bytes(ser.read(min(max_bytes, waiting) if waiting else 1))
        except _PORT_ERRORS as exc:
            raise self._lost(exc) from exc

    def discard_input(self) -> None:
        ser = self._ready()
        try:
            ser.reset_input_buffer()
        except _PORT_ERRORS as exc:
            raise self._lost(exc) from exc

    def __enter__(self) -> SerialLink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SerialLink(port={self._port!r}, baudrate={self._baudrate}, open={self.is_open})"


def read_exact(link: ByteLink, count: int, deadline: float, clock: Clock = time.monotonic) -> bytes:
    """Exactly `count` bytes before `deadline` (a `clock` time), else LinkTimeoutError carrying the partial bytes."""
    buf = bytearray()
    while len(buf) < count:
        remaining = deadline - clock()
        if remaining <= 0:
            raise LinkTimeoutError(f"{len(buf)} of {count} bytes before the deadline", bytes(buf))
        buf += link.read(count - len(buf), remaining)
    return bytes(buf)


def xor_checksum(data: bytes) -> int:
    """XOR of all bytes (the SAM module's CHK and the generic reader frame's BCC)."""
    value = 0
    for b in data:
        value ^= b
    return value
