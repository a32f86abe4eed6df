"""The chaos harness's pure parts: the fault schedule and the terminal's ledger."""

from __future__ import annotations

import random
from pathlib import Path

from yibao.chaos import FAULT_KINDS, _fault_plan, _read_ledger


def test_fault_plan_covers_every_kind_in_each_round_and_is_repeatable_by_seed() -> None:
    plan = _fault_plan(random.Random(1), FAULT_KINDS, 25)
    assert len(plan) == 25
    for start in range(0, 24, len(FAULT_KINDS)):
        assert sorted(plan[start : start + len(FAULT_KINDS)]) == sorted(FAULT_KINDS)
    assert plan == _fault_plan(random.Random(1), FAULT_KINDS, 25)
    assert plan != _fault_plan(random.Random(2), FAULT_KINDS, 25)


def test_ledger_counts_accepted_refused_and_stopped_and_ignores_a_torn_last_line(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.txt"
    ledger.write_text("ok 1 0\nok 1 1\nrefused 1 2 full\nok 1 3\nstopped 1 4\nok 2 0\nrefused 2 1 write_error\nok 2")
    accepted, refused, stopped = _read_ledger(ledger)
    assert accepted == {(1, 0), (1, 1), (1, 3), (2, 0)}
    assert refused == {"full": 1, "write_error": 1}
    assert stopped == {1}
    assert _read_ledger(tmp_path / "absent.txt") == (set(), {}, set())
