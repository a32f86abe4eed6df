"""Synthetic camera frames that hold a QR code: the degraded test set for `drivers.qr_decode` and its benchmark.

Owns `render_qr` (a clean code image from zxing-cpp's writer), `degraded_set` (a seeded, reproducible set of 640x480
RGB frames: a code composited into a real photograph with perspective, blur, noise, low contrast, uneven light, JPEG
compression, a phone screen's moire and dark mode) and `measure_decoding` (decode rate and latency of each decoder
configuration on such a set), which `yibao bench vision` and the tests call.

It must never be imported by production code (import-linter), and never read photos from a default location:
callers pass the photo paths (tests use `tests/face_data.py`).
"""

from __future__ import annotations

import statistics
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt
import zxingcpp

from drivers.qr_decode import LADDER, DecodedCode, FrameQrScanner, decode_pyzbar, decode_qr

FRAME_SIZE: Final = (640, 480)
"""(width, height) of the kiosk camera frames the bar (<= 5 ms median per frame) is stated for."""

DEFAULT_SEED: Final = 20261201

_ALPHABET: Final = string.ascii_uppercase + string.digits

U8Image = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class QrSample:
    """One synthetic frame: the RGB image, the text encoded in it and the degradations applied (for reports)."""

    image: U8Image
    text: str
    degradations: tuple[str, ...]
    module_px: float


def render_qr(text: str, *, module_px: int = 4, ec_level: str = "M", quiet_zone: bool = True) -> U8Image:
    """A clean QR code image (grayscale, black on white) from zxing-cpp's writer."""
    barcode = zxingcpp.create_barcode(text, zxingcpp.BarcodeFormat.QRCode, ec_level=ec_level)
    image = barcode.to_image(scale=module_px, add_quiet_zones=quiet_zone)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def random_code_text(rng: np.random.Generator, length: int = 48) -> str:
    """Text shaped like a dynamic e-voucher code: a short prefix and upper-case alphanumerics."""
    body = "".join(_ALPHABET[i] for i in rng.integers(0, len(_ALPHABET), size=length))
    return "SIM1" + body


def load_backgrounds(photos: Sequence[Path], size: tuple[int, int] = FRAME_SIZE) -> list[U8Image]:
    """Real photos as RGB frames of `size` (centre crop to the aspect ratio, then resize)."""
    width, height = size
    frames: list[U8Image] = []
    for path in photos:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            continue
        ph, pw = bgr.shape[:2]
        target = width / height
        if pw / ph > target:
            crop_w = round(ph * target)
            x0 = (pw - crop_w) // 2
            bgr = bgr[:, x0 : x0 + crop_w]
        else:
            crop_h = round(pw / target)
            y0 = (ph - crop_h) // 2
            bgr = bgr[y0 : y0 + crop_h]
        resized = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
        frames.append(np.asarray(cv2.cvtColor(resized, cv2.COLOR_BGR2RGB), dtype=np.uint8))
    if not frames:
        raise ValueError("no readable background photos")
    return frames


def composite(
    background: U8Image,
    code: U8Image,
    rng: np.random.Generator,
    *,
    side_px: float,
    tilt: float,
    screen: bool = False,
) -> U8Image:
    """Warp `code` (grayscale) onto `background` (RGB) as a quadrilateral of about `side_px`, with corner jitter of
    `tilt` x side (perspective). A `screen` code is lit (additive, slightly blue) like a phone display."""
    height, width = background.shape[:2]
    ch, cw = code.shape
    margin = side_px * (0.6 + tilt)
    cx = rng.uniform(margin, max(margin + 1, width - margin))
    cy = rng.uniform(margin, max(margin + 1, height - margin))
    angle = rng.uniform(0, 2 * np.pi)
    half = side_px / 2
    square = np.array([[-half, -half], [half, -half], [half, half], [-half, half]], dtype=np.float64)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    quad = square @ rot.T + np.array([cx, cy]) + rng.uniform(-tilt, tilt, size=(4, 2)) * side_px
    src = np.array([[0, 0], [cw, 0], [cw, ch], [0, ch]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(src, quad.astype(np.float32))
    warped = cv2.warpPerspective(code, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
    mask = cv2.warpPerspective(np.full_like(code, 255), matrix, (width, height), flags=cv2.INTER_LINEAR)
    alpha = (mask.astype(np.float32) / 255.0)[:, :, None]
    if screen:
        tint = np.array([0.92, 0.97, 1.0], dtype=np.float32)
        layer = warped.astype(np.float32)[:, :, None] * tint
    else:
        layer = np.repeat(warped.astype(np.float32)[:, :, None], 3, axis=2)
    out = background.astype(np.float32) * (1 - alpha) + layer * alpha
    return np.asarray(np.clip(out, 0, 255), dtype=np.uint8)


def _moire(image: U8Image, rng: np.random.Generator, strength: float) -> U8Image:
    # A phone screen filmed by a camera: the pixel grid beats against the sensor's into slanted fringes.
    height, width = image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(3.0, 7.0)
    wave = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period))
    factor = 1.0 + strength * wave
    return np.asarray(np.clip(image.astype(np.float32) * factor[:, :, None], 0, 255), dtype=np.uint8)


def _jpeg(image: U8Image, quality: int) -> U8Image:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV always encodes a valid uint8 image
        raise RuntimeError("JPEG encoding failed")
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if decoded is None:  # pragma: no cover - the bytes were just encoded by OpenCV
        raise RuntimeError("JPEG decoding failed")
    return np.asarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def degrade(image: U8Image, rng: np.random.Generator) -> tuple[U8Image, tuple[str, ...]]:
    """Apply a random subset of camera degradations; returns the image and the names applied."""
    applied: list[str] = []
    out: npt.NDArray[np.float32] = image.astype(np.float32)
    if rng.random() < 0.4:
        # Low contrast: squeeze the range towards a grey (a faded print, an over-exposed frame).
        gain = rng.uniform(0.25, 0.5)
        out = out * gain + rng.uniform(40, 255 * (1 - gain) - 10)
        applied.append("low_contrast")
    if rng.random() < 0.35:
        # Uneven light: a soft gradient across the frame (a window beside the kiosk).
        width = out.shape[1]
        ramp = np.linspace(rng.uniform(0.35, 0.7), rng.uniform(1.0, 1.3), width, dtype=np.float32)
        if rng.random() < 0.5:
            ramp = ramp[::-1]
        out = out * ramp[None, :, None]
        applied.append("uneven_light")
    result = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            sigma = rng.uniform(0.8, 1.8)
            result = np.asarray(cv2.GaussianBlur(result, (0, 0), sigma), dtype=np.uint8)
            applied.append("blur")
        else:
            length = int(rng.integers(3, 8))
            kernel = np.zeros((length, length), dtype=np.float32)
            kernel[length // 2, :] = 1.0 / length
            rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), float(rng.uniform(0, 180)), 1.0)
            rotated = np.asarray(cv2.warpAffine(kernel, rot, (length, length)), dtype=np.float32)
            kernel = rotated / np.float32(max(float(rotated.sum()), 1e-6))
            result = np.asarray(cv2.filter2D(result, -1, kernel), dtype=np.uint8)
            applied.append("motion_blur")
    if rng.random() < 0.5:
        noise = rng.normal(0.0, rng.uniform(6, 22), size=result.shape).astype(np.float32)
        result = np.clip(result.astype(np.float32) + noise, 0, 255).astype(np.uint8)
        applied.append("noise")
    if rng.random() < 0.6:
        quality = int(rng.integers(15, 60))
        result = _jpeg(result, quality)
        applied.append("jpeg")
    return result, tuple(applied)


def degraded_set(
    photos: Sequence[Path],
    count: int = 300,
    *,
    seed: int = DEFAULT_SEED,
    size: tuple[int, int] = FRAME_SIZE,
) -> list[QrSample]:
    """`count` reproducible frames (same seed, same photos -> same pixels): one QR code each, composited into a
    real photo and degraded. About a third are phone screens (moire, some in dark mode, i.e. inverted)."""
    rng = np.random.default_rng(seed)
    backgrounds = load_backgrounds(photos, size)
    samples: list[QrSample] = []
    for _ in range(count):
        text = random_code_text(rng, int(rng.integers(24, 72)))
        code = render_qr(text, module_px=6)
        modules = code.shape[0] / 6  # symbol plus the writer's 4-module quiet zone on each side
        # Module size in the frame: 1.6 px (at the edge of what any decoder can do) to 5 px.
        module_px = float(rng.uniform(1.6, 5.0))
        side = module_px * modules
        degradations: list[str] = []
        screen = rng.random() < 0.33
        if screen:
            degradations.append("screen")
            if rng.random() < 0.4:
                code = np.asarray(cv2.bitwise_not(code), dtype=np.uint8)
                degradations.append("dark_mode")
        tilt = float(rng.uniform(0.0, 0.12))
        if tilt > 0.05:
            degradations.append("perspective")
        background = backgrounds[int(rng.integers(0, len(backgrounds)))]
        frame = composite(background, code, rng, side_px=side, tilt=tilt, screen=screen)
        if screen:
            frame = _moire(frame, rng, float(rng.uniform(0.08, 0.25)))
            degradations.append("moire")
        frame, applied = degrade(frame, rng)
        samples.append(QrSample(frame, text, (*degradations, *applied), module_px))
    return samples


# ---------------------------------------------------------------------------------------------------- measurement


@dataclass(frozen=True, slots=True)
class DecoderScore:
    """How one decoder configuration did on a sample set."""

    name: str
    decoded: int
    total: int
    wrong: int
    median_ms: float
    p95_ms: float
    misses_by_degradation: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.decoded / self.total if self.total else 0.0


CONFIGURATIONS: Final[dict[str, Callable[[npt.NDArray[np.generic]], list[DecodedCode]]]] = {
    "zxing-cpp": lambda img: decode_qr(img, preprocess=False, qr_only=True, fallback=False),
    "zxing-cpp+preprocessing": lambda img: decode_qr(img, preprocess=True, qr_only=True, fallback=False),
    "pyzbar": lambda img: decode_pyzbar(img, qr_only=True),
    "decode_qr (all)": lambda img: decode_qr(img, qr_only=True),
}
"""The decoder configurations the benchmark compares; the last one is what the kiosk runs."""


def measure_decoding(
    samples: Sequence[QrSample],
    configurations: Sequence[str] = tuple(CONFIGURATIONS),
) -> list[DecoderScore]:
    """Decode every sample with each configuration; count exact-text hits, wrong texts, and per-frame latency."""
    scores: list[DecoderScore] = []
    for name in configurations:
        decode = CONFIGURATIONS[name]
        decode(samples[0].image)  # warm-up: first-call allocations are not what a kiosk sees per frame
        times: list[float] = []
        decoded = wrong = 0
        misses: dict[str, int] = {}
        for sample in samples:
            start = time.perf_counter()
            codes = decode(sample.image)
            times.append((time.perf_counter() - start) * 1000.0)
            texts = {c.text for c in codes}
            if sample.text in texts:
                decoded += 1
            else:
                wrong += bool(texts)
                for label in sample.degradations or ("none",):
                    misses[label] = misses.get(label, 0) + 1
        times.sort()
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        scores.append(
            DecoderScore(
                name, decoded, len(samples), wrong, statistics.median(times), p95, dict(sorted(misses.items()))
            )
        )
    return scores


@dataclass(frozen=True, slots=True)
class StreamScore:
    """`FrameQrScanner` on a live stream: each sample shown for up to `frames_per_code` consecutive frames."""

    decoded: int
    total: int
    frames_per_code: int
    mean_frames_to_decode: float
    median_ms: float
    p95_ms: float
    no_code_median_ms: float


def measure_stream(
    samples: Sequence[QrSample], backgrounds: Sequence[U8Image], frames_per_code: int = len(LADDER) + 1
) -> StreamScore:
    """Per-frame cost and decode rate of the camera-loop scanner, plus its cost on frames that hold no code (most
    frames a kiosk camera sees)."""
    scanner = FrameQrScanner(qr_only=True)
    scanner.scan(samples[0].image)
    times: list[float] = []
    decoded = 0
    frames_used: list[int] = []
    for sample in samples:
        for frame_no in range(1, frames_per_code + 1):
            start = time.perf_counter()
            codes = scanner.scan(sample.image)
            times.append((time.perf_counter() - start) * 1000.0)
            if any(c.text == sample.text for c in codes):
                decoded += 1
                frames_used.append(frame_no)
                break
    empty: list[float] = []
    for background in backgrounds:
        for _ in range(len(LADDER)):
            start = time.perf_counter()
            scanner.scan(background)
            empty.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return StreamScore(
        decoded=decoded,
        total=len(samples),
        frames_per_code=frames_per_code,
        mean_frames_to_decode=statistics.fmean(frames_used) if frames_used else 0.0,
        median_ms=statistics.median(times),
        p95_ms=times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
        no_code_median_ms=statistics.median(empty),
    )


def measure_no_code(backgrounds: Sequence[U8Image], repeats: int = 5) -> dict[str, float]:
    """Median ms of each configuration on frames with no code at all (the worst case: every pass runs)."""
    result: dict[str, float] = {}
    for name, decode in CONFIGURATIONS.items():
        times: list[float] = []
        for _ in range(repeats):
            for background in backgrounds:
                start = time.perf_counter()
                decode(background)
                times.append((time.perf_counter() - start) * 1000.0)
        result[name] = statistics.median(times)
    return result


def decode_report(photos: Sequence[Path], count: int = 300, *, seed: int = DEFAULT_SEED) -> dict[str, object]:
    """Every QR figure in one JSON-able dict (what `yibao bench vision` can embed): decode rate and per-frame latency
    of each configuration on the seeded degraded set, the camera-loop scanner, and the cost of frames with no code."""
    samples = degraded_set(photos, count, seed=seed)
    backgrounds = load_backgrounds(photos)
    stream = measure_stream(samples, backgrounds)
    return {
        "qr_frames": count,
        "qr_seed": seed,
        "qr_frame_size": list(FRAME_SIZE),
        "qr_configurations": {
            score.name: {
                "decoded": score.decoded,
                "rate": round(score.rate, 4),
                "wrong": score.wrong,
                "median_ms": round(score.median_ms, 3),
                "p95_ms": round(score.p95_ms, 3),
            }
            for score in measure_decoding(samples)
        },
        "qr_frame_scanner": {
            "decoded": stream.decoded,
            "frames_per_code": stream.frames_per_code,
            "mean_frames_to_decode": round(stream.mean_frames_to_decode, 3),
            "median_ms": round(stream.median_ms, 3),
            "p95_ms": round(stream.p95_ms, 3),
            "no_code_median_ms": round(stream.no_code_median_ms, 3),
        },
        "qr_no_code_median_ms": {name: round(ms, 3) for name, ms in measure_no_code(backgrounds).items()},
    }
