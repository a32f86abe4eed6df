"""Calibration arithmetic against known values, the operating-point rule, and where the threshold is stored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from models.calibration import (
    CalibrationError,
    ScoreSet,
    beta_ppf,
    betainc,
    choose_threshold,
    clopper_pearson,
    equal_error_rate,
    load_threshold,
    markdown_table,
    read_calibration_file,
    summarise,
    write_calibration_file,
    zero_failure_upper_bound,
)
from models.manifest import SHIPPED_MANIFESTS_DIR, ModelStore, parse_manifest
from yibao.calibrate import manifest_with_threshold, person_photos, score_sets


@pytest.mark.parametrize(
    ("a", "b", "x", "expected"),
    [
        (2.0, 3.0, 0.4, 0.5248),  # 1 - sum of binomial terms: exact
        (1.0, 1.0, 0.37, 0.37),  # uniform
        (0.5, 0.5, 0.3, 2 / math.pi * math.asin(math.sqrt(0.3))),  # arcsine law
        (5.0, 1.0, 0.8, 0.8**5),
        (1.0, 4.0, 0.1, 1 - 0.9**4),
    ],
)
def test_incomplete_beta_known_values(a: float, b: float, x: float, expected: float) -> None:
    assert betainc(a, b, x) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("a", "b", "x"), [(50, 60, 0.5), (3, 400, 0.002), (120, 3, 0.97), (7, 7, 0.31)])
def test_incomplete_beta_equals_the_binomial_tail(a: int, b: int, x: float) -> None:
    """For integer a, b: I_x(a, b) = P(Binomial(a + b - 1, x) >= a), summed here exactly in fractions."""
    from fractions import Fraction

    n = a + b - 1
    fx = Fraction(x).limit_denominator(10**6)
    tail = sum(math.comb(n, j) * fx**j * (1 - fx) ** (n - j) for j in range(a, n + 1))
    assert betainc(a, b, float(fx)) == pytest.approx(float(tail), abs=1e-10)


def test_beta_quantile_inverts_the_cdf() -> None:
    for a, b in [(1.0, 1.0), (0.5, 3.0), (3.0, 120.0), (250.0, 2.0)]:
        for q in (0.001, 0.025, 0.5, 0.975, 0.999):
            assert betainc(a, b, beta_ppf(q, a, b)) == pytest.approx(q, abs=1e-9)
    assert beta_ppf(0.0, 2, 2) == 0.0
    assert beta_ppf(1.0, 2, 2) == 1.0


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (5, 10, 0.187086, 0.812914),  # R: binom.test(5, 10)$conf.int
        (0, 10, 0.0, 0.308497),
        (1, 100, 0.000253, 0.054459),
        (10, 10, 0.691503, 1.0),
        (0, 200, 0.0, 0.018275),
    ],
)
def test_clopper_pearson_known_intervals(k: int, n: int, low: float, high: float) -> None:
    lo, hi = clopper_pearson(k, n)
    assert lo == pytest.approx(low, abs=2e-6)
    assert hi == pytest.approx(high, abs=2e-6)


def test_rule_of_three() -> None:
    assert zero_failure_upper_bound(300) == pytest.approx(3 / 300, rel=0.01)
    assert zero_failure_upper_bound(2995) <= 0.001 < zero_failure_upper_bound(2990)


def test_small_data_uses_max_impostor_or_gaussian_tail_and_says_why() -> None:
    rng = np.random.default_rng(1)
    genuine = rng.normal(0.95, 0.01, 50)
    impostor = rng.normal(0.75, 0.04, 120)
    point = choose_threshold(genuine, impostor, independent_impostors=120)
    assert not point.data_supports_target
    assert point.threshold > impostor.max()
    assert point.threshold >= point.gaussian_tail
    assert "cannot show FAR <= 0.10%" in point.how_chosen
    assert "2.47%" in point.how_chosen  # 1 - 0.05 ** (1/120)


def test_augmented_pairs_do_not_count_as_independent_evidence() -> None:
    rng = np.random.default_rng(2)
    impostor = rng.normal(0.7, 0.05, 5000)
    point = choose_threshold(np.array([0.99]), impostor, independent_impostors=100)
    assert not point.data_supports_target


def test_large_data_uses_the_clopper_pearson_bound() -> None:
    rng = np.random.default_rng(3)
    impostor = rng.normal(0.7, 0.05, 10_000)
    genuine = rng.normal(0.95, 0.02, 500)
    point = choose_threshold(genuine, impostor, independent_impostors=10_000)
    assert point.data_supports_target
    k = int((impostor >= point.threshold).sum())
    assert clopper_pearson(k, impostor.size)[1] <= 0.001
    assert clopper_pearson(k + 1, impostor.size)[1] > 0.001
    assert point.threshold < impostor.max()


def test_equal_error_rate() -> None:
    genuine = np.array([0.6, 0.7, 0.8, 0.9])
    impostor = np.array([0.1, 0.2, 0.65, 0.3])
    eer, t = equal_error_rate(genuine, impostor)
    assert eer == pytest.approx(0.25)
    assert 0.6 < t <= 0.7
    separable, _ = equal_error_rate(np.array([0.9, 0.95]), np.array([0.1, 0.2]))
    assert separable == 0.0


def _result() -> object:
    sets = [
        ScoreSet("genuine", "original", (0.95, 0.97, 0.93)),
        ScoreSet("impostor", "original", (0.5, 0.6, 0.7, 0.65)),
        ScoreSet("genuine", "augmented", (0.94, 0.96)),
        ScoreSet("impostor", "augmented", (0.55, 0.72)),
    ]
    return summarise(sets, model="dlib_resnet", model_sha256="ab" * 32, calibrated_on="2026-12-01")


def test_summary_json_table_and_file_round_trip(tmp_path: Path) -> None:
    from models.calibration import CalibrationResult

    result = _result()
    assert isinstance(result, CalibrationResult)
    assert result.threshold > 0.72
    line = json.loads(result.to_json())
    assert {"threshold", "rows", "how_chosen", "eer"} <= set(line)
    assert [r["pairs"] for r in result.rows] == ["original", "augmented", "all"]
    table = markdown_table(result)
    assert "| original | 3 | 4 |" in table
    assert "not independent" in table
    path = tmp_path / "calibration.json"
    write_calibration_file(path, result)
    assert read_calibration_file(path) == result
    assert load_threshold(None, path, "ab" * 32).value == result.threshold
    assert load_threshold(0.9, path, "ab" * 32).origin == "model manifest"
    with pytest.raises(CalibrationError, match="calibrated for model"):
        load_threshold(None, path, "cd" * 32)
    with pytest.raises(CalibrationError, match="no calibrated threshold"):
        load_threshold(None, None)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CalibrationError):
        read_calibration_file(tmp_path / "bad.json")


def test_threshold_block_written_into_a_manifest_parses_back() -> None:
    from models.calibration import CalibrationResult

    result = _result()
    assert isinstance(result, CalibrationResult)
    text = (SHIPPED_MANIFESTS_DIR / "mtcnn_onet.toml").read_text(encoding="utf-8")
    once = manifest_with_threshold(text, result)
    manifest = parse_manifest(once)
    assert manifest.threshold is not None
    assert manifest.threshold.value == pytest.approx(result.threshold, abs=1e-4)
    assert manifest.threshold.metric == "cosine"
    twice = manifest_with_threshold(once, result)  # replaced, not appended again
    assert twice.count("[threshold]") == 1
    assert parse_manifest(twice) == manifest


def test_pairs_from_the_face_set(tmp_path: Path) -> None:
    """Person folders only; the *_res_* copies of one shot are one source and never paired with each other."""
    from models.types import Embedding
    from tests.face_data import faces_dir
    from yibao.calibrate import Template

    photos = person_photos(faces_dir())
    assert {p.person for p in photos} == {"alex_lacamoire", "biden", "kit_harington", "obama", "rose_leslie"}
    sources = {p.source for p in photos if p.person == "obama"}
    assert "obama/obama" in sources  # obama_res_240p ... obama_res_1080p
    rng = np.random.default_rng(0)

    def vec() -> Embedding:
        v = rng.normal(size=8).astype(np.float32)
        out: Embedding = v / np.linalg.norm(v)
        return out

    items = [Template(p, "original", vec()) for p in photos]
    sets = {(s.kind, s.source): s for s in score_sets(items)}
    n_genuine = len(sets[("genuine", "original")].scores)
    n_impostor = len(sets[("impostor", "original")].scores)
    assert n_genuine == 45  # alex 1 + biden 1 + kit 3 + rose 1 + obama C(10,2)-C(4,2)=39
    assert n_impostor == 120


def test_copies_of_one_shot_are_one_source() -> None:
    """obama_a and obama_res_* are crops/rescales of one portrait: one source. Distinct photos stay apart."""
    from models.detector import PARAMS_PHOTOS, MtcnnDetector
    from models.manifest import ModelStore
    from tests.face_data import faces_dir
    from yibao.calibrate import merge_same_shots, shot_signature
    from yibao.verify_face import read_rgb

    detector = MtcnnDetector.from_store(ModelStore(), PARAMS_PHOTOS)
    photos = [p for p in person_photos(faces_dir()) if p.person in {"obama", "kit_harington"}]
    signatures = {}
    for p in photos:
        rgb = read_rgb(p.path)
        face = max(detector.detect(rgb), key=lambda d: d.width)
        signatures[p.path] = shot_signature(rgb, face.landmarks)
    merged = {p.path.stem: p.source for p in merge_same_shots(photos, signatures)}
    portrait = merged["obama_a"]
    assert all(merged[f"obama_res_{r}"] == portrait for r in ("240p", "480p", "720p", "1080p"))
    others = ["obama_b", "obama_c", "obama_d", "kit_a", "kit_b", "kit_c"]
    assert len({merged[n] for n in others} | {portrait}) == len(others) + 1


def test_package_shipped_photos_add_impostor_identities(store: ModelStore) -> None:
    from models.detector import PARAMS_PHOTOS, MtcnnDetector
    from models.embedder import DlibResnetEmbedder
    from models.face import FaceEngine
    from models.quality import QualityPolicy
    from yibao.calibrate import package_photo_paths, package_templates

    paths = package_photo_paths()
    assert sorted(p.name for p in paths) == ["Tom_Hanks_54745.png", "t1.jpg"]  # insightface's samples (dev install)
    engine = FaceEngine(
        MtcnnDetector.from_store(store, PARAMS_PHOTOS),
        DlibResnetEmbedder(store.load("dlib_resnet_v1")),
        QualityPolicy.for_photos(),
        0.0,
    )
    items = package_templates(engine, paths)
    people = {t.photo.person for t in items}
    assert len(people) == len(items) == 7  # six people in t1.jpg, one in the other: each its own identity
    sets = {(s.kind, s.source): s for s in score_sets(items)}
    assert set(sets) == {("impostor", "original")}  # no genuine pairs among them
    assert len(sets["impostor", "original"].scores) == 21
