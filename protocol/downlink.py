"""Messages the server sends to one terminal on `Topics.downlink(device_id)`.

A downlink message is a closed pydantic model chosen by its `type` field (a discriminated union):

* `UplinkAck` — "every record of this device with seq 1..`acked_through_seq` is stored on the server". The server
  only ever sends the highest *contiguous* stored sequence, so a terminal may drop every record at or below it and
  must keep (and eventually re-send) everything above it.
* `DeviceCommand` — "do this once": identified by `command_id` (the idempotency key; a terminal remembers every id it
  answered and never carries one out twice), valid between `issued_at` and `expires_at`. The terminal answers each
  command exactly once with a `protocol.CommandResult` uplink record.

Command arguments travel as a small bounded flat dict (`CommandArgs`) and are checked against the kind's closed model
(`COMMAND_ARGS_MODELS`, `parse_command_args`) by the server before it queues a command and by the terminal's handler
before it acts. Not a per-kind union on the wire, on purpose: a terminal running older software than the server must
still *decode* a command whose arguments grew, so that it can answer `rejected` naming the argument instead of dropping
the message as malformed and leaving the command unanswered until it expires.

This module owns those shapes, `decode_downlink` and `parse_command_args`. It must never grow behaviour of either
side, and it must never carry personal data (acks name a device and a number; commands carry operational settings).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Final, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

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


class CommandKind(StrEnum):
    """What a `DeviceCommand` asks for. Terminals carry out every kind but `config_update` and `template_update`, which
    they answer `rejected` ("not supported yet"); docs/architecture.md lists the handlers."""

    CONFIG_UPDATE = "config_update"
    UNBIND = "unbind"
    ROTATE_KEYS = "rotate_keys"
    LOG_REQUEST = "log_request"
    ROSTER_UPDATE = "roster_update"
    TEMPLATE_UPDATE = "template_update"
    PING = "ping"
    BINDING_DECISION = "binding_decision"
    PRESCRIPTIONS_PENDING = "prescriptions_pending"
    CATALOGUE_UPDATE = "catalogue_update"
    PROXY_RELATIONSHIPS = "proxy_relationships"
    TEMPLATE_PURGE = "template_purge"


MAX_COMMAND_ARGS: Final = 16
"""At most this many argument keys: commands carry settings and references, never bulk data."""

_ArgKey = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
CommandArgValue = Annotated[str, Field(max_length=256)] | int | float | bool | None
CommandArgs = dict[_ArgKey, CommandArgValue]
"""A command's arguments on the wire: flat, at most `MAX_COMMAND_ARGS` keys, scalar values, strings <= 256 chars."""


class _ClosedArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PingArgs(_ClosedArgs):
    """`ping` takes no arguments: the answer itself is the point (is the device there, does the command path work)."""


class LogRequestArgs(_ClosedArgs):
    """`log_request`: the terminal sends a summary of its recent state (outbox figures, versions; no personal data)."""

    window_s: int = Field(
        default=3600, ge=60, le=7 * 24 * 3600, description="How far back the summary looks, in seconds."
    )


class BindingDecisionArgs(_ClosedArgs):
    """`binding_decision`: the server's answer to this terminal's binding application (docs/binding.md). Names the
    institution, never the applicant; `contact` is the service desk unbound staff should call (not a person's data)."""

    application_id: int = Field(ge=1, description="The server's id of the application decided.")
    approved: bool
    institution_code: str | None = Field(default=None, max_length=32)
    institution_name: str | None = Field(default=None, max_length=200)
    reason: str = Field(min_length=1, max_length=256, description="The device admin's reason.")
    contact: str | None = Field(default=None, max_length=64)


class UnbindArgs(_ClosedArgs):
    """`unbind`: the terminal is no longer bound to any institution (docs/binding.md)."""

    reason: str = Field(min_length=1, max_length=256, description="The device admin's reason.")
    contact: str | None = Field(default=None, max_length=64)


class PrescriptionsPendingArgs(_ClosedArgs):
    """`prescriptions_pending`: a notice that HIS registered a prescription at this terminal's institution
    (docs/prescriptions.md). References only; the terminal fetches its pending list over HTTPS."""

    prescription_id: int = Field(ge=1, description="The server's id of the prescription registered.")
    rx_no: str = Field(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_-]+$", description="医保处方编号.")


class CatalogueUpdateArgs(_ClosedArgs):
    """`catalogue_update`: a new version of a catalogue (or of the drug-usage rules) is published (docs/catalogue.md).
    The terminal fetches the document over HTTPS from the version it holds; the command carries only the notice."""

    kind: Literal["drug", "treatment", "institution", "drug_rules"] = Field(
        description="A `protocol.catalogue.CatalogueKind` value, or 'drug_rules' for the rule set."
    )
    version: int = Field(ge=1, description="The version now published.")
    content_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="Its content hash (SM3, lowercase hex).")


class ProxyRelationshipsArgs(_ClosedArgs):
    """`proxy_relationships`: the proxy-purchase relationships (代购药关系) of this terminal's institution changed; the
    terminal fetches them again over its device API (docs/purchases.md). A notice only: no person references."""

    changed_at: str | None = Field(default=None, max_length=40, description="Server time of the change (ISO 8601).")


class RosterUpdateArgs(_ClosedArgs):
    """`roster_update`: the pharmacists of this terminal's institution or their face templates changed; the terminal
    fetches `GET /device/v1/pharmacists` (docs/pharmacists.md). A notice only: the roster never rides on a command."""

    institution_code: str = Field(min_length=1, max_length=32)
    reason: str = Field(min_length=1, max_length=64, description="e.g. 'his_sync', 'template_enrolled'.")


class TemplatePurgeArgs(_ClosedArgs):
    """`template_purge`: delete a pharmacist's face template (they left the institution), or every pharmacist
    template on the terminal when `pharmacist_code` is null (docs/pharmacists.md)."""

    pharmacist_code: str | None = Field(default=None, min_length=1, max_length=20)
    reason: str = Field(min_length=1, max_length=64, description="e.g. 'pharmacist_left'.")


COMMAND_ARGS_MODELS: Final[Mapping[CommandKind, type[_ClosedArgs]]] = {
    CommandKind.PING: PingArgs,
    CommandKind.LOG_REQUEST: LogRequestArgs,
    CommandKind.BINDING_DECISION: BindingDecisionArgs,
    CommandKind.UNBIND: UnbindArgs,
    CommandKind.PRESCRIPTIONS_PENDING: PrescriptionsPendingArgs,
    CommandKind.CATALOGUE_UPDATE: CatalogueUpdateArgs,
    CommandKind.PROXY_RELATIONSHIPS: ProxyRelationshipsArgs,
    CommandKind.ROSTER_UPDATE: RosterUpdateArgs,
    CommandKind.TEMPLATE_PURGE: TemplatePurgeArgs,
}
"""The closed argument model of each kind that has one today; the others accept any `CommandArgs` on the wire (their
terminals answer `rejected` for now)."""


def parse_command_args(kind: CommandKind, args: Mapping[str, object]) -> _ClosedArgs | None:
    """Check `args` against the closed model of `kind`: the model, `None` for a kind without one yet, or
    `ContractError` naming the offending argument (never its value)."""
    model = COMMAND_ARGS_MODELS.get(kind)
    if model is None:
        return None
    try:
        return model.model_validate(dict(args))
    except ValidationError as exc:
        raise ContractError(f"invalid {kind.value} arguments: {summarise_validation_error(exc)}") from exc


class DeviceCommand(BaseModel):
    """One command to one terminal, to be carried out at most once and answered exactly once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Wire schema version.")
    type: Literal["command"] = "command"
    command_id: uuid.UUID = Field(description="Idempotency key: a terminal never carries out one id twice.")
    device_id: DeviceId
    kind: CommandKind
    issued_at: AwareDatetime = Field(description="Server wall clock when the command was queued.")
    expires_at: AwareDatetime = Field(description="Not to be carried out at or after this instant (terminal clock).")
    args: CommandArgs = Field(default_factory=dict, max_length=MAX_COMMAND_ARGS, description="Flat arguments.")

    @model_validator(mode="after")
    def _expires_after_issue(self) -> Self:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        return self

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


DownlinkMessage = Annotated[UplinkAck | DeviceCommand, Field(discriminator="type")]
"""Everything that travels on a device's downlink topic, chosen by `type`."""

_DOWNLINK: Final[TypeAdapter[UplinkAck | DeviceCommand]] = TypeAdapter(DownlinkMessage)


def decode_downlink(raw: bytes) -> UplinkAck | DeviceCommand:
    """Parse wire bytes from a downlink topic into a `DownlinkMessage` or raise `ContractError` saying why not."""
    if len(raw) > MAX_DOWNLINK_BYTES:
        raise ContractError(f"downlink message of {len(raw)} bytes exceeds the {MAX_DOWNLINK_BYTES}-byte limit")
    try:
        return _DOWNLINK.validate_json(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid downlink message: {summarise_validation_error(exc)}") from exc
