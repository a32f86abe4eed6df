"""`yibao bench outbox-kill`: a few real kill rounds pass, and the checker really refuses a torn or lossy file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from yibao.outbox_kill import _check, _interrupted_outcome, _open_outbox, _parse, bench_outbox_kill


def test_a_few_real_kill_rounds_leave_a_sound_outbox() -> None:
    figures = bench_outbox_kill(rounds=5, seed=7)
    assert figures["ok"] is True, figures["problems"]
    assert figures["lost"] == 0
    assert figures["corrupt"] == 0
    assert sum(figures["kills_by_phase"].values()) == 5
    assert figures["rows_checked"] > 0


def test_the_interrupted_operation_must_be_all_or_nothing() -> None:
    model = {1: "acked", 2: "pending", 3: "pending", 4: "pending"}
    assert _interrupted_outcome(model, dict(model), "claim", [2]) == "rolled_back"
    assert _interrupted_outcome(model, model | {2: "inflight", 3: "inflight"}, "claim", [2]) == "committed"
    # Claim takes the lowest pending seqs: skipping seq 2 is not something a claim can do.
    assert _interrupted_outcome(model, model | {3: "inflight"}, "claim", [2]) == "torn"
    inflight = {1: "inflight", 2: "inflight"}
    assert _interrupted_outcome(inflight, {1: "sent", 2: "sent"}, "sent", [1, 2]) == "committed"
    assert _interrupted_outcome(inflight, {1: "sent", 2: "inflight"}, "sent", [1, 2]) == "torn"
    assert _interrupted_outcome({1: "acked"}, {1: "acked", 2: "pending"}, "enqueue", [2]) == "torn", "half a batch"


def test_the_check_reports_a_missing_committed_row_and_an_undecodable_one(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite3"
    from protocol import AuditEvent, AuditOutcome

    with _open_outbox(db) as outbox:
        outbox.enqueue_many([AuditEvent(category="system", action="t", outcome=AuditOutcome.INFO) for _ in range(3)])
    report = _parse(["ready\n", "begin enqueue 3\n", "done enqueue 1 3\n", "begin enqueue 1\n", "done enqueue 4 4\n"])
    problems, checked, missing, _actual, outcome = _check(db, {}, report)
    assert checked == 3
    assert missing == 1
    assert outcome == "between_operations"
    assert any("missing" in p for p in problems)

    conn = sqlite3.connect(db)
    conn.execute('UPDATE outbox SET envelope = \'{"not": "an envelope"}\' WHERE seq = 2')
    conn.commit()
    conn.close()
    problems, *_ = _check(db, {}, _parse(["begin enqueue 3\n", "done enqueue 1 3\n"]))
    assert any("seq 2 does not decode" in p for p in problems)
