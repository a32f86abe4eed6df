# The part of pyzbar 0.1.9 that drivers/qr_decode.py uses (pyzbar ships no type information).
import enum
from typing import Any, NamedTuple

class ZBarSymbol(enum.IntEnum):
    NONE = 0
    PARTIAL = 1
    EAN2 = 2
    EAN5 = 5
    EAN8 = 8
    UPCE = 9
    ISBN10 = 10
    UPCA = 12
    EAN13 = 13
    ISBN13 = 14
    COMPOSITE = 15
    I25 = 25
    DATABAR = 34
    DATABAR_EXP = 35
    CODABAR = 38
    CODE39 = 39
    PDF417 = 57
    QRCODE = 64
    SQCODE = 80
    CODE93 = 93
    CODE128 = 128

class Point(NamedTuple):
    x: int
    y: int

class Rect(NamedTuple):
    left: int
    top: int
    width: int
    height: int

class Decoded(NamedTuple):
    data: bytes
    type: str
    rect: Rect
    polygon: list[Point]
    quality: int
    orientation: str | None

def decode(image: Any, symbols: list[ZBarSymbol] | None = None) -> list[Decoded]: ...
