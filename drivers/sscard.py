"""Driver for a social-security-card (社会保障卡) reader: contact and contactless, card files read by APDUs.

There is no universal wire protocol for these readers (each vendor has its own), so this module owns:

* a documented generic reader frame, `STX | LEN | CMD/STATUS | data | BCC | ETX`, whose variant (length width,
  checksum coverage, command and status codes) is configuration (`ReaderFrameConfig`);
* APDU pass-through: power on the contact chip or activate the contactless one (ISO 14443), then ISO 7816 SELECT
  by file id (00 A4) down a path such as 3F00/DDF1/EF05, and READ RECORD (00 B2) of TLV records;
* the vendor's field layout as typed configuration (`SsCardLayout`, `extra="forbid"`): for each field, the file,
  record, tag and encoding. `DEFAULT_LAYOUT` follows the MOHRSS card specification's EF05 / EF06 layout;
* `SocialSecurityCardData` (masked `repr`) and `SocialSecurityCardReader`, which implements `Peripheral`.

Link errors are translated into `drivers.card_reader` errors here. This module must never log a name, a
social-security number, a card number or a card identification code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.card_reader import (
    ETHNICITIES,
    CardReaderError,
    CardRefusedError,
    CardRemovedError,
    InvalidCardDataError,
    NoCardError,
    ReaderChecksumError,
    ReaderFaultError,
    ReaderHealth,
    ReaderProtocolError,
    ReaderTimeoutError,
    ReaderUnavailableError,
    Sex,
    id_number_problem,
    mask_name,
    mask_number,
    parse_yyyymmdd,
)
from drivers.serial_link import (
    BadChecksumError,
    ByteLink,
    Clock,
    FrameError,
    GarbageError,
    LinkTimeoutError,
    OversizedFrameError,
    PortUnavailableError,
    SerialLink,
    TruncatedFrameError,
    read_exact,
    xor_checksum,
)
from protocol import PeripheralKind, PeripheralStatus

logger = logging.getLogger(__name__)

STX = 0x02
ETX = 0x03
SW_OK = 0x9000

Interface = Literal["contact", "contactless"]
Encoding = Literal["ascii", "gbk", "utf-8", "bcd"]


# ---------------------------------------------------------------- configuration


class ReaderFrameConfig(BaseModel):
    """The reader's frame variant: STX | LEN | CMD/STATUS | data | BCC | ETX with vendor-specific details."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    baudrate: int = Field(default=115200, description="Serial speed of this reader model (8N1).")
    length_bytes: Literal[1, 2] = Field(default=2, description="Width of LEN (big-endian): bytes of CMD/STATUS+data.")
    bcc_covers_stx: bool = Field(default=False, description="Whether the XOR BCC starts at STX instead of at LEN.")
    max_length: int = Field(default=1024, ge=16, le=65535, description="Largest LEN accepted from the reader.")
    cmd_power_on_contact: int = Field(default=0x31, ge=0, le=255, description="Power on the contact chip (ATR).")
    cmd_activate_contactless: int = Field(default=0x32, ge=0, le=255, description="Activate an ISO 14443 card.")
    cmd_apdu_contact: int = Field(default=0x33, ge=0, le=255, description="APDU to the contact chip.")
    cmd_apdu_contactless: int = Field(default=0x34, ge=0, le=255, description="APDU to the contactless card.")
    cmd_power_off: int = Field(default=0x35, ge=0, le=255, description="Power off / deactivate the card.")
    status_ok: int = Field(default=0x00, ge=0, le=255, description="Reader status: done.")
    status_no_card: int = Field(default=0x01, ge=0, le=255, description="Reader status: no card on this interface.")
    status_card_error: int = Field(
        default=0x02, ge=0, le=255, description="Reader status: the card stopped answering (removed or mute)."
    )
    status_bad_checksum: int = Field(default=0x03, ge=0, le=255, description="Reader status: our BCC was wrong.")

    def apdu_command(self, interface: Interface) -> int:
        return self.cmd_apdu_contact if interface == "contact" else self.cmd_apdu_contactless

    def activate_command(self, interface: Interface) -> int:
        return self.cmd_power_on_contact if interface == "contact" else self.cmd_activate_contactless


class FieldSpec(BaseModel):
    """Where one field lives on the card and how its bytes are encoded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(description="Path of 2-byte file ids from the MF, e.g. '3F00/DDF1/EF05'.")
    record: int = Field(ge=1, le=254, description="Record number for READ RECORD (00 B2 record 04).")
    tag: int = Field(ge=1, le=254, description="Tag of the TLV holding the value inside that record.")
    encoding: Encoding = Field(description="ascii / gbk / utf-8 text, or bcd digits (dates, codes).")

    @field_validator("file")
    @classmethod
    def _path(cls, value: str) -> str:
        parts = value.split("/")
        if not parts or not all(len(p) == 4 and _is_hex(p) for p in parts):
            raise ValueError("a path of 4-hex-digit file ids separated by '/'")
        return value.upper()

    @property
    def path(self) -> tuple[bytes, ...]:
        return file_path(self.file)


def file_path(file: str) -> tuple[bytes, ...]:
    """'3F00/DDF1/EF05' as the file ids to SELECT in turn."""
    return tuple(bytes.fromhex(p) for p in file.split("/"))


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


class SsFieldLayout(BaseModel):
    """Field-by-field location on the card; the four identity fields are required, the rest may be absent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    card_identification_code: FieldSpec = Field(description="卡识别码 (32 characters).")
    card_number: FieldSpec = Field(description="社会保障卡卡号 (9 characters).")
    ss_number: FieldSpec = Field(description="社会保障号码 (the 18-character identity number).")
    name: FieldSpec = Field(description="姓名.")
    card_type: FieldSpec | None = Field(default=None, description="卡的类别.")
    spec_version: FieldSpec | None = Field(default=None, description="规范版本.")
    issuing_institution: FieldSpec | None = Field(default=None, description="初始化机构编号 / issuing institution.")
    issue_date: FieldSpec | None = Field(default=None, description="发卡日期 (YYYYMMDD).")
    expiry_date: FieldSpec | None = Field(default=None, description="卡有效期 (YYYYMMDD).")
    sex: FieldSpec | None = Field(default=None, description="性别 (GB/T 2261.1 code).")
    ethnicity: FieldSpec | None = Field(default=None, description="民族 (GB 3304 two-digit code).")
    birthplace: FieldSpec | None = Field(default=None, description="出生地 (administrative division code).")
    birth_date: FieldSpec | None = Field(default=None, description="出生日期 (YYYYMMDD).")

    def specs(self) -> dict[str, FieldSpec]:
        """Configured fields by name, in declaration order."""
        return {name: spec for name in type(self).model_fields if (spec := getattr(self, name)) is not None}


class SsCardLayout(BaseModel):
    """One reader vendor's frame variant plus one card layout; part of the terminal configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(default=1, description="Version of this configuration's shape.")
    name: str = Field(min_length=1, max_length=64, description="Label for logs and status, e.g. 'default'.")
    frame: ReaderFrameConfig = Field(default_factory=ReaderFrameConfig, description="The reader's frame variant.")
    interfaces: tuple[Interface, ...] = Field(
        default=("contact", "contactless"), min_length=1, description="Interfaces to try for a card, in order."
    )
    fields: SsFieldLayout = Field(description="Where each field lives on the card.")
    verify_ss_number: bool = Field(
        default=True, description="Require the social-security number to be a valid 18-character identity number."
    )

    @model_validator(mode="after")
    def _distinct_interfaces(self) -> SsCardLayout:
        if len(set(self.interfaces)) != len(self.interfaces):
            raise ValueError("interfaces listed twice")
        return self


def _spec(file: str, tag: int, encoding: Encoding) -> FieldSpec:
    return FieldSpec(file=file, record=tag, tag=tag, encoding=encoding)


_EF05 = "3F00/DDF1/EF05"
_EF06 = "3F00/DDF1/EF06"
DEFAULT_LAYOUT = SsCardLayout(
    name="mohrss-default",
    fields=SsFieldLayout(
        card_identification_code=_spec(_EF05, 0x01, "ascii"),
        card_type=_spec(_EF05, 0x02, "ascii"),
        spec_version=_spec(_EF05, 0x03, "ascii"),
        issuing_institution=_spec(_EF05, 0x04, "ascii"),
        issue_date=_spec(_EF05, 0x05, "bcd"),
        expiry_date=_spec(_EF05, 0x06, "bcd"),
        card_number=_spec(_EF05, 0x07, "ascii"),
        ss_number=_spec(_EF06, 0x08, "ascii"),
        name=_spec(_EF06, 0x09, "gbk"),
        sex=_spec(_EF06, 0x0A, "ascii"),
        ethnicity=_spec(_EF06, 0x0B, "bcd"),
        birthplace=_spec(_EF06, 0x0C, "bcd"),
        birth_date=_spec(_EF06, 0x0D, "bcd"),
    ),
)
"""MOHRSS layout: DDF1/EF05 card data (tags 01-07), DDF1/EF06 holder data (tags 08-0D); record number = tag."""


# ---------------------------------------------------------------- reader frame codec


def encode_frame(code: int, data: bytes, frame: ReaderFrameConfig) -> bytes:
    """STX | LEN | code | data | BCC | ETX; `code` is CMD (host to reader) or STATUS (reader to host)."""
    body = bytes([code]) + data
    if len(body) > min(frame.max_length, 256**frame.length_bytes - 1):
        raise ValueError("frame too long for this variant")
    length = len(body).to_bytes(frame.length_bytes, "big")
    covered = (bytes([STX]) if frame.bcc_covers_stx else b"") + length + body
    return bytes([STX]) + length + body + bytes([xor_checksum(covered), ETX])


def decode_frame(raw: bytes, frame: ReaderFrameConfig) -> tuple[int, bytes]:
    """(code, data) of one complete frame; raises only `FrameError` subclasses."""
    if not raw or raw[0] != STX:
        raise GarbageError("frame does not start with STX")
    header = 1 + frame.length_bytes
    if len(raw) < header:
        raise TruncatedFrameError("frame ends inside its length field")
    length = _check_length(raw[1:header], frame)
    if len(raw) < header + length + 2:
        raise TruncatedFrameError(f"frame announces {length} bytes, has fewer")
    if len(raw) > header + length + 2:
        raise GarbageError("bytes after ETX")
    return _check_tail(raw[1:header], raw[header:], frame)


def _check_length(length_bytes: bytes, frame: ReaderFrameConfig) -> int:
    length = int.from_bytes(length_bytes, "big")
    if length < 1:
        raise GarbageError("empty frame")
    if length > frame.max_length:
        raise OversizedFrameError(f"frame length {length} exceeds {frame.max_length}")
    return length


def _check_tail(length_bytes: bytes, rest: bytes, frame: ReaderFrameConfig) -> tuple[int, bytes]:
    body, bcc, etx = rest[:-2], rest[-2], rest[-1]
    if etx != ETX:
        raise GarbageError("frame does not end with ETX")
    covered = (bytes([STX]) if frame.bcc_covers_stx else b"") + length_bytes + body
    if xor_checksum(covered) != bcc:
        raise BadChecksumError("reader frame BCC mismatch")
    return body[0], body[1:]


def read_frame(
    link: ByteLink, frame: ReaderFrameConfig, deadline: float, clock: Clock = time.monotonic, *, max_skip: int = 64
) -> tuple[int, bytes]:
    """Read one frame, skipping bytes before STX; LinkTimeoutError only if nothing at all arrived."""
    skipped = 0
    while True:
        try:
            first = read_exact(link, 1, deadline, clock)
        except LinkTimeoutError as exc:
            if skipped:
                raise GarbageError(f"{skipped} bytes without STX") from exc
            raise
        if first[0] == STX:
            break
        skipped += 1
        if skipped > max_skip:
            raise GarbageError(f"more than {max_skip} bytes without STX")
    try:
        length_bytes = read_exact(link, frame.length_bytes, deadline, clock)
        length = _check_length(length_bytes, frame)
        rest = read_exact(link, length + 2, deadline, clock)
    except LinkTimeoutError as exc:
        raise TruncatedFrameError(f"reader frame stopped after {len(exc.received)} bytes") from exc
    return _check_tail(length_bytes, rest, frame)


# ---------------------------------------------------------------- APDUs and TLV


def select_fid(fid: bytes) -> bytes:
    """ISO 7816-4 SELECT by file identifier: 00 A4 00 00 02 FID."""
    return bytes([0x00, 0xA4, 0x00, 0x00, 0x02]) + fid


def read_record(record: int) -> bytes:
    """ISO 7816-4 READ RECORD of the current EF, record number in P1: 00 B2 record 04 00."""
    return bytes([0x00, 0xB2, record, 0x04, 0x00])


def split_response_apdu(rapdu: bytes) -> tuple[bytes, int]:
    """(data, SW1SW2) of a response APDU; ReaderProtocolError if it cannot hold a status word."""
    if len(rapdu) < 2:
        raise ReaderProtocolError("response APDU shorter than its status word")
    return rapdu[:-2], int.from_bytes(rapdu[-2:], "big")


def parse_tlv(record: bytes) -> dict[int, bytes]:
    """Simple TLV (1-byte tag; 1-byte length, or 81 LL): a record's values by tag; padding 00/FF ends the list.

    Raises only InvalidCardDataError.
    """
    values: dict[int, bytes] = {}
    i = 0
    while i < len(record):
        tag = record[i]
        if tag in (0x00, 0xFF):
            break
        if i + 1 >= len(record):
            raise InvalidCardDataError("TLV ends after its tag")
        length, i = record[i + 1], i + 2
        if length == 0x81:
            if i >= len(record):
                raise InvalidCardDataError("TLV ends inside its length")
            length, i = record[i], i + 1
        elif length > 0x7F:
            raise InvalidCardDataError("unsupported TLV length form")
        if i + length > len(record):
            raise InvalidCardDataError("TLV value runs past the record")
        if tag in values:
            raise InvalidCardDataError("tag repeated in one record")
        values[tag] = record[i : i + length]
        i += length
    return values


def encode_tlv(tag: int, value: bytes) -> bytes:
    """One TLV (the simulator and tests build records with it)."""
    if len(value) > 0xFF:
        raise ValueError("value too long")
    length = bytes([len(value)]) if len(value) <= 0x7F else bytes([0x81, len(value)])
    return bytes([tag]) + length + value


def decode_value(value: bytes, encoding: Encoding) -> str:
    """A field's text: padding (spaces, 00, FF; F nibbles in BCD) removed. Raises only InvalidCardDataError."""
    if encoding == "bcd":
        digits = value.hex().upper().rstrip("F")
        if not digits.isdigit() and digits:
            raise InvalidCardDataError("BCD field holds non-decimal nibbles")
        return digits
    try:
        text = value.rstrip(b"\x00\xff").decode(encoding)
    except UnicodeDecodeError as exc:
        raise InvalidCardDataError(f"field is not valid {encoding}") from exc
    text = text.rstrip(" ")
    if not text.isprintable():
        raise InvalidCardDataError("field has control characters")
    return text


# ---------------------------------------------------------------- card data


@dataclasses.dataclass(frozen=True, repr=False)
class SocialSecurityCardData:
    """One social-security card as read through a layout. `repr`/`str` mask personal data; log only those."""

    card_identification_code: str
    card_number: str
    ss_number: str
    name: str
    interface: Interface
    card_type: str | None = None
    spec_version: str | None = None
    issuing_institution: str | None = None
    issue_date: dt.date | None = None
    expiry_date: dt.date | None = None
    sex: Sex | None = None
    ethnicity_code: str | None = None
    birthplace: str | None = None
    birth_date: dt.date | None = None

    @property
    def ethnicity(self) -> str | None:
        return None if self.ethnicity_code is None else ETHNICITIES.get(self.ethnicity_code, "未知")

    def masked(self) -> dict[str, str]:
        """Fields safe for logs and operator screens."""
        return {
            "name": mask_name(self.name),
            "ss_number": mask_number(self.ss_number),
            "card_number": mask_number(self.card_number, 1, 2),
            "card_identification_code": mask_number(self.card_identification_code, 6, 0),
            "interface": self.interface,
        }

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.masked().items())
        return f"SocialSecurityCardData({fields})"

    __str__ = __repr__


def build_card_data(
    values: dict[str, str], interface: Interface, *, verify_ss_number: bool = True
) -> SocialSecurityCardData:
    """Validate decoded field texts (by layout field name) into a card; raises only InvalidCardDataError."""
    for required in ("card_identification_code", "card_number", "ss_number", "name"):
        if not values.get(required):
            raise InvalidCardDataError(f"{required} is empty")
    card_number = values["card_number"]
    if not card_number.isascii() or not card_number.isalnum():
        raise InvalidCardDataError("card number is not alphanumeric")
    if verify_ss_number:
        problem = id_number_problem(values["ss_number"])
        if problem is not None:
            raise InvalidCardDataError(f"social-security number: {problem}")
    dates: dict[str, dt.date | None] = {}
    for field in ("issue_date", "expiry_date", "birth_date"):
        text = values.get(field)
        try:
            dates[field] = parse_yyyymmdd(text) if text else None
        except ValueError as exc:
            raise InvalidCardDataError(f"{field} is not YYYYMMDD") from exc
    sex: Sex | None = None
    if values.get("sex"):
        try:
            sex = Sex(values["sex"])
        except ValueError as exc:
            raise InvalidCardDataError("unknown sex code") from exc
    ethnicity = values.get("ethnicity") or None
    if ethnicity is not None:
        ethnicity = ethnicity.zfill(2)
        if ethnicity not in ETHNICITIES:
            raise InvalidCardDataError("unknown ethnicity code")
    return SocialSecurityCardData(
        card_identification_code=values["card_identification_code"],
        card_number=card_number,
        ss_number=values["ss_number"],
        name=values["name"],
        interface=interface,
        card_type=values.get("card_type") or None,
        spec_version=values.get("spec_version") or None,
        issuing_institution=values.get("issuing_institution") or None,
        issue_date=dates["issue_date"],
        expiry_date=dates["expiry_date"],
        sex=sex,
        ethnicity_code=ethnicity,
        birthplace=values.get("birthplace") or None,
        birth_date=dates["birth_date"],
    )


# ---------------------------------------------------------------- the reader

_REQUIRED_FIELDS = frozenset({"card_identification_code", "card_number", "ss_number", "name"})
SW_FILE_NOT_FOUND = 0x6A82
SW_RECORD_NOT_FOUND = 0x6A83


class SocialSecurityCardReader:
    """A social-security-card reader on a `ByteLink`, driven by one `SsCardLayout`; implements `Peripheral`."""

    def __init__(
        self,
        link: ByteLink,
        layout: SsCardLayout = DEFAULT_LAYOUT,
        *,
        name: str = "sscard0",
        command_timeout_s: float = 1.0,
        poll_interval_s: float = 0.1,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._link = link
        self._layout = layout
        self._frame = layout.frame
        self._name = name
        self._command_timeout_s = command_timeout_s
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._sleep = sleep
        self._health = ReaderHealth(name, PeripheralKind.SS_CARD_READER)

    @classmethod
    def on_port(
        cls, port: str, layout: SsCardLayout = DEFAULT_LAYOUT, *, name: str = "sscard0"
    ) -> SocialSecurityCardReader:
        """The reader on a serial port path, at the layout's baud rate (opened lazily)."""
        return cls(SerialLink(port, baudrate=layout.frame.baudrate), layout, name=name)

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> PeripheralKind:
        return PeripheralKind.SS_CARD_READER

    @property
    def layout(self) -> SsCardLayout:
        return self._layout

    def status(self) -> PeripheralStatus:
        return self._health.status()

    def close(self) -> None:
        self._link.close()

    def read_card(self, timeout_s: float = 5.0) -> SocialSecurityCardData:
        """Wait up to `timeout_s` for a card on any configured interface, read the layout's fields, power off.

        Raises NoCardError, CardRemovedError, CardRefusedError (the card lacks a required file or record),
        InvalidCardDataError, ReaderChecksumError, ReaderProtocolError, ReaderFaultError, ReaderTimeoutError,
        ReaderUnavailableError.
        """
        try:
            card = self._read_card(timeout_s)
        except CardReaderError as exc:
            self._health.failed(exc)
            raise
        self._health.ok()
        logger.info("social-security card read: %s", card)
        return card

    def _read_card(self, timeout_s: float) -> SocialSecurityCardData:
        deadline = self._clock() + timeout_s
        interface = self._activate(deadline)
        try:
            values = self._read_fields(interface)
        except (ReaderTimeoutError, ReaderUnavailableError, ReaderProtocolError):
            raise  # the reader itself is not answering sensibly: no point telling it to power off
        except CardReaderError:
            self._power_off()
            raise
        self._power_off()
        return build_card_data(values, interface, verify_ss_number=self._layout.verify_ss_number)

    def _activate(self, deadline: float) -> Interface:
        while True:
            for interface in self._layout.interfaces:
                status, _answer = self._transact(self._frame.activate_command(interface), b"")
                if status == self._frame.status_ok:
                    return interface
                if status not in (self._frame.status_no_card, self._frame.status_card_error):
                    raise ReaderFaultError(f"reader status 0x{status:02X} activating {interface}", status)
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise NoCardError("no social-security card presented")
            self._sleep(min(self._poll_interval_s, remaining))

    def _read_fields(self, interface: Interface) -> dict[str, str]:
        by_file: dict[str, dict[int, list[tuple[str, FieldSpec]]]] = {}
        for field, spec in self._layout.fields.specs().items():
            by_file.setdefault(spec.file, {}).setdefault(spec.record, []).append((field, spec))
        values: dict[str, str] = {}
        for file, records in by_file.items():
            try:
                for fid in file_path(file):
                    self._apdu(interface, select_fid(fid))
            except CardRefusedError:
                if any(f in _REQUIRED_FIELDS for fields in records.values() for f, _ in fields):
                    raise
                continue  # only optional fields live there
            for record, fields in records.items():
                try:
                    data = self._apdu(interface, read_record(record))
                except CardRefusedError as exc:
                    if exc.sw == SW_RECORD_NOT_FOUND and not any(f in _REQUIRED_FIELDS for f, _ in fields):
                        continue
                    raise
                tlv = parse_tlv(data)
                for field, spec in fields:
                    if spec.tag in tlv:
                        values[field] = decode_value(tlv[spec.tag], spec.encoding)
        return values

    def _apdu(self, interface: Interface, command: bytes) -> bytes:
        status, rapdu = self._transact(self._frame.apdu_command(interface), command)
        if status in (self._frame.status_no_card, self._frame.status_card_error):
            raise CardRemovedError("card stopped answering during the read")
        if status != self._frame.status_ok:
            raise ReaderFaultError(f"reader status 0x{status:02X} on an APDU", status)
        data, sw = split_response_apdu(rapdu)
        if sw != SW_OK:
            raise CardRefusedError(f"card answered {sw:04X} to {command[:2].hex().upper()}", sw)
        return data

    def _power_off(self) -> None:
        try:
            self._transact(self._frame.cmd_power_off, b"")
        except CardReaderError:
            # Powering off is courtesy: the outcome of the read stands, the next activation resets the card.
            logger.debug("%s: power off failed", self._name, exc_info=True)

    def _transact(self, command: int, data: bytes) -> tuple[int, bytes]:
        try:
            self._link.discard_input()
            self._link.write(encode_frame(command, data, self._frame))
            status, payload = read_frame(self._link, self._frame, self._clock() + self._command_timeout_s, self._clock)
        except PortUnavailableError as exc:
            raise ReaderUnavailableError(str(exc)) from exc
        except LinkTimeoutError as exc:
            raise ReaderTimeoutError(f"no answer to command 0x{command:02X}") from exc
        except BadChecksumError as exc:
            raise ReaderChecksumError(f"reply to command 0x{command:02X}: {exc}") from exc
        except FrameError as exc:
            raise ReaderProtocolError(f"reply to command 0x{command:02X}: {exc}") from exc
        if status == self._frame.status_bad_checksum:
            raise ReaderChecksumError(f"reader reports a BCC error in our command 0x{command:02X}")
        return status, payload
