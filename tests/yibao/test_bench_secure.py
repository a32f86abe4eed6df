"""`yibao bench sync --encryption on`: a tiny encrypted run through the real server, broker and fleet."""

from __future__ import annotations

import json

import pytest

from yibao.bench import SyncBenchOptions, bench_sync, bench_sync_prefilled
from yibao.bench_secure import check_encryption, reported_encryption, server_env


def test_encryption_choices_and_combinations_the_bench_does_not_measure_are_refused() -> None:
    check_encryption("on", ceiling=False)
    check_encryption("off", ceiling=True)
    with pytest.raises(ValueError, match="'off' or 'on'"):
        check_encryption("sm4", ceiling=False)
    with pytest.raises(ValueError, match="ceiling"):
        check_encryption("on", ceiling=True)
    assert server_env("on") == {"YIBAO_SERVER_UPLINK_SECURITY": "required"}
    assert server_env("off") == {}
    assert reported_encryption("on") == "sm4-gcm"


@pytest.mark.e2e
def test_an_encrypted_bench_stores_every_record_with_no_security_refusal() -> None:
    line = bench_sync(
        SyncBenchOptions(
            terminals=5,
            events=200,
            duration_s=90,
            hold_s=1.5,
            scheduling="pooled",
            heartbeat_interval_s=1.0,
            encryption="on",
        )
    )
    figures = json.loads(line)
    assert figures["encryption"] == "sm4-gcm"
    assert (figures["stored"], figures["lost"], figures["duplicated"]) == (200, 0, 0)
    # the server required secure frames: anything plaintext would have been refused and counted here
    assert figures["security_refusals"] == 0
    assert figures["enrolled"] == figures["devices_enrolled_in_db"] == 5
    assert figures["enrol_s"] > 0
    # the sealed uplink_acks were opened with the devices' session keys: every record has its "stored" time
    assert figures["records_without_ack_seen"] == 0
    assert figures["p99_ms"] >= figures["p50_ms"] > 0
    assert figures["heartbeats_received"] > 0  # sealed heartbeats were accepted too


@pytest.mark.e2e
def test_an_encrypted_prefilled_drain_stores_every_record() -> None:
    """The server alone draining sealed frames queued while it was away (enrolled against its first run)."""
    figures = json.loads(
        bench_sync_prefilled(SyncBenchOptions(terminals=4, events=400, duration_s=90, encryption="on"))
    )
    assert figures["encryption"] == "sm4-gcm"
    assert (figures["stored"], figures["lost"]) == (400, 0)
    assert figures["security_refusals"] == 0
    assert figures["devices_enrolled_in_db"] == 4
