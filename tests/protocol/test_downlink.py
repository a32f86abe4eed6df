"""Downlink contract: the server's uplink acknowledgement round-trips, and anything else is refused clearly."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import MAX_DOWNLINK_BYTES, ContractError, Heartbeat, UplinkAck, decode_downlink

NOW = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def ack_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "type": "uplink_ack",
        "device_id": "SIM-0001",
        "acked_through_seq": 42,
        "server_time": "2026-03-01T08:00:00Z",
    }
    doc.update(overrides)
    return doc


def test_uplink_ack_round_trip() -> None:
    ack = UplinkAck(device_id="SIM-0001", acked_through_seq=7, server_time=NOW)
    decoded = decode_downlink(ack.to_bytes())
    assert decoded == ack
    assert isinstance(decoded, UplinkAck)
    assert json.loads(ack.to_bytes())["type"] == "uplink_ack"


def test_nothing_stored_yet_is_ack_zero() -> None:
    decoded = decode_downlink(json.dumps(ack_doc(acked_through_seq=0)).encode())
    assert isinstance(decoded, UplinkAck)
    assert decoded.acked_through_seq == 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"type": "reboot"}, "does not match"),
        ({"acked_through_seq": -1}, "acked_through_seq"),
        ({"acked_through_seq": "many"}, "acked_through_seq"),
        ({"device_id": "a/b"}, "device_id"),
        ({"server_time": "2026-03-01T08:00:00"}, "server_time"),
        ({"schema_version": 2}, "schema_version"),
        ({"extra": 1}, "extra"),
    ],
)
def test_malformed_acks_are_refused_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ContractError, match=field):
        decode_downlink(json.dumps(ack_doc(**overrides)).encode())


def test_missing_type_and_oversize_are_refused() -> None:
    doc = ack_doc()
    del doc["type"]
    with pytest.raises(ContractError, match="type"):
        decode_downlink(json.dumps(doc).encode())
    with pytest.raises(ContractError, match="exceeds"):
        decode_downlink(b" " * (MAX_DOWNLINK_BYTES + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decoding_arbitrary_bytes_never_raises_anything_else(raw: bytes) -> None:
    with contextlib.suppress(ContractError):
        decode_downlink(raw)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: st.lists(c) | st.dictionaries(st.sampled_from(["type", "device_id", "acked_through_seq"]), c),
        max_leaves=20,
    )
)
def test_decoding_arbitrary_json_never_raises_anything_else(doc: object) -> None:
    with contextlib.suppress(ContractError):
        decode_downlink(json.dumps(doc).encode())


def test_heartbeat_without_outbox_sent_total_still_decodes() -> None:
    """Terminals that predate server acks send no `outbox_sent_total`; it defaults to 0."""
    hb = Heartbeat.model_validate(
        {
            "software_version": "0.1.0",
            "config_version": "c1",
            "config_schema_version": 1,
            "interval_s": 30,
            "uptime_s": 1,
            "outbox_depth": 0,
            "outbox_oldest_age_s": None,
            "outbox_used_bytes": 4096,
            "outbox_capacity_bytes": 1 << 20,
        }
    )
    assert hb.outbox_sent_total == 0
