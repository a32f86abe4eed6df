"""`yibao verify qr IMG`: the codes in any JPEG/PNG, as one JSON object or as text.

Owns reading an arbitrary image file into the RGB/gray array `drivers.qr_decode.decode_qr` takes (alpha flattened
onto white, 16-bit scaled to 8-bit) and the command's output contract:

    --json   stdout is exactly one line {"codes": [{"text": ..., "format": ...}, ...]} (empty list: exit 0)
    errors   one line on stderr, exit 2, nothing on stdout (missing file, not an image, unsupported pixel type)

It must never print anything else on stdout in --json mode, and never write the decoded text to a log (a 医保码 is
a credential while it is valid; the user asked for it on stdout, so that is the only place it goes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from drivers.qr_decode import DecodedCode, decode_qr

EXIT_OK = 0
EXIT_UNREADABLE = 2


class UnreadableImageError(Exception):
    """The file cannot be read or is not an image OpenCV can decode; the message names the file and the reason."""


@dataclass(frozen=True, slots=True)
class CommandResult:
    stdout: str
    stderr: str
    exit_code: int


def read_image(path: Path) -> npt.NDArray[np.uint8]:
    """Any image file OpenCV decodes (JPEG, PNG, BMP, WebP, TIFF...) as RGB `(H, W, 3)` or gray `(H, W)` uint8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not data:
        raise UnreadableImageError(f"{path} is empty")
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise UnreadableImageError(f"{path} is not a readable image: {exc}") from exc
    if image is None or image.size == 0:
        raise UnreadableImageError(f"{path} is not a readable image (expected JPEG, PNG or another common format)")
    return _to_rgb8(image, path)


def _to_rgb8(image: npt.NDArray[Any], path: Path) -> npt.NDArray[np.uint8]:
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        raise UnreadableImageError(f"{path}: unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return np.asarray(image, dtype=np.uint8)
    channels = image.shape[2]
    if channels == 1:
        return np.asarray(image[:, :, 0], dtype=np.uint8)
    if channels == 3:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), dtype=np.uint8)
    if channels == 4:
        # A code exported with a transparent background: flatten onto white, or black modules vanish into black.
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        rgb = cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_BGR2RGB).astype(np.float32)
        return np.asarray(np.clip(rgb * alpha + 255.0 * (1.0 - alpha), 0, 255), dtype=np.uint8)
    raise UnreadableImageError(f"{path}: unsupported image with {channels} channels")


def codes_json(codes: list[DecodedCode]) -> str:
    return json.dumps({"codes": [{"text": c.text, "format": c.format} for c in codes]}, ensure_ascii=False)


def verify_qr_command(path: Path, *, as_json: bool) -> CommandResult:
    """Run the command: decode every code (all 2D symbologies and the common 1D ones) in the image."""
    try:
        image = read_image(path)
    except UnreadableImageError as exc:
        return CommandResult("", f"error: {exc}", EXIT_UNREADABLE)
    codes = decode_qr(image)
    if as_json:
        return CommandResult(codes_json(codes), "", EXIT_OK)
    if not codes:
        return CommandResult(f"no codes found in {path}", "", EXIT_OK)
    lines = [
        f"{c.format}: {c.text}" + (" (not valid UTF-8; shown with replacements)" if c.lossy_text else "") for c in codes
    ]
    return CommandResult("\n".join(lines), "", EXIT_OK)
