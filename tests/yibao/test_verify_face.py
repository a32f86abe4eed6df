"""`yibao verify face` and `yibao calibrate` through the real CLI, on real photos and on files that are not photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray
from typer.testing import CliRunner

from models.dlib_convert import build_dlib_resnet
from models.manifest import ModelStore
from tests.face_data import faces_dir
from yibao.cli import app


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dlib ResNet built by the real build step into a fresh folder (the MTCNN nets come from their package)."""
    out = tmp_path_factory.mktemp("models")
    build_dlib_resnet(ModelStore(out).manifest("dlib_resnet_v1"), out)
    return out


def verify(models_dir: Path, a: Path, b: Path, *extra: str) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(app, ["verify", "face", str(a), str(b), "--models-dir", str(models_dir), *extra])
    return result.exit_code, result.stdout, result.stderr


def face(name: str) -> Path:
    return faces_dir() / name


def bgr(name: str) -> NDArray[np.uint8]:
    image = cv2.imread(str(face(name)))
    assert image is not None
    return np.asarray(image, dtype=np.uint8)


def test_same_person(models_dir: Path) -> None:
    code, out, _ = verify(models_dir, face("obama/obama_a.jpg"), face("obama/obama_b.jpg"), "--json")
    assert code == 0
    line = json.loads(out)
    assert set(line) >= {"same_person", "similarity", "threshold", "faces_a", "faces_b"}
    assert line["same_person"] is True
    assert line["similarity"] > line["threshold"]
    assert line["faces_a"] == 1
    assert line["faces_b"] == 1


def test_different_people(models_dir: Path) -> None:
    code, out, _ = verify(models_dir, face("obama/obama_c.jpg"), face("biden/biden_a.jpg"), "--json")
    assert code == 0
    line = json.loads(out)
    assert line["same_person"] is False
    assert line["similarity"] < line["threshold"]


def test_human_sentence(models_dir: Path) -> None:
    code, out, _ = verify(models_dir, face("kit_harington/kit_a.jpg"), face("kit_harington/kit_c.jpg"))
    assert code == 0
    assert out.startswith("Same person (similarity ")


def test_group_photo_uses_the_largest_face_and_says_so(models_dir: Path) -> None:
    code, out, _ = verify(models_dir, face("group/two_people.jpg"), face("obama/obama_a.jpg"), "--json")
    assert code == 0
    line = json.loads(out)
    assert line["faces_a"] == 2
    assert any("compared the largest" in note for note in line["notes"])


def test_no_face_gives_null_and_a_reason(models_dir: Path, tmp_path: Path) -> None:
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((300, 400, 3), 180, dtype=np.uint8))
    code, out, _ = verify(models_dir, blank, face("obama/obama_a.jpg"), "--json")
    assert code == 0
    line = json.loads(out)
    assert line["same_person"] is None
    assert line["similarity"] is None
    assert line["faces_a"] == 0
    assert "no face found in image A" in line["notes"]


def test_non_ascii_path_and_png(models_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "照片 奥巴马.png"
    cv2.imwrite(str(tmp_path / "tmp.png"), bgr("obama/obama_b.jpg"))
    shutil.move(tmp_path / "tmp.png", target)
    code, out, _ = verify(models_dir, face("obama/obama_a.jpg"), target, "--json")
    assert code == 0
    assert json.loads(out)["same_person"] is True


def test_exif_orientation_is_applied(models_dir: Path, tmp_path: Path) -> None:
    """A JPEG stored sideways with EXIF Orientation=6 (rotate 90° clockwise to view) still matches."""
    upright = bgr("obama/obama_b.jpg")
    sideways = cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE)
    ok, jpeg = cv2.imencode(".jpg", sideways)
    assert ok
    data = jpeg.tobytes()
    # APP1 Exif segment: big-endian TIFF header, one IFD entry: Orientation (0x0112), SHORT, 1, value 6.
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"
    tiff += b"\x00\x00\x00\x00"
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    path = tmp_path / "sideways.jpg"
    path.write_bytes(data[:2] + app1 + data[2:])
    code, out, _ = verify(models_dir, face("obama/obama_a.jpg"), path, "--json")
    assert code == 0
    line = json.loads(out)
    assert line["faces_b"] == 1
    assert line["same_person"] is True


def test_text_file_is_a_clear_error(models_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo\n", encoding="utf-8")
    code, out, err = verify(models_dir, text, face("obama/obama_a.jpg"), "--json")
    assert code == 2
    assert out == ""
    assert "notes.jpg is not an image" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_file_is_a_clear_error(models_dir: Path, tmp_path: Path) -> None:
    code, _, err = verify(models_dir, tmp_path / "nope.jpg", face("obama/obama_a.jpg"))
    assert code == 2
    assert "cannot read" in err


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    code, _, err = verify(tmp_path, face("obama/obama_a.jpg"), face("obama/obama_b.jpg"))
    assert code == 2
    assert "yibao models build" in err


def test_calibrate_face_prints_a_json_line_and_a_table(models_dir: Path, tmp_path: Path) -> None:
    """Originals only (no augmentation) to stay quick; --no-write leaves the shipped manifest alone."""
    runner = CliRunner()
    faces = tmp_path / "faces"
    for person in ("obama", "biden", "rose_leslie"):
        shutil.copytree(faces_dir() / person, faces / person)
    args = ["calibrate", "face", "--faces-dir", str(faces), "--models-dir", str(models_dir), "--no-augment"]
    result = runner.invoke(app, [*args, "--no-write", "--table"])
    assert result.exit_code == 0, result.stderr
    first, *rest = result.stdout.splitlines()
    line = json.loads(first)
    assert line["model"] == "dlib_resnet_v1"
    assert line["data_supports_target"] is False
    assert line["rows"][0]["pairs"] == "original"
    assert line["rows"][0]["tar"] == 1.0
    assert line["rows"][0]["far"] == 0.0
    assert any(r.startswith("| original |") for r in rest)
