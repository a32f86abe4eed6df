"""Alignment: the similarity fit is exact, the template is reproducible, and our chips are dlib's chips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from models.align import CHIP_TEMPLATE_150, align_detections, align_face, chip_transform, similarity_transform
from models.detector import PARAMS_PHOTOS, MtcnnDetector
from models.manifest import ModelStore
from tests.face_data import faces_dir, person_photos
from yibao.calibrate import DlibReferenceEmbedder, derive_chip_template, dlib_chips_under
from yibao.verify_face import read_rgb


@pytest.fixture(scope="module")
def detector() -> MtcnnDetector:
    return MtcnnDetector.from_store(ModelStore(), PARAMS_PHOTOS)


@pytest.fixture(scope="module")
def dlib_chips() -> dict[Path, list[NDArray[np.uint8]]]:
    """dlib's own chips of every face in the face set (HOG + 5-point + get_face_chip), computed once."""
    return dlib_chips_under(faces_dir())


def test_similarity_transform_recovers_a_known_one() -> None:
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 200, size=(5, 2))
    angle, scale, shift = 0.3, 0.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    m = similarity_transform(src, dst, np.array([2.0, 2.0, 1.0, 1.0, 1.0]))
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(np.zeros((5, 2)), dst)


def test_template_landmarks_map_onto_themselves() -> None:
    m = chip_transform(CHIP_TEMPLATE_150)
    np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-9)


def test_template_is_reproduced_by_its_derivation(
    detector: MtcnnDetector, dlib_chips: dict[Path, list[NDArray[np.uint8]]]
) -> None:
    """`yibao calibrate chip-template` on the committed photos gives the constants in models/align.py."""
    derived = derive_chip_template([c for chips in dlib_chips.values() for c in chips], detector)
    assert derived.faces >= 20
    np.testing.assert_allclose(derived.template, CHIP_TEMPLATE_150, atol=0.05)


def test_our_chips_match_dlibs_chips(detector: MtcnnDetector, dlib_chips: dict[Path, list[NDArray[np.uint8]]]) -> None:
    """Same photo, dlib's chip (HOG + 5-point + get_face_chip) vs ours (MTCNN + template): landmarks within a few
    chip pixels, and dlib's own network sees the same face (cosine >= 0.98)."""
    net = DlibReferenceEmbedder()
    cosines: list[float] = []
    errors: list[float] = []
    for photos in person_photos().values():
        for path in photos:
            rgb = read_rgb(path)
            theirs = dlib_chips[path]
            found = detector.detect(rgb)
            if not theirs or not found:
                continue
            ours = align_face(rgb, max(found, key=lambda d: d.width).landmarks)
            dlib_chip = theirs[0]
            a, b = net.embed(np.stack([dlib_chip, ours]))
            cosines.append(float(a @ b))
            on_theirs, on_ours = detector.detect(dlib_chip), detector.detect(ours)
            if on_theirs and on_ours:
                errors.append(float(np.linalg.norm(on_theirs[0].landmarks - on_ours[0].landmarks, axis=1).mean()))
    figures = f"cosine min {min(cosines):.4f} mean {np.mean(cosines):.4f}; landmark error mean {np.mean(errors):.2f} px"
    assert len(cosines) >= 15
    assert min(cosines) >= 0.98, figures
    assert float(np.mean(errors)) < 4.0, figures
    assert max(errors) < 8.0, figures


def test_large_faces_are_shrunk_before_the_warp(detector: MtcnnDetector) -> None:
    """A 1080p face and the 480p copy of the same photo give nearly the same chip (no aliasing from the big one)."""
    big = read_rgb(faces_dir() / "obama" / "obama_res_1080p.jpg")
    small = read_rgb(faces_dir() / "obama" / "obama_res_480p.jpg")
    chips = []
    for rgb in (big, small):
        face = max(detector.detect(rgb), key=lambda d: d.width)
        chips.append(align_face(rgb, face.landmarks).astype(np.float64))
    assert float(np.abs(chips[0] - chips[1]).mean()) < 12.0


def test_align_detections_batches(detector: MtcnnDetector) -> None:
    rgb = read_rgb(faces_dir() / "group" / "two_people.jpg")
    found = detector.detect(rgb)
    chips = align_detections(rgb, found)
    assert chips.shape == (len(found), 150, 150, 3)
    assert chips.dtype == np.uint8
    assert align_detections(rgb, []).shape == (0, 150, 150, 3)
