"""A simulated RGB+IR+depth face camera: real photos and video, synthetic IR/depth, attacks, faults, head motion.

Owns `SimulatedCamera` (implements `drivers.camera.Camera`, hence also a `Peripheral`) and the pure function
`synthesize`, which turns one real RGB frame and the face found in it into what a binocular RGB+IR+depth kiosk
camera would deliver for a given *presentation*:

- BONA_FIDE: the RGB as captured; IR = a near, NIR-lit head (skin bright and smooth, dark pupils, corneal glints
  at the eye landmarks) in front of a dim background; depth = a head-shaped surface (ellipsoid, nose, eye sockets)
  at 450–600 mm from the face box and landmarks, with sensor noise and dropouts.
- PRINT (paper photo): RGB with reduced range/saturation and faint halftone aliasing; IR = the sheet lit
  uniformly, the print only as a flat, low-contrast reflectance, no glints; depth = a tilted, slightly bent plane.
- SCREEN_REPLAY (phone/tablet): RGB with a pixel-grid moiré, a colour shift and a bezel; IR = no face at all
  (screens emit no NIR image), a dark uniform rectangle; depth = a plane with dropouts (glossy glass).
- MASK (3D mask): RGB texture smoothed; IR = uniform material reflectance without eye structure; depth face-like.

Everything but the RGB photo is SYNTHETIC and follows this module's model of the sensors: PAD figures measured on
it show the signals separate what this simulator makes, not what a real attacker with real materials makes.

A live subject (and a mask wearer) answers an active challenge (`perform`) with a smooth geometric warp of the face
region that moves the landmarks as a yaw turn or a nod would; a print stays static and a screen replays its own,
unrelated motion. Faults (NO_FRAMES, TOO_DARK, BLURRED, UNPLUGGED) are injectable and clearable at run time. All
randomness comes from one seeded RNG. Never imported by production code; frames are never written to disk.
(Not to be confused with `hardware_sim.peripherals.SimulatedCamera`, a status-only stand-in for heartbeats.)
"""

from __future__ import annotations

import random
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from drivers.camera import (
    FRAME_HEIGHT,
    FRAME_WIDTH,
    CameraFault,
    CameraHealth,
    CameraUnavailable,
    Frame,
    NoFrame,
    classify_frame,
)
from models.liveness import Challenge
from models.types import DepthImage, Detection, FaceDetector, GrayImage, RgbImage
from protocol import PeripheralKind, PeripheralStatus

F32 = NDArray[np.float32]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov"}


class Presentation(StrEnum):
    """What is in front of the camera (ISO/IEC 30107 terms: bona fide or an attack species)."""

    BONA_FIDE = "bona_fide"
    PRINT = "print"
    SCREEN_REPLAY = "screen_replay"
    MASK = "mask"


ATTACK_SPECIES = (Presentation.PRINT, Presentation.SCREEN_REPLAY, Presentation.MASK)


@dataclass(frozen=True, slots=True)
class Motion:
    """A head motion in progress: which move and how far through it (0 = neutral, 1 = fully done)."""

    move: Challenge
    amount: float


@dataclass(frozen=True, slots=True)
class Synthesized:
    rgb: RgbImage
    ir: GrayImage | None  # None when made with sensors=False
    depth: DepthImage | None
    detection: Detection | None  # where the face now is (after motion), None when the source had no face


def letterbox(image: RgbImage, width: int = FRAME_WIDTH, height: int = FRAME_HEIGHT) -> RgbImage:
    """Scale to fit inside width×height keeping the aspect ratio; pad the rest with black."""
    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0 = (width - nw) // 2, (height - nh) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = resized
    return out


def load_rgb(path: Path) -> RgbImage:
    """A photo as 640x480 letterboxed RGB; ValueError when it cannot be read."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {path}")
    return letterbox(np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8))


# ---------------------------------------------------------------- geometry helpers


def _face_geometry(det: Detection) -> tuple[float, float, float, float, float]:
    """(cx, cy, face width, face height, inter-ocular distance) from a detection."""
    lm = det.landmarks.astype(np.float64)
    x0, y0, x1, y1 = det.box
    iod = float(max(4.0, np.hypot(*(lm[1] - lm[0]))))
    cx = float(lm[2][0])
    cy = float((lm[0][1] + lm[1][1]) / 2 * 0.5 + lm[2][1] * 0.5)
    return cx, cy, float(x1 - x0), float(y1 - y0), iod


def _grid(h: int, w: int) -> tuple[F32, F32]:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs, ys


def _gauss(xs: F32, ys: F32, cx: float, cy: float, sx: float, sy: float) -> F32:
    return np.exp(-(((xs - cx) / sx) ** 2 + ((ys - cy) / sy) ** 2) / 2).astype(np.float32)


def _motion_field(det: Detection, motion: Motion) -> tuple[float, float, float, float, float, float]:
    """(ax, ay, cx, cy, sx, sy): a Gaussian bump centred on the nose that carries the nose further than the eyes."""
    lm = det.landmarks
    iod = _face_geometry(det)[4]
    cx, cy = float(lm[2][0]), float(lm[2][1])
    sx, sy = 0.35 * iod, 0.5 * iod
    amount = float(np.clip(motion.amount, 0.0, 1.0))
    if motion.move is Challenge.NOD:
        return 0.0, 0.35 * iod * amount, cx, cy, sx, sy
    # Subject's left = image right in an unmirrored camera (see models.liveness.yaw_proxy).
    sign = 1.0 if motion.move is Challenge.TURN_LEFT else -1.0
    # Amplitude chosen so detectors' nose landmark moves ≈ 0.2 inter-ocular distances relative to the eyes, as in
    # a ~25-30° real turn (the warp keeps the face outline, so landmark regressors follow it only partly).
    return sign * 0.65 * iod * amount, 0.0, cx, cy, sx, sy


def apply_motion(rgb: RgbImage, det: Detection, motion: Motion) -> tuple[RgbImage, Detection]:
    """Warp the face region as a yaw turn / nod would move it; returns the frame and the moved detection."""
    ax, ay, cx, cy, sx, sy = _motion_field(det, motion)
    if ax == 0.0 and ay == 0.0:
        return rgb, det
    h, w = rgb.shape[:2]
    # Only within 4 sigma of the nose does the bump move anything: warp that window, copy the rest.
    x0, x1 = max(0, int(cx - 4 * sx)), min(w, int(cx + 4 * sx) + 1)
    y0, y1 = max(0, int(cy - 4 * sy)), min(h, int(cy + 4 * sy) + 1)
    xs, ys = _grid(y1 - y0, x1 - x0)
    xs, ys = xs + x0, ys + y0
    bump = _gauss(xs, ys, cx, cy, sx, sy)
    # Backward map: a destination pixel takes the source pixel one displacement behind it (small-motion inverse).
    map_x = (xs - ax * bump).astype(np.float32)
    map_y = (ys - ay * bump).astype(np.float32)
    warped = rgb.copy()
    warped[y0:y1, x0:x1] = cv2.remap(rgb, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    lm = det.landmarks.astype(np.float32).copy()
    k = np.exp(-(((lm[:, 0] - cx) / sx) ** 2 + ((lm[:, 1] - cy) / sy) ** 2) / 2)
    lm[:, 0] += ax * k
    lm[:, 1] += ay * k
    return warped, Detection(box=det.box, score=det.score, landmarks=lm)


# ---------------------------------------------------------------- per-presentation synthesis


def _background_ir(h: int, w: int, gray: F32, rng: np.random.Generator, scene: np.random.Generator) -> F32:
    # The illuminator barely reaches the room behind the subject: dim, low-contrast; ambient NIR (sunlight, a
    # near wall) lifts it by a random amount.
    level = scene.uniform(12.0, 55.0)
    return (level + 0.12 * gray + rng.normal(0.0, 2.0, (h, w))).astype(np.float32)


def _head_mask(xs: F32, ys: F32, det: Detection) -> F32:
    _, _, fw, fh, _ = _face_geometry(det)
    x0, y0, x1, y1 = det.box
    head = (((xs - (x0 + x1) / 2) / (0.62 * fw)) ** 2 + ((ys - (y0 + y1) / 2 + 0.1 * fh) / (0.8 * fh)) ** 2) <= 1.0
    neck = (np.abs(xs - (x0 + x1) / 2) < 0.32 * fw) & (ys > y1 - 0.1 * fh) & (ys < y1 + 0.6 * fh)
    shoulders = (((xs - (x0 + x1) / 2) / (1.6 * fw)) ** 2 + ((ys - (y1 + 1.5 * fh)) / (1.0 * fh)) ** 2) <= 1.0
    mask = (head | neck | shoulders).astype(np.float32)
    blurred: F32 = np.asarray(cv2.GaussianBlur(mask, (0, 0), max(1.0, 0.04 * fw)), dtype=np.float32)
    return blurred


def _eye_features(ir: F32, xs: F32, ys: F32, det: Detection, *, glint: bool) -> F32:
    _, _, _, _, iod = _face_geometry(det)
    out = ir
    for ex, ey in det.landmarks[:2]:
        pupil = _gauss(xs, ys, float(ex), float(ey), 0.07 * iod, 0.06 * iod)
        out = out * (1.0 - 0.65 * pupil)
        if glint:
            # The corneal reflection of the illuminator LED: a tiny saturated spot slightly off the pupil centre.
            size = max(0.8, 0.018 * iod)  # never smaller than the optics' blur spot
            spot = _gauss(xs, ys, float(ex) + 0.02 * iod, float(ey) - 0.02 * iod, size, size)
            out = out + 200.0 * spot
    return out.astype(np.float32)


def _head_depth(xs: F32, ys: F32, det: Detection, distance: float, nose_mm: float) -> F32:
    lm = det.landmarks
    x0, y0, x1, y1 = det.box
    fw, fh = x1 - x0, y1 - y0
    hx, hy = (x0 + x1) / 2, (y0 + y1) / 2 - 0.1 * fh
    a, b = 0.62 * fw, 0.8 * fh
    u = np.clip(1.0 - ((xs - hx) / a) ** 2 - ((ys - hy) / b) ** 2, 0.0, None)
    # Head half-depth ≈ 95 mm, nearest at the face centre.
    z: F32 = (distance + 95.0 - 95.0 * np.sqrt(u)).astype(np.float32)
    iod = float(np.hypot(*(lm[1] - lm[0])))
    z -= nose_mm * _gauss(xs, ys, float(lm[2][0]), float(lm[2][1]) - 0.25 * iod, 0.22 * iod, 0.45 * iod)
    for ex, ey in lm[:2]:
        z += 8.0 * _gauss(xs, ys, float(ex), float(ey), 0.25 * iod, 0.18 * iod)
    return z


def _plane_depth(xs: F32, ys: F32, center: tuple[float, float], distance: float, scene: np.random.Generator) -> F32:
    tilt_x, tilt_y = scene.uniform(-0.25, 0.25), scene.uniform(-0.25, 0.25)  # mm per px (≈ ±15° at this scale)
    return (distance + tilt_x * (xs - center[0]) + tilt_y * (ys - center[1])).astype(np.float32)


def _sheet(det: Detection, shape: tuple[int, int], scale: float, scene: np.random.Generator) -> tuple[int, ...]:
    x0, y0, x1, y1 = det.box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw = (x1 - x0) * scale * scene.uniform(0.95, 1.1) / 2
    hh = (y1 - y0) * scale * 1.25 * scene.uniform(0.95, 1.1) / 2
    h, w = shape
    return (
        max(0, int(cx - hw)),
        max(0, int(cy - hh * 0.9)),
        min(w, int(cx + hw)),
        min(h, int(cy + hh * 1.1)),
    )


def _finish_depth(z: F32, rng: np.random.Generator, dropout: float) -> DepthImage:
    # Sensor noise grows with distance (≈1.5 mm + 0.1 % of range); dropouts where the pattern is not seen.
    noisy = z + rng.normal(0.0, 1.0, z.shape).astype(np.float32) * (1.5 + 0.001 * z)
    keep = (rng.random(z.shape) >= dropout) & (noisy > 0) & (noisy < 8000)
    return np.where(keep, np.round(noisy), 0).astype(np.uint16)


def synthesize(
    rgb: RgbImage,
    det: Detection | None,
    presentation: Presentation,
    rng: np.random.Generator,
    *,
    motion: Motion | None = None,
    sensors: bool = True,
    scene_seed: int | None = None,
    ir_parallax_px: int = 0,
) -> Synthesized:
    """One frame as the RGB+IR+depth camera would see `presentation` of the face `det` found in `rgb`.

    `motion` is applied by a live subject or a mask wearer (they answer the kiosk) and by a screen replay (its
    clip's own motion); a print ignores it. With `sensors=False` only the RGB is made (IR and depth are None).
    `scene_seed` fixes the scene and the attack instrument (sheet size and tilt, paper, halftone and screen grid,
    distance, skin and ambient levels) across frames, as one physical presentation would; sensor noise still
    comes from `rng` per frame. Without it every call draws a new scene from `rng`. `ir_parallax_px` shifts the IR
    image to the right as the IR sensor of a binocular module beside the RGB one sees it (depth stays registered).
    """
    h, w = rgb.shape[:2]
    scene = np.random.default_rng(scene_seed) if scene_seed is not None else rng
    if det is None:
        if not sensors:
            return Synthesized(rgb, None, None, None)
        xs, ys = _grid(h, w)
        gray = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.float32)
        far = np.full((h, w), scene.uniform(1800.0, 2600.0), dtype=np.float32)
        return Synthesized(rgb, _u8(_background_ir(h, w, gray, rng, scene)), _finish_depth(far, rng, 0.05), None)

    if motion is not None and presentation is not Presentation.PRINT:
        rgb, det = apply_motion(rgb, det, motion)
    sheet = _sheet(det, (h, w), 2.0, scene)
    out_rgb = _present_rgb(rgb, det, presentation, sheet, scene)
    if not sensors:
        return Synthesized(out_rgb, None, None, det)

    xs, ys = _grid(h, w)
    gray = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.float32)
    far = np.full((h, w), scene.uniform(1800.0, 2600.0), dtype=np.float32)
    distance = float(scene.uniform(450.0, 600.0))
    background = _background_ir(h, w, gray, rng, scene)
    noise = rng.normal(0.0, 2.5, (h, w)).astype(np.float32)

    if presentation in (Presentation.BONA_FIDE, Presentation.MASK):
        mask = _head_mask(xs, ys, det)
        if presentation is Presentation.BONA_FIDE:
            # NIR skin: bright and smoother than in visible light; keeps the facial edges (brows, nose, lips).
            blurred = np.asarray(cv2.GaussianBlur(gray, (0, 0), 1.5), dtype=np.float32)
            skin = (scene.uniform(95.0, 150.0) + 0.45 * (blurred - float(gray.mean()))).astype(np.float32)
            lit = _eye_features(skin, xs, ys, det, glint=True)
            nose_mm = float(scene.uniform(18.0, 28.0))
        else:
            # Mask material: uniform reflectance, only shading from its shape; no pupils, no corneal glint.
            x0, y0, x1, y1 = det.box
            shade = _gauss(xs, ys, (x0 + x1) / 2, (y0 + y1) / 2, 0.5 * (x1 - x0), 0.6 * (y1 - y0))
            lit = (150.0 + 25.0 * shade).astype(np.float32)
            nose_mm = float(scene.uniform(12.0, 20.0))
        ir = mask * lit + (1.0 - mask) * background + noise
        z = np.where(mask > 0.5, _head_depth(xs, ys, det, distance, nose_mm), far).astype(np.float32)
        return Synthesized(out_rgb, _parallax(_u8(ir), ir_parallax_px), _finish_depth(z, rng, 0.02), det)

    sx0, sy0, sx1, sy1 = sheet
    inside = np.zeros((h, w), dtype=bool)
    inside[sy0:sy1, sx0:sx1] = True
    plane = _plane_depth(xs, ys, ((sx0 + sx1) / 2, (sy0 + sy1) / 2), distance, scene)
    if presentation is Presentation.PRINT:
        # Paper: the whole sheet lit alike; inks are nearly transparent in NIR, so the print shows only faintly.
        paper = scene.uniform(110.0, 190.0)
        ir = np.where(inside, paper - 0.12 * (255.0 - gray), background) + noise
        bend = scene.uniform(-3.0, 3.0) * ((xs - (sx0 + sx1) / 2) / max(1.0, (sx1 - sx0) / 2)) ** 2
        z = np.where(inside, plane + bend, far).astype(np.float32)
        return Synthesized(out_rgb, _parallax(_u8(ir), ir_parallax_px), _finish_depth(z, rng, 0.02), det)

    # SCREEN_REPLAY: emits visible light only; the NIR camera sees dark glass and maybe a reflection of the LED.
    glass = 28.0 + scene.uniform(-6.0, 6.0)
    hx, hy = scene.uniform(sx0, sx1), scene.uniform(sy0, sy1)
    ir = np.where(inside, glass + 120.0 * _gauss(xs, ys, hx, hy, 6.0, 6.0), background) + noise
    z = np.where(inside, plane, far).astype(np.float32)
    return Synthesized(out_rgb, _parallax(_u8(ir), ir_parallax_px), _finish_depth(z, rng, 0.08), det)


def _present_rgb(
    rgb: RgbImage,
    det: Detection,
    presentation: Presentation,
    sheet: tuple[int, ...],
    scene: np.random.Generator,
) -> RgbImage:
    """What the RGB sensor sees of the presentation (effects only inside the face/sheet region: cheap)."""
    if presentation is Presentation.BONA_FIDE:
        return rgb
    h, w = rgb.shape[:2]
    if presentation is Presentation.MASK:
        x0, y0, x1, y1 = (int(v) for v in _clip(det.box, 0.35, (h, w)))
        roi = rgb[y0:y1, x0:x1]
        smooth = cv2.GaussianBlur(cv2.bilateralFilter(roi, 9, 40, 9), (0, 0), 1.6).astype(np.float32)
        rx, ry = _grid(y1 - y0, x1 - x0)
        bx0, by0, bx1, by1 = det.box
        face = _gauss(rx, ry, (bx0 + bx1) / 2 - x0, (by0 + by1) / 2 - y0, 0.55 * (bx1 - bx0), 0.65 * (by1 - by0))
        out = rgb.copy()
        out[y0:y1, x0:x1] = _u8(face[:, :, None] * smooth + (1 - face[:, :, None]) * roi.astype(np.float32))
        return out
    sx0, sy0, sx1, sy1 = sheet
    roi = rgb[sy0:sy1, sx0:sx1].astype(np.float32)
    rx, ry = _grid(sy1 - sy0, sx1 - sx0)
    rx, ry = rx + sx0, ry + sy0  # keep the pattern's phase in frame coordinates
    out = rgb.copy()
    if presentation is Presentation.PRINT:
        paper = 30.0 + roi * 0.82  # paper white and ink black: less dynamic range
        lum = paper.mean(axis=2, keepdims=True)
        paper = lum + 0.75 * (paper - lum)  # inks: less saturation
        period, angle = scene.uniform(3.0, 5.0), scene.uniform(0.0, np.pi)
        # A halftone screen far finer than a pixel still aliases into a faint periodic pattern.
        halftone = 1.0 + 0.045 * np.cos((rx * np.cos(angle) + ry * np.sin(angle)) * 2 * np.pi / period)
        out[sy0:sy1, sx0:sx1] = _u8(paper * halftone[:, :, None])
        return out
    screen = roi * np.array([0.92, 0.98, 1.1], dtype=np.float32) + 8.0  # backlit LCD: cooler, lifted blacks
    p1, p2 = scene.uniform(2.6, 4.2), scene.uniform(2.6, 4.2)
    a1, a2 = scene.uniform(0.0, np.pi), scene.uniform(0.0, np.pi)
    # Two beating gratings: the display's pixel grid sampled by the camera's pixel grid (moiré).
    grid = (
        1.0
        + 0.07 * np.cos((rx * np.cos(a1) + ry * np.sin(a1)) * 2 * np.pi / p1)
        + 0.07 * np.cos((rx * np.cos(a2) + ry * np.sin(a2)) * 2 * np.pi / p2)
    )
    screen = screen * grid[:, :, None]
    screen[:4], screen[-4:], screen[:, :4], screen[:, -4:] = 12.0, 12.0, 12.0, 12.0  # the bezel
    out[sy0:sy1, sx0:sx1] = _u8(screen)
    return out


def _clip(box: tuple[float, float, float, float], margin: float, shape: tuple[int, int]) -> tuple[int, ...]:
    x0, y0, x1, y1 = box
    mw, mh = (x1 - x0) * margin, (y1 - y0) * margin
    h, w = shape
    return (max(0, int(x0 - mw)), max(0, int(y0 - mh)), min(w, int(x1 + mw)), min(h, int(y1 + mh)))


def _parallax(ir: GrayImage, px: int) -> GrayImage:
    if px == 0:
        return ir
    out = np.empty_like(ir)
    if px > 0:
        out[:, px:], out[:, :px] = ir[:, :-px], ir[:, :1]
    else:
        out[:, :px], out[:, px:] = ir[:, -px:], ir[:, -1:]
    return out


def _u8(a: NDArray[np.floating] | F32) -> NDArray[np.uint8]:
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def apply_fault_to_picture(rgb: RgbImage, fault: CameraFault) -> RgbImage:
    """DARK and BLURRED as the sensor would deliver them (underexposed; defocused)."""
    if fault is CameraFault.TOO_DARK:
        return _u8(rgb.astype(np.float32) * 0.1)
    if fault is CameraFault.BLURRED:
        return np.asarray(cv2.GaussianBlur(rgb, (0, 0), 6.0), dtype=np.uint8)
    return rgb


# ---------------------------------------------------------------- the camera


class _Source:
    """Cycles through stills (each held `frames_per_still` reads) and video files (streamed, frame by frame)."""

    def __init__(self, paths: Sequence[Path], frames_per_still: int) -> None:
        if not paths:
            raise ValueError("a simulated camera needs at least one image or video")
        for path in paths:
            if path.suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                raise ValueError(f"unsupported source {path.name}")
            if not path.is_file():
                raise ValueError(f"source not found: {path}")
        self._paths = list(paths)
        self._hold = max(1, frames_per_still)
        self._i = 0
        self._held = 0
        self._still: tuple[RgbImage, str] | None = None
        self._video: cv2.VideoCapture | None = None

    def next(self) -> tuple[RgbImage, str]:
        """The next RGB frame (640x480) and a key that is the same for repeated reads of one still."""
        for _ in range(2 * len(self._paths) + 1):
            path = self._paths[self._i % len(self._paths)]
            if path.suffix.lower() in IMAGE_SUFFIXES:
                if self._still is None:
                    self._still = (load_rgb(path), str(path))
                if self._held < self._hold:
                    self._held += 1
                    return self._still
                self._advance()
                continue
            if self._video is None:
                self._video = cv2.VideoCapture(str(path))
            ok, bgr = self._video.read()
            if ok and bgr is not None:
                rgb = letterbox(np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8))
                return rgb, ""
            self._advance()
        raise NoFrame("no readable source")

    def _advance(self) -> None:
        self._i += 1
        self._held = 0
        self._still = None
        if self._video is not None:
            self._video.release()
            self._video = None

    def close(self) -> None:
        if self._video is not None:
            self._video.release()
            self._video = None


class SimulatedCamera:
    """Implements `drivers.camera.Camera` over real photos/video with synthetic IR and depth.

    `detector` finds the face in each source frame so IR and depth can be placed (cached per still). Change what
    is presented with `set_presentation`, start an active-challenge response with `perform`, inject faults with
    `inject_fault` / `clear_fault`. `motion_frames` is how many frames the simulated subject takes to complete a
    move. Thread-safe for the heartbeat's `status()`; `read()` is meant for one reading thread.
    """

    def __init__(
        self,
        sources: Sequence[Path],
        detector: FaceDetector,
        *,
        presentation: Presentation = Presentation.BONA_FIDE,
        name: str = "camera0",
        seed: int = 0,
        with_ir: bool = True,
        with_depth: bool = True,
        frames_per_still: int = 1,
        motion_frames: int = 6,
        ir_parallax_px: int = 0,
        degrade_after: int = 15,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._paths = [Path(p) for p in sources]
        self._detector = detector
        self._presentation = presentation
        self._name = name
        self._seed = seed
        self._np_rng = np.random.default_rng(seed)
        self._rng = random.Random(seed)  # noqa: S311 - reproducible simulation, not security
        self._with_ir = with_ir
        self._with_depth = with_depth
        self._frames_per_still = frames_per_still
        self._motion_frames = max(1, motion_frames)
        self._parallax = ir_parallax_px
        self._monotonic = monotonic
        self._health = CameraHealth(name, simulated=True, degrade_after=degrade_after)
        self._faults: set[CameraFault] = set()
        self._lock = threading.Lock()
        self._source: _Source | None = None
        self._index = 0
        self._cache: dict[str, Detection | None] = {}
        self._asked: Challenge | None = None
        self._motion_step = 0
        self._replay_move = self._rng.choice(list(Challenge))

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> PeripheralKind:
        return PeripheralKind.CAMERA

    @property
    def presentation(self) -> Presentation:
        return self._presentation

    def status(self) -> PeripheralStatus:
        return self._health.status()

    def set_presentation(self, presentation: Presentation) -> None:
        with self._lock:
            self._presentation = presentation
            self._motion_step = 0

    def perform(self, challenge: Challenge | None) -> None:
        """The kiosk asked for `challenge` (None = hold still): a live subject (or mask wearer) starts doing it."""
        with self._lock:
            self._asked = challenge
            self._motion_step = 0

    def present_person(self, sources: Sequence[Path], presentation: Presentation = Presentation.BONA_FIDE) -> None:
        """Someone else steps in front of the camera: from the next frame on, frames come from `sources` (e.g. the
        simulated town's next citizen). The open source is closed and replaced; read() keeps working."""
        with self._lock:
            self._paths = [Path(p) for p in sources]
            self._presentation = presentation
            self._motion_step = 0
            old, self._source = self._source, (_Source(self._paths, self._frames_per_still) if self._source else None)
        if old is not None:
            old.close()

    def inject_fault(self, fault: CameraFault) -> None:
        with self._lock:
            self._faults.add(fault)
        if fault is CameraFault.UNPLUGGED:
            self._health.fault(CameraFault.UNPLUGGED, "device gone")

    def clear_fault(self, fault: CameraFault | None = None) -> None:
        """Clear one fault, or all when None."""
        with self._lock:
            if fault is None:
                self._faults.clear()
            else:
                self._faults.discard(fault)

    def open(self) -> None:
        with self._lock:
            unplugged = CameraFault.UNPLUGGED in self._faults
        if unplugged:
            self._health.fault(CameraFault.UNPLUGGED, "device cannot be opened")
            raise CameraUnavailable(f"simulated camera {self._name} is unplugged")
        if self._source is None:
            self._source = _Source(self._paths, self._frames_per_still)
        self._health.ok()

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
        self._health.closed()

    def read(self) -> Frame:
        with self._lock:
            faults = set(self._faults)
            presentation = self._presentation
            motion = self._next_motion(presentation)
        if CameraFault.UNPLUGGED in faults:
            self._health.fault(CameraFault.UNPLUGGED, "device gone")
            raise CameraUnavailable(f"simulated camera {self._name} is unplugged")
        if self._source is None:
            raise CameraUnavailable(f"simulated camera {self._name} is not open")
        if CameraFault.NO_FRAMES in faults:
            self._health.fault(CameraFault.NO_FRAMES, "read timed out")
            raise NoFrame(f"simulated camera {self._name}: read timed out")
        rgb, key = self._source.next()
        det = self._detect(rgb, key)
        # One physical presentation per (source, species): the same sheet, screen or scene frame after frame.
        scene_seed = zlib.crc32(f"{self._seed}:{presentation.value}:{key}".encode())
        synth = synthesize(
            rgb, det, presentation, self._np_rng, motion=motion, scene_seed=scene_seed, ir_parallax_px=self._parallax
        )
        out_rgb = synth.rgb
        for fault in (CameraFault.TOO_DARK, CameraFault.BLURRED):
            if fault in faults:
                out_rgb = apply_fault_to_picture(out_rgb, fault)
        self._health.picture(classify_frame(out_rgb))
        frame = Frame(
            rgb=out_rgb,
            ir=synth.ir if self._with_ir else None,
            depth=synth.depth if self._with_depth else None,
            t=self._monotonic(),
            index=self._index,
        )
        self._index += 1
        return frame

    def _next_motion(self, presentation: Presentation) -> Motion | None:
        if presentation is Presentation.PRINT:
            return None
        if presentation is Presentation.SCREEN_REPLAY:
            # The replayed clip does its own move on its own schedule, deaf to the kiosk.
            self._motion_step += 1
            amount = min(1.0, self._motion_step / self._motion_frames)
            return Motion(self._replay_move, amount)
        if self._asked is None:
            return None
        self._motion_step += 1
        return Motion(self._asked, min(1.0, self._motion_step / self._motion_frames))

    def _detect(self, rgb: RgbImage, key: str) -> Detection | None:
        if key and key in self._cache:
            return self._cache[key]
        found = self._detector.detect(rgb)
        det = found[0] if found else None
        if key:
            self._cache[key] = det
        return det

    def __repr__(self) -> str:
        return f"SimulatedCamera(name={self._name!r}, presentation={self._presentation.value!r})"
