"""The quality gate on real photos and on degraded copies: each problem gets its own reason, good photos pass."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from models.detector import PARAMS_PHOTOS, MtcnnDetector
from models.manifest import ModelStore
from models.quality import MESSAGES, QualityPolicy, assess, estimate_pose, message
from models.types import QualityIssue, QualityReport, RgbImage
from tests.face_data import faces_dir
from yibao.verify_face import read_rgb

GOOD = [
    "obama/obama_a.jpg",
    "obama/obama_res_480p.jpg",
    "biden/biden_b.jpg",
    "rose_leslie/rose_a.jpg",
    "rose_leslie/rose_b.jpg",
    "alex_lacamoire/alex_a.jpg",
    "kit_harington/kit_a.jpg",
]


@pytest.fixture(scope="module")
def detector() -> MtcnnDetector:
    return MtcnnDetector.from_store(ModelStore(), PARAMS_PHOTOS)


def photo(name: str) -> RgbImage:
    return read_rgb(faces_dir() / name)


def gate(detector: MtcnnDetector, rgb: RgbImage, policy: QualityPolicy | None = None) -> QualityReport:
    _, report = assess(rgb, detector.detect(rgb), policy or QualityPolicy.for_photos())
    return report


def as_uint8(x: NDArray[Any]) -> RgbImage:
    """Any numeric array, clipped to pixel values."""
    return np.ascontiguousarray(np.clip(x, 0, 255), dtype=np.uint8)


@pytest.mark.parametrize("name", GOOD)
def test_good_photos_pass(detector: MtcnnDetector, name: str) -> None:
    report = gate(detector, photo(name))
    assert report.ok, (name, report)
    assert report.measures["face_px"] > 40


@pytest.mark.parametrize("name", ["obama/obama_a.jpg", "kit_harington/kit_c.jpg", "rose_leslie/rose_a.jpg"])
def test_degraded_copies_get_the_right_reason(detector: MtcnnDetector, name: str) -> None:
    rgb = photo(name)
    sigma = 5 * rgb.shape[1] / 1000
    assert QualityIssue.BLUR in gate(detector, as_uint8(cv2.GaussianBlur(rgb, (0, 0), sigma))).issues
    assert QualityIssue.TOO_DARK in gate(detector, as_uint8(rgb.astype(np.float32) * 0.2)).issues
    assert QualityIssue.TOO_BRIGHT in gate(detector, as_uint8(rgb.astype(np.float32) * 2.2 + 40)).issues


@pytest.mark.parametrize("name", ["kit_harington/kit_c.jpg", "rose_leslie/rose_a.jpg"])
def test_face_cut_by_the_frame_edge(detector: MtcnnDetector, name: str) -> None:
    rgb = photo(name)
    face = max(detector.detect(rgb), key=lambda d: d.width)
    middle = int((face.box[0] + face.box[2]) / 2)
    report = gate(detector, np.ascontiguousarray(rgb[:, middle:]))
    assert report.issues == (QualityIssue.FACE_CUT_OFF,), report


def test_partial_faces_in_the_set_are_cut_off(detector: MtcnnDetector) -> None:
    for name in ("obama/obama_partial_1.jpg", "obama/obama_partial_2.jpg"):
        assert QualityIssue.FACE_CUT_OFF in gate(detector, photo(name)).issues, name


def test_group_photos_have_more_than_one_face(detector: MtcnnDetector) -> None:
    for path in sorted((faces_dir() / "group").glob("*.jpg")):
        report = gate(detector, read_rgb(path))
        assert QualityIssue.MULTIPLE_FACES in report.issues, path.name
        assert report.measures["faces"] >= 2


def test_tiny_background_face_is_ignored(detector: MtcnnDetector) -> None:
    """obama_a has a small false/background detection far below the main face: it does not count as a second."""
    rgb = photo("obama/obama_a.jpg")
    assert len(detector.detect(rgb)) >= 2
    assert gate(detector, rgb).ok


def test_turned_head_is_a_pose_issue(detector: MtcnnDetector) -> None:
    report = gate(detector, photo("kit_harington/kit_b.jpg"))
    assert QualityIssue.POSE in report.issues
    assert abs(report.measures["yaw_deg"]) > 25


def test_small_face_at_the_kiosk(detector: MtcnnDetector) -> None:
    rgb = photo("obama/obama_res_240p.jpg")  # the face is ~52 px wide
    assert QualityIssue.FACE_TOO_SMALL in gate(detector, rgb, QualityPolicy()).issues
    assert QualityIssue.FACE_TOO_SMALL not in gate(detector, rgb, QualityPolicy.for_photos()).issues


def test_no_face() -> None:
    blank: RgbImage = np.full((480, 640, 3), 90, dtype=np.uint8)
    face, report = assess(blank, [], QualityPolicy())
    assert face is None
    assert report.issues == (QualityIssue.NO_FACE,)


def test_pose_estimate_is_symmetric_and_zero_on_the_template() -> None:
    from models.align import CHIP_TEMPLATE_150

    yaw, pitch, roll = estimate_pose(CHIP_TEMPLATE_150)
    assert abs(yaw) < 2
    assert abs(pitch) < 0.01
    assert abs(roll) < 1
    turned = CHIP_TEMPLATE_150.copy()
    turned[2, 0] += 15  # nose towards the image's right
    mirrored = turned.copy()
    mirrored[:, 0] = 150 - mirrored[:, 0]
    mirrored = mirrored[[1, 0, 2, 4, 3]]  # left/right swap places in a mirror
    assert estimate_pose(turned)[0] > 15
    assert estimate_pose(mirrored)[0] == pytest.approx(-estimate_pose(turned)[0], abs=3)


def test_every_issue_has_a_message_in_both_languages() -> None:
    assert set(MESSAGES) == set(QualityIssue)
    for issue in QualityIssue:
        assert message(issue, "zh")
        assert message(issue, "en")
        assert message(issue, "zh") != message(issue, "en")
    assert message(QualityIssue.POSE, "zh") == "请正对摄像头"
    assert message(QualityIssue.POSE, "en") == "Please look straight at the camera"
