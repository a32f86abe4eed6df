"""What the ID-card and social-security-card readers share: their error tree, resident-ID rules, health tracking.

Owns the card-reader exception tree (link errors are translated into it by the reader drivers), the resident
identity number rules (GB 11643: ISO 7064 MOD 11-2 check character, embedded birth date and sex), the GB/T 2261.1
sex and GB 3304 ethnicity code tables, the masking used by every `repr` of personal data, and `ReaderHealth`, which
turns read outcomes into a `PeripheralStatus` and logs once on failure and once on recovery. It must never log or
return an unmasked name or ID number from anything but the parsed card objects' fields.

    CardReaderError
    ├── ReaderUnavailableError    port cannot be opened / reader unplugged
    ├── ReaderTimeoutError        the reader did not answer in time
    ├── ReaderProtocolError       the reader's bytes are not a valid frame (garbage, truncated outside a card read)
    │   └── ReaderChecksumError   a frame whose checksum is wrong (either direction: the module may report ours)
    ├── ReaderFaultError          the reader answered with an error status (SAM fault, unknown command, ...)
    ├── NoCardError               no card found before the caller's timeout
    ├── CardRemovedError          the card left the field during the transaction
    ├── CardRefusedError          the card answered a command (APDU) with an error status word (6A82, 6982, ...)
    └── InvalidCardDataError      the card answered but its content is not a valid record (bad check digit, ...)
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import threading

from protocol import PeripheralKind, PeripheralState, PeripheralStatus

logger = logging.getLogger(__name__)


class CardReaderError(Exception):
    """Root of the card readers' errors."""


class ReaderUnavailableError(CardReaderError):
    """The reader's port cannot be opened or vanished (unplugged)."""


class ReaderTimeoutError(CardReaderError):
    """The reader did not answer a command in time."""


class ReaderProtocolError(CardReaderError):
    """The reader's answer is not a valid frame."""


class ReaderChecksumError(ReaderProtocolError):
    """A frame with a wrong checksum (ours as reported by the module, or the module's as seen by us)."""


class ReaderFaultError(CardReaderError):
    """The reader answered with an error status; `status` is the raw status code."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class NoCardError(CardReaderError):
    """No card was presented before the timeout."""


class CardRemovedError(CardReaderError):
    """The card was pulled (or left the RF field) mid-transaction."""


class CardRefusedError(CardReaderError):
    """The card refused an APDU; `sw` is its status word (e.g. 0x6A82 file not found)."""

    def __init__(self, message: str, sw: int) -> None:
        super().__init__(message)
        self.sw = sw


class InvalidCardDataError(CardReaderError):
    """The card's data does not form a valid record."""


# ---------------------------------------------------------------- resident identity number (GB 11643-1999)

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK_CHARS = "10X98765432"


def id_check_char(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of the first 17 digits of a resident identity number."""
    if len(first17) != 17 or not first17.isascii() or not first17.isdigit():
        raise ValueError("need exactly 17 ASCII digits")
    total = sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK_CHARS[total % 11]


def id_number_problem(id_number: str) -> str | None:
    """Why `id_number` is not a valid 18-character resident identity number, or None if it is.

    The reason never contains the number itself (it ends up in logs and exception messages).
    """
    if len(id_number) != 18:
        return f"identity number has {len(id_number)} characters, not 18"
    body, check = id_number[:17], id_number[17]
    if not body.isascii() or not body.isdigit() or check not in "0123456789X":
        return "identity number has characters other than 17 digits and a check digit/X"
    if id_check_char(body) != check:
        return "identity number check digit (ISO 7064 MOD 11-2) does not match"
    try:
        id_birth_date(id_number)
    except ValueError:
        return "identity number embeds an impossible birth date"
    return None


def id_birth_date(id_number: str) -> dt.date:
    """Birth date embedded in characters 7-14 of an 18-character identity number; ValueError if impossible."""
    return parse_yyyymmdd(id_number[6:14])


def id_sex_digit_is_male(id_number: str) -> bool:
    """The 17th character is odd for men, even for women (GB 11643)."""
    return int(id_number[16]) % 2 == 1


def parse_yyyymmdd(text: str) -> dt.date:
    """A YYYYMMDD date; ValueError on anything else."""
    if len(text) != 8 or not text.isascii() or not text.isdigit():
        raise ValueError("not YYYYMMDD")
    return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))


# ---------------------------------------------------------------- code tables


class Sex(enum.Enum):
    """GB/T 2261.1 sex codes as stored on the cards."""

    UNKNOWN = "0"
    MALE = "1"
    FEMALE = "2"
    UNSPECIFIED = "9"

    @property
    def label(self) -> str:
        return {"0": "未知", "1": "男", "2": "女", "9": "未说明"}[self.value]


ETHNICITIES: dict[str, str] = {
    "01": "汉族",
    "02": "蒙古族",
    "03": "回族",
    "04": "藏族",
    "05": "维吾尔族",
    "06": "苗族",
    "07": "彝族",
    "08": "壮族",
    "09": "布依族",
    "10": "朝鲜族",
    "11": "满族",
    "12": "侗族",
    "13": "瑶族",
    "14": "白族",
    "15": "土家族",
    "16": "哈尼族",
    "17": "哈萨克族",
    "18": "傣族",
    "19": "黎族",
    "20": "傈僳族",
    "21": "佤族",
    "22": "畲族",
    "23": "高山族",
    "24": "拉祜族",
    "25": "水族",
    "26": "东乡族",
    "27": "纳西族",
    "28": "景颇族",
    "29": "柯尔克孜族",
    "30": "土族",
    "31": "达斡尔族",
    "32": "仫佬族",
    "33": "羌族",
    "34": "布朗族",
    "35": "撒拉族",
    "36": "毛南族",
    "37": "仡佬族",
    "38": "锡伯族",
    "39": "阿昌族",
    "40": "普米族",
    "41": "塔吉克族",
    "42": "怒族",
    "43": "乌孜别克族",
    "44": "俄罗斯族",
    "45": "鄂温克族",
    "46": "德昂族",
    "47": "保安族",
    "48": "裕固族",
    "49": "京族",
    "50": "塔塔尔族",
    "51": "独龙族",
    "52": "鄂伦春族",
    "53": "赫哲族",
    "54": "门巴族",
    "55": "珞巴族",
    "56": "基诺族",
    "97": "其他",
    "98": "外国血统中国籍人士",
}
"""GB 3304 two-digit ethnicity codes (01 汉族 … 56 基诺族, 97, 98) to their names."""


# ---------------------------------------------------------------- masking


def mask_name(name: str) -> str:
    """First character, the rest starred: enough for an operator to recognise a mix-up, not to identify anyone."""
    return name[:1] + "*" * max(len(name) - 1, 1) if name else ""


def mask_number(number: str, keep_head: int = 3, keep_tail: int = 2) -> str:
    """Head and tail of an ID-like number, the middle starred; short inputs are starred entirely."""
    if len(number) <= keep_head + keep_tail + 4:
        return "*" * len(number)
    return number[:keep_head] + "*" * (len(number) - keep_head - keep_tail) + number[len(number) - keep_tail :]


# ---------------------------------------------------------------- health


class ReaderHealth:
    """A reader's availability as its owner last saw it; logs once per transition, never per failed read.

    Card problems (no card, card pulled, unreadable card) say nothing about the reader and leave it OK; link and
    reader faults make it FAULT or ABSENT until the next successful exchange.
    """

    def __init__(self, name: str, kind: PeripheralKind) -> None:
        self._name = name
        self._kind = kind
        self._lock = threading.Lock()
        self._state = PeripheralState.OK
        self._detail: str | None = None

    def status(self) -> PeripheralStatus:
        with self._lock:
            state, detail = self._state, self._detail
        return PeripheralStatus(name=self._name, kind=self._kind, state=state, simulated=False, detail=detail)

    def ok(self) -> None:
        with self._lock:
            previous, self._state, self._detail = self._state, PeripheralState.OK, None
        if previous is not PeripheralState.OK:
            logger.info("%s recovered", self._name)

    def failed(self, error: CardReaderError) -> None:
        """Record a card reader's failed exchange (card problems leave the reader OK)."""
        if isinstance(error, NoCardError | CardRemovedError | CardRefusedError | InvalidCardDataError):
            self.ok()
            return
        state = PeripheralState.ABSENT if isinstance(error, ReaderUnavailableError) else PeripheralState.FAULT
        self.down(state, f"{type(error).__name__}: {error}")

    def down(self, state: PeripheralState, detail: str) -> None:
        """Record the device as FAULT or ABSENT (any device kind); logs only on the transition from OK."""
        detail = detail[:200]
        with self._lock:
            previous, self._state, self._detail = self._state, state, detail
        if previous is PeripheralState.OK:
            logger.warning("%s unavailable: %s", self._name, detail)
