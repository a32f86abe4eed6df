"""Presentation-attack detection (liveness): independent signals, an active challenge and the fusion policy.

Owns the PAD signals the kiosk combines before it trusts a face match:

- `IrSignal`: a live face under the camera's NIR illuminator is present in the IR frame inside the RGB face box,
  its edges line up with the RGB face, it is brighter than its surround (near the illuminator) and shows eye
  structure (dark pupil, corneal glint). A phone screen emits no NIR image; a paper print reflects flat and
  low-contrast; a mask material has no eye structure.
- `DepthSignal`: a plane fitted to the depth inside the face box; a live face deviates from it by centimetres
  (nose, cheeks, eye sockets), a print or a screen by a few millimetres at most.
- `ChallengeSession`: a randomized active challenge (turn left, turn right, nod) checked with the five landmarks
  across frames within a time window, on an injected RNG and an injected clock.
- `TextureSignal`: passive cues in the RGB face crop: isolated peaks in the spectrum (screen moiré, print halftone
  aliasing).
- `OnnxPadSignal`: an optional operator-supplied ONNX PAD model (MiniFASNet-class) loaded through the model
  manifest system (`models.manifest.ModelStore`), hash- and spec-checked like every other model.

`LivenessChecker` fuses them: every signal that has its input must pass; when neither IR nor depth is available,
a passed active challenge is required. The decision carries the scores, the failed reasons and the method used,
never the image.

Works on plain arrays and `models.types.Detection` only: never imports `drivers`, `terminal` or `hardware_sim`,
never keeps a frame past the call that was handed it and never logs image content.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

from models.manifest import LoadedModel
from models.types import DepthImage, Detection, GrayImage, RgbImage

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class SignalResult:
    """One signal's verdict: score in [0, 1] (1 = live), whether it passes its threshold, and why."""

    name: str
    score: float
    passed: bool
    reason: str
    measures: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LivenessDecision:
    """The fused decision: `live`, the score of every signal consulted, the reasons of those that failed, method."""

    live: bool
    scores: dict[str, float]
    failed: list[str]
    method: str


def _ramp(value: float, low: float, high: float) -> float:
    """0 at or below `low`, 1 at or above `high`, linear between."""
    if high <= low:
        return 1.0 if value >= high else 0.0
    return float(min(1.0, max(0.0, (value - low) / (high - low))))


def _clip_box(box: tuple[float, float, float, float], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    h, w = shape[0], shape[1]
    x0, y0, x1, y1 = box
    return (
        max(0, min(w, math.floor(x0))),
        max(0, min(h, math.floor(y0))),
        max(0, min(w, math.ceil(x1))),
        max(0, min(h, math.ceil(y1))),
    )


def _scaled_box(detection: Detection, scale: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = detection.box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
    return (cx - hw, cy - hh, cx + hw, cy + hh)


def _shifted(detection: Detection, dx: float, dy: float) -> Detection:
    x0, y0, x1, y1 = detection.box
    landmarks = (detection.landmarks + np.array([dx, dy], dtype=np.float32)).astype(np.float32)
    return Detection(box=(x0 + dx, y0 + dy, x1 + dx, y1 + dy), score=detection.score, landmarks=landmarks)


def _gray(rgb: RgbImage) -> NDArray[np.float32]:
    return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.float32)


def _interocular(detection: Detection) -> float:
    lm = detection.landmarks
    return float(max(1.0, np.hypot(*(lm[1] - lm[0]))))


# ---------------------------------------------------------------- IR


@dataclass(frozen=True, slots=True)
class IrSignal:
    """Face presence and consistency in the IR frame (same size as the RGB frame, rectified to its rows; a
    horizontal parallax of up to `max_parallax_px` is searched for).

    Sub-measures, each ramped to [0, 1]; the score is their minimum, so the weakest cue names the reason:
    `edge_corr` (IR vs RGB-gray gradient magnitudes in the face box: no face in IR when ≈ 0),
    `relief` (face/surround IR brightness: the illuminator lights a near face more than what is behind it),
    `eye` (pupil darker than the cheeks and a corneal glint at the eye landmarks).
    """

    threshold: float = 0.5
    corr_range: tuple[float, float] = (0.15, 0.35)
    relief_range: tuple[float, float] = (1.1, 1.35)
    eye_range: tuple[float, float] = (0.12, 0.32)
    max_parallax_px: int = 12  # IR-to-RGB horizontal offset searched (binocular modules at 40-80 cm)

    name: str = "ir"

    def score(self, rgb: RgbImage, ir: GrayImage, detection: Detection) -> SignalResult:
        if ir.shape[:2] != rgb.shape[:2]:
            return SignalResult(self.name, 0.0, False, "ir_not_registered")
        # Work on the window the measures look at (face and its surround), not the whole frame: ~5x cheaper.
        rx0, ry0, rx1, ry1 = _clip_box(_scaled_box(detection, 2.4), ir.shape)
        detection = _shifted(detection, -rx0, -ry0)
        ir, rgb = ir[ry0:ry1, rx0:rx1], rgb[ry0:ry1, rx0:rx1]
        x0, y0, x1, y1 = _clip_box(_scaled_box(detection, 0.8), ir.shape)
        if x1 - x0 < 8 or y1 - y0 < 8:
            return SignalResult(self.name, 0.0, False, "face_box_too_small")
        irf = np.asarray(cv2.GaussianBlur(ir.astype(np.float32), (0, 0), 1.2), dtype=np.float32)
        gray = np.asarray(cv2.GaussianBlur(_gray(np.ascontiguousarray(rgb)), (0, 0), 1.2), dtype=np.float32)
        ir_mag, gray_mag = _gradient_magnitude(irf), _gradient_magnitude(gray)
        # A binocular module's IR sensor sits beside the RGB one: the face appears shifted along the baseline
        # (parallax) by an amount that depends on the distance. Take the best horizontal shift within the limit.
        corr, shift = max(
            (_correlation(ir_mag[y0:y1, x0 + dx : x1 + dx], gray_mag[y0:y1, x0:x1]), dx)
            for dx in range(-self.max_parallax_px, self.max_parallax_px + 1, 2)
            if x0 + dx >= 0 and x1 + dx <= ir.shape[1]
        )
        in_ir = _shifted(detection, shift, 0)
        relief = _face_surround_ratio(irf, in_ir)
        eye = _eye_structure(irf, in_ir)
        measures = {"edge_corr": corr, "relief": relief, "eye": eye, "parallax_px": float(shift)}
        parts = {
            "no_face_in_ir": _ramp(corr, *self.corr_range),
            "ir_flat_reflectance": _ramp(relief, *self.relief_range),
            "ir_no_eye_structure": _ramp(eye, *self.eye_range),
        }
        reason, score = min(parts.items(), key=lambda kv: kv[1])
        passed = score >= self.threshold
        return SignalResult(self.name, score, passed, "ok" if passed else reason, measures)


def _gradient_magnitude(image: NDArray[np.float32]) -> NDArray[np.float32]:
    gx, gy = cv2.Sobel(image, cv2.CV_32F, 1, 0), cv2.Sobel(image, cv2.CV_32F, 0, 1)
    return np.asarray(cv2.magnitude(gx, gy), dtype=np.float32)


def _correlation(a: NDArray[np.float32], b: NDArray[np.float32]) -> float:
    """Pearson correlation of two equally shaped arrays; 0 when either is flat."""
    ga, gb = a.ravel(), b.ravel()
    sa, sb = float(ga.std()), float(gb.std())
    if sa < 1e-3 or sb < 1e-3:
        return 0.0
    return float(np.mean((ga - ga.mean()) * (gb - gb.mean())) / (sa * sb))


def _face_surround_ratio(ir: NDArray[np.float32], detection: Detection) -> float:
    fx0, fy0, fx1, fy1 = _clip_box(_scaled_box(detection, 0.7), ir.shape)
    ox0, oy0, ox1, oy1 = _clip_box(_scaled_box(detection, 2.2), ir.shape)
    face = ir[fy0:fy1, fx0:fx1]
    outer = ir[oy0:oy1, ox0:ox1]
    if face.size == 0 or outer.size == 0:
        return 0.0
    ring_sum = float(outer.sum()) - float(ir[fy0:fy1, fx0:fx1].sum())
    ring_n = outer.size - face.size
    if ring_n <= 0:
        return 0.0
    # A low percentile of the ring: what is behind the head, not the hair or the neck beside it.
    ring_mask = np.ones(outer.shape, dtype=bool)
    ring_mask[fy0 - oy0 : fy1 - oy0, fx0 - ox0 : fx1 - ox0] = False
    ring_level = float(np.percentile(outer[ring_mask], 25)) if ring_mask.any() else ring_sum / ring_n
    return float(np.median(face)) / max(ring_level, 8.0)


def _eye_structure(ir: NDArray[np.float32], detection: Detection) -> float:
    """Pupil darkness plus corneal glint at both eyes, relative to the cheek level; ≈ 0 for a uniform material."""
    lm = detection.landmarks
    iod = _interocular(detection)
    r = max(2, round(0.12 * iod))
    h, w = ir.shape
    cheek_y = float(lm[0][1] + lm[2][1]) / 2 + 0.1 * iod
    cheeks = []
    for cx in (float(lm[0][0]), float(lm[1][0])):
        cy0, cy1 = max(0, round(cheek_y - r)), min(h, round(cheek_y + r))
        cx0, cx1 = max(0, round(cx - r)), min(w, round(cx + r))
        if cy1 > cy0 and cx1 > cx0:
            cheeks.append(float(np.median(ir[cy0:cy1, cx0:cx1])))
    if not cheeks:
        return 0.0
    cheek = max(8.0, float(np.mean(cheeks)))
    values = []
    for ex, ey in lm[:2]:
        x0, x1 = max(0, round(float(ex) - r)), min(w, round(float(ex) + r))
        y0, y1 = max(0, round(float(ey) - r)), min(h, round(float(ey) + r))
        patch = ir[y0:y1, x0:x1]
        if patch.size == 0:
            return 0.0
        dark = (cheek - float(np.percentile(patch, 10))) / cheek
        glint = (float(patch.max()) - float(np.percentile(patch, 10))) / cheek
        values.append(min(max(dark, 0.0), 1.0) * 0.5 + min(max(glint, 0.0), 1.0) * 0.5)
    return float(min(values))


# ---------------------------------------------------------------- depth


@dataclass(frozen=True, slots=True)
class DepthSignal:
    """Depth relief: RMS residual (mm) of a least-squares plane over the face box; a print or screen is flat.

    Depth is uint16 millimetres registered to the RGB frame, 0 = no reading. Also refuses a face outside the
    working distance (a face at 3 m is not at the kiosk).
    """

    threshold: float = 0.5
    rms_range_mm: tuple[float, float] = (3.0, 7.0)
    distance_mm: tuple[float, float] = (250.0, 1200.0)
    min_valid_fraction: float = 0.3
    name: str = "depth"

    def score(self, depth: DepthImage, detection: Detection) -> SignalResult:
        x0, y0, x1, y1 = _clip_box(_scaled_box(detection, 0.7), depth.shape)
        if x1 - x0 < 6 or y1 - y0 < 6:
            return SignalResult(self.name, 0.0, False, "face_box_too_small")
        patch = depth[y0:y1, x0:x1]
        # Median filter: sensor speckle is not relief, and single dropouts must not dominate the fit.
        smooth = cv2.medianBlur(np.ascontiguousarray(patch), 5).astype(np.float64)
        valid = (patch > 0) & (smooth > 0)
        fraction = float(valid.mean())
        if fraction < self.min_valid_fraction:
            return SignalResult(self.name, 0.0, False, "depth_no_reading", {"valid": fraction})
        ys, xs = np.nonzero(valid)
        z = smooth[valid]
        median_mm = float(np.median(z))
        a = np.column_stack([xs.astype(np.float64), ys.astype(np.float64), np.ones(xs.size)])
        coef, *_ = np.linalg.lstsq(a, z, rcond=None)
        residual = z - a @ coef
        rms = float(np.sqrt(np.mean(residual**2)))
        measures = {"rms_mm": rms, "distance_mm": median_mm, "valid": fraction}
        if not self.distance_mm[0] <= median_mm <= self.distance_mm[1]:
            return SignalResult(self.name, 0.0, False, "depth_out_of_range", measures)
        score = _ramp(rms, *self.rms_range_mm)
        passed = score >= self.threshold
        return SignalResult(self.name, score, passed, "ok" if passed else "depth_flat", measures)


# ---------------------------------------------------------------- passive texture


@dataclass(frozen=True, slots=True)
class TextureSignal:
    """Isolated spectral peaks in the face crop: the pixel grid of a screen (moiré) or a print's halftone.

    The central `window` px of the face box at native resolution (no resampling, which would alias the very
    pattern looked for), Hann-windowed; the log-magnitude spectrum minus its own median-filtered background;
    the highest prominence in the mid/high band is the measure. Natural skin has a smooth 1/f spectrum.
    """

    threshold: float = 0.5
    prominence_range: tuple[float, float] = (2.0, 1.5)  # high prominence -> 0 (attack), low -> 1 (live)
    window: int = 96
    band: tuple[float, float] = (0.25, 0.95)  # fraction of Nyquist
    name: str = "texture"

    def score(self, rgb: RgbImage, detection: Detection) -> SignalResult:
        prominence = moire_prominence(rgb, detection, window=self.window, band=self.band)
        if prominence is None:
            return SignalResult(self.name, 0.0, False, "face_box_too_small")
        hi, lo = self.prominence_range
        score = 1.0 - _ramp(prominence, lo, hi)
        passed = score >= self.threshold
        reason = "ok" if passed else "periodic_texture"
        return SignalResult(self.name, score, passed, reason, {"prominence": prominence})


def moire_prominence(
    rgb: RgbImage, detection: Detection, *, window: int = 96, band: tuple[float, float] = (0.25, 0.95)
) -> float | None:
    """Peak prominence (natural-log units) of the face crop's spectrum in the given band; None if the crop is tiny."""
    x0, y0, x1, y1 = _clip_box(_scaled_box(detection, 0.75), rgb.shape)
    side = min(window, x1 - x0, y1 - y0)
    if side < 32:
        return None
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    gray = _gray(rgb)[cy - side // 2 : cy - side // 2 + side, cx - side // 2 : cx - side // 2 + side]
    gray = gray - float(gray.mean())
    hann = np.outer(np.hanning(side), np.hanning(side)).astype(np.float32)
    spectrum = np.fft.fftshift(np.abs(np.fft.fft2(gray * hann)))
    logmag = np.log1p(spectrum).astype(np.float32)
    background = cv2.medianBlur(logmag, 5)
    prominence = logmag - background
    fy, fx = np.meshgrid(np.arange(side) - side // 2, np.arange(side) - side // 2, indexing="ij")
    radius = np.hypot(fx, fy) / (side / 2)
    mask = (radius >= band[0]) & (radius <= band[1])
    return float(prominence[mask].max())


# ---------------------------------------------------------------- optional ONNX PAD model


@dataclass(frozen=True, slots=True)
class OnnxPadSignal:
    """An operator-supplied PAD classifier (MiniFASNet-class, manifest role "pad"): face crop → class scores.

    The model comes from `models.manifest` (`ModelStore.load(name)`), already hash-checked, spec-checked and
    warmed up; its manifest decides the input size, layout, channel order and normalisation. The crop is the face
    box scaled by `crop_scale` around its centre (zero-padded at frame edges, as such models are trained), output
    `output_index` is one row of class scores, soft-maxed unless `outputs_probabilities`; the probability at
    `live_index` is the score. The pass threshold is the manifest's calibrated one (metric "score") when present.
    """

    model: LoadedModel
    crop_scale: float = 2.7
    live_index: int = 1
    output_index: int = 0
    outputs_probabilities: bool = False
    default_threshold: float = 0.5
    name: str = "onnx_pad"

    def __post_init__(self) -> None:
        manifest = self.model.manifest
        if manifest.role != "pad":
            raise ValueError(f"model {manifest.name} has role {manifest.role!r}, not 'pad'")
        if manifest.input.dtype != "float32" or len(manifest.input.shape) != 4:
            raise ValueError(f"model {manifest.name}: a PAD model takes one float32 image batch")
        if manifest.threshold is not None and manifest.threshold.metric != "score":
            raise ValueError(f"model {manifest.name}: a PAD threshold is a 'score', not {manifest.threshold.metric}")

    @property
    def threshold(self) -> float:
        calibrated = self.model.manifest.threshold
        return calibrated.value if calibrated is not None else self.default_threshold

    def _input_size(self) -> tuple[int, int]:
        """(width, height) the model takes, read from the manifest's shape and layout."""
        spec = self.model.manifest.input
        shape = spec.shape
        if spec.layout == "NCHW":
            return shape[3], shape[2]
        if spec.layout == "NHWC":
            return shape[2], shape[1]
        return shape[1], shape[2]  # NWHC

    def score(self, rgb: RgbImage, detection: Detection) -> SignalResult:
        x0, y0, x1, y1 = _scaled_box(detection, self.crop_scale)
        h, w = rgb.shape[:2]
        # Pad instead of clipping so a face near the edge keeps its aspect and scale, as the model was trained.
        pad = max(0, math.ceil(max(-x0, -y0, x1 - w, y1 - h)))
        padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0)) if pad else rgb
        crop = padded[round(y0) + pad : round(y1) + pad, round(x0) + pad : round(x1) + pad]
        if crop.size == 0:
            return SignalResult(self.name, 0.0, False, "face_box_too_small")
        chip = cv2.resize(crop, self._input_size(), interpolation=cv2.INTER_LINEAR)
        outputs = self.model.run(self.model.preprocess(np.asarray(chip)[None]))
        if not 0 <= self.output_index < len(outputs):
            return SignalResult(self.name, 0.0, False, "pad_model_output_mismatch")
        row = np.asarray(outputs[self.output_index], dtype=np.float64).reshape(-1)
        if not 0 <= self.live_index < row.size:
            return SignalResult(self.name, 0.0, False, "pad_model_output_mismatch")
        if not self.outputs_probabilities:
            row = np.exp(row - row.max())
            row = row / row.sum()
        score = float(row[self.live_index])
        passed = score >= self.threshold
        return SignalResult(self.name, score, passed, "ok" if passed else "pad_model_attack")


# ---------------------------------------------------------------- active challenge


class Clock(Protocol):
    """Monotonic seconds, injectable so tests advance time (not `protocol.Clock`, which also gives wall time)."""

    def now(self) -> float: ...


class Challenge(StrEnum):
    """What the kiosk asks the citizen to do. Directions are the subject's own (their left), not the screen's."""

    TURN_LEFT = "turn_left"
    TURN_RIGHT = "turn_right"
    NOD = "nod"


class ChallengeState(StrEnum):
    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"


def yaw_proxy(detection: Detection) -> float:
    """Nose offset from the eye midpoint along the eye line, in inter-ocular distances; + = subject turned left.

    In an unmirrored camera image the subject's left is the image's right, so turning left moves the nose
    toward larger x. 0 for a frontal face.
    """
    lm = detection.landmarks.astype(np.float64)
    mid = (lm[0] + lm[1]) / 2
    axis = lm[1] - lm[0]
    iod = float(np.hypot(*axis))
    if iod < 1.0:
        return 0.0
    return float(np.dot(lm[2] - mid, axis) / iod**2)


def pitch_proxy(detection: Detection) -> float:
    """Nose drop below the eye line, in inter-ocular distances; grows when the subject nods down."""
    lm = detection.landmarks.astype(np.float64)
    mid = (lm[0] + lm[1]) / 2
    axis = lm[1] - lm[0]
    iod = float(np.hypot(*axis))
    if iod < 1.0:
        return 0.0
    normal = np.array([-axis[1], axis[0]]) / iod
    return float(np.dot(lm[2] - mid, normal) / iod)


class ChallengeSession:
    """A randomized active challenge: `steps` moves drawn from the RNG, each to be done within `window_s`.

    Feed it the best detection of every frame (None when no face). The first `baseline_frames` frames with a face
    fix the neutral pose; a step passes when the proxy moves by `yaw_delta` (turns) or `pitch_delta` (nod) in the
    asked direction; moving the other way by as much fails it (a replayed video doing something else), and so does
    the window running out. Every move is measured from that neutral pose; after a move, wrong-move checks wait
    until the subject is back near neutral. A session is single-use.
    """

    def __init__(
        self,
        rng: random.Random,
        clock: Clock,
        *,
        steps: int = 1,
        window_s: float = 5.0,
        yaw_delta: float = 0.1,
        pitch_delta: float = 0.08,
        baseline_frames: int = 2,
        smooth_frames: int = 3,
        choices: Sequence[Challenge] = tuple(Challenge),
    ) -> None:
        if steps < 1:
            raise ValueError("a challenge needs at least one step")
        picked: list[Challenge] = []
        for _ in range(steps):
            # Never the same move twice in a row: a replay of one motion must not satisfy two steps.
            options = [c for c in choices if not picked or c is not picked[-1]] or list(choices)
            picked.append(rng.choice(options))
        self.challenges: tuple[Challenge, ...] = tuple(picked)
        self._clock = clock
        self._window = window_s
        self._yaw_delta = yaw_delta
        self._pitch_delta = pitch_delta
        self._baseline_frames = baseline_frames
        self._baseline: list[tuple[float, float]] = []
        self._step = 0
        self._step_started = clock.now()
        self._state = ChallengeState.PENDING
        self._reason = "pending"
        self._progress = 0.0
        self._armed = True
        self._smooth = max(1, smooth_frames)
        self._recent: list[tuple[float, float]] = []

    @property
    def current(self) -> Challenge | None:
        """The move the kiosk should be asking for now (None once decided)."""
        return self.challenges[self._step] if self._state is ChallengeState.PENDING else None

    @property
    def step_index(self) -> int:
        """Which move of `challenges` is being asked for (0-based); moves on when one is done."""
        return self._step

    @property
    def state(self) -> ChallengeState:
        return self._state

    def observe(self, detection: Detection | None) -> ChallengeState:
        """Consume one frame's detection at the clock's current time and return the session state."""
        if self._state is not ChallengeState.PENDING:
            return self._state
        now = self._clock.now()
        if now - self._step_started > self._window:
            return self._fail("challenge_timeout")
        if detection is None:
            return self._state
        raw = (yaw_proxy(detection), pitch_proxy(detection))
        if len(self._baseline) < self._baseline_frames:
            self._baseline.append(raw)
            return self._state
        # Median of the last few frames: single-frame landmark jitter is neither a move nor a wrong move.
        self._recent = [*self._recent[-(self._smooth - 1) :], raw] if self._smooth > 1 else [raw]
        pose = (float(np.median([p[0] for p in self._recent])), float(np.median([p[1] for p in self._recent])))
        base_yaw = float(np.median([p[0] for p in self._baseline]))
        base_pitch = float(np.median([p[1] for p in self._baseline]))
        move = self.challenges[self._step]
        d_yaw, d_pitch = pose[0] - base_yaw, pose[1] - base_pitch
        if abs(d_yaw) < 0.5 * self._yaw_delta and abs(d_pitch) < 0.5 * self._pitch_delta:
            # Back near the neutral pose: from here on, a move other than the one asked is a wrong move.
            self._armed = True
        if move is Challenge.NOD:
            along = d_pitch / self._pitch_delta
            # Nodding up instead, or a clear turn: the wrong move (a replay doing its own thing).
            against = max(-along, abs(d_yaw) / (2 * self._yaw_delta))
        else:
            along = (1.0 if move is Challenge.TURN_LEFT else -1.0) * d_yaw / self._yaw_delta
            # A turn also shifts the nose's projection on the eye line's normal, so only a large pitch change
            # (a clear nod) or a turn the other way counts as wrong.
            against = max(-along, abs(d_pitch) / (3 * self._pitch_delta))
        self._progress = max(self._progress, min(1.0, along))
        if along >= 1.0:
            self._step += 1
            if self._step == len(self.challenges):
                self._state, self._reason = ChallengeState.PASSED, "ok"
                return self._state
            # Every move is measured from the neutral pose of the session's first frames; the subject first
            # returns to it, so wrong-move checks wait until they have.
            self._armed = False
            self._recent = []
            self._step_started = now
            self._progress = 0.0
        elif self._armed and against >= 1.0:
            return self._fail(f"challenge_wrong_move_{move.value}")
        return self._state

    def result(self) -> SignalResult:
        """The challenge as a PAD signal: 1 when passed; partial progress otherwise."""
        if self._state is ChallengeState.PASSED:
            return SignalResult("challenge", 1.0, True, "ok")
        done = (self._step + self._progress) / len(self.challenges)
        reason = self._reason if self._state is ChallengeState.FAILED else "challenge_incomplete"
        return SignalResult("challenge", float(done), False, reason)

    def _fail(self, reason: str) -> ChallengeState:
        self._state, self._reason = ChallengeState.FAILED, reason
        return self._state


# ---------------------------------------------------------------- fusion


class FrameSignal(Protocol):
    """An extra RGB signal (e.g. `OnnxPadSignal`)."""

    @property
    def name(self) -> str: ...

    def score(self, rgb: RgbImage, detection: Detection) -> SignalResult: ...


@dataclass(frozen=True, slots=True)
class LivenessChecker:
    """The fusion policy. All available hardware signals (IR when an IR frame exists, depth when a depth frame
    exists) must pass, the passive texture signal must pass, every extra signal (an operator's ONNX model) must
    pass, and an active challenge must have passed when it was run; when neither IR nor depth is available the
    challenge is REQUIRED (RGB texture alone is not enough to accept). Each frame is judged on its own."""

    ir: IrSignal = IrSignal()
    depth: DepthSignal = DepthSignal()
    texture: TextureSignal | None = TextureSignal()
    extra: tuple[FrameSignal, ...] = ()
    require_challenge_without_hardware: bool = True

    def signals(
        self,
        rgb: RgbImage,
        detection: Detection,
        *,
        ir: GrayImage | None = None,
        depth: DepthImage | None = None,
        challenge: SignalResult | None = None,
    ) -> list[SignalResult]:
        """Every signal that has its input, in a fixed order (IR, depth, texture, extras, challenge)."""
        results: list[SignalResult] = []
        if ir is not None:
            results.append(self.ir.score(rgb, ir, detection))
        if depth is not None:
            results.append(self.depth.score(depth, detection))
        if self.texture is not None:
            results.append(self.texture.score(rgb, detection))
        results.extend(signal.score(rgb, detection) for signal in self.extra)
        if challenge is not None:
            results.append(challenge)
        return results

    def decide(self, results: Sequence[SignalResult], *, hardware: bool) -> LivenessDecision:
        """Fuse already-computed signal results; `hardware` says whether an IR or depth frame was available."""
        failed = [f"{r.name}:{r.reason}" for r in results if not r.passed]
        names = [r.name for r in results]
        if not hardware and self.require_challenge_without_hardware and "challenge" not in names:
            failed.append("challenge:challenge_required")
        return LivenessDecision(
            live=not failed,
            scores={r.name: round(r.score, 4) for r in results},
            failed=failed,
            method="+".join(names) if names else "none",
        )

    def assess(
        self,
        rgb: RgbImage,
        detection: Detection,
        *,
        ir: GrayImage | None = None,
        depth: DepthImage | None = None,
        challenge: SignalResult | None = None,
    ) -> LivenessDecision:
        results = self.signals(rgb, detection, ir=ir, depth=depth, challenge=challenge)
        decision = self.decide(results, hardware=ir is not None or depth is not None)
        logger.debug("liveness %s via %s (failed: %s)", decision.live, decision.method, decision.failed)
        return decision
