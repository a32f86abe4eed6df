"""Driver for a QR scanner module in serial ("virtual COM") mode, which the kiosk uses to read 医保码 e-vouchers.

Owns `QrScannerConfig` (suffix CR / CRLF / LF / none-with-gap, optional prefix, optional trigger command for
command mode, encoding, length limit), `QrLineAssembler` (pure: bytes and times in, complete codes or typed errors
out, so it can be fuzzed), and `QrScanner`, which implements `drivers.peripherals.Peripheral`. A malformed scan
(non-UTF-8 bytes, an over-long line, a partial line that never finished, a missing prefix) is a clear, typed error
and the link stays usable for the next scan. Link errors are translated here. The decoded text is a bearer token
for one payment: it must never be logged; `ScannedCode`'s repr shows only its head and length.

    QrScannerError
    ├── ScannerUnavailableError   port cannot be opened / scanner unplugged
    ├── ScanTimeoutError          no complete code before the timeout
    └── MalformedScanError        bytes arrived but are not a usable code (the next scan is unaffected)
        ├── UndecodableCodeError  not valid in the configured encoding
        ├── CodeTooLongError      longer than `max_code_bytes` (the rest of that line is skipped)
        ├── IncompleteCodeError   a partial line went quiet and was dropped
        └── MissingPrefixError    the configured prefix is absent
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from drivers.card_reader import ReaderHealth
from drivers.serial_link import ByteLink, Clock, LinkTimeoutError, PortUnavailableError, SerialLink
from protocol import PeripheralKind, PeripheralState, PeripheralStatus

logger = logging.getLogger(__name__)


class QrScannerError(Exception):
    """Root of the QR scanner's errors."""


class ScannerUnavailableError(QrScannerError):
    """The scanner's port cannot be opened or vanished."""


class ScanTimeoutError(QrScannerError):
    """No complete code arrived before the timeout."""


class MalformedScanError(QrScannerError):
    """Bytes arrived but do not make a usable code; the scanner is fine and the next scan is unaffected."""


class UndecodableCodeError(MalformedScanError):
    """The code's bytes are not valid in the configured encoding."""


class CodeTooLongError(MalformedScanError):
    """A line longer than the configured limit."""


class IncompleteCodeError(MalformedScanError):
    """A partial line that never got its suffix (the scanner was interrupted, or bytes were lost)."""


class MissingPrefixError(MalformedScanError):
    """A line without the configured prefix."""


_SUFFIXES: dict[str, bytes] = {"cr": b"\r", "crlf": b"\r\n", "lf": b"\n", "none": b""}


def _hex_field(value: str) -> str:
    try:
        bytes.fromhex(value)
    except ValueError as exc:
        raise ValueError("must be hex bytes, e.g. '7E 00 08 01 00 02 01 AB CD'") from exc
    return value


class QrScannerConfig(BaseModel):
    """How one scanner model frames its output; set in the terminal config per installed scanner."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suffix: Literal["cr", "crlf", "lf", "none"] = Field(
        default="cr", description="What ends each code; 'none' means a code ends after `gap_timeout_s` of silence."
    )
    prefix_hex: str = Field(default="", description="Bytes the scanner sends before each code (hex); '' for none.")
    gap_timeout_s: float = Field(
        default=0.05, gt=0, le=2, description="Silence that ends a code when suffix is 'none' (inter-byte gap)."
    )
    stale_partial_s: float = Field(
        default=0.5, gt=0, le=10, description="A partial line idle this long is dropped as IncompleteCodeError."
    )
    trigger_hex: str | None = Field(
        default=None, description="Command-mode trigger the driver sends before each read (hex); None: continuous."
    )
    encoding: Literal["utf-8", "gbk", "ascii"] = Field(default="utf-8", description="Text encoding of the codes.")
    max_code_bytes: int = Field(default=1024, ge=16, le=65536, description="Longest code accepted, in bytes.")
    baudrate: int = Field(default=9600, description="Serial speed (QR modules ship at 9600 8N1).")

    @field_validator("prefix_hex", "trigger_hex")
    @classmethod
    def _is_hex(cls, value: str | None) -> str | None:
        return value if value is None else _hex_field(value)

    @property
    def suffix_bytes(self) -> bytes:
        return _SUFFIXES[self.suffix]

    @property
    def prefix(self) -> bytes:
        return bytes.fromhex(self.prefix_hex)

    @property
    def trigger(self) -> bytes | None:
        return None if self.trigger_hex is None else bytes.fromhex(self.trigger_hex)


@dataclasses.dataclass(frozen=True, repr=False)
class ScannedCode:
    """One decoded code: its text, the payload bytes as received (prefix and suffix removed), and when (clock)."""

    text: str
    raw: bytes
    t: float

    def __repr__(self) -> str:
        return f"ScannedCode(text={self.text[:4]!r}+{max(len(self.text) - 4, 0)} chars, t={self.t:.3f})"

    __str__ = __repr__


AssembledItem = bytes | MalformedScanError
"""What the assembler yields: a complete code's payload bytes, or the error that replaced one."""


class QrLineAssembler:
    """Turns the scanner's byte stream into codes; pure (time is passed in), raises nothing."""

    def __init__(self, config: QrScannerConfig) -> None:
        self._config = config
        self._suffix = config.suffix_bytes
        self._prefix = config.prefix
        self._buffer = bytearray()
        self._discarding = False  # inside an over-long line: skip until its end
        self._last_byte_t: float | None = None

    @property
    def has_partial(self) -> bool:
        return bool(self._buffer)

    def clear(self) -> None:
        self._buffer.clear()
        self._discarding = False
        self._last_byte_t = None

    def feed(self, data: bytes, now: float) -> list[AssembledItem]:
        out = self.tick(now)
        if not data:
            return out
        self._last_byte_t = now
        self._buffer += data
        if self._suffix:
            while (end := self._buffer.find(self._suffix)) >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + len(self._suffix)]
                if self._discarding:
                    self._discarding = False
                    continue
                item = self._line(line)
                if item is not None:
                    out.append(item)
        self._check_length(out)
        return out

    def tick(self, now: float) -> list[AssembledItem]:
        """End-of-code by silence: a gap in suffix-less mode, staleness of a partial line otherwise."""
        if self._last_byte_t is None or not (self._buffer or self._discarding):
            return []
        idle = now - self._last_byte_t
        out: list[AssembledItem] = []
        if not self._suffix and idle >= self._config.gap_timeout_s:
            line, discarding = bytes(self._buffer), self._discarding
            self.clear()
            if not discarding:
                item = self._line(line)
                if item is not None:
                    out.append(item)
        elif self._suffix and idle >= self._config.stale_partial_s:
            partial, discarding = len(self._buffer), self._discarding
            self.clear()
            if not discarding:
                out.append(IncompleteCodeError(f"{partial} bytes without a line end were dropped"))
        return out

    def _check_length(self, out: list[AssembledItem]) -> None:
        limit = self._config.max_code_bytes + len(self._prefix)
        if len(self._buffer) <= limit:
            return
        if not self._discarding:
            out.append(CodeTooLongError(f"line longer than {self._config.max_code_bytes} bytes; skipped"))
            self._discarding = True
        # Keep a tail that may be the start of a split suffix (CR of a CRLF) so the line's end is still found.
        keep = len(self._suffix) - 1
        del self._buffer[: len(self._buffer) - keep if keep else None]

    def _line(self, line: bytes) -> AssembledItem | None:
        if not line:
            return None  # blank line (e.g. LF after a CR-configured scanner): nothing was scanned
        if self._prefix:
            if not line.startswith(self._prefix):
                return MissingPrefixError("line without the configured prefix")
            line = line[len(self._prefix) :]
        if len(line) > self._config.max_code_bytes:
            return CodeTooLongError(f"code longer than {self._config.max_code_bytes} bytes")
        return line if line else None


def decode_code(raw: bytes, config: QrScannerConfig) -> str:
    """The code's text; UndecodableCodeError for bytes that are not valid text or hold control characters."""
    try:
        text = raw.decode(config.encoding)
    except UnicodeDecodeError as exc:
        raise UndecodableCodeError(f"{len(raw)} bytes are not valid {config.encoding}") from exc
    if not text.isprintable():
        raise UndecodableCodeError("code contains control characters")
    return text


class QrScanner:
    """A serial QR scanner on a `ByteLink`; implements `Peripheral`. One thread reads it at a time."""

    def __init__(
        self,
        link: ByteLink,
        config: QrScannerConfig | None = None,
        *,
        name: str = "qr0",
        poll_s: float = 0.02,
        clock: Clock = time.monotonic,
    ) -> None:
        self._link = link
        self._config = config if config is not None else QrScannerConfig()
        self._name = name
        self._poll_s = poll_s
        self._clock = clock
        self._assembler = QrLineAssembler(self._config)
        self._ready: deque[AssembledItem] = deque()
        self._health = ReaderHealth(name, PeripheralKind.QR_SCANNER)

    @classmethod
    def on_port(cls, port: str, config: QrScannerConfig | None = None, *, name: str = "qr0") -> QrScanner:
        """The scanner on a serial port path, at the config's baud rate (opened lazily)."""
        config = config if config is not None else QrScannerConfig()
        return cls(SerialLink(port, baudrate=config.baudrate), config, name=name)

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> PeripheralKind:
        return PeripheralKind.QR_SCANNER

    @property
    def config(self) -> QrScannerConfig:
        return self._config

    def status(self) -> PeripheralStatus:
        return self._health.status()

    def close(self) -> None:
        self._link.close()

    def open(self) -> None:
        """Open the port now. Call at start-up: bytes a scanner sends before its port is open are lost."""
        try:
            self._link.open()
        except PortUnavailableError as exc:
            raise self._unavailable(exc) from exc

    def clear(self) -> None:
        """Forget codes scanned before now (a new session must not pick up the previous customer's scan)."""
        self._ready.clear()
        self._assembler.clear()
        try:
            self._link.discard_input()
        except PortUnavailableError as exc:
            raise self._unavailable(exc) from exc

    def read_code(self, timeout_s: float = 10.0) -> ScannedCode:
        """The next code, waiting up to `timeout_s`; in command mode the trigger is sent first.

        Raises ScanTimeoutError, a MalformedScanError subclass (then call again for the next scan), or
        ScannerUnavailableError.
        """
        deadline = self._clock() + timeout_s
        trigger = self._config.trigger
        if trigger is not None and not self._ready:
            self._write(trigger)
        while not self._ready:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise ScanTimeoutError(f"no code within {timeout_s:.1f} s")
            try:
                chunk = self._link.read(4096, min(remaining, self._poll_s))
            except PortUnavailableError as exc:
                raise self._unavailable(exc) from exc
            self._ready.extend(self._assembler.feed(chunk, self._clock()))
        self._health.ok()
        item = self._ready.popleft()
        if isinstance(item, MalformedScanError):
            logger.info("%s: unusable scan (%s)", self._name, type(item).__name__)
            raise item
        text = decode_code(item, self._config)
        return ScannedCode(text=text, raw=item, t=self._clock())

    def _write(self, data: bytes) -> None:
        try:
            self._link.write(data)
        except PortUnavailableError as exc:
            raise self._unavailable(exc) from exc
        except LinkTimeoutError as exc:
            self._health.down(PeripheralState.FAULT, "trigger write timed out")
            raise ScanTimeoutError("trigger command could not be sent") from exc

    def _unavailable(self, exc: PortUnavailableError) -> ScannerUnavailableError:
        error = ScannerUnavailableError(str(exc))
        self._health.down(PeripheralState.ABSENT, f"ScannerUnavailableError: {exc}")
        return error
