"""`yibao bench serial` reads through the real drivers from the pty simulators and prints one JSON line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from yibao.cli import app


def test_bench_serial_prints_one_json_line() -> None:
    result = CliRunner().invoke(app, ["bench", "serial", "--reads", "10"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    figures = json.loads(lines[0])
    assert figures["consistent"] is True
    for step in ("id_card_read", "ss_card_read", "qr_scan_to_code"):
        assert figures[step]["n"] == 10
        assert figures[step]["median_ms"] > 0
