"""Wire contracts: round trips, and clear refusals of anything malformed."""

from __future__ import annotations

import contextlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    MAX_ENVELOPE_BYTES,
    AuditEvent,
    AuditOutcome,
    ContractError,
    DeviceStatusMessage,
    Envelope,
    Heartbeat,
    LinkState,
    Payload,
    PayloadType,
    PeripheralKind,
    PeripheralState,
    PeripheralStatus,
    Topics,
    decode_envelope,
    decode_status,
)


def heartbeat() -> Heartbeat:
    return Heartbeat(
        software_version="0.1.0",
        model_versions={"face_embedder": "dlib-resnet-v1"},
        config_version="demo-1",
        config_schema_version=1,
        interval_s=30,
        uptime_s=12.5,
        outbox_depth=3,
        outbox_oldest_age_s=1.25,
        outbox_used_bytes=40960,
        outbox_capacity_bytes=1 << 28,
        alarms=[],
        peripherals=[
            PeripheralStatus(name="camera0", kind=PeripheralKind.CAMERA, state=PeripheralState.OK, simulated=True)
        ],
    )


def envelope(payload: Payload | None = None, **overrides: Any) -> Envelope:
    payload = payload or heartbeat()
    fields: dict[str, Any] = {
        "device_id": "SIM-0001",
        "seq": 7,
        "message_id": uuid.uuid4(),
        "payload_type": PayloadType(payload.type),
        "device_time": datetime(2026, 11, 23, 8, 0, tzinfo=UTC),
        "boot_id": uuid.uuid4(),
        "monotonic_ns": 123_456_789,
        "payload": payload,
    }
    fields.update(overrides)
    return Envelope(**fields)


def test_heartbeat_envelope_round_trips_through_bytes() -> None:
    env = envelope()
    back = decode_envelope(env.to_bytes())
    assert back == env
    assert isinstance(back.payload, Heartbeat)
    assert back.payload.peripherals[0].state is PeripheralState.OK


def test_audit_event_envelope_round_trips() -> None:
    event = AuditEvent(category="system", action="terminal.started", outcome=AuditOutcome.INFO, detail={"n": 1})
    env = envelope(event)
    back = decode_envelope(env.to_bytes())
    assert back.payload == event
    assert back.payload_type is PayloadType.AUDIT_EVENT


def _wire(**changes: Any) -> bytes:
    doc = json.loads(envelope().to_bytes())
    for key, value in changes.items():
        if value is ...:
            doc.pop(key)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("changes", "mentions"),
    [
        ({"seq": 0}, "seq"),
        ({"seq": "seven"}, "seq"),
        ({"device_id": "a/b"}, "device_id"),
        ({"device_id": ...}, "device_id"),
        ({"message_id": "not-a-uuid"}, "message_id"),
        ({"device_time": "2026-11-23T08:00:00"}, "device_time"),  # naive time: timezone required
        ({"schema_version": 2}, "schema_version"),
        ({"payload_type": "audit_event"}, "payload"),  # type says audit, body is a heartbeat
        ({"payload_type": "firmware"}, "payload_type"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_malformed_envelopes_are_refused_with_the_field_named(changes: dict[str, Any], mentions: str) -> None:
    with pytest.raises(ContractError, match=mentions):
        decode_envelope(_wire(**changes))


def test_unknown_payload_field_is_refused() -> None:
    doc = json.loads(envelope().to_bytes())
    doc["payload"]["face_image"] = "base64..."
    with pytest.raises(ContractError, match="face_image"):
        decode_envelope(json.dumps(doc).encode())


def test_audit_detail_values_are_bounded() -> None:
    with pytest.raises(ValueError, match="256"):
        AuditEvent(category="system", action="x.y", outcome=AuditOutcome.INFO, detail={"note": "x" * 257})


def test_largest_valid_audit_event_fits_in_an_envelope() -> None:
    event = AuditEvent(
        category="c" * 64,
        action="a" * 64,
        outcome=AuditOutcome.FAILURE,
        actor="p" * 64,
        subject="s" * 64,
        detail={f"k{i:02d}" + "k" * 60: "\u9fa5" * 256 for i in range(32)},
    )
    assert len(envelope(event).to_bytes()) < MAX_ENVELOPE_BYTES


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(ContractError, match="exceeds"):
        decode_envelope(b" " * (MAX_ENVELOPE_BYTES + 1))


@pytest.mark.parametrize("raw", [b"", b"{", b"null", b"[]", b"\xff\xfe", b'{"seq": 1}'])
def test_garbage_is_a_contract_error(raw: bytes) -> None:
    with pytest.raises(ContractError):
        decode_envelope(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decoding_arbitrary_bytes_never_raises_anything_else(raw: bytes) -> None:
    with contextlib.suppress(ContractError):
        decode_envelope(raw)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=10), c),
        max_leaves=20,
    )
)
def test_decoding_arbitrary_json_never_raises_anything_else(doc: object) -> None:
    with contextlib.suppress(ContractError):
        decode_envelope(json.dumps(doc).encode())


def test_status_message_round_trip_and_refusal() -> None:
    msg = DeviceStatusMessage(device_id="SIM-0001", state=LinkState.OFFLINE, boot_id=uuid.uuid4())
    assert decode_status(msg.to_bytes()) == msg
    with pytest.raises(ContractError, match="state"):
        decode_status(b'{"device_id": "SIM-0001", "state": "sleeping", "boot_id": "%s"}' % str(uuid.uuid4()).encode())


def test_topic_scheme() -> None:
    t = Topics()
    assert t.uplink("SIM-0001") == "yibao/v1/dev/SIM-0001/up"
    assert t.downlink("SIM-0001") == "yibao/v1/dev/SIM-0001/down"
    assert t.status("SIM-0001") == "yibao/v1/dev/SIM-0001/status"
    assert t.all_uplinks_shared == "$share/yibao-ingest/yibao/v1/dev/+/up"
    assert t.device_of("yibao/v1/dev/SIM-0001/up") == "SIM-0001"
    assert t.device_of("yibao/v1/dev/SIM-0001/other") is None
    assert t.device_of("elsewhere/dev/SIM-0001/up") is None
    assert t.device_of("yibao/v1/dev/+/up") is None
    with pytest.raises(ValueError, match="device id"):
        t.uplink("a/b")
