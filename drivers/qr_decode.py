"""QR (and other barcode) decoding from camera frames and photographs: zxing-cpp first, pyzbar as the fallback.

Owns `decode_qr`, the one function the kiosk's camera path, `yibao verify qr` and `yibao bench vision` call, and the
preprocessing ladder that helps real photographs. DESIGN.md §4: zxing-cpp decoded more degraded codes at a tenth of
pyzbar's time, so it runs first on every variant; pyzbar (needs Debian `libzbar0`) only runs when zxing-cpp found
nothing at all.

The ladder, tried in this order and only while nothing has been found (cheap passes first, then the one that
rescues the most codes):

    plain       grayscale (a photo whose long side exceeds MAX_SIDE_PX is downscaled first: big phone photos)
    clahe       local contrast (CLAHE): low-contrast prints, glare, a dim phone screen
    smoothed    Gaussian blur: kills the moire of a phone screen photographed by the camera
    upscaled    x2 cubic when the image is not large (small modules: zxing needs ~2.5-3 px per module)
    stretched   global 1st..99th percentile contrast stretch
    adaptive    adaptive-mean threshold: uneven lighting
    full_res    the original resolution when the plain pass was downscaled (a small code in a huge photo)

Inverted codes (white on black: phone screens in dark mode) are handled by zxing-cpp itself (`try_invert`) and by an
explicit inverted pass for pyzbar; rotation is handled by both decoders.

It must never log a decoded payload (a 医保码 is a credential while it is valid), never keep a frame beyond the call,
and never raise for "no code found" (that is an empty list). Typed errors only for unusable input.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Literal

import cv2
import numpy as np
import numpy.typing as npt
import zxingcpp

try:
    from pyzbar import pyzbar
except ImportError as exc:  # pragma: no cover - the installed environment always has libzbar0 (scripts/setup.sh)
    raise ImportError(
        "pyzbar cannot load libzbar (install the Debian package libzbar0); it is the QR fallback decoder"
    ) from exc

logger = logging.getLogger(__name__)

MAX_SIDE_PX: Final = 1600
"""Photos larger than this (long side) are downscaled for the first passes: decoding cost grows with pixels and a
phone photo's code is large enough to survive it. The full resolution is still tried last."""

UPSCALE_MAX_SIDE_PX: Final = 1024
"""Images whose long side is at most this get an x2 upscaled pass (small modules; a 640x480 frame qualifies)."""

Decoder = Literal["zxing-cpp", "pyzbar"]

U8Image = npt.NDArray[np.uint8]

_QR_FORMATS: Final = zxingcpp.barcode_formats_from_str("QRCode")
# `verify qr` reports any code a pharmacy might hold up: every 2D symbology plus the common 1D ones.
_ANY_FORMATS: Final = zxingcpp.barcode_formats_from_str(
    "QRCode, MicroQRCode, RMQRCode, DataMatrix, PDF417, Aztec, EAN13, EAN8, UPCA, UPCE, Code128, Code39, Code93, "
    "ITF, Codabar"
)

# pyzbar's symbol names mapped to zxing-cpp's format names, so callers see one vocabulary.
_PYZBAR_FORMATS: Final = {
    "QRCODE": "QRCode",
    "EAN13": "EAN13",
    "EAN8": "EAN8",
    "UPCA": "UPCA",
    "UPCE": "UPCE",
    "CODE128": "Code128",
    "CODE39": "Code39",
    "CODE93": "Code93",
    "I25": "ITF",
    "CODABAR": "Codabar",
    "PDF417": "PDF417",
    "ISBN10": "ISBN",
    "ISBN13": "ISBN",
}


class QrDecodeError(Exception):
    """Base of the errors `decode_qr` raises on purpose."""


class InvalidImageError(QrDecodeError, ValueError):
    """The input is not an image this module can decode: empty, wrong dtype, wrong shape."""


Corner = tuple[int, int]


@dataclass(frozen=True, slots=True)
class DecodedCode:
    """One code found in an image.

    `format` uses zxing-cpp's names ("QRCode", "EAN13", ...) whichever decoder found it. `corners` are the code's
    four corners in the INPUT image's pixel coordinates (top-left, top-right, bottom-right, bottom-left as the
    decoder reports them). When the payload is not valid text, `text` carries U+FFFD replacement characters,
    `lossy_text` is True and `raw` holds the exact bytes.
    """

    text: str
    format: str
    corners: tuple[Corner, Corner, Corner, Corner]
    decoder: Decoder
    variant: str
    raw: bytes
    lossy_text: bool = False


def decode_qr(
    image: npt.NDArray[np.generic],
    *,
    preprocess: bool = True,
    qr_only: bool = False,
    fallback: bool = True,
) -> list[DecodedCode]:
    """Decode every code in an RGB `(H, W, 3)` or grayscale `(H, W)` uint8 image.

    `preprocess=False` runs the plain pass only (what a clean scanner image needs); `qr_only` restricts both
    decoders to QR Code (the e-voucher path); `fallback=False` skips pyzbar (benchmarks). Returns an empty list when
    nothing decodes. Raises `InvalidImageError` for an empty array, a non-uint8 dtype or an unsupported shape.
    """
    gray = to_gray(image)
    formats = _QR_FORMATS if qr_only else _ANY_FORMATS
    for variant, candidate, scale in preprocess_variants(gray, full=preprocess):
        found = _zxing(candidate, formats, variant, scale)
        if found:
            return found
    if not fallback:
        return []
    # pyzbar is an order of magnitude slower: the plain image, then inverted (it has no try_invert of its own).
    plain, scale = plain_pass(gray)
    found = _pyzbar(plain, qr_only, "plain" if scale == 1.0 else "downscaled", scale)
    if found or not preprocess:
        return found
    return _pyzbar(np.asarray(cv2.bitwise_not(plain), dtype=np.uint8), qr_only, "inverted", scale)


def decode_pyzbar(image: npt.NDArray[np.generic], *, qr_only: bool = False) -> list[DecodedCode]:
    """pyzbar alone on the plain pass (no preprocessing): the baseline the benchmark compares zxing-cpp with."""
    plain, scale = plain_pass(to_gray(image))
    return _pyzbar(plain, qr_only, "plain" if scale == 1.0 else "downscaled", scale)


def to_gray(image: npt.NDArray[np.generic]) -> U8Image:
    """The grayscale view the decoders work on; `InvalidImageError` for anything that is not a uint8 image."""
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidImageError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.size == 0:
        raise InvalidImageError(f"empty image of shape {image.shape}")
    if image.ndim == 2:
        return np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.ascontiguousarray(image[:, :, 0], dtype=np.uint8)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        code = cv2.COLOR_RGB2GRAY if image.shape[2] == 3 else cv2.COLOR_RGBA2GRAY
        return np.asarray(cv2.cvtColor(np.ascontiguousarray(image), code), dtype=np.uint8)
    raise InvalidImageError(f"expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {image.shape}")


LADDER: Final = ("clahe", "smoothed", "upscaled", "stretched", "adaptive", "full_res")
"""The preprocessing passes after the plain one, in the order `decode_qr` tries them (measured on the degraded set
of `hardware_sim.qr_images`: upscaling rescues the most codes, CLAHE and smoothing are the cheapest)."""


def preprocess_variants(gray: U8Image, *, full: bool = True) -> Iterator[tuple[str, U8Image, float]]:
    """The preprocessing ladder, plain pass first: `(variant name, image, scale from input to this image)`.

    With `full=False` only the plain pass is produced. Lazily computed, so a caller that stops at the first hit
    pays only for the passes it used. Passes that do not apply to this image (no upscaling of a large one, no
    full-resolution pass when nothing was downscaled) are skipped.
    """
    plain, scale = plain_pass(gray)
    yield ("plain" if scale == 1.0 else "downscaled"), plain, scale
    if not full:
        return
    for name in LADDER:
        variant = apply_variant(name, gray, plain, scale)
        if variant is not None:
            yield name, variant[0], variant[1]


def plain_pass(gray: U8Image) -> tuple[U8Image, float]:
    """The first pass: the grayscale image, downscaled when its long side exceeds MAX_SIDE_PX."""
    long_side = max(gray.shape)
    if long_side > MAX_SIDE_PX:
        scale = MAX_SIDE_PX / long_side
        return _resize(gray, scale, cv2.INTER_AREA), scale
    return gray, 1.0


def apply_variant(name: str, gray: U8Image, plain: U8Image, scale: float) -> tuple[U8Image, float] | None:
    """One ladder pass on `plain` (the plain pass of `gray`, at `scale`); None when it does not apply here."""
    if name == "clahe":
        clahe = cv2.createCLAHE(clipLimit=3.0, tileGridSize=(8, 8))
        return np.asarray(clahe.apply(plain), dtype=np.uint8), scale
    if name == "smoothed":
        return np.asarray(cv2.GaussianBlur(plain, (5, 5), 0), dtype=np.uint8), scale
    if name == "upscaled":
        # Small modules (< ~2.5 px) are below what the binarizer resolves; x2 cubic gives them room.
        if max(plain.shape) > UPSCALE_MAX_SIDE_PX:
            return None
        return _resize(plain, 2.0, cv2.INTER_CUBIC), scale * 2.0
    if name == "stretched":
        return _stretch(plain), scale
    if name == "adaptive":
        adaptive = cv2.adaptiveThreshold(plain, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 31, 5)
        return np.asarray(adaptive, dtype=np.uint8), scale
    if name == "full_res":
        return (gray, 1.0) if scale != 1.0 else None
    raise ValueError(f"unknown preprocessing variant {name!r}")


class FrameQrScanner:
    """Decoding for a live camera stream, where most frames hold no code and the frame budget is small.

    Each frame gets the plain zxing-cpp pass plus ONE ladder pass, rotating through `LADDER` from frame to frame,
    so a code held in front of the camera meets every preprocessing within a few frames while a frame costs about
    two passes (not the whole ladder, and never pyzbar: stills go through `decode_qr`). Not thread-safe: one
    scanner per camera loop.
    """

    def __init__(self, *, qr_only: bool = True) -> None:
        self._formats = _QR_FORMATS if qr_only else _ANY_FORMATS
        self._next = 0

    def scan(self, frame: npt.NDArray[np.generic]) -> list[DecodedCode]:
        gray = to_gray(frame)
        plain, scale = plain_pass(gray)
        found = _zxing(plain, self._formats, "plain" if scale == 1.0 else "downscaled", scale)
        if found:
            return found
        for _ in range(len(LADDER)):
            name = LADDER[self._next]
            self._next = (self._next + 1) % len(LADDER)
            variant = apply_variant(name, gray, plain, scale)
            if variant is not None:
                return _zxing(variant[0], self._formats, name, variant[1])
        return []


def _resize(gray: U8Image, factor: float, interpolation: int) -> U8Image:
    height, width = gray.shape
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(cv2.resize(gray, size, interpolation=interpolation), dtype=np.uint8)


def _stretch(gray: U8Image) -> U8Image:
    low, high = np.percentile(gray, (1.0, 99.0))
    if high - low < 1.0:
        return gray
    stretched: npt.NDArray[np.float32] = (gray.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    clipped: U8Image = np.clip(stretched, 0, 255).astype(np.uint8)
    return clipped


def _text_of(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _corners(points: list[tuple[float, float]], scale: float) -> tuple[Corner, Corner, Corner, Corner]:
    mapped = [(round(x / scale), round(y / scale)) for x, y in points]
    return mapped[0], mapped[1], mapped[2], mapped[3]


def _zxing(gray: U8Image, formats: zxingcpp.BarcodeFormats, variant: str, scale: float) -> list[DecodedCode]:
    found: list[DecodedCode] = []
    for barcode in zxingcpp.read_barcodes(gray, formats=formats):
        if barcode.content_type == zxingcpp.ContentType.Binary:
            # zxing-cpp shows unknown bytes as Latin-1 with escapes; report them the same way pyzbar's are.
            text, lossy = _text_of(bytes(barcode.bytes))
        else:
            text, lossy = barcode.text, False
        pos = barcode.position
        points = [(float(p.x), float(p.y)) for p in (pos.top_left, pos.top_right, pos.bottom_right, pos.bottom_left)]
        found.append(
            DecodedCode(
                text=text,
                format=barcode.format.name,
                corners=_corners(points, scale),
                decoder="zxing-cpp",
                variant=variant,
                raw=bytes(barcode.bytes),
                lossy_text=lossy,
            )
        )
    return found


def _pyzbar(gray: U8Image, qr_only: bool, variant: str, scale: float) -> list[DecodedCode]:
    symbols = [pyzbar.ZBarSymbol.QRCODE] if qr_only else None
    found: list[DecodedCode] = []
    for symbol in pyzbar.decode(gray, symbols=symbols):
        raw = bytes(symbol.data)
        text, lossy = _text_of(raw)
        polygon = [(float(p.x), float(p.y)) for p in symbol.polygon]
        if len(polygon) != 4:
            # zbar reports a hull for 1D codes; fall back to the bounding rectangle.
            left, top, width, height = symbol.rect
            polygon = [
                (float(left), float(top)),
                (float(left + width), float(top)),
                (float(left + width), float(top + height)),
                (float(left), float(top + height)),
            ]
        found.append(
            DecodedCode(
                text=text,
                format=_PYZBAR_FORMATS.get(str(symbol.type), str(symbol.type)),
                corners=_corners(polygon, scale),
                decoder="pyzbar",
                variant=variant,
                raw=raw,
                lossy_text=lossy,
            )
        )
    return found
