"""The envelope every uplink record travels in, and the retained device-status message.

An envelope is identified twice, on purpose: by (`device_id`, `seq`) — the per-device monotonic sequence number the
terminal's outbox assigns in the same transaction as the record — and by `message_id`, a UUID. The server stores each
envelope exactly once under unique constraints on both. `device_time` is the terminal's wall clock (which may be
wrong); `monotonic_ns` with `boot_id` orders records within one boot even if the wall clock jumps.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from protocol.payloads import PAYLOAD_MODELS, Payload, PayloadType

SCHEMA_VERSION: Literal[1] = 1
"""Wire schema version; bump on an incompatible change to the envelope or a payload."""

MAX_ENVELOPE_BYTES = 256 * 1024
"""Larger messages are refused before parsing."""

DeviceId = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{2,63}$",
        description="Terminal identifier: 3-64 chars of letters, digits, '-' and '_'.",
    ),
]


class ContractError(ValueError):
    """Raised when bytes from the wire do not form a valid message; the text says what is wrong."""


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Wire schema version.")
    device_id: DeviceId
    seq: int = Field(ge=1, description="Per-device monotonic sequence number, assigned by the outbox.")
    message_id: uuid.UUID = Field(description="Unique id of this record; the idempotency key.")
    payload_type: PayloadType
    device_time: AwareDatetime = Field(description="Terminal wall-clock time when the record was created.")
    boot_id: uuid.UUID = Field(description="Identifies the terminal process run that `monotonic_ns` belongs to.")
    monotonic_ns: int = Field(ge=0, description="Terminal monotonic clock when the record was created.")
    payload: Payload

    @field_validator("payload", mode="before")
    @classmethod
    def _payload_matches_type(cls, value: Any, info: ValidationInfo) -> Any:
        payload_type = info.data.get("payload_type")
        if payload_type is None:  # payload_type itself failed; its own error is reported
            return value
        model = PAYLOAD_MODELS[payload_type]
        if isinstance(value, model):
            return value
        if isinstance(value, dict):
            return model.model_validate(value)
        raise ValueError(f"payload must be an object of type {payload_type.value}")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class LinkState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class DeviceStatusMessage(BaseModel):
    """Retained on the device's status topic: 'online' when it connects, 'offline' as its last will."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    device_id: DeviceId
    state: LinkState
    boot_id: uuid.UUID
    at: datetime | None = Field(default=None, description="When the device published it (absent for the will).")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


def summarise_validation_error(exc: ValidationError) -> str:
    """The first few field errors of `exc` as one line (field paths and messages, never the input values)."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def decode_envelope(raw: bytes) -> Envelope:
    """Parse wire bytes into an envelope or raise `ContractError` saying why not."""
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise ContractError(f"envelope of {len(raw)} bytes exceeds the {MAX_ENVELOPE_BYTES}-byte limit")
    try:
        return Envelope.model_validate_json(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid envelope: {summarise_validation_error(exc)}") from exc


def decode_status(raw: bytes) -> DeviceStatusMessage:
    """Parse a retained status message or raise `ContractError`."""
    if len(raw) > 4096:
        raise ContractError("status message too large")
    try:
        return DeviceStatusMessage.model_validate_json(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid status message: {summarise_validation_error(exc)}") from exc
