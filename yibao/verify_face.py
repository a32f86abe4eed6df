"""`yibao verify face IMG_A IMG_B`: is it the same person, on any two JPEG/PNG photos?

Owns reading arbitrary image files (bytes -> cv2.imdecode, so non-ASCII paths work; EXIF orientation applied),
building the face engine from the model store with the photo-friendly detector and quality settings, and the
command's JSON/sentence output. The decision itself is `models.face.FaceEngine.verify`'s.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.calibration import CalibrationError
from models.detector import PARAMS_PHOTOS
from models.face import FaceAnalysis, FaceEngine, cosine_similarity, engine_from_store
from models.manifest import ModelLoadError, ModelStore
from models.quality import QualityPolicy, message
from models.types import RgbImage

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
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


def build_engine(
    models_dir: Path | None = None,
    calibration_file: Path | None = DEFAULT_CALIBRATION_FILE,
    *,
    store: ModelStore | None = None,
) -> FaceEngine:
    """The engine for arbitrary photos: faces down to 40 px, the photo quality policy, the calibrated threshold."""
    try:
        return engine_from_store(
            store or ModelStore(models_dir),
            detector_params=PARAMS_PHOTOS,
            quality_policy=QualityPolicy.for_photos(),
            calibration_file=calibration_file,
        )
    except (ModelLoadError, CalibrationError) as exc:
        raise EngineUnavailableError(str(exc)) from exc


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
