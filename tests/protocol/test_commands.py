"""Command contract: `DeviceCommand` on the downlink and `CommandResult` in the envelope round-trip; anything else is
refused with a `ContractError` naming the field, never with another exception."""

from __future__ import annotations

import contextlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    MAX_COMMAND_ARGS,
    CommandKind,
    CommandOutcome,
    CommandResult,
    ContractError,
    DeviceCommand,
    Envelope,
    LogRequestArgs,
    PayloadType,
    PingArgs,
    decode_downlink,
    decode_envelope,
    parse_command_args,
)

NOW = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
COMMAND_ID = uuid.UUID("0b6f2d0e-8f5e-4c3a-9a53-3d3c1e2b4a10")


def command_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "type": "command",
        "command_id": str(COMMAND_ID),
        "device_id": "SIM-0001",
        "kind": "log_request",
        "issued_at": "2026-03-01T08:00:00Z",
        "expires_at": "2026-03-01T09:00:00Z",
        "args": {"window_s": 600},
    }
    doc.update(overrides)
    return doc


@pytest.mark.parametrize("kind", list(CommandKind))
def test_every_kind_round_trips(kind: CommandKind) -> None:
    command = DeviceCommand(
        command_id=uuid.uuid4(),
        device_id="SIM-0001",
        kind=kind,
        issued_at=NOW,
        expires_at=NOW + timedelta(minutes=5),
        args={"a": 1, "b": "x", "c": None, "d": True, "e": 1.5},
    )
    decoded = decode_downlink(command.to_bytes())
    assert decoded == command
    assert isinstance(decoded, DeviceCommand)
    assert json.loads(command.to_bytes())["type"] == "command"


def test_a_command_document_decodes_and_its_args_parse() -> None:
    decoded = decode_downlink(json.dumps(command_doc()).encode())
    assert isinstance(decoded, DeviceCommand)
    assert decoded.kind is CommandKind.LOG_REQUEST
    assert parse_command_args(decoded.kind, decoded.args) == LogRequestArgs(window_s=600)
    assert parse_command_args(CommandKind.PING, {}) == PingArgs()
    assert parse_command_args(CommandKind.LOG_REQUEST, {}) == LogRequestArgs()
    assert parse_command_args(CommandKind.CONFIG_UPDATE, {"anything": 1}) is None


@pytest.mark.parametrize(
    ("kind", "args", "field"),
    [
        (CommandKind.PING, {"x": 1}, "x"),
        (CommandKind.LOG_REQUEST, {"window_s": 1}, "window_s"),
        (CommandKind.LOG_REQUEST, {"window_s": "a day"}, "window_s"),
        (CommandKind.LOG_REQUEST, {"verbose": True}, "verbose"),
    ],
)
def test_bad_arguments_of_a_known_kind_are_refused_naming_the_argument(
    kind: CommandKind, args: dict[str, Any], field: str
) -> None:
    with pytest.raises(ContractError, match=field):
        parse_command_args(kind, args)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"kind": "reboot"}, "kind"),
        ({"command_id": "not-a-uuid"}, "command_id"),
        ({"device_id": "a/b"}, "device_id"),
        ({"issued_at": "2026-03-01T08:00:00"}, "issued_at"),
        ({"expires_at": "2026-03-01T07:00:00Z"}, "expires_at must be after issued_at"),
        ({"args": {"Bad Key": 1}}, "args"),
        ({"args": {"nested": {"a": 1}}}, "args"),
        ({"args": {"long": "x" * 257}}, "args"),
        ({"args": {f"k{i}": i for i in range(MAX_COMMAND_ARGS + 1)}}, "args"),
        ({"schema_version": 2}, "schema_version"),
        ({"extra": 1}, "extra"),
    ],
)
def test_malformed_commands_are_refused_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ContractError, match=field):
        decode_downlink(json.dumps(command_doc(**overrides)).encode())


def result_envelope(**payload_overrides: Any) -> Envelope:
    payload: dict[str, Any] = {
        "type": "command_result",
        "command_id": str(COMMAND_ID),
        "outcome": "applied",
        "detail": "pong",
        "applied_at": "2026-03-01T08:00:01Z",
    }
    payload.update(payload_overrides)
    return Envelope.model_validate(
        {
            "device_id": "SIM-0001",
            "seq": 3,
            "message_id": str(uuid.uuid4()),
            "payload_type": "command_result",
            "device_time": "2026-03-01T08:00:01Z",
            "boot_id": str(uuid.uuid4()),
            "monotonic_ns": 5,
            "payload": payload,
        }
    )


def test_command_result_round_trips_in_an_envelope() -> None:
    envelope = result_envelope()
    decoded = decode_envelope(envelope.to_bytes())
    assert decoded == envelope
    assert decoded.payload_type is PayloadType.COMMAND_RESULT
    assert isinstance(decoded.payload, CommandResult)
    assert decoded.payload.outcome is CommandOutcome.APPLIED
    assert decoded.payload.command_id == COMMAND_ID


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"outcome": "maybe"}, "outcome"),
        ({"detail": "x" * 201}, "detail"),
        ({"applied_at": "2026-03-01T08:00:01"}, "applied_at"),
        ({"command_id": 7}, "command_id"),
        ({"extra": 1}, "extra"),
    ],
)
def test_malformed_command_results_are_refused(overrides: dict[str, Any], field: str) -> None:
    raw = json.loads(result_envelope().to_bytes())
    raw["payload"].update(overrides)
    with pytest.raises(ContractError, match=field):
        decode_envelope(json.dumps(raw).encode())


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda c: (
            st.lists(c, max_size=4)
            | st.dictionaries(
                st.sampled_from(["type", "command_id", "device_id", "kind", "issued_at", "expires_at", "args", "x"]),
                c,
                max_size=8,
            )
        ),
        max_leaves=20,
    )
)
def test_arbitrary_json_shaped_like_a_command_never_raises_anything_else(doc: Any) -> None:
    if isinstance(doc, dict):
        doc = {**command_doc(), **doc}
    with contextlib.suppress(ContractError):
        decode_downlink(json.dumps(doc).encode())


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=70), st.none() | st.integers() | st.text(max_size=300), max_size=20))
def test_arbitrary_args_never_raise_anything_else(args: dict[str, Any]) -> None:
    with contextlib.suppress(ContractError):
        decode_downlink(json.dumps(command_doc(args=args)).encode())
    for kind in CommandKind:
        with contextlib.suppress(ContractError):
            parse_command_args(kind, args)
