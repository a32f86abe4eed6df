"""`yibao bench vision` runs end to end and prints one JSON line with every figure (no timing assertions)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tests.face_data import faces_dir
from yibao.cli import app


def test_bench_vision_prints_one_json_line_with_every_figure() -> None:
    result = CliRunner().invoke(
        app, ["bench", "vision", "--faces", str(faces_dir()), "--repeats", "5", "--qr-codes", "20", "--compare"]
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    figures = json.loads(lines[0])
    for step in ("detection", "align_embedding", "liveness", "verify_1to1", "identify_1toN_50"):
        assert figures["ours"][step]["median_ms"] > 0
        assert figures["ours"][step]["n"] == 5
    assert figures["ours"]["accuracy"]["genuine_pairs"] > 0
    assert figures["ours"]["accuracy"]["tar"] > 0.8
    assert figures["face_recognition"]["verify_1to1"]["median_ms"] > 0
    assert figures["qr"]["per_frame"]["n"] == 20
    assert int(figures["qr"]["stream_decoded"].split("/")[0]) > 10
    assert figures["peak_rss_mb"] > 0
    assert set(figures["bars"]) == {
        "verify_1to1_median_le_40ms",
        "identify_1toN_50_median_le_45ms",
        "qr_per_frame_median_le_5ms",
    }
