"""`yibao verify face IMG_A IMG_B`: is it the same person, on any two JPEG/PNG photos?

Owns reading arbitrary image files (bytes -> cv2.imdecode, so non-ASCII paths work; EXIF orientation applied),
building the face engine from the model store with the photo-friendly detector and quality settings, and the
command's JSON/sentence output. The decision itself is `models.face.FaceEngine.verify`'s.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.calibration import CalibrationError, load_threshold
from models.detector import PARAMS_PHOTOS, MtcnnDetector
from models.face import FaceAnalysis, FaceEngine, cosine_similarity
from models.manifest import ModelLoadError, ModelStore
from models.quality import QualityPolicy, message
from models.types import FaceEmbedder, RgbImage

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
EMBEDDER_MODEL = "dlib_resnet"
DEFAULT_CALIBRATION_FILE = Path(__file__).resolve().parent.parent / "models" / "calibration.json"


class ImageReadError(Exception):
    """A file that is not a readable image."""


class EngineUnavailableError(Exception):
    """The face engine cannot be built: a model is missing or unverified, or no threshold is calibrated."""


def read_rgb(path: Path) -> RgbImage:
    """An RGB uint8 image from any JPEG/PNG file; EXIF orientation applied (cv2.IMREAD_COLOR does so)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not data:
        raise ImageReadError(f"{path} is empty")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageReadError(f"{path} is not an image OpenCV can decode (JPEG, PNG, BMP, WebP)")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def load_embedder(store: ModelStore) -> FaceEmbedder:
    """The dlib ResNet embedder on onnxruntime, through the store (`yibao models build` makes its ONNX file)."""
    # Imported by name until face-core's models.embedder lands on this branch (then: a plain import).
    module = importlib.import_module("models.embedder")
    embedder: FaceEmbedder = module.DlibResnetEmbedder.from_store(store)
    return embedder


def build_engine(
    models_dir: Path | None = None,
    calibration_file: Path | None = DEFAULT_CALIBRATION_FILE,
    *,
    embedder: FaceEmbedder | None = None,
    embedder_sha256: str | None = None,
    store: ModelStore | None = None,
) -> FaceEngine:
    """The engine for arbitrary photos (faces down to 40 px). `embedder` overrides the store's (tests, reference)."""
    try:
        the_store = store or ModelStore(models_dir)
        detector = MtcnnDetector.from_store(the_store, PARAMS_PHOTOS)
        manifest_threshold: float | None = None
        sha: str | None = embedder_sha256
        if embedder is None:
            loaded = the_store.load(EMBEDDER_MODEL)
            manifest = loaded.manifest
            manifest_threshold = manifest.threshold.value if manifest.threshold is not None else None
            sha = manifest.sha256
            embedder = load_embedder(the_store)
        threshold = load_threshold(manifest_threshold, calibration_file, sha)
    except (ModelLoadError, CalibrationError) as exc:
        raise EngineUnavailableError(str(exc)) from exc
    logger.info("face engine ready; threshold %.4f from %s", threshold.value, threshold.origin)
    return FaceEngine(detector, embedder, QualityPolicy.for_photos(), threshold.value)


@dataclass(frozen=True, slots=True)
class FaceComparison:
    same_person: bool | None
    similarity: float | None
    threshold: float
    faces_a: int
    faces_b: int
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "same_person": self.same_person,
            "similarity": None if self.similarity is None else round(self.similarity, 4),
            "threshold": round(self.threshold, 4),
            "faces_a": self.faces_a,
            "faces_b": self.faces_b,
            "notes": list(self.notes),
        }

    def sentence(self) -> str:
        if self.same_person is None:
            verdict = "Cannot compare"
        elif self.same_person:
            verdict = "Same person"
        else:
            verdict = "Different people"
        score = (
            f" (similarity {self.similarity:.3f}, threshold {self.threshold:.3f})"
            if self.similarity is not None
            else ""
        )
        extra = f". Note: {'; '.join(self.notes)}" if self.notes else ""
        return f"{verdict}{score}{extra}."


def _notes(label: str, analysis: FaceAnalysis) -> list[str]:
    out: list[str] = []
    if not analysis.faces:
        out.append(f"no face found in image {label}")
    elif len(analysis.faces) > 1:
        out.append(f"{len(analysis.faces)} faces in image {label}: compared the largest")
    for issue in analysis.quality.issues:
        if analysis.faces and issue.value not in {"multiple_faces", "no_face"}:
            out.append(f"image {label}: {message(issue, 'en').lower()} ({issue.value})")
    return out


def compare_photos(engine: FaceEngine, path_a: Path, path_b: Path) -> FaceComparison:
    """Reads both files (ImageReadError if one is not an image) and compares their largest faces."""
    a = engine.analyse(read_rgb(path_a))
    b = engine.analyse(read_rgb(path_b))
    notes = _notes("A", a) + _notes("B", b)
    if a.template is None or b.template is None:
        return FaceComparison(None, None, engine.threshold, len(a.faces), len(b.faces), tuple(notes))
    similarity = cosine_similarity(a.template, b.template)
    return FaceComparison(
        similarity >= engine.threshold, similarity, engine.threshold, len(a.faces), len(b.faces), tuple(notes)
    )


def render(result: FaceComparison, as_json: bool) -> str:
    return json.dumps(result.to_dict(), ensure_ascii=False) if as_json else result.sentence()
