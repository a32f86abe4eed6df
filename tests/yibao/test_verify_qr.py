"""`yibao verify qr`: the real CLI on generated images, a code in a real photo, and files that are not images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import zxingcpp

from hardware_sim.qr_images import composite, load_backgrounds, render_qr
from tests.face_data import person_photos
from yibao.verify_qr import EXIT_UNREADABLE, UnreadableImageError, read_image, verify_qr_command

TEXT = "SIMEC1VERIFYQRCOMMANDTEST234567ABCDEFGHIJKLMN"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "yibao", "verify", "qr", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _white_border(image: np.ndarray, pad: int = 30) -> np.ndarray:
    return cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=255)


def test_generated_png_and_a_photo_jpeg(tmp_path: Path) -> None:
    png = tmp_path / "code.png"
    cv2.imwrite(str(png), render_qr(TEXT))
    result = run_cli(str(png), "--json")
    assert result.returncode == 0, result.stderr
    assert result.stdout == json.dumps({"codes": [{"text": TEXT, "format": "QRCode"}]}) + "\n"

    photo = load_backgrounds([person_photos()["kit_harington"][0]])[0]
    frame = composite(photo, render_qr(TEXT, module_px=6), np.random.default_rng(9), side_px=200, tilt=0.08)
    jpeg = tmp_path / "photo.jpg"
    cv2.imwrite(str(jpeg), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 70])
    result = run_cli(str(jpeg), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"codes": [{"text": TEXT, "format": "QRCode"}]}


def test_no_code_is_an_empty_list_and_exit_0() -> None:
    result = run_cli(str(person_photos()["obama"][0]), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"codes": []}


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 not really a jpeg" * 10, "病历".encode() * 50])
def test_files_that_are_not_images_exit_2_with_one_line(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(content)
    result = run_cli(str(bad), "--json")
    assert result.returncode == EXIT_UNREADABLE
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ")
    assert str(bad) in result.stderr


def test_missing_file_and_directory() -> None:
    for path in (Path("/nonexistent/q.png"), Path(__file__).parent):
        result = verify_qr_command(path, as_json=True)
        assert (result.stdout, result.exit_code) == ("", EXIT_UNREADABLE)
        assert str(path) in result.stderr


def test_text_mode_and_several_symbologies(tmp_path: Path) -> None:
    qr = _white_border(render_qr(TEXT))
    ean = _white_border(
        np.asarray(zxingcpp.create_barcode("6901234567892", zxingcpp.BarcodeFormat.EAN13).to_image(scale=3))
    )
    canvas = np.full((max(qr.shape[0], ean.shape[0]), qr.shape[1] + ean.shape[1]), 255, dtype=np.uint8)
    canvas[: qr.shape[0], : qr.shape[1]] = qr
    canvas[: ean.shape[0], qr.shape[1] :] = ean
    path = tmp_path / "both.png"
    cv2.imwrite(str(path), canvas)
    found = json.loads(verify_qr_command(path, as_json=True).stdout)["codes"]
    assert sorted((c["format"], c["text"]) for c in found) == [("EAN13", "6901234567892"), ("QRCode", TEXT)]
    text = verify_qr_command(path, as_json=False)
    assert f"QRCode: {TEXT}" in text.stdout.splitlines()
    empty = tmp_path / "white.png"
    cv2.imwrite(str(empty), np.full((50, 50), 255, dtype=np.uint8))
    assert verify_qr_command(empty, as_json=False).stdout.startswith("no codes found")


def test_transparent_16bit_and_dark_mode_images(tmp_path: Path) -> None:
    code = render_qr(TEXT)
    # Black modules on a transparent background: flattened onto white, not onto black.
    bgra = np.zeros((*code.shape, 4), dtype=np.uint8)
    bgra[:, :, 3] = 255 - code
    transparent = tmp_path / "alpha.png"
    cv2.imwrite(str(transparent), bgra)
    deep = tmp_path / "deep.png"
    cv2.imwrite(str(deep), code.astype(np.uint16) * 257)
    dark = tmp_path / "dark.png"
    cv2.imwrite(str(dark), cv2.bitwise_not(_white_border(code)))
    for path in (transparent, deep, dark):
        assert json.loads(verify_qr_command(path, as_json=True).stdout)["codes"] == [
            {"text": TEXT, "format": "QRCode"}
        ], path.name
    assert read_image(deep).dtype == np.uint8


def test_unsupported_pixel_type(tmp_path: Path) -> None:
    path = tmp_path / "float.tiff"
    cv2.imwrite(str(path), np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(UnreadableImageError, match="float32"):
        read_image(path)
