"""`yibao bench pad`: one JSON line with APCER per species and BPCER, fused and per signal; reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.face_data import faces_dir
from yibao.cli import app
from yibao.pad_harness import make_detector, rate, run_pad_bench, wilson


@pytest.fixture(scope="module")
def small_faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three photos of two people (symlinks), so the bench runs in seconds."""
    root = tmp_path_factory.mktemp("faces")
    src = faces_dir()
    for person, name in [("obama", "obama_a.jpg"), ("obama", "obama_c.jpg"), ("biden", "biden_b.jpg")]:
        (root / person).mkdir(exist_ok=True)
        (root / person / name).symlink_to(src / person / name)
    return root


def test_wilson_interval() -> None:
    assert wilson(0, 0) is None
    low, high = wilson(0, 20) or (1.0, 0.0)
    assert low == 0.0
    assert 0.15 < high < 0.18
    low, high = wilson(10, 20) or (1.0, 0.0)
    assert low < 0.5 < high
    assert rate(1, 4)["rate"] == 0.25


def test_bench_pad_prints_one_json_line(small_faces: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "pad", "--faces", str(small_faces), "--seed", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    table = json.loads(lines[0])
    assert table["sources"]["photos"] == 3
    fused = table["fusion_rgb_ir_depth"]
    for species in ("print", "screen_replay", "mask"):
        assert fused["apcer"][species]["n"] == 3
        assert fused["apcer"][species]["rate"] == 0.0
    assert fused["bpcer"]["n"] == 3
    assert set(table["per_signal"]) == {"ir", "depth", "texture", "challenge"}
    # Depth alone cannot see a mask: the per-signal table shows why the fusion needs IR too.
    assert table["per_signal"]["depth"]["apcer"]["mask"]["rate"] == 1.0
    assert table["per_signal"]["depth"]["apcer"]["print"]["rate"] == 0.0
    rgb_only = table["fusion_rgb_only_texture_challenge"]
    assert rgb_only["apcer"]["print"]["rate"] == 0.0
    assert table["liveness_ms_per_frame"]["median"] > 0


def test_the_bench_is_reproducible(small_faces: Path) -> None:
    a = run_pad_bench(small_faces, seed=11, with_challenge=False)
    b = run_pad_bench(small_faces, seed=11, with_challenge=False)
    for table in (a, b):
        table.pop("liveness_ms_per_frame")
        table.pop("wall_s")
    assert a == b
    assert a["fusion_rgb_only_texture_challenge"] is None


def test_missing_folders_fail_clearly(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "pad", "--faces", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "no face folder" in result.output


def test_the_dlib_reference_adapter_gives_five_ordered_landmarks() -> None:
    from hardware_sim.camera_sim import load_rgb

    rgb = load_rgb(faces_dir() / "obama" / "obama_a.jpg")
    found = make_detector("dlib").detect(rgb)
    assert len(found) == 1
    lm = found[0].landmarks
    assert lm.shape == (5, 2)
    assert lm[0, 0] < lm[2, 0] < lm[1, 0]  # image-left eye, nose, image-right eye
    assert lm[2, 1] > max(lm[0, 1], lm[1, 1])  # the nose below the eyes
    assert lm[3, 1] > lm[2, 1]  # the (approximated) mouth below the nose
    mtcnn = make_detector("mtcnn").detect(rgb)[0].landmarks
    assert float(abs(mtcnn[:2] - lm[:2]).max()) < 8.0  # the eye centres agree with the product detector's
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("haar")
