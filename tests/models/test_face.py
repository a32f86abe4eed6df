"""The face engine end to end on real photos: 1:1 verification, 1:N identification, no-face handling, latency."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.calibration import CalibrationError
from models.detector import PARAMS_PHOTOS
from models.face import (
    FaceEngine,
    FaceEngineError,
    Gallery,
    cosine_similarity,
    engine_from_store,
)
from models.manifest import ModelStore
from models.quality import QualityPolicy, face_area
from models.types import QualityIssue, RgbImage
from tests.face_data import faces_dir
from yibao.verify_face import read_rgb


def photo(name: str) -> RgbImage:
    return read_rgb(faces_dir() / name)


def kiosk_frame(name: str) -> RgbImage:
    resized = cv2.resize(photo(name), (640, 480), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(resized, dtype=np.uint8)


@pytest.fixture(scope="module")
def engine(store: ModelStore) -> FaceEngine:
    """The kiosk engine from the freshly built models; the threshold is the one the manifest ships."""
    return engine_from_store(store, detector_params=PARAMS_PHOTOS, quality_policy=QualityPolicy.for_photos())


def test_threshold_comes_from_the_manifest(engine: FaceEngine, store: ModelStore) -> None:
    block = store.manifest("dlib_resnet_v1").threshold
    assert block is not None
    assert engine.threshold == block.value


def test_same_person_and_different_people(engine: FaceEngine) -> None:
    reference = engine.analyse(photo("obama/obama_a.jpg")).template
    assert reference is not None
    same = engine.verify(photo("obama/obama_b.jpg"), reference)
    other = engine.verify(photo("biden/biden_a.jpg"), reference)
    assert same.same_person
    assert not other.same_person
    assert same.similarity is not None
    assert other.similarity is not None
    assert same.similarity > engine.threshold > other.similarity


def test_analysis_carries_quality_and_the_largest_face(engine: FaceEngine) -> None:
    analysis = engine.analyse(photo("group/two_people.jpg"))
    assert len(analysis.faces) == 2
    assert analysis.face is analysis.faces[0]
    assert face_area(analysis.face) >= face_area(analysis.faces[1])
    assert QualityIssue.MULTIPLE_FACES in analysis.quality.issues
    assert analysis.template is not None
    assert float(np.linalg.norm(analysis.template)) == pytest.approx(1.0, abs=1e-5)


def test_no_face_is_never_a_match(engine: FaceEngine) -> None:
    reference = engine.analyse(photo("obama/obama_a.jpg")).template
    assert reference is not None
    blank: RgbImage = np.full((480, 640, 3), 200, dtype=np.uint8)
    result = engine.verify(blank, reference)
    assert result.same_person is False
    assert result.similarity is None
    assert result.analysis.quality.issues == (QualityIssue.NO_FACE,)


def _gallery(engine: FaceEngine, extra_random: int = 0) -> Gallery:
    ids: list[str] = []
    templates = []
    for person, name in [
        ("p-obama", "obama/obama_c.jpg"),
        ("p-biden", "biden/biden_b.jpg"),
        ("p-kit", "kit_harington/kit_a.jpg"),
        ("p-rose", "rose_leslie/rose_b.jpg"),
        ("p-alex", "alex_lacamoire/alex_b.jpg"),
    ]:
        t = engine.analyse(photo(name)).template
        assert t is not None
        ids.append(person)
        templates.append(t)
    rng = np.random.default_rng(5)
    for i in range(extra_random):
        v = rng.normal(size=templates[0].shape).astype(np.float32)
        templates.append(v / np.linalg.norm(v))
        ids.append(f"filler-{i}")
    return Gallery(tuple(ids), np.stack(templates).astype(np.float32))


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        ("obama/obama_b.jpg", "p-obama"),
        ("biden/biden_a.jpg", "p-biden"),
        ("kit_harington/kit_c.jpg", "p-kit"),
        ("rose_leslie/rose_a.jpg", "p-rose"),
        ("alex_lacamoire/alex_a.jpg", "p-alex"),
    ],
)
def test_identify_finds_the_right_person(engine: FaceEngine, probe: str, expected: str) -> None:
    result = engine.identify(photo(probe), _gallery(engine, extra_random=45))
    assert result.best_id == expected
    assert result.matched


def test_identify_someone_not_enrolled(engine: FaceEngine) -> None:
    gallery = _gallery(engine)
    without_obama = Gallery(gallery.ids[1:], gallery.templates[1:])
    result = engine.identify(photo("obama/obama_b.jpg"), without_obama)
    assert result.best_id is not None
    assert not result.matched
    empty = engine.identify(photo("obama/obama_b.jpg"), Gallery((), np.zeros((0, 128), dtype=np.float32)))
    assert empty.best_id is None
    assert not empty.matched


def test_gallery_and_template_validation() -> None:
    with pytest.raises(FaceEngineError, match="ids"):
        Gallery(("a",), np.zeros((2, 128), dtype=np.float32))
    with pytest.raises(FaceEngineError, match="unique"):
        Gallery(("a", "a"), np.eye(2, 128, dtype=np.float32))
    with pytest.raises(FaceEngineError, match="L2"):
        Gallery(("a",), np.full((1, 128), 3.0, dtype=np.float32))
    with pytest.raises(FaceEngineError, match="vectors"):
        cosine_similarity(np.zeros(128, dtype=np.float32), np.zeros(64, dtype=np.float32))


def test_engine_refuses_a_missing_threshold(built_models_dir: Path, tmp_path: Path) -> None:
    """A manifest without [threshold] and no calibration file: no engine (fail closed, never a default)."""
    shipped = Path(__file__).resolve().parents[2] / "models" / "manifests"
    for src in shipped.glob("*.toml"):
        text = src.read_text(encoding="utf-8")
        if "[threshold]" in text:
            text = text[: text.index("[threshold]")]
        (tmp_path / src.name).write_text(text, encoding="utf-8")
    store = ModelStore(built_models_dir, operator_dir=None, shipped_dir=tmp_path)
    with pytest.raises(CalibrationError, match="no calibrated threshold"):
        engine_from_store(store)


def test_kiosk_latency_at_640x480(store: ModelStore) -> None:
    """1:1 and 1:N over 50 on a 640x480 frame with the kiosk detector; bounds catch gross regressions only (the
    machine is shared; `yibao bench vision` measures the bars)."""
    engine = engine_from_store(store)
    frame = kiosk_frame("obama/obama_a.jpg")
    reference = engine.analyse(photo("obama/obama_b.jpg")).template
    assert reference is not None
    gallery = _gallery(engine, extra_random=45)

    def median_ms(run: object) -> float:
        assert callable(run)
        run()
        times = []
        for _ in range(15):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        return float(np.median(times)) * 1000

    one = median_ms(lambda: engine.verify(frame, reference))
    many = median_ms(lambda: engine.identify(frame, gallery))
    assert engine.verify(frame, reference).same_person
    assert one < 120, f"1:1 median {one:.1f} ms"
    assert many < 130, f"1:N(50) median {many:.1f} ms"
