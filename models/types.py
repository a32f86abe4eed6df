"""The shapes every face component speaks: detections with five landmarks, aligned chips, embeddings, quality.

Owns only plain data types and the small Protocols the detector and the embedder present, so the face pipeline,
liveness, the PAD harness, the benchmark and the terminal's verification session can be written against them
independently. Arrays are numpy: images are RGB `uint8` `(H, W, 3)`; IR frames `uint8` `(H, W)`; depth frames
`uint16` millimetres `(H, W)` with 0 meaning "no reading". Must never import `terminal`, `drivers` or
`hardware_sim`, and never hold a face image longer than the call that was handed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

RgbImage = NDArray[np.uint8]
"""An RGB image, `(H, W, 3)` uint8 (convert from OpenCV's BGR once, at the driver boundary)."""

GrayImage = NDArray[np.uint8]
"""A single-channel image, `(H, W)` uint8 (IR frames)."""

DepthImage = NDArray[np.uint16]
"""A depth frame, `(H, W)` uint16 millimetres; 0 = no reading."""

Embedding = NDArray[np.float32]
"""A face template: `(D,)` float32 (D = 128 for the dlib ResNet)."""

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
"""Order of the five landmarks. "left" is the image's left (the subject's right eye), as MTCNN reports them."""


@dataclass(frozen=True, slots=True)
class Detection:
    """One face found in an image: box in pixels `(x0, y0, x1, y1)`, detector score in [0, 1], five landmarks."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: NDArray[np.float32]  # (5, 2) x, y in image pixels, LANDMARK_NAMES order

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


class QualityIssue(StrEnum):
    """Why a frame is not good enough to verify; each has a message the kiosk shows (models.quality)."""

    NO_FACE = "no_face"
    MULTIPLE_FACES = "multiple_faces"
    FACE_TOO_SMALL = "face_too_small"
    FACE_CUT_OFF = "face_cut_off"
    POSE = "pose"
    BLUR = "blur"
    TOO_DARK = "too_dark"
    TOO_BRIGHT = "too_bright"


@dataclass(frozen=True, slots=True)
class QualityReport:
    """The quality gate's verdict on one frame; `ok` only when `issues` is empty."""

    issues: tuple[QualityIssue, ...]
    measures: dict[str, float] = field(default_factory=dict)  # face_px, yaw_deg, pitch_deg, sharpness, brightness

    @property
    def ok(self) -> bool:
        return not self.issues


class FaceDetector(Protocol):
    """Finds faces with five landmarks in an RGB image; results sorted by score, best first."""

    def detect(self, rgb: RgbImage) -> list[Detection]: ...


class FaceEmbedder(Protocol):
    """Maps aligned face chips `(N, S, S, 3)` uint8 RGB to L2-normalised templates `(N, D)` float32."""

    @property
    def chip_size(self) -> int: ...

    @property
    def model_sha256(self) -> str:
        """sha256 of the model file: templates of different models are never compared."""
        ...

    def embed(self, chips: NDArray[np.uint8]) -> NDArray[np.float32]: ...
