"""drivers.qr_decode on real pixels: codes from zxing-cpp's writer, composited into real photos."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import zxingcpp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from drivers.qr_decode import (
    LADDER,
    DecodedCode,
    FrameQrScanner,
    InvalidImageError,
    QrDecodeError,
    decode_pyzbar,
    decode_qr,
)
from hardware_sim.qr_images import QrSample, composite, degraded_set, load_backgrounds, render_qr
from tests.face_data import person_photos

TEXT = "SIM1QRDECODETEST0123456789ABCDEFGHIJ"


def _on_white(code: npt.NDArray[np.uint8], pad: int = 40) -> npt.NDArray[np.uint8]:
    return np.asarray(cv2.copyMakeBorder(code, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=255), dtype=np.uint8)


def _photo() -> npt.NDArray[np.uint8]:
    photos = person_photos()
    return load_backgrounds([photos["obama"][0]])[0]


def test_clean_code_decodes_with_zxing_first() -> None:
    codes = decode_qr(_on_white(render_qr(TEXT)))
    assert [(c.text, c.format, c.decoder, c.variant, c.lossy_text) for c in codes] == [
        (TEXT, "QRCode", "zxing-cpp", "plain", False)
    ]
    assert codes[0].raw == TEXT.encode()


def test_rgb_gray_and_rgba_inputs_give_the_same_code() -> None:
    gray = _on_white(render_qr(TEXT))
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full_like(gray[:, :, None], 255)], axis=2)
    single = gray[:, :, None]
    texts = {tuple(c.text for c in decode_qr(img)) for img in (gray, rgb, rgba, single)}
    assert texts == {(TEXT,)}


def test_corners_are_in_input_coordinates() -> None:
    code = render_qr(TEXT, module_px=4, quiet_zone=False)
    image = np.full((300, 400), 255, dtype=np.uint8)
    image[100 : 100 + code.shape[0], 150 : 150 + code.shape[1]] = code
    (found,) = decode_qr(image)
    xs = [x for x, _ in found.corners]
    ys = [y for _, y in found.corners]
    assert min(xs) == pytest.approx(150, abs=3)
    assert max(xs) == pytest.approx(150 + code.shape[1], abs=3)
    assert min(ys) == pytest.approx(100, abs=3)


def test_code_in_a_real_photo() -> None:
    rng = np.random.default_rng(7)
    frame = composite(_photo(), render_qr(TEXT, module_px=6), rng, side_px=170, tilt=0.05)
    assert [c.text for c in decode_qr(frame, qr_only=True)] == [TEXT]


def test_huge_photo_is_downscaled_and_corners_map_back() -> None:
    code = render_qr(TEXT, module_px=24)
    big = cv2.resize(_photo(), (3200, 2400), interpolation=cv2.INTER_LINEAR)
    big[800 : 800 + code.shape[0], 1200 : 1200 + code.shape[1]] = code[:, :, None]
    (found,) = decode_qr(big)
    assert found.text == TEXT
    assert found.variant == "downscaled"
    assert min(x for x, _ in found.corners) == pytest.approx(1200 + 4 * 24, abs=12)  # the writer's quiet zone


def test_dark_mode_code_is_found() -> None:
    inverted = cv2.bitwise_not(_on_white(render_qr(TEXT)))
    assert [c.text for c in decode_qr(inverted)] == [TEXT]


def test_chinese_text_round_trips() -> None:
    text = "医保电子凭证 测试"
    assert [c.text for c in decode_qr(_on_white(render_qr(text)))] == [text]


def test_bytes_that_are_not_utf8_are_reported_not_raised() -> None:
    payload = bytes([0xFF, 0xFE, 0x80, 0x41, 0xC3])
    image = np.asarray(zxingcpp.create_barcode(payload, zxingcpp.BarcodeFormat.QRCode).to_image(scale=4))
    (found,) = decode_qr(_on_white(image))
    assert found.lossy_text
    assert found.raw == payload
    assert "\ufffd" in found.text
    assert found.text.endswith("\ufffd") or "A" in found.text


def test_pyzbar_alone_reads_the_same_code_with_the_same_vocabulary() -> None:
    codes = decode_pyzbar(_on_white(render_qr(TEXT)))
    assert [(c.text, c.format, c.decoder) for c in codes] == [(TEXT, "QRCode", "pyzbar")]


def test_qr_only_ignores_linear_barcodes() -> None:
    ean = np.asarray(zxingcpp.create_barcode("5901234123457", zxingcpp.BarcodeFormat.EAN13).to_image(scale=3))
    image = _on_white(ean)
    assert [(c.text, c.format) for c in decode_qr(image)] == [("5901234123457", "EAN13")]
    assert decode_qr(image, qr_only=True) == []


def test_no_code_is_an_empty_list() -> None:
    assert decode_qr(_photo()) == []
    assert decode_qr(np.zeros((5, 5), dtype=np.uint8)) == []


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0, 0), dtype=np.uint8),
        np.zeros((10, 10), dtype=np.float32),
        np.zeros((10, 10, 2), dtype=np.uint8),
        np.zeros((2, 10, 10, 3), dtype=np.uint8),
        [[0, 255], [255, 0]],
    ],
)
def test_unusable_input_raises_a_typed_error(bad: object) -> None:
    with pytest.raises(InvalidImageError) as info:
        decode_qr(bad)  # type: ignore[arg-type]  # deliberately not an array of the declared type
    assert isinstance(info.value, QrDecodeError)


@pytest.fixture(scope="module")
def rescued() -> QrSample:
    """A degraded frame from the seeded set that the plain pass misses and the ladder decodes."""
    photos = [p for paths in person_photos().values() for p in paths]
    for sample in degraded_set(photos, 60):
        if not decode_qr(sample.image, preprocess=False, fallback=False):
            found = decode_qr(sample.image, fallback=False)
            if [c.text for c in found] == [sample.text]:
                return sample
    pytest.fail("no frame in the seeded set is rescued by preprocessing")


def test_preprocessing_rescues_a_code_the_plain_pass_misses(rescued: QrSample) -> None:
    found = decode_qr(rescued.image)
    assert [c.text for c in found] == [rescued.text]
    assert found[0].variant in LADDER
    assert found[0].decoder == "zxing-cpp"


def test_frame_scanner_tries_one_ladder_pass_per_frame(rescued: QrSample) -> None:
    scanner = FrameQrScanner()
    results: list[list[DecodedCode]] = [scanner.scan(rescued.image) for _ in range(len(LADDER))]
    first_hit = next(i for i, r in enumerate(results) if r)
    assert results[first_hit][0].text == rescued.text
    # The hit comes from the ladder pass of that frame (the plain pass misses every time).
    assert results[first_hit][0].variant == LADDER[first_hit]


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        st.one_of(
            st.tuples(st.integers(1, 48), st.integers(1, 48)),
            st.tuples(st.integers(1, 48), st.integers(1, 48), st.sampled_from([1, 3, 4])),
        ),
    )
)
def test_arbitrary_pixels_never_crash(image: npt.NDArray[np.uint8]) -> None:
    for code in decode_qr(image):
        assert isinstance(code.text, str)
    assert isinstance(FrameQrScanner().scan(image), list)
