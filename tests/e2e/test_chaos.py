"""A short chaos run with every real piece (Mosquitto, the server process, terminal processes, the TCP proxies): each
fault kind happens once, and every record the outboxes accepted is stored exactly once. The long runs (25 cycles,
PostgreSQL) are `yibao bench sync --chaos`; their figures are in docs/benchmarks.md."""

from __future__ import annotations

import pytest

from yibao.chaos import FAULT_KINDS, ChaosOptions, bench_sync_chaos

pytestmark = pytest.mark.e2e


def test_every_fault_kind_once_loses_and_duplicates_nothing() -> None:
    figures = bench_sync_chaos(
        ChaosOptions(
            cycles=len(FAULT_KINDS),
            seed=20261123,
            terminals=2,
            rate=10.0,
            gap_s=(0.2, 0.6),
            outage_s=(0.3, 1.5),
            recovery_timeout_s=60.0,
            drain_timeout_s=60.0,
        )
    )
    assert figures["faults"] == dict.fromkeys(FAULT_KINDS, 1)
    assert figures["sent"] > 100
    assert figures["lost"] == 0
    assert figures["duplicated"] == 0
    assert figures["unexpected"] == 0
    assert figures["stored"] == figures["sent"]
    assert figures["seq_holes"] == 0
    assert figures["unrecovered_cycles"] == 0
    assert figures["drained"] is True
    assert figures["disk_full_refusals_seen"] == 1, "the disk fault never made the outbox refuse a record"
    assert figures["refused_disk_full"] > 0
    assert figures["ok"] is True
