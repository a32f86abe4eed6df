"""Wire contracts shared by the terminal and the sync server.

This package owns everything both sides must agree on byte for byte: the envelope, the payload schemas, the downlink
messages (server acknowledgements and device commands), the MQTT topic scheme and the injected clock. It imports
nothing of ours, so `terminal` and `sync_server` can both depend on it without depending on each other. It must never
grow behaviour that belongs to one side.
"""

from protocol.clock import Clock, SystemClock
from protocol.downlink import (
    COMMAND_ARGS_MODELS,
    MAX_COMMAND_ARGS,
    MAX_DOWNLINK_BYTES,
    CommandArgs,
    CommandKind,
    DeviceCommand,
    DownlinkMessage,
    LogRequestArgs,
    PingArgs,
    UplinkAck,
    decode_downlink,
    parse_command_args,
)
from protocol.envelope import (
    MAX_ENVELOPE_BYTES,
    SCHEMA_VERSION,
    ContractError,
    DeviceId,
    DeviceStatusMessage,
    Envelope,
    LinkState,
    decode_envelope,
    decode_status,
)
from protocol.payloads import (
    AuditEvent,
    AuditOutcome,
    CommandOutcome,
    CommandResult,
    Heartbeat,
    Payload,
    PayloadType,
    PeripheralKind,
    PeripheralState,
    PeripheralStatus,
    SignedRecord,
    SignedRecordKind,
)
from protocol.topics import Topics

__all__ = [
    "COMMAND_ARGS_MODELS",
    "MAX_COMMAND_ARGS",
    "MAX_DOWNLINK_BYTES",
    "MAX_ENVELOPE_BYTES",
    "SCHEMA_VERSION",
    "AuditEvent",
    "AuditOutcome",
    "Clock",
    "CommandArgs",
    "CommandKind",
    "CommandOutcome",
    "CommandResult",
    "ContractError",
    "DeviceCommand",
    "DeviceId",
    "DeviceStatusMessage",
    "DownlinkMessage",
    "Envelope",
    "Heartbeat",
    "LinkState",
    "LogRequestArgs",
    "Payload",
    "PayloadType",
    "PeripheralKind",
    "PeripheralState",
    "PeripheralStatus",
    "PingArgs",
    "SignedRecord",
    "SignedRecordKind",
    "SystemClock",
    "Topics",
    "UplinkAck",
    "decode_downlink",
    "decode_envelope",
    "decode_status",
    "parse_command_args",
]
