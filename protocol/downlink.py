"""Messages the server sends to one terminal on `Topics.downlink(device_id)`.

A downlink message is a closed pydantic model chosen by its `type` field (a discriminated union), so server-to-device
commands can join `DownlinkMessage` later without changing how terminals decode. Today there is one member:

* `UplinkAck` — "every record of this device with seq 1..`acked_through_seq` is stored on the server". The server
  only ever sends the highest *contiguous* stored sequence, so a terminal may drop every record at or below it and
  must keep (and eventually re-send) everything above it.

This module owns those shapes and `decode_downlink`. It must never grow behaviour of either side, and it must never
carry personal data (acks name a device and a number, nothing else).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from protocol.envelope import SCHEMA_VERSION, ContractError, DeviceId, summarise_validation_error

MAX_DOWNLINK_BYTES: Final = 64 * 1024
"""Larger downlink messages are refused before parsing."""


class UplinkAck(BaseModel):
    """The server's acknowledgement of the highest contiguous stored sequence number of one device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Wire schema version.")
    type: Literal["uplink_ack"] = "uplink_ack"
    device_id: DeviceId
    acked_through_seq: int = Field(
        ge=0, description="Every seq 1..N of this device is stored on the server; 0 when nothing is stored yet."
    )
    server_time: AwareDatetime = Field(description="Server wall clock when the ack was computed.")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


DownlinkMessage = Annotated[UplinkAck, Field(discriminator="type")]
"""Everything that travels on a device's downlink topic, chosen by `type`. Commands join this union later
(`Annotated[UplinkAck | DeviceCommand, Field(discriminator="type")]`)."""

_DOWNLINK: Final[TypeAdapter[UplinkAck]] = TypeAdapter(DownlinkMessage)


def decode_downlink(raw: bytes) -> UplinkAck:
    """Parse wire bytes from a downlink topic into a `DownlinkMessage` or raise `ContractError` saying why not."""
    if len(raw) > MAX_DOWNLINK_BYTES:
        raise ContractError(f"downlink message of {len(raw)} bytes exceeds the {MAX_DOWNLINK_BYTES}-byte limit")
    try:
        return _DOWNLINK.validate_json(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid downlink message: {summarise_validation_error(exc)}") from exc
