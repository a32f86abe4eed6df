"""The synthetic QR frame set and its measurement: reproducible, and it tells the decoder configurations apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drivers.qr_decode import decode_qr
from hardware_sim.qr_images import (
    FRAME_SIZE,
    decode_report,
    degraded_set,
    load_backgrounds,
    measure_decoding,
    measure_no_code,
    measure_stream,
    render_qr,
)
from tests.face_data import person_photos


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    return [p for paths in person_photos().values() for p in paths]


def test_same_seed_same_pixels(photos: list[Path]) -> None:
    first = degraded_set(photos, 5, seed=11)
    again = degraded_set(photos, 5, seed=11)
    other = degraded_set(photos, 5, seed=12)
    assert all(np.array_equal(a.image, b.image) and a.text == b.text for a, b in zip(first, again, strict=True))
    assert [s.text for s in first] != [s.text for s in other]
    assert all(s.image.shape == (FRAME_SIZE[1], FRAME_SIZE[0], 3) and s.image.dtype == np.uint8 for s in first)


def test_render_qr_round_trips() -> None:
    assert [c.text for c in decode_qr(render_qr("SIM1ROUNDTRIP"))] == ["SIM1ROUNDTRIP"]


def test_measurement_separates_the_configurations(photos: list[Path]) -> None:
    samples = degraded_set(photos, 40)
    scores = {s.name: s for s in measure_decoding(samples)}
    plain, ladder, zbar, full = (
        scores["zxing-cpp"],
        scores["zxing-cpp+preprocessing"],
        scores["pyzbar"],
        scores["decode_qr (all)"],
    )
    # The set is hard enough that plain zxing-cpp misses some, and the ladder never loses a code plain found.
    assert 0 < plain.decoded < plain.total
    assert ladder.decoded >= plain.decoded
    assert full.decoded >= ladder.decoded
    assert zbar.decoded <= full.decoded
    assert all(s.wrong == 0 for s in scores.values())
    assert all(s.median_ms > 0 and s.p95_ms >= s.median_ms for s in scores.values())
    assert sum(plain.misses_by_degradation.values()) >= plain.total - plain.decoded


def test_stream_and_no_code_figures(photos: list[Path]) -> None:
    samples = degraded_set(photos, 10)
    backgrounds = load_backgrounds(photos[:3])
    stream = measure_stream(samples, backgrounds)
    assert 0 < stream.decoded <= stream.total
    assert 1.0 <= stream.mean_frames_to_decode <= stream.frames_per_code
    assert stream.no_code_median_ms > 0
    assert set(measure_no_code(backgrounds, repeats=1)) == {
        "zxing-cpp",
        "zxing-cpp+preprocessing",
        "pyzbar",
        "decode_qr (all)",
    }


def test_decode_report_is_json(photos: list[Path]) -> None:
    import json

    report = decode_report(photos[:4], count=8)
    assert json.loads(json.dumps(report)) == report
    configurations = report["qr_configurations"]
    assert isinstance(configurations, dict)
    assert set(configurations) == {"zxing-cpp", "zxing-cpp+preprocessing", "pyzbar", "decode_qr (all)"}
