"""`yibao bench vision`: latency of every vision step at 640×480 on this machine, and the face_recognition library
(dlib's HOG detector + the same ResNet) measured side by side on the same frames, speed and accuracy.

Owns the benchmark only: frames are the development face photos letterboxed to 640×480 (what the kiosk camera
delivers), each step is timed over many repetitions after a warm-up, and the output is ONE JSON line (medians and
p95 in milliseconds, peak RSS). It must never be run by the test suite as a timing assertion (the bars are checked
by reading its output; docs/benchmarks.md records the figures with the command and the machine).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

FRAME_W, FRAME_H = 640, 480


def letterbox(bgr: NDArray[np.uint8], width: int = FRAME_W, height: int = FRAME_H) -> NDArray[np.uint8]:
    """Fit an image into width×height without distortion, padding with grey (a camera frame's shape)."""
    h, w = bgr.shape[:2]
    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.full((height, width, 3), 114, dtype=np.uint8)
    x0, y0 = (width - nw) // 2, (height - nh) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = resized
    return out


def load_rgb_frames(paths: Sequence[Path]) -> list[NDArray[np.uint8]]:
    frames = []
    for path in paths:
        decoded = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise ValueError(f"{path} is not a readable image")
        bgr: NDArray[np.uint8] = np.asarray(decoded, dtype=np.uint8)
        rgb: NDArray[np.uint8] = np.ascontiguousarray(cv2.cvtColor(letterbox(bgr), cv2.COLOR_BGR2RGB), dtype=np.uint8)
        frames.append(rgb)
    return frames


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p95_ms: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"median_ms": round(self.median_ms, 2), "p95_ms": round(self.p95_ms, 2), "n": self.n}


def time_calls(fn: Callable[[int], object], repeats: int, *, warmup: int = 3) -> Timing:
    """Time `fn(i)` for i in range(repeats) after `warmup` untimed calls; milliseconds."""
    for i in range(warmup):
        fn(i)
    samples = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - start) * 1000.0)
    samples.sort()
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    return Timing(statistics.median(samples), p95, len(samples))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def pair_accuracy(people: dict[str, list[int]], same: Callable[[int, int], bool | None]) -> dict[str, float | int]:
    """True-accept and false-accept counts over every genuine and impostor pair of frame indices.

    `same(i, j)` returns None when either frame has no usable face: that pair counts as a failure to acquire (a
    genuine pair not accepted; an impostor pair not falsely accepted), so a detector that finds nothing cannot
    look accurate.
    """
    owner = {i: person for person, idx in people.items() for i in idx}
    genuine = accepted = impostor = false_accepts = not_acquired = 0
    for i, j in combinations(sorted(owner), 2):
        verdict = same(i, j)
        if verdict is None:
            not_acquired += 1
        if owner[i] == owner[j]:
            genuine += 1
            accepted += bool(verdict)
        else:
            impostor += 1
            false_accepts += bool(verdict)
    return {
        "genuine_pairs": genuine,
        "true_accepts": accepted,
        "tar": round(accepted / genuine, 4) if genuine else 0.0,
        "impostor_pairs": impostor,
        "false_accepts": false_accepts,
        "far": round(false_accepts / impostor, 4) if impostor else 0.0,
        "pairs_without_face": not_acquired,
    }


def bench_face_recognition(
    frames: list[NDArray[np.uint8]], people: dict[str, list[int]], repeats: int
) -> dict[str, Any]:
    """The face_recognition library as people use it: HOG detector (1 upsample), its default encoder, tolerance 0.6."""
    import face_recognition  # dev dependency: only this comparison needs it

    def detect(i: int) -> list[tuple[int, int, int, int]]:
        return list(face_recognition.face_locations(frames[i % len(frames)]))

    def largest(locations: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
        return sorted(locations, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]), reverse=True)[:1]

    locations = [largest(detect(i)) for i in range(len(frames))]
    usable = [i for i, loc in enumerate(locations) if loc]

    def encode(i: int) -> object:
        k = usable[i % len(usable)]
        return face_recognition.face_encodings(frames[k], locations[k])

    reference = face_recognition.face_encodings(frames[usable[0]], locations[usable[0]])[0]

    def verify(i: int) -> bool:
        frame = frames[i % len(frames)]
        found = largest(list(face_recognition.face_locations(frame)))
        if not found:
            return False
        encoding = face_recognition.face_encodings(frame, found)[0]
        return bool(face_recognition.face_distance([reference], encoding)[0] <= 0.6)

    encodings: dict[int, NDArray[np.float64]] = {
        k: face_recognition.face_encodings(frames[k], locations[k])[0] for k in usable
    }

    def same(i: int, j: int) -> bool | None:
        if i not in encodings or j not in encodings:
            return None
        return bool(np.linalg.norm(encodings[i] - encodings[j]) <= 0.6)

    return {
        "detection": time_calls(detect, repeats).as_dict(),
        "embedding": time_calls(encode, repeats).as_dict(),
        "verify_1to1": time_calls(verify, repeats).as_dict(),
        "faces_found": f"{len(usable)}/{len(frames)}",
        "accuracy": {"threshold": "distance <= 0.6", **pair_accuracy(people, same)},
    }
