"""Simulated QR scanner module in serial mode, for `pty_device.PtyDevice`: it 'scans' the texts a test gives it.

Owns `QrScannerSimulator`: in continuous mode a scanned code goes out at once as prefix + code + suffix; in command
mode it waits in front of the scanner until the host sends the trigger bytes. Faults are explicit methods: raw
bytes (non-UTF-8 garbage), a partial line that stops, an over-long line; unplugging is `PtyDevice.unplug()`. It
holds only the test's synthetic codes and production code never imports it.
"""

from __future__ import annotations

import threading
from collections import deque

from hardware_sim.pty_device import DeviceLine


class QrScannerSimulator:
    """A serial QR module; `scan()` may be called from any thread while the pty serves."""

    def __init__(self, *, suffix: bytes = b"\r", prefix: bytes = b"", trigger: bytes | None = None) -> None:
        self._suffix = suffix
        self._prefix = prefix
        self._trigger = trigger
        self._lock = threading.Lock()
        self._line: DeviceLine | None = None
        self._waiting: deque[bytes] = deque()
        self._received = bytearray()
        self.triggers = 0
        """How many trigger commands arrived (command mode)."""

    def attach(self, line: DeviceLine) -> None:
        with self._lock:
            self._line = line

    def scan(self, text: str, *, encoding: str = "utf-8") -> None:
        """A code in front of the scanner: sent now (continuous mode) or at the next trigger (command mode)."""
        self.scan_raw(self._prefix + text.encode(encoding) + self._suffix)

    def scan_raw(self, data: bytes) -> None:
        """Exact bytes as the scanner would send them (for garbage, partial and over-long lines)."""
        with self._lock:
            if self._trigger is not None:
                self._waiting.append(data)
                return
            line = self._line
        if line is None:
            raise RuntimeError("scanner simulator is not attached to a running PtyDevice")
        line.send(data)

    def scan_partial(self, text: str) -> None:
        """The first half of a code and then nothing (a decode interrupted mid-transmission)."""
        payload = self._prefix + text.encode()
        self.scan_raw(payload[: max(1, len(payload) // 2)])

    def on_byte(self, byte: int, line: DeviceLine) -> None:
        if self._trigger is None:
            return  # continuous-mode modules ignore host bytes
        self._received.append(byte)
        if not self._trigger.startswith(bytes(self._received[-len(self._trigger) :])):
            self._received.clear()
            return
        if bytes(self._received[-len(self._trigger) :]) != self._trigger:
            return
        self._received.clear()
        with self._lock:
            self.triggers += 1
            code = self._waiting.popleft() if self._waiting else None
        if code is not None:
            line.send(code)
