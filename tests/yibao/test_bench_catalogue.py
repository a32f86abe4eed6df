"""`yibao bench catalogue` applies a synthetic catalogue, times searches of each kind and prints one JSON line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from yibao.cli import app


def test_bench_catalogue_prints_one_json_line() -> None:
    result = CliRunner().invoke(app, ["bench", "catalogue", "--drugs", "800", "--queries", "20"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    figures = json.loads(lines[0])
    assert figures["drugs"] == 800
    assert figures["held_after_delta"] == {"version": 2, "entries": 750}
    assert figures["snapshot_apply_ms"] > 0
    for kind in ("substring", "code", "pinyin"):
        assert figures["search_ms"][kind]["n"] == 20
        assert figures["search_ms"][kind]["found_share"] == 1.0
    assert figures["rules_evaluate_ms"]["rules"] == 300
