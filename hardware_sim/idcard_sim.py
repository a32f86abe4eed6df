"""Simulated 2nd-generation ID-card reader (SAM module) that speaks the real frames, for `pty_device.PtyDevice`.

Owns the synthetic card model (valid identity numbers with correct ISO 7064 check digits, synthetic names and
addresses, an opaque 1024-byte 'photo'), an encoder for the 256-byte UCS-2 text written independently of the
driver's parser, and `IdCardSimulator`, which answers reset / SAM status / SAM id / find / select / read like a
module would and injects faults at run time: card pulled mid-read, 'no card' on select, bad checksum, no answer,
garbage, line noise before a good reply, unplugged. Every person it produces is synthetic; it must never be given
or log real personal data, and production code never imports it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import random
import threading
from collections import deque

from drivers.card_reader import Sex, id_check_char
from drivers.idcard import PREAMBLE, IdCardData, SamCommand, SamStatus, encode_response
from drivers.serial_link import xor_checksum
from hardware_sim.pty_device import DeviceLine

logger = logging.getLogger(__name__)

# (region code, address prefix, issuing authority): real administrative divisions, synthetic people.
_REGIONS = (
    ("110101", "北京市东城区", "北京市公安局东城分局"),
    ("310104", "上海市徐汇区", "上海市公安局徐汇分局"),
    ("440305", "广东省深圳市南山区", "深圳市公安局南山分局"),
    ("330106", "浙江省杭州市西湖区", "杭州市公安局西湖分局"),
    ("510107", "四川省成都市武侯区", "成都市公安局武侯区分局"),
    ("420111", "湖北省武汉市洪山区", "武汉市公安局洪山区分局"),
)
_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华建国文"
_STREETS = ("人民路", "建设路", "中山路", "解放路", "和平街", "长江路", "新华街")

TEXT_FIELD_CHARS = (
    ("name", 15),
    ("sex", 1),
    ("ethnicity", 2),
    ("birth_date", 8),
    ("address", 35),
    ("id_number", 18),
    ("issuing_authority", 15),
    ("valid_from", 8),
    ("valid_until", 8),
    ("reserved", 18),
)
"""The GA 467 text layout in characters (UCS-2: two bytes each), written out here independently of the driver."""


def synthetic_id_number(rng: random.Random, birth_date: dt.date, sex: Sex, region: str = "110101") -> str:
    """A well-formed identity number: region, birth date, sequence, sex digit (odd male), MOD 11-2 check char."""
    sequence = rng.randrange(0, 100)
    sex_digit = rng.choice((1, 3, 5, 7, 9) if sex is Sex.MALE else (0, 2, 4, 6, 8))
    first17 = f"{region}{birth_date:%Y%m%d}{sequence:02d}{sex_digit}"
    return first17 + id_check_char(first17)


def _add_years(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


def synthetic_card(seed: int = 0, *, today: dt.date = dt.date(2026, 6, 1)) -> IdCardData:
    """A synthetic, internally consistent card (validity period by age at issue as GA 467 cards have)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible synthetic test data, not secrets
    region, address_prefix, authority = rng.choice(_REGIONS)
    sex = rng.choice((Sex.MALE, Sex.FEMALE))
    birth = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(0, 365 * 55))
    issued = max(_add_years(birth, 16), today - dt.timedelta(days=rng.randrange(0, 365 * 9)))
    age_at_issue = (issued - birth).days // 365
    valid_until = None if age_at_issue >= 46 else _add_years(issued, 10 if age_at_issue < 26 else 20)
    name = rng.choice(_SURNAMES) + "".join(rng.choice(_GIVEN) for _ in range(rng.choice((1, 2))))
    address = f"{address_prefix}{rng.choice(_STREETS)}{rng.randrange(1, 300)}号{rng.randrange(1, 30)}栋"
    return IdCardData(
        name=name,
        sex=sex,
        ethnicity_code=rng.choice(("01", "01", "01", "03", "08", "11")),
        birth_date=birth,
        address=address,
        id_number=synthetic_id_number(rng, birth, sex, region),
        issuing_authority=authority,
        valid_from=issued,
        valid_until=valid_until,
        photo_wlt=synthetic_photo(seed),
    )


def synthetic_photo(seed: int = 0) -> bytes:
    """1024 opaque bytes standing in for the WLT-compressed photo (nobody can decode the real one without a licence)."""
    return random.Random(f"photo-{seed}").randbytes(1024)  # noqa: S311 - opaque filler bytes


def encode_id_text(card: IdCardData) -> bytes:
    """The 256-byte UCS-2 little-endian text a card holds, space-padded field by field."""
    values = {
        "name": card.name,
        "sex": card.sex.value,
        "ethnicity": card.ethnicity_code,
        "birth_date": f"{card.birth_date:%Y%m%d}",
        "address": card.address,
        "id_number": card.id_number,
        "issuing_authority": card.issuing_authority,
        "valid_from": f"{card.valid_from:%Y%m%d}",
        "valid_until": "长期" if card.valid_until is None else f"{card.valid_until:%Y%m%d}",
        "reserved": "",
    }
    out = bytearray()
    for field, chars in TEXT_FIELD_CHARS:
        value = values[field]
        if len(value) > chars:
            raise ValueError(f"{field} longer than {chars} characters")
        out += value.ljust(chars, " ").encode("utf-16-le")
    return bytes(out)


def read_response_data(card: IdCardData, *, with_fingerprint: bool = False) -> bytes:
    """Data of a successful read: text length, photo length[, fingerprint length], text, photo[, fingerprint]."""
    text, photo = encode_id_text(card), card.photo_wlt
    parts = [len(text).to_bytes(2, "big"), len(photo).to_bytes(2, "big")]
    fingerprint = (card.fingerprint or b"") if with_fingerprint else b""
    if with_fingerprint:
        parts.append(len(fingerprint).to_bytes(2, "big"))
    return b"".join(parts) + text + photo + fingerprint


class IdCardFault(enum.Enum):
    """Faults the simulated reader injects into one exchange."""

    PULLED_MID_READ = "pulled_mid_read"
    """Send part of the read response, then nothing; the card is gone afterwards."""
    NO_CARD_ON_SELECT = "no_card_on_select"
    """The card left between find and select: select answers 81 and the card is gone."""
    BAD_CHECKSUM = "bad_checksum"
    """The reply's checksum byte is wrong."""
    TIMEOUT = "timeout"
    """No reply at all."""
    GARBAGE = "garbage"
    """Random bytes (never a preamble) instead of the reply."""
    LINE_NOISE = "line_noise"
    """Random bytes, then the correct reply (a driver that resynchronises on the preamble still succeeds)."""
    UNPLUG = "unplug"
    """The pty closes when the command arrives."""


_DEFAULT_TARGET = {
    IdCardFault.NO_CARD_ON_SELECT: SamCommand.SELECT_CARD,
    IdCardFault.PULLED_MID_READ: SamCommand.READ_TEXT_PHOTO,
}


@dataclasses.dataclass
class _PendingFault:
    fault: IdCardFault
    on: SamCommand | None


class IdCardSimulator:
    """SAM module behaviour; thread-safe for `place`/`remove`/`inject` from a test while the pty thread serves."""

    def __init__(self, card: IdCardData | None = None, *, sam_id: bytes | None = None, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._card = card
        self._sam_id = sam_id if sam_id is not None else bytes(range(1, 17))
        self._faults: deque[_PendingFault] = deque()
        self._rng = random.Random(seed)  # noqa: S311 - reproducible fault bytes
        self._buffer = bytearray()
        self.commands: list[SamCommand | None] = []
        """Commands received, in order (None for a frame with an unknown command); for test assertions."""

    def place(self, card: IdCardData) -> None:
        with self._lock:
            self._card = card

    def remove(self) -> None:
        with self._lock:
            self._card = None

    def inject(self, fault: IdCardFault, *, on: SamCommand | None = None) -> None:
        """Apply `fault` once, to the next command (or the next `on` command).

        Faults that only make sense for one command default to it: NO_CARD_ON_SELECT to select, PULLED_MID_READ
        to the text+photo read.
        """
        if on is None:
            on = _DEFAULT_TARGET.get(fault)
        with self._lock:
            self._faults.append(_PendingFault(fault, on))

    def _take_fault(self, command: SamCommand | None) -> IdCardFault | None:
        for pending in self._faults:
            if pending.on is None or pending.on is command:
                self._faults.remove(pending)
                return pending.fault
        return None

    # ------------------------------------------------------------ byte handling

    def attach(self, line: DeviceLine) -> None:
        """The module only ever answers commands; it needs no line of its own."""

    def on_byte(self, byte: int, line: DeviceLine) -> None:
        self._buffer.append(byte)
        # Resynchronise: keep only a suffix that could still become the preamble.
        while self._buffer and not PREAMBLE.startswith(bytes(self._buffer[:5])):
            del self._buffer[0]
        if len(self._buffer) < 7:
            return
        length = int.from_bytes(self._buffer[5:7], "big")
        if length < 3 or length > 4096:
            self._buffer.clear()
            return
        if len(self._buffer) < 7 + length:
            return
        frame = bytes(self._buffer[: 7 + length])
        del self._buffer[: 7 + length]
        self._on_frame(frame, line)

    def _on_frame(self, frame: bytes, line: DeviceLine) -> None:
        body, chk = frame[7:-1], frame[-1]
        if xor_checksum(frame[5:7] + body) != chk:
            line.send(encode_response(SamStatus.CHECKSUM_ERROR))
            return
        try:
            command: SamCommand | None = SamCommand((body[0], body[1]))
        except ValueError:
            command = None
        with self._lock:
            self.commands.append(command)
            fault = self._take_fault(command)
        if command is None:
            line.send(encode_response(SamStatus.COMMAND_ERROR))
            return
        if fault is IdCardFault.UNPLUG:
            line.unplug()
            return
        if fault is IdCardFault.TIMEOUT:
            return
        if fault is IdCardFault.GARBAGE:
            line.send(bytes(self._rng.randrange(0, 0xA0) for _ in range(self._rng.randrange(3, 40))))
            return
        if fault is IdCardFault.NO_CARD_ON_SELECT and command is SamCommand.SELECT_CARD:
            self.remove()
            line.send(encode_response(SamStatus.SELECT_FAILED))
            return
        reply = self._reply(command)
        if fault is IdCardFault.PULLED_MID_READ:
            self.remove()
            reply = reply[: max(8, len(reply) // 3)]
        elif fault is IdCardFault.BAD_CHECKSUM:
            reply = reply[:-1] + bytes([reply[-1] ^ 0x5A])
        elif fault is IdCardFault.LINE_NOISE:
            reply = bytes(self._rng.randrange(0, 0xA0) for _ in range(self._rng.randrange(1, 20))) + reply
        line.send(reply)

    def _reply(self, command: SamCommand) -> bytes:
        with self._lock:
            card = self._card
        if command in (SamCommand.RESET, SamCommand.SAM_STATUS):
            return encode_response(SamStatus.SUCCESS)
        if command is SamCommand.READ_SAM_ID:
            return encode_response(SamStatus.SUCCESS, self._sam_id)
        if command is SamCommand.FIND_CARD:
            if card is None:
                return encode_response(SamStatus.FIND_FAILED)
            return encode_response(SamStatus.FIND_SUCCESS, bytes(4))
        if command is SamCommand.SELECT_CARD:
            if card is None:
                return encode_response(SamStatus.SELECT_FAILED)
            return encode_response(SamStatus.SUCCESS, bytes(8))
        if card is None:
            return encode_response(SamStatus.READ_FAILED)
        with_fingerprint = command is SamCommand.READ_TEXT_PHOTO_FINGERPRINT
        return encode_response(SamStatus.SUCCESS, read_response_data(card, with_fingerprint=with_fingerprint))
