"""The face quality gate: is this frame good enough to verify, and if not, what should the user do?

Owns the policy (thresholds), the measures (face size, pose from the five landmarks, sharpness, brightness) and the
plain-words messages the kiosk shows for each QualityIssue, in Chinese and English, written for elderly users.
Measures are taken on the aligned 150x150 chip where they concern the face itself, so they do not depend on how
large the face is in the frame (face size is its own check).

Must never log a face, keep an image beyond the call, or decide identity: it only says whether to try.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from models.align import CHIP_SIZE, CHIP_TEMPLATE_150, align_face
from models.types import Detection, QualityIssue, QualityReport, RgbImage

# What the kiosk says, per issue: (Chinese, English). Short, plain, telling the user what to do.
MESSAGES: dict[QualityIssue, tuple[str, str]] = {
    QualityIssue.NO_FACE: ("没有看到人脸，请站在摄像头前", "No face seen. Please stand in front of the camera"),
    QualityIssue.MULTIPLE_FACES: ("请只留一人在镜头前", "Only one person in front of the camera, please"),
    QualityIssue.FACE_TOO_SMALL: ("请靠近一点", "Please come a little closer"),
    QualityIssue.FACE_CUT_OFF: ("请把脸移到画面中间", "Please move your face to the middle of the screen"),
    QualityIssue.POSE: ("请正对摄像头", "Please look straight at the camera"),
    QualityIssue.BLUR: ("请保持不动", "Please hold still"),
    QualityIssue.TOO_DARK: ("光线太暗，请面向亮处", "Too dark. Please face the light"),
    QualityIssue.TOO_BRIGHT: ("光线太亮，请避开强光", "Too bright. Please move out of the strong light"),
}

# Depth of the nose tip in front of the eye plane, as a fraction of the distance between the eye centres, and in
# front of the eye-mouth line as a fraction of the eye-to-mouth height: a rough adult average, enough to turn
# landmark offsets into angles that are right to a few degrees near frontal (what the gate needs).
NOSE_DEPTH_PER_EYE_DISTANCE = 0.55
NOSE_DEPTH_PER_EYE_MOUTH_HEIGHT = 0.5
_T = CHIP_TEMPLATE_150
# Where the nose sits between the eye line and the mouth line on a frontal face (from the chip template).
FRONTAL_NOSE_RATIO = float(
    (_T[2, 1] - (_T[0, 1] + _T[1, 1]) / 2) / ((_T[3, 1] + _T[4, 1]) / 2 - (_T[0, 1] + _T[1, 1]) / 2)
)
# The part of the chip that is face (cheeks, eyes, nose, mouth), without hair and background.
FACE_REGION = (slice(35, 120), slice(35, 115))


@dataclass(frozen=True, slots=True)
class QualityPolicy:
    """Thresholds of the gate. Defaults suit the kiosk camera at 640x480; `for_photos()` suits arbitrary photos."""

    min_face_px: float = 80.0  # box width of the chosen face
    background_fraction: float = 0.5  # faces narrower than this fraction of the largest are background, ignored
    edge_margin: float = 0.05  # box may leave the frame by at most this fraction of its width
    max_yaw_deg: float = 25.0
    max_pitch_deg: float = 25.0
    min_sharpness: float = 40.0  # variance of the Laplacian on the chip's face region
    min_brightness: float = 55.0  # mean grey level of the face region
    max_brightness: float = 210.0
    max_saturated_fraction: float = 0.25  # fraction of face pixels at >= 250 (blown out)

    @classmethod
    def for_photos(cls) -> QualityPolicy:
        """Arbitrary photos (the CLI): smaller faces are fine; the rest as at the kiosk."""
        return cls(min_face_px=40.0)


def message(issue: QualityIssue, lang: str = "zh") -> str:
    """The kiosk's message for an issue; `lang` is "zh" or "en"."""
    zh, en = MESSAGES[issue]
    return zh if lang == "zh" else en


def face_area(d: Detection) -> float:
    return max(d.width, 0.0) * max(d.height, 0.0)


def relevant_faces(detections: list[Detection], policy: QualityPolicy) -> list[Detection]:
    """Faces that count, largest first: those at least `background_fraction` as wide as the largest."""
    if not detections:
        return []
    ordered = sorted(detections, key=face_area, reverse=True)
    largest = ordered[0].width
    return [d for d in ordered if d.width >= policy.background_fraction * largest]


def estimate_pose(landmarks: NDArray[np.floating]) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from the five landmarks; yaw > 0: nose towards the image's right."""
    pts = np.asarray(landmarks, dtype=np.float64)
    le, re_ = pts[0], pts[1]
    roll = math.degrees(math.atan2(re_[1] - le[1], re_[0] - le[0]))
    # Undo the roll about the eye midpoint so yaw and pitch read along the face's own axes.
    c, s = math.cos(math.radians(-roll)), math.sin(math.radians(-roll))
    rot = np.array([[c, -s], [s, c]])
    mid_eye = (le + re_) / 2
    p = (pts - mid_eye) @ rot.T
    eye_dist = float(p[1, 0] - p[0, 0])
    mouth_mid = (p[3] + p[4]) / 2
    height = float(mouth_mid[1])
    if eye_dist <= 1e-6 or height <= 1e-6:
        return 90.0, 90.0, roll  # eyes crossed over or mouth above the eyes: as far from frontal as it gets
    # Nose offset against the midline of eyes and mouth (the mouth moves with yaw less than the nose).
    midline_x = (0.0 + float(mouth_mid[0])) / 2
    yaw = math.degrees(math.atan((float(p[2, 0]) - midline_x) / eye_dist / NOSE_DEPTH_PER_EYE_DISTANCE))
    ratio = float(p[2, 1]) / height
    pitch = math.degrees(math.atan((ratio - FRONTAL_NOSE_RATIO) / NOSE_DEPTH_PER_EYE_MOUTH_HEIGHT))
    return yaw, pitch, roll


def sharpness(chip: NDArray[np.uint8]) -> float:
    """Variance of the Laplacian on the chip's face region (the chip's fixed size normalises it by face size)."""
    grey = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)[FACE_REGION]
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def exposure(chip: NDArray[np.uint8]) -> tuple[float, float]:
    """(mean grey level, fraction of blown-out pixels) on the chip's face region."""
    grey = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)[FACE_REGION]
    return float(grey.mean()), float((grey >= 250).mean())


def cut_off(d: Detection, height: int, width: int, margin: float) -> bool:
    """The face leaves the frame: its box crosses an edge by more than `margin` of its width, or a landmark does."""
    slack = margin * max(d.width, 1.0)
    x0, y0, x1, y1 = d.box
    if x0 < -slack or y0 < -slack or x1 > width + slack or y1 > height + slack:
        return True
    lm = d.landmarks
    return bool((lm[:, 0] < 0).any() or (lm[:, 1] < 0).any() or (lm[:, 0] >= width).any() or (lm[:, 1] >= height).any())


def assess(
    rgb: RgbImage,
    detections: list[Detection],
    policy: QualityPolicy,
    chip: NDArray[np.uint8] | None = None,
) -> tuple[Detection | None, QualityReport]:
    """The chosen face (the largest) and the gate's report. `chip`: the chosen face's aligned chip, if made already."""
    faces = relevant_faces(detections, policy)
    if not faces:
        return None, QualityReport(issues=(QualityIssue.NO_FACE,), measures={"faces": 0.0})
    face = faces[0]
    issues: list[QualityIssue] = []
    measures: dict[str, float] = {"faces": float(len(faces)), "face_px": face.width}
    if len(faces) > 1:
        issues.append(QualityIssue.MULTIPLE_FACES)
    if face.width < policy.min_face_px:
        issues.append(QualityIssue.FACE_TOO_SMALL)
    height, width = rgb.shape[:2]
    if cut_off(face, height, width, policy.edge_margin):
        issues.append(QualityIssue.FACE_CUT_OFF)
    yaw, pitch, roll = estimate_pose(face.landmarks)
    measures.update(yaw_deg=yaw, pitch_deg=pitch, roll_deg=roll)
    if abs(yaw) > policy.max_yaw_deg or abs(pitch) > policy.max_pitch_deg:
        issues.append(QualityIssue.POSE)
    the_chip = chip if chip is not None else align_face(rgb, face.landmarks, CHIP_SIZE)
    sharp = sharpness(the_chip)
    bright, blown = exposure(the_chip)
    measures.update(sharpness=sharp, brightness=bright, saturated_fraction=blown)
    if bright < policy.min_brightness:
        issues.append(QualityIssue.TOO_DARK)
    elif bright > policy.max_brightness or blown > policy.max_saturated_fraction:
        issues.append(QualityIssue.TOO_BRIGHT)
    # A dark face has little contrast anyway: call it dark, not blurred, so the user gets the helpful instruction.
    if sharp < policy.min_sharpness and QualityIssue.TOO_DARK not in issues:
        issues.append(QualityIssue.BLUR)
    return face, QualityReport(issues=tuple(issues), measures=measures)
