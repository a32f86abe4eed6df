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

from hardware_sim.camera_sim import letterbox
from models.types import FaceDetector
from yibao.verify_face import read_rgb

FRAME_W, FRAME_H = 640, 480


def load_rgb_frames(paths: Sequence[Path]) -> list[NDArray[np.uint8]]:
    """Photos as the kiosk camera delivers frames: RGB, letterboxed to 640x480."""
    return [letterbox(read_rgb(path), FRAME_W, FRAME_H) for path in paths]


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

    return {
        "detection": time_calls(detect, repeats).as_dict(),
        "embedding": time_calls(encode, repeats).as_dict(),
        "verify_1to1": time_calls(verify, repeats).as_dict(),
        "accuracy": face_recognition_accuracy(frames, people),
        "accuracy_degraded": face_recognition_accuracy([degrade(f) for f in frames], people),
    }


def face_recognition_accuracy(frames: list[NDArray[np.uint8]], people: dict[str, list[int]]) -> dict[str, Any]:
    """Pair accuracy of face_recognition (HOG, 1 upsample; largest face; distance <= 0.6) on these frames."""
    import face_recognition  # dev dependency: only this comparison needs it

    encodings: dict[int, NDArray[np.float64]] = {}
    for k, frame in enumerate(frames):
        found = sorted(face_recognition.face_locations(frame), key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))
        if found:
            encodings[k] = face_recognition.face_encodings(frame, found[-1:])[0]

    def same(i: int, j: int) -> bool | None:
        if i not in encodings or j not in encodings:
            return None
        return bool(np.linalg.norm(encodings[i] - encodings[j]) <= 0.6)

    return {
        "threshold": "distance <= 0.6",
        "faces_found": f"{len(encodings)}/{len(frames)}",
        **pair_accuracy(people, same),
    }


def degrade(rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """A harder kiosk frame from a good one: the person twice as far away (half scale, re-centred in the same
    640x480), a slightly soft lens (Gaussian sigma 1.2) and a dim hall (70 % brightness)."""
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    out = np.full_like(rgb, 114)
    y0, x0 = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    out[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    soft = cv2.GaussianBlur(out, (0, 0), 1.2)
    return np.asarray(np.clip(soft.astype(np.float32) * 0.7, 0, 255), dtype=np.uint8)


def package_face_frames(detector: FaceDetector) -> tuple[list[NDArray[np.uint8]], list[str]]:
    """Every face (at least 40 px) in the package-shipped photos (`yibao.calibrate.PACKAGE_FACE_PHOTOS`), each
    cropped with a wide margin and letterboxed to 640x480, with a distinct identity per face."""
    from yibao.calibrate import package_photo_paths

    frames: list[NDArray[np.uint8]] = []
    names: list[str] = []
    for path in package_photo_paths():
        rgb = read_rgb(path)
        height, width = rgb.shape[:2]
        for k, face in enumerate(d for d in detector.detect(rgb) if min(d.width, d.height) >= 40):
            x0, y0, x1, y1 = face.box
            mx, my = 0.8 * (x1 - x0), 0.8 * (y1 - y0)
            crop = rgb[
                max(0, int(y0 - my)) : min(height, int(y1 + my)), max(0, int(x0 - mx)) : min(width, int(x1 + mx))
            ]
            frames.append(np.ascontiguousarray(letterbox(np.ascontiguousarray(crop)), dtype=np.uint8))
            names.append(f"package:{path.name}#{k}")
    return frames, names


def _people(paths: Sequence[Path], root: Path) -> dict[str, list[int]]:
    people: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        people.setdefault(path.relative_to(root).parts[0], []).append(i)
    return people


def _independent_photos(faces_dir: Path) -> list[Path]:
    """One file per distinct shot: the resolution ladder (obama_res_*) is the same portrait as obama_a, so only
    obama_a counts (pairs of copies would flatter any matcher)."""
    photos: list[Path] = []
    for person in sorted(p for p in faces_dir.iterdir() if p.is_dir() and p.name not in {"group", "video"}):
        photos.extend(
            p
            for p in sorted(person.iterdir())
            if p.suffix.lower() in {".jpg", ".jpeg", ".png"} and not p.stem.startswith("obama_res_")
        )
    return photos


def run_vision_bench(
    faces_dir: Path,
    *,
    repeats: int = 60,
    qr_codes: int = 300,
    models_dir: Path | None = None,
    compare: bool = True,
) -> dict[str, Any]:
    """Every figure of `yibao bench vision` as one JSON-able dict."""
    from drivers.qr_decode import FrameQrScanner, decode_qr
    from hardware_sim.camera_sim import Presentation, synthesize
    from hardware_sim.qr_images import degraded_set, load_backgrounds, measure_stream
    from models.align import align_face
    from models.detector import PARAMS_PHOTOS
    from models.face import Gallery, engine_from_store, l2_normalise
    from models.liveness import LivenessChecker
    from models.manifest import ModelStore

    started = time.perf_counter()
    paths = _independent_photos(faces_dir)
    frames = load_rgb_frames(paths)
    people = _people(paths, faces_dir)
    store = ModelStore(models_dir) if models_dir is not None else ModelStore()
    engine = engine_from_store(store)
    detector = engine.detector

    # Frames the kiosk's quality gate accepts (a real kiosk frame: one face, close enough, sharp)
    # (frame index, its face, its template) for every frame the gate accepts
    accepted = [
        (i, a.face, a.template)
        for i, a in enumerate(engine.analyse(f) for f in frames)
        if a.quality.ok and a.face is not None and a.template is not None
    ]
    if not accepted:
        raise ValueError(f"no photo under {faces_dir} passes the kiosk quality gate at {FRAME_W}x{FRAME_H}")
    good = [i for i, _, _ in accepted]
    reference = accepted[0][2]

    def detect(i: int) -> object:
        return detector.detect(frames[good[i % len(good)]])

    def align_embed(i: int) -> object:
        k, face, _ = accepted[i % len(accepted)]
        return engine.embedder.embed(align_face(frames[k], face.landmarks, engine.embedder.chip_size)[None])

    def verify(i: int) -> object:
        return engine.verify(frames[good[i % len(good)]], reference)

    templates = [t for _, _, t in accepted]
    flipped = [engine.analyse(np.ascontiguousarray(frames[k][:, ::-1])).template for k in good]
    rows = [t for t in templates + flipped if t is not None]
    rng = np.random.default_rng(50)
    while len(rows) < 50:
        rows.append(l2_normalise(rng.standard_normal(int(rows[0].shape[0]))))
    gallery = Gallery(ids=tuple(f"staff-{n:03d}" for n in range(50)), templates=l2_normalise(np.stack(rows[:50])))

    def identify(i: int) -> object:
        return engine.identify(frames[good[i % len(good)]], gallery)

    checker = LivenessChecker()
    synth_rng = np.random.default_rng(7)
    live_frames = []
    for k, face, _ in accepted:
        s = synthesize(frames[k], face, Presentation.BONA_FIDE, synth_rng)
        live_frames.append((s.rgb, s.ir, s.depth, s.detection or face))

    def liveness(i: int) -> object:
        rgb, ir, depth, face = live_frames[i % len(live_frames)]
        return checker.assess(rgb, face, ir=ir, depth=depth)

    # Accuracy on every photo (not only the kiosk-quality ones), with the photo detector settings, as the
    # face_recognition side below also sees every photo
    from models.detector import MtcnnDetector

    photo_engine = type(engine)(
        MtcnnDetector.from_store(store, PARAMS_PHOTOS), engine.embedder, engine.quality_policy, engine.threshold
    )

    def accuracy(
        images: list[NDArray[np.uint8]], *, kiosk_gate: bool = False, owners: dict[str, list[int]] = people
    ) -> dict[str, Any]:
        # kiosk_gate: a frame the kiosk's quality gate refuses yields no template (the kiosk asks for another)
        gate = engine if kiosk_gate else photo_engine
        templates = {}
        for i, image in enumerate(images):
            analysis = gate.analyse(image)
            templates[i] = analysis.template if (analysis.quality.ok or not kiosk_gate) else None

        def same(i: int, j: int) -> bool | None:
            a, b = templates[i], templates[j]
            if a is None or b is None:
                return None
            return bool(float(l2_normalise(a) @ l2_normalise(b)) >= engine.threshold)

        found = sum(1 for t in templates.values() if t is not None)
        return {
            "threshold": f"cosine >= {engine.threshold}" + (", kiosk quality gate" if kiosk_gate else ""),
            "faces_found": f"{found}/{len(images)}",
            **pair_accuracy(owners, same),
        }

    # The faces in package-shipped photos (six East Asian people in insightface's t1.jpg, one more) as extra
    # identities: each cropped around its detection and letterboxed, so both pipelines see one face per frame
    extra_frames, extra_people = package_face_frames(photo_engine.detector)
    wide_frames = frames + extra_frames
    wide_people = {**people, **{p: [len(frames) + i] for i, p in enumerate(extra_people)}}

    ours: dict[str, Any] = {
        "detection": time_calls(detect, repeats).as_dict(),
        "align_embedding": time_calls(align_embed, repeats).as_dict(),
        "liveness": time_calls(liveness, repeats).as_dict(),
        "verify_1to1": time_calls(verify, repeats).as_dict(),
        "identify_1toN_50": time_calls(identify, repeats).as_dict(),
        "accuracy": accuracy(frames),
        "accuracy_degraded": accuracy([degrade(f) for f in frames]),
        "accuracy_degraded_kiosk_gate": accuracy([degrade(f) for f in frames], kiosk_gate=True),
        "accuracy_with_package_faces": accuracy(wide_frames, owners=wide_people),
    }
    rss_face_mb = peak_rss_mb()  # models, frames and the face pipeline; before the QR set is generated

    qr_samples = degraded_set(paths, qr_codes, seed=20261201)
    qr_frames = [sample.image for sample in qr_samples]
    scanner = FrameQrScanner()

    def qr_stream(i: int) -> object:
        return scanner.scan(qr_frames[i % len(qr_frames)])

    def qr_still(i: int) -> object:
        return decode_qr(qr_frames[i % len(qr_frames)], qr_only=True)

    stream = measure_stream(qr_samples, load_backgrounds(paths))
    stills_decoded = sum(1 for smp in qr_samples if any(c.text == smp.text for c in decode_qr(smp.image, qr_only=True)))

    result: dict[str, Any] = {
        "bench": "vision",
        "frame": f"{FRAME_W}x{FRAME_H}",
        "photos": len(frames),
        "kiosk_quality_frames": len(good),
        "repeats": repeats,
        "ours": ours,
        "qr": {
            # The kiosk camera loop: every frame gets one zxing-cpp pass plus one preprocessing pass (the bar)
            "per_frame": time_calls(qr_stream, len(qr_frames)).as_dict(),
            "per_frame_without_code_median_ms": round(stream.no_code_median_ms, 2),
            "stream_decoded": f"{stream.decoded}/{stream.total}",
            "stream_mean_frames_to_decode": round(stream.mean_frames_to_decode, 2),
            # A still (the e-voucher path on a photo): the whole ladder, then pyzbar, until something decodes
            "still_photo": time_calls(qr_still, len(qr_frames)).as_dict(),
            "still_decoded": f"{stills_decoded}/{len(qr_samples)}",
            "set": f"{qr_codes} degraded QR codes in the face photos, seed 20261201 (hardware_sim.qr_images)",
        },
    }
    if compare:
        theirs = bench_face_recognition(frames, people, repeats)
        theirs["accuracy_with_package_faces"] = face_recognition_accuracy(wide_frames, wide_people)
        result["face_recognition"] = theirs
        result["speedup_vs_face_recognition"] = {
            step: round(theirs[step]["median_ms"] / ours[mine]["median_ms"], 1)
            for step, mine in (
                ("detection", "detection"),
                ("embedding", "align_embedding"),
                ("verify_1to1", "verify_1to1"),
            )
        }
    qr_figures: dict[str, Any] = result["qr"]
    result["bars"] = {
        "verify_1to1_median_le_40ms": ours["verify_1to1"]["median_ms"] <= 40.0,
        "identify_1toN_50_median_le_45ms": ours["identify_1toN_50"]["median_ms"] <= 45.0,
        "qr_per_frame_median_le_5ms": qr_figures["per_frame"]["median_ms"] <= 5.0,
    }
    result["peak_rss_mb_face_pipeline"] = round(rss_face_mb, 1)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)  # whole run: + the 300 synthetic QR frames (+ dlib when compared)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result
