"""Simulated social-security-card reader with a card in it, for `pty_device.PtyDevice`.

Owns `SsCardSimulator`: the generic reader frame (in whichever variant an `SsCardLayout` configures), contact
power-on and contactless activation, and an ISO 7816 card behind APDU pass-through (SELECT by file id through
MF/DF/EF, READ RECORD of TLV records, 9000 / 6A82 / 6A83 / 6986 / 6D00). The card's files are built from a
`SocialSecurityCardData` through the same layout a driver is configured with, so a second vendor's layout is a
second simulator. Faults are injected at run time: card pulled mid-read, bad BCC, no answer, garbage, unplugged.
Every card it holds is synthetic; production code never imports it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import random
import threading
from collections import deque

from drivers.serial_link import xor_checksum
from drivers.sscard import (
    DEFAULT_LAYOUT,
    ETX,
    STX,
    Encoding,
    Interface,
    SocialSecurityCardData,
    SsCardLayout,
    encode_frame,
    encode_tlv,
)
from hardware_sim.idcard_sim import synthetic_card
from hardware_sim.pty_device import DeviceLine

STATUS_UNKNOWN_COMMAND = 0x04


def synthetic_ss_card(seed: int = 0, interface: Interface = "contact") -> SocialSecurityCardData:
    """A synthetic card for the same synthetic person as `synthetic_card(seed)` (the SS number is the ID number)."""
    person = synthetic_card(seed)
    rng = random.Random(f"ss-{seed}")  # noqa: S311 - reproducible synthetic test data, not secrets
    region = person.id_number[:6]
    issued = dt.date(2020, 1, 1) + dt.timedelta(days=rng.randrange(0, 1500))
    return SocialSecurityCardData(
        card_identification_code=region + "D156000005" + "".join(rng.choice("0123456789ABCDEF") for _ in range(16)),
        card_number=rng.choice("ABCDEFGHJK") + f"{rng.randrange(0, 10**8):08d}",
        ss_number=person.id_number,
        name=person.name,
        interface=interface,
        card_type="3",
        spec_version="3.00",
        issuing_institution=region + "000000",
        issue_date=issued,
        expiry_date=issued.replace(year=issued.year + 10),
        sex=person.sex,
        ethnicity_code=person.ethnicity_code,
        birthplace=region,
        birth_date=person.birth_date,
    )


def _field_text(card: SocialSecurityCardData, field: str) -> str | None:
    value = {"ethnicity": card.ethnicity_code}.get(field, getattr(card, field, None))
    if value is None:
        return None
    if isinstance(value, dt.date):
        return f"{value:%Y%m%d}"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def _encode_value(text: str, encoding: Encoding) -> bytes:
    if encoding == "bcd":
        return bytes.fromhex(text + ("F" if len(text) % 2 else ""))
    return text.encode(encoding)


def build_card_files(card: SocialSecurityCardData, layout: SsCardLayout) -> dict[tuple[bytes, ...], dict[int, bytes]]:
    """The card's EFs (by path) and their records, each record a run of TLVs, as `layout` says they are stored."""
    files: dict[tuple[bytes, ...], dict[int, bytes]] = {}
    for field, spec in layout.fields.specs().items():
        text = _field_text(card, field)
        if text is None:
            continue
        records = files.setdefault(spec.path, {})
        records[spec.record] = records.get(spec.record, b"") + encode_tlv(spec.tag, _encode_value(text, spec.encoding))
    return files


class SsCardFault(enum.Enum):
    """Faults the simulated reader injects."""

    PULLED_MID_READ = "pulled_mid_read"
    """The card leaves after `after_apdus` APDUs: the reader answers 'card error' and the card is gone."""
    BAD_CHECKSUM = "bad_checksum"
    """The reply's BCC is wrong."""
    TIMEOUT = "timeout"
    """No reply."""
    GARBAGE = "garbage"
    """Random bytes (never STX) instead of the reply."""
    UNPLUG = "unplug"
    """The pty closes when the command arrives."""


@dataclasses.dataclass
class _PendingFault:
    fault: SsCardFault
    on: int | None
    after_apdus: int


class SsCardSimulator:
    """A reader and (optionally) a card on one interface; thread-safe for place/remove/inject from a test."""

    def __init__(
        self,
        card: SocialSecurityCardData | None = None,
        layout: SsCardLayout = DEFAULT_LAYOUT,
        *,
        interface: Interface = "contact",
        seed: int = 0,
    ) -> None:
        self._layout = layout
        self._frame = layout.frame
        self._lock = threading.Lock()
        self._files: dict[tuple[bytes, ...], dict[int, bytes]] | None = None
        self._interface: Interface = interface
        self._powered: Interface | None = None
        self._current: tuple[bytes, ...] = ()
        self._apdus = 0
        self._pull_after: int | None = None
        self._faults: deque[_PendingFault] = deque()
        self._rng = random.Random(seed)  # noqa: S311 - reproducible fault bytes
        self._buffer = bytearray()
        self.apdus: list[bytes] = []
        """Command APDUs received, in order; for test assertions."""
        if card is not None:
            self.place(card, interface)

    def attach(self, line: DeviceLine) -> None:
        """The reader only answers commands."""

    def place(self, card: SocialSecurityCardData, interface: Interface = "contact") -> None:
        files = build_card_files(card, self._layout)
        with self._lock:
            self._files, self._interface, self._powered = files, interface, None

    def place_files(self, files: dict[tuple[bytes, ...], dict[int, bytes]], interface: Interface = "contact") -> None:
        """A card with exactly these files (for cards that do not match the layout)."""
        with self._lock:
            self._files, self._interface, self._powered = files, interface, None

    def remove(self) -> None:
        with self._lock:
            self._files, self._powered = None, None

    def inject(self, fault: SsCardFault, *, on: int | None = None, after_apdus: int = 2) -> None:
        """Apply `fault` once: to the next reader command (or the next with code `on`)."""
        with self._lock:
            self._faults.append(_PendingFault(fault, on, after_apdus))

    # ------------------------------------------------------------ bytes

    def on_byte(self, byte: int, line: DeviceLine) -> None:
        if not self._buffer and byte != STX:
            return
        self._buffer.append(byte)
        header = 1 + self._frame.length_bytes
        if len(self._buffer) < header:
            return
        length = int.from_bytes(self._buffer[1:header], "big")
        if length < 1 or length > self._frame.max_length:
            self._buffer.clear()
            return
        if len(self._buffer) < header + length + 2:
            return
        raw = bytes(self._buffer)
        self._buffer.clear()
        body, bcc, etx = raw[header:-2], raw[-2], raw[-1]
        covered = (raw[:1] if self._frame.bcc_covers_stx else b"") + raw[1:header] + body
        if etx != ETX:
            return
        if xor_checksum(covered) != bcc:
            line.send(encode_frame(self._frame.status_bad_checksum, b"", self._frame))
            return
        self._on_command(body[0], body[1:], line)

    def _on_command(self, command: int, data: bytes, line: DeviceLine) -> None:
        with self._lock:
            fault = self._take_fault(command)
        if fault is not None and fault.fault is SsCardFault.UNPLUG:
            line.unplug()
            return
        if fault is not None and fault.fault is SsCardFault.TIMEOUT:
            return
        if fault is not None and fault.fault is SsCardFault.GARBAGE:
            noise = (0x00, 0x55, 0x7F, 0xAA, 0xFE)
            line.send(bytes(self._rng.choice(noise) for _ in range(self._rng.randrange(3, 30))))
            return
        if fault is not None and fault.fault is SsCardFault.PULLED_MID_READ:
            with self._lock:
                self._pull_after = fault.after_apdus
        status, payload = self._handle(command, data)
        reply = encode_frame(status, payload, self._frame)
        if fault is not None and fault.fault is SsCardFault.BAD_CHECKSUM:
            reply = reply[:-2] + bytes([reply[-2] ^ 0x5A]) + reply[-1:]
        line.send(reply)

    def _take_fault(self, command: int) -> _PendingFault | None:
        for pending in self._faults:
            if pending.on is None or pending.on == command:
                self._faults.remove(pending)
                return pending
        return None

    def _handle(self, command: int, data: bytes) -> tuple[int, bytes]:
        frame = self._frame
        with self._lock:
            if command in (frame.cmd_power_on_contact, frame.cmd_activate_contactless):
                interface: Interface = "contact" if command == frame.cmd_power_on_contact else "contactless"
                if self._files is None or self._interface != interface:
                    return frame.status_no_card, b""
                self._powered, self._current, self._apdus = interface, (), 0
                answer = bytes.fromhex("3B6C00000031C06C0D0A000090") if interface == "contact" else b"\x04\x1a\x2b\x3c"
                return frame.status_ok, answer
            if command in (frame.cmd_apdu_contact, frame.cmd_apdu_contactless):
                interface = "contact" if command == frame.cmd_apdu_contact else "contactless"
                if self._files is None:
                    return frame.status_no_card, b""
                if self._powered != interface:
                    return frame.status_card_error, b""
                self._apdus += 1
                if self._pull_after is not None and self._apdus > self._pull_after:
                    self._files, self._powered, self._pull_after = None, None, None
                    return frame.status_card_error, b""
                self.apdus.append(data)
                return frame.status_ok, self._apdu(data)
            if command == frame.cmd_power_off:
                self._powered = None
                return frame.status_ok, b""
        return STATUS_UNKNOWN_COMMAND, b""

    def _apdu(self, apdu: bytes) -> bytes:
        files = self._files or {}
        if len(apdu) < 4:
            return bytes.fromhex("6700")
        if apdu[:4] == bytes.fromhex("00A40000") and len(apdu) == 7 and apdu[4] == 2:
            fid = apdu[5:7]
            if fid == b"\x3f\x00":
                self._current = (fid,)
                return bytes.fromhex("9000")
            parent = self._current if self._current not in files else self._current[:-1]
            candidate = (*parent, fid)
            if any(path[: len(candidate)] == candidate for path in files):
                self._current = candidate
                return bytes.fromhex("9000")
            return bytes.fromhex("6A82")
        if apdu[:2] == bytes.fromhex("00B2") and len(apdu) >= 4 and apdu[3] == 0x04:
            records = files.get(self._current)
            if records is None:
                return bytes.fromhex("6986")
            record = records.get(apdu[2])
            return record + bytes.fromhex("9000") if record is not None else bytes.fromhex("6A83")
        return bytes.fromhex("6D00")
