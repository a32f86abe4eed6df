"""Driver for the 2nd-generation resident ID-card reader (SAM module, GA 467 framing) over a serial link.

Owns the SAM frame codec (preamble AA AA AA 96 69, 2-byte big-endian length, command/status, XOR checksum), the
find → select → read sequence with retries while no card is present, the decoding of the 256-byte UCS-2 text into
`IdCardData` (with the identity number's check digit and embedded birth date verified), and `IdCardReader`, which
implements `drivers.peripherals.Peripheral`. Link errors are translated into `drivers.card_reader` errors here.

The 1024-byte photo is WLT-compressed; decoding it needs the reader vendor's licensed library, so this driver hands
it on as opaque bytes and never tries. This module must never log a name, an identity number or the photo; the
card object's `repr` masks them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import time
from collections.abc import Callable

from drivers.card_reader import (
    ETHNICITIES,
    CardReaderError,
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
    id_birth_date,
    id_number_problem,
    id_sex_digit_is_male,
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

PREAMBLE = bytes.fromhex("AAAAAA9669")
BAUDRATE = 115200
MAX_FRAME_LENGTH = 4096
"""Largest LEN we accept: text + photo + fingerprint (2 x 512 bytes) and their length words fit well inside."""
TEXT_LENGTH = 256
PHOTO_LENGTH = 1024


class SamCommand(enum.Enum):
    """(CMD, PARA) pairs of the SAM module."""

    RESET = (0x10, 0xFF)
    SAM_STATUS = (0x11, 0xFF)
    READ_SAM_ID = (0x12, 0xFF)
    FIND_CARD = (0x20, 0x01)
    SELECT_CARD = (0x20, 0x02)
    READ_TEXT_PHOTO = (0x30, 0x01)
    READ_TEXT_PHOTO_FINGERPRINT = (0x30, 0x10)


class SamStatus(enum.IntEnum):
    """SW3 values (SW1 SW2 are 00 00) as published in the SAM module manuals."""

    SUCCESS = 0x90
    NO_CONTENT = 0x91
    FIND_SUCCESS = 0x9F
    CHECKSUM_ERROR = 0x10
    LENGTH_ERROR = 0x11
    COMMAND_ERROR = 0x21
    UNAUTHORIZED_OPERATION = 0x23
    UNRECOGNISED_ERROR = 0x24
    CARD_AUTH_FAILED = 0x31
    READER_AUTH_FAILED = 0x32
    INFO_VERIFY_FAILED = 0x33
    UNKNOWN_CARD_TYPE = 0x40
    READ_FAILED = 0x41
    RANDOM_FAILED = 0x47
    SAM_SELF_TEST_FAILED = 0x60
    SAM_NOT_AUTHORISED = 0x66
    FIND_FAILED = 0x80
    SELECT_FAILED = 0x81


@dataclasses.dataclass(frozen=True)
class SamResponse:
    """A decoded response frame: status words and data."""

    sw1: int
    sw2: int
    sw3: int
    data: bytes

    @property
    def status_name(self) -> str:
        try:
            return SamStatus(self.sw3).name
        except ValueError:
            return f"0x{self.sw3:02X}"


# ---------------------------------------------------------------- frame codec


def encode_frame(body: bytes) -> bytes:
    """preamble + LEN (bytes after LEN, CHK included) + body + CHK (XOR of LEN through the body)."""
    if len(body) + 1 > MAX_FRAME_LENGTH:
        raise ValueError("frame body too long")
    length = (len(body) + 1).to_bytes(2, "big")
    return PREAMBLE + length + body + bytes([xor_checksum(length + body)])


def encode_request(command: SamCommand, data: bytes = b"") -> bytes:
    """The request frame for `command`."""
    cmd, para = command.value
    return encode_frame(bytes([cmd, para]) + data)


def encode_response(sw3: int, data: bytes = b"", *, sw1: int = 0, sw2: int = 0) -> bytes:
    """A response frame (what the module sends); used by the simulator and tests."""
    return encode_frame(bytes([sw1, sw2, sw3]) + data)


def decode_frame(frame: bytes) -> bytes:
    """The body of one complete frame; raises only `FrameError` subclasses."""
    if not frame.startswith(PREAMBLE):
        raise GarbageError("frame does not start with the SAM preamble")
    if len(frame) < len(PREAMBLE) + 2:
        raise TruncatedFrameError("frame ends inside its length field")
    length = int.from_bytes(frame[5:7], "big")
    _check_length(length)
    if len(frame) < 7 + length:
        raise TruncatedFrameError(f"frame announces {length} bytes, has {len(frame) - 7}")
    if len(frame) > 7 + length:
        raise GarbageError("bytes after the frame's checksum")
    return _check_body(frame[5:7], frame[7:])


def _check_length(length: int) -> None:
    if length < 3:  # at least CMD PARA CHK (requests); responses need 4 and are checked by decode_response
        raise GarbageError(f"impossible frame length {length}")
    if length > MAX_FRAME_LENGTH:
        raise OversizedFrameError(f"frame length {length} exceeds {MAX_FRAME_LENGTH}")


def _check_body(length_bytes: bytes, rest: bytes) -> bytes:
    body, chk = rest[:-1], rest[-1]
    if xor_checksum(length_bytes + body) != chk:
        raise BadChecksumError("SAM frame checksum mismatch")
    return body


def decode_response(body: bytes) -> SamResponse:
    """Status words and data of a response body; GarbageError if it cannot hold the three status bytes."""
    if len(body) < 3:
        raise GarbageError("response shorter than its status words")
    return SamResponse(body[0], body[1], body[2], body[3:])


def read_frame(link: ByteLink, deadline: float, clock: Clock = time.monotonic, *, max_skip: int = 256) -> bytes:
    """Read one frame from the link, resynchronising on the preamble; returns its body.

    Silence before any byte is LinkTimeoutError; bytes that never become a preamble are GarbageError; a frame that stops
    before its announced length is TruncatedFrameError; then the checksum is checked.
    """
    window = bytearray()
    skipped = 0
    while bytes(window[-5:]) != PREAMBLE:
        try:
            window += read_exact(link, 1, deadline, clock)
        except LinkTimeoutError as exc:
            if window:
                raise GarbageError(f"{len(window)} bytes without a SAM preamble") from exc
            raise
        if len(window) > 5:
            skipped += 1
            del window[0]
            if skipped > max_skip:
                raise GarbageError(f"more than {max_skip} bytes without a SAM preamble")
    try:
        length_bytes = read_exact(link, 2, deadline, clock)
        length = int.from_bytes(length_bytes, "big")
        _check_length(length)
        rest = read_exact(link, length, deadline, clock)
    except LinkTimeoutError as exc:
        raise TruncatedFrameError(f"frame stopped after {len(exc.received)} bytes") from exc
    if skipped:
        logger.debug("skipped %d bytes before a SAM preamble", skipped)
    return _check_body(length_bytes, rest)


# ---------------------------------------------------------------- card text


@dataclasses.dataclass(frozen=True, repr=False)
class IdCardData:
    """One resident ID card as read by the SAM module. `repr`/`str` mask personal data; log only those."""

    name: str
    sex: Sex
    ethnicity_code: str
    birth_date: dt.date
    address: str
    id_number: str
    issuing_authority: str
    valid_from: dt.date
    valid_until: dt.date | None
    """None means 长期 (valid for life)."""
    photo_wlt: bytes = b""
    """The 1024-byte WLT-compressed photo, opaque: decoding needs the reader vendor's licensed library."""
    fingerprint: bytes | None = None

    @property
    def ethnicity(self) -> str:
        return ETHNICITIES.get(self.ethnicity_code, "未知")

    @property
    def long_term(self) -> bool:
        return self.valid_until is None

    def masked(self) -> dict[str, str]:
        """Fields safe for logs and operator screens: masked name and number, no address or photo."""
        return {
            "name": mask_name(self.name),
            "id_number": mask_number(self.id_number),
            "sex": self.sex.label,
            "valid_until": "长期" if self.valid_until is None else self.valid_until.isoformat(),
        }

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.masked().items())
        return f"IdCardData({fields})"

    __str__ = __repr__


_TEXT_FIELDS = (
    ("name", 30),
    ("sex", 2),
    ("ethnicity", 4),
    ("birth_date", 16),
    ("address", 70),
    ("id_number", 36),
    ("issuing_authority", 30),
    ("valid_from", 16),
    ("valid_until", 16),
    ("reserved", 36),
)
TEXT_LAYOUT: dict[str, tuple[int, int]] = {}
"""Field name -> (byte offset, byte length) in the 256-byte UCS-2 little-endian text."""
_offset = 0
for _field, _size in _TEXT_FIELDS:
    TEXT_LAYOUT[_field] = (_offset, _size)
    _offset += _size
del _offset, _field, _size

LONG_TERM = "长期"


def parse_id_text(text: bytes, photo: bytes = b"", fingerprint: bytes | None = None) -> IdCardData:
    """Decode and validate the 256-byte text; raises only `InvalidCardDataError`, never quoting the data."""
    if len(text) != TEXT_LENGTH:
        raise InvalidCardDataError(f"text is {len(text)} bytes, not {TEXT_LENGTH}")
    fields: dict[str, str] = {}
    for field, (offset, size) in TEXT_LAYOUT.items():
        try:
            value = text[offset : offset + size].decode("utf-16-le")
        except UnicodeDecodeError as exc:
            raise InvalidCardDataError(f"field {field} is not UCS-2") from exc
        fields[field] = value.rstrip(" \x00")
    if not fields["name"] or not fields["name"].isprintable():
        raise InvalidCardDataError("name is empty or has control characters")
    try:
        sex = Sex(fields["sex"])
    except ValueError as exc:
        raise InvalidCardDataError("unknown sex code") from exc
    if fields["ethnicity"] not in ETHNICITIES:
        raise InvalidCardDataError("unknown ethnicity code")
    id_number = fields["id_number"]
    problem = id_number_problem(id_number)
    if problem is not None:
        raise InvalidCardDataError(problem)
    try:
        birth_date = parse_yyyymmdd(fields["birth_date"])
        valid_from = parse_yyyymmdd(fields["valid_from"])
        valid_until = None if fields["valid_until"] == LONG_TERM else parse_yyyymmdd(fields["valid_until"])
    except ValueError as exc:
        raise InvalidCardDataError("a date field is not YYYYMMDD") from exc
    if id_birth_date(id_number) != birth_date:
        raise InvalidCardDataError("birth date differs from the one in the identity number")
    if sex in (Sex.MALE, Sex.FEMALE) and id_sex_digit_is_male(id_number) != (sex is Sex.MALE):
        raise InvalidCardDataError("sex differs from the one in the identity number")
    if valid_until is not None and valid_until <= valid_from:
        raise InvalidCardDataError("card expires before it becomes valid")
    return IdCardData(
        name=fields["name"],
        sex=sex,
        ethnicity_code=fields["ethnicity"],
        birth_date=birth_date,
        address=fields["address"],
        id_number=id_number,
        issuing_authority=fields["issuing_authority"],
        valid_from=valid_from,
        valid_until=valid_until,
        photo_wlt=photo,
        fingerprint=fingerprint,
    )


def parse_read_data(data: bytes, *, with_fingerprint: bool = False) -> IdCardData:
    """Split a read response's data (length words, text, photo[, fingerprint]) and parse the text."""
    words = 3 if with_fingerprint else 2
    if len(data) < 2 * words:
        raise InvalidCardDataError("read response shorter than its length words")
    lengths = [int.from_bytes(data[2 * i : 2 * i + 2], "big") for i in range(words)]
    if len(data) != 2 * words + sum(lengths):
        raise InvalidCardDataError("read response length words do not add up to its size")
    text_len, photo_len = lengths[0], lengths[1]
    start = 2 * words
    text = data[start : start + text_len]
    photo = data[start + text_len : start + text_len + photo_len]
    fingerprint = data[start + text_len + photo_len :] if with_fingerprint else None
    return parse_id_text(text, photo, fingerprint)


# ---------------------------------------------------------------- the reader


class IdCardReader:
    """A SAM-module ID-card reader on a `ByteLink`; implements `Peripheral`. One thread uses it at a time."""

    def __init__(
        self,
        link: ByteLink,
        *,
        name: str = "idcard0",
        command_timeout_s: float = 1.0,
        poll_interval_s: float = 0.1,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._link = link
        self._name = name
        self._command_timeout_s = command_timeout_s
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._sleep = sleep
        self._health = ReaderHealth(name, PeripheralKind.ID_CARD_READER)

    @classmethod
    def on_port(cls, port: str, *, name: str = "idcard0", baudrate: int = BAUDRATE) -> IdCardReader:
        """The reader on a serial port path (opened lazily, at 115200 8N1 unless told otherwise)."""
        return cls(SerialLink(port, baudrate=baudrate), name=name)

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> PeripheralKind:
        return PeripheralKind.ID_CARD_READER

    def status(self) -> PeripheralStatus:
        return self._health.status()

    def close(self) -> None:
        self._link.close()

    def read_card(self, timeout_s: float = 5.0, *, with_fingerprint: bool = False) -> IdCardData:
        """Wait up to `timeout_s` for a card, then select and read it.

        Raises NoCardError (none presented in time), CardRemovedError (pulled between find and the end of the
        read), InvalidCardDataError, ReaderChecksumError, ReaderProtocolError, ReaderFaultError,
        ReaderTimeoutError, ReaderUnavailableError.
        """
        try:
            card = self._read_card(timeout_s, with_fingerprint)
        except CardReaderError as exc:
            self._health.failed(exc)
            raise
        self._health.ok()
        logger.info("ID card read: %s", card)
        return card

    def _read_card(self, timeout_s: float, with_fingerprint: bool) -> IdCardData:
        deadline = self._clock() + timeout_s
        while True:
            found = self._transact(SamCommand.FIND_CARD)
            if found.sw3 == SamStatus.FIND_SUCCESS:
                break
            if found.sw3 != SamStatus.FIND_FAILED:
                raise _status_error(found)
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise NoCardError("no ID card presented")
            self._sleep(min(self._poll_interval_s, remaining))
        selected = self._transact(SamCommand.SELECT_CARD)
        if selected.sw3 in (SamStatus.SELECT_FAILED, SamStatus.FIND_FAILED):
            raise CardRemovedError("card left the reader before it could be selected")
        if selected.sw3 != SamStatus.SUCCESS:
            raise _status_error(selected)
        command = SamCommand.READ_TEXT_PHOTO_FINGERPRINT if with_fingerprint else SamCommand.READ_TEXT_PHOTO
        try:
            read = self._transact(command)
        except ReaderProtocolError as exc:
            if isinstance(exc.__cause__, TruncatedFrameError):
                # The module stops mid-frame when the card leaves the field during the transfer.
                raise CardRemovedError("card left the reader during the read") from exc
            raise
        if read.sw3 in (SamStatus.READ_FAILED, SamStatus.FIND_FAILED, SamStatus.SELECT_FAILED):
            raise CardRemovedError("card read failed (card moved or removed)")
        if read.sw3 != SamStatus.SUCCESS:
            raise _status_error(read)
        return parse_read_data(read.data, with_fingerprint=with_fingerprint)

    def sam_status(self) -> None:
        """Ask the SAM module whether it is healthy; ReaderFaultError if it reports anything but success."""
        response = self._checked(SamCommand.SAM_STATUS)
        if response.sw3 != SamStatus.SUCCESS:
            raise self._failed(_status_error(response))

    def sam_id(self) -> str:
        """The SAM module's 16-byte identifier, rendered by `format_sam_id`."""
        response = self._checked(SamCommand.READ_SAM_ID)
        if response.sw3 != SamStatus.SUCCESS:
            raise self._failed(_status_error(response))
        return format_sam_id(response.data)

    def reset(self) -> None:
        """Reset the SAM module (its reply is a plain success)."""
        response = self._checked(SamCommand.RESET)
        if response.sw3 != SamStatus.SUCCESS:
            raise self._failed(_status_error(response))

    def _failed(self, error: CardReaderError) -> CardReaderError:
        self._health.failed(error)
        return error

    def _checked(self, command: SamCommand) -> SamResponse:
        try:
            response = self._transact(command)
        except CardReaderError as exc:
            self._health.failed(exc)
            raise
        self._health.ok()
        return response

    def _transact(self, command: SamCommand) -> SamResponse:
        """One request/response exchange, link errors translated; a module-reported checksum error raised."""
        try:
            # A late reply to an earlier, timed-out command must not be taken for this one's.
            self._link.discard_input()
            self._link.write(encode_request(command))
            body = read_frame(self._link, self._clock() + self._command_timeout_s, self._clock)
            response = decode_response(body)
        except PortUnavailableError as exc:
            raise ReaderUnavailableError(str(exc)) from exc
        except LinkTimeoutError as exc:
            raise ReaderTimeoutError(f"no answer to {command.name} in {self._command_timeout_s:.1f} s") from exc
        except BadChecksumError as exc:
            raise ReaderChecksumError(f"reply to {command.name}: {exc}") from exc
        except FrameError as exc:
            raise ReaderProtocolError(f"reply to {command.name}: {exc}") from exc
        if response.sw3 == SamStatus.CHECKSUM_ERROR:
            raise ReaderChecksumError(f"module reports a checksum error in our {command.name}")
        return response


def _status_error(response: SamResponse) -> ReaderFaultError:
    return ReaderFaultError(f"SAM module status {response.status_name}", response.sw3)


def format_sam_id(data: bytes) -> str:
    """The 16-byte SAM id as little-endian words 2-2-4-4-4, dotted/dashed; a display form, not a normative one."""
    if len(data) != 16:
        return data.hex().upper()
    a, b = int.from_bytes(data[0:2], "little"), int.from_bytes(data[2:4], "little")
    c, d, e = (int.from_bytes(data[i : i + 4], "little") for i in (4, 8, 12))
    return f"{a:02d}.{b:02d}-{c:08d}-{d:010d}-{e:010d}"
