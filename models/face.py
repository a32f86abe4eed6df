"""The face engine: detect, gate, align, embed, and compare — 1:1 verification and 1:N identification.

Owns the composition of a FaceDetector, the chip alignment, the quality gate and a FaceEmbedder, and the decision
rule: cosine similarity of L2-normalised templates against one operating threshold, which the caller hands in
(from the embedding model's calibrated manifest block or the calibration file: `models.calibration.load_threshold`),
so the number lives in exactly one place.

Must never log a face, a template or a similarity tied to a person, keep an image beyond the call, or pick a
threshold of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from models.align import align_face
from models.calibration import CalibrationError, load_threshold
from models.detector import PARAMS_KIOSK, DetectorParams, MtcnnDetector
from models.embedder import DLIB_RESNET, DlibResnetEmbedder
from models.manifest import ModelStore
from models.quality import QualityPolicy, assess, relevant_faces
from models.types import Detection, Embedding, FaceDetector, FaceEmbedder, QualityReport, RgbImage

logger = logging.getLogger(__name__)


class FaceEngineError(Exception):
    """The engine was handed something it cannot use (a malformed template or gallery)."""


@dataclass(frozen=True, slots=True)
class FaceAnalysis:
    """One frame: every detection, the faces that count, the chosen (largest) face, its quality and template."""

    detections: list[Detection]
    faces: list[Detection]  # detections that are not tiny background faces, largest first
    face: Detection | None
    quality: QualityReport
    template: Embedding | None  # present whenever a face was found, even if the quality gate objects


@dataclass(frozen=True, slots=True)
class Verification:
    """1:1: is the probe the person of the reference template? `similarity` is None when no face was found."""

    same_person: bool
    similarity: float | None
    threshold: float
    analysis: FaceAnalysis


@dataclass(frozen=True, slots=True)
class Identification:
    """1:N: the best match in the gallery, its similarity, and whether it clears the threshold."""

    best_id: str | None  # the gallery id of the best match (None: no face, or an empty gallery)
    similarity: float | None
    matched: bool  # best similarity >= threshold
    threshold: float
    analysis: FaceAnalysis


@dataclass(frozen=True, slots=True)
class Gallery:
    """N enrolled templates `(N, D)` float32, L2-normalised, with opaque ids (never names)."""

    ids: tuple[str, ...]
    templates: NDArray[np.float32]

    def __post_init__(self) -> None:
        if self.templates.ndim != 2 or self.templates.shape[0] != len(self.ids):
            raise FaceEngineError(f"gallery: {len(self.ids)} ids but templates of shape {self.templates.shape}")
        if len(set(self.ids)) != len(self.ids):
            raise FaceEngineError("gallery: ids must be unique")
        if self.templates.shape[0] and not np.allclose(np.linalg.norm(self.templates, axis=1), 1.0, atol=1e-3):
            raise FaceEngineError("gallery: templates must be L2-normalised")


def l2_normalise(x: NDArray[np.floating]) -> NDArray[np.float32]:
    v = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    out: NDArray[np.float32] = (v / np.maximum(norm, 1e-12)).astype(np.float32)
    return out


def cosine_similarity(a: NDArray[np.floating], b: NDArray[np.floating]) -> float:
    """Cosine similarity of two templates (normalised here again, so a stored template's rounding cannot matter)."""
    if a.shape != b.shape or a.ndim != 1:
        raise FaceEngineError(f"templates must be two vectors of one length, got {a.shape} and {b.shape}")
    return float(l2_normalise(a) @ l2_normalise(b))


class FaceEngine:
    """Detector + quality gate + alignment + embedder, deciding with one calibrated cosine threshold."""

    def __init__(
        self,
        detector: FaceDetector,
        embedder: FaceEmbedder,
        quality_policy: QualityPolicy,
        threshold: float,
    ) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"a cosine threshold lies in [-1, 1], got {threshold}")
        self.detector = detector
        self.embedder = embedder
        self.quality_policy = quality_policy
        self.threshold = threshold

    def analyse(self, rgb: RgbImage) -> FaceAnalysis:
        detections = self.detector.detect(rgb)
        faces = relevant_faces(detections, self.quality_policy)
        if not faces:
            _, report = assess(rgb, detections, self.quality_policy)
            return FaceAnalysis(detections=detections, faces=[], face=None, quality=report, template=None)
        chip = align_face(rgb, faces[0].landmarks, self.embedder.chip_size)
        face, report = assess(rgb, detections, self.quality_policy, chip=chip)
        template = self.embedder.embed(chip[None])[0]
        return FaceAnalysis(detections=detections, faces=faces, face=face, quality=report, template=template)

    def verify(self, probe_rgb: RgbImage, reference_template: Embedding) -> Verification:
        analysis = self.analyse(probe_rgb)
        if analysis.template is None:
            return Verification(same_person=False, similarity=None, threshold=self.threshold, analysis=analysis)
        similarity = cosine_similarity(analysis.template, reference_template)
        return Verification(
            same_person=similarity >= self.threshold,
            similarity=similarity,
            threshold=self.threshold,
            analysis=analysis,
        )

    def identify(self, probe_rgb: RgbImage, gallery: Gallery) -> Identification:
        analysis = self.analyse(probe_rgb)
        if analysis.template is None or not gallery.ids:
            return Identification(
                best_id=None, similarity=None, matched=False, threshold=self.threshold, analysis=analysis
            )
        if gallery.templates.shape[1] != analysis.template.shape[0]:
            raise FaceEngineError(
                f"gallery templates have {gallery.templates.shape[1]} dimensions, the embedder makes "
                f"{analysis.template.shape[0]}"
            )
        scores = gallery.templates @ l2_normalise(analysis.template)
        best = int(np.argmax(scores))
        similarity = float(scores[best])
        return Identification(
            best_id=gallery.ids[best],
            similarity=similarity,
            matched=similarity >= self.threshold,
            threshold=self.threshold,
            analysis=analysis,
        )


def engine_from_store(
    store: ModelStore,
    *,
    detector_params: DetectorParams = PARAMS_KIOSK,
    quality_policy: QualityPolicy | None = None,
    calibration_file: Path | None = None,
    embedder_model: str = DLIB_RESNET,
) -> FaceEngine:
    """The engine from verified models: MTCNN, the dlib ResNet, and the threshold from the embedder's manifest
    (`[threshold]`), else from `calibration_file` (which must name the same model sha256).

    Raises ModelLoadError (a model is missing or disagrees with its manifest) or CalibrationError (no threshold).
    """
    detector = MtcnnDetector.from_store(store, detector_params)
    loaded = store.load(embedder_model)
    block = loaded.manifest.threshold
    if block is not None and block.metric != "cosine":
        raise CalibrationError(f"model {embedder_model}: threshold metric {block.metric!r}, the engine compares cosine")
    threshold = load_threshold(block.value if block is not None else None, calibration_file, loaded.sha256)
    logger.info("face engine: threshold %.4f from %s", threshold.value, threshold.origin)
    return FaceEngine(detector, DlibResnetEmbedder(loaded), quality_policy or QualityPolicy(), threshold.value)
