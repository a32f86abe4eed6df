"""Payload schemas carried inside an `Envelope`.

Each payload is a closed pydantic model (`extra="forbid"`): a field the other side does not know is an error, not
something to ignore silently. Adding a payload type means adding a model here and a `PayloadType` member; changing a
payload incompatibly means bumping `protocol.envelope.SCHEMA_VERSION`.

Privacy: no payload here may carry a name, a full ID number, a phone number, a face image or a face template.
Audit events name people only by pseudonymous or masked references.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue

_Short = Annotated[str, Field(min_length=1, max_length=64)]
_Version = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]*$")]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PayloadType(StrEnum):
    """What an envelope carries; routes ingest and is indexed on the server."""

    HEARTBEAT = "heartbeat"
    AUDIT_EVENT = "audit_event"
    COMMAND_RESULT = "command_result"
    SIGNED_RECORD = "signed_record"


class PeripheralKind(StrEnum):
    CAMERA = "camera"
    QR_SCANNER = "qr_scanner"
    ID_CARD_READER = "id_card_reader"
    SS_CARD_READER = "ss_card_reader"
    PRINTER = "printer"
    OTHER = "other"


class PeripheralState(StrEnum):
    """A peripheral's availability as its owner last saw it."""

    OK = "ok"
    DEGRADED = "degraded"
    FAULT = "fault"
    ABSENT = "absent"


class PeripheralStatus(_Closed):
    name: _Short = Field(description="Stable name of the peripheral on this terminal, e.g. 'camera0'.")
    kind: PeripheralKind = Field(description="What sort of device it is.")
    state: PeripheralState = Field(description="Availability as last seen by its owner.")
    simulated: bool = Field(description="True when a hardware simulator stands in for the real device.")
    detail: str | None = Field(default=None, max_length=200, description="Short reason for a non-ok state.")


class Heartbeat(_Closed):
    """Periodic device health: versions, outbox backlog, peripherals. Drives online state on the server."""

    type: Literal["heartbeat"] = "heartbeat"
    software_version: _Version = Field(description="Terminal software version.")
    model_versions: dict[_Short, _Version] = Field(
        default_factory=dict, description="Version (or sha256 prefix) of each loaded ML model, by model name."
    )
    config_version: _Version = Field(description="Version of the terminal configuration bundle in force.")
    config_schema_version: int = Field(ge=1, description="Schema version of that configuration.")
    interval_s: float = Field(gt=0, le=3600, description="Seconds until the next heartbeat is due.")
    uptime_s: float = Field(ge=0, description="Seconds since the terminal process started.")
    outbox_depth: int = Field(
        ge=0,
        description="Records in the outbox the server has not yet acknowledged as stored (pending, in flight, or "
        "published to the broker but not yet covered by an uplink_ack).",
    )
    outbox_oldest_age_s: float | None = Field(
        ge=0,
        description="Age in seconds of the oldest record the server has not yet acknowledged; null when there is none.",
    )
    outbox_sent_total: int = Field(
        default=0,
        ge=0,
        description="Records the server acknowledged as stored over the outbox file's life (survives pruning); "
        "0 from terminals that predate server acknowledgements.",
    )
    outbox_used_bytes: int = Field(
        ge=0, description="Bytes of live pages in the outbox database (freed pages are reused, not counted)."
    )
    outbox_capacity_bytes: int = Field(gt=0, description="The configured outbox size bound.")
    alarms: list[_Short] = Field(default_factory=list, description="Active alarm codes, e.g. 'outbox_full'.")
    peripherals: list[PeripheralStatus] = Field(default_factory=list, description="Each peripheral's status.")


class AuditOutcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    INFO = "info"


AuditDetailValue = Annotated[str, Field(max_length=256)] | int | float | bool | None
"""Detail values are short and flat so that any valid audit event fits well inside MAX_ENVELOPE_BYTES."""


class AuditEvent(_Closed):
    """Something that happened on the terminal and must reach the server's record (S-09: 'all operations leave a
    trace'). `actor` and `subject` are pseudonymous references or masked values, never raw personal data."""

    type: Literal["audit_event"] = "audit_event"
    category: _Short = Field(description="Area, e.g. 'system', 'identity', 'pharmacist', 'admin'.")
    action: _Short = Field(description="Dotted verb, e.g. 'terminal.started', 'outbox.full'.")
    outcome: AuditOutcome = Field(description="success, failure or info.")
    actor: str | None = Field(default=None, max_length=64, description="Who acted (pseudonymous/masked).")
    subject: str | None = Field(default=None, max_length=64, description="What was acted on (masked).")
    detail: dict[_Short, AuditDetailValue] = Field(
        default_factory=dict, max_length=32, description="Small flat key/value context."
    )


class CommandOutcome(StrEnum):
    """What a terminal did with a `protocol.DeviceCommand`."""

    APPLIED = "applied"
    """Carried out (for `ping`: received and answered)."""
    REJECTED = "rejected"
    """Understood but refused: a kind this software cannot carry out yet, or arguments it does not accept."""
    EXPIRED = "expired"
    """Arrived after its `expires_at` by the terminal's clock; not carried out."""
    FAILED = "failed"
    """Tried and failed; `detail` says why (never with personal data)."""


class CommandResult(_Closed):
    """The terminal's one answer to one downlink command, sent through the outbox like any record (so it reaches the
    server exactly once). A command redelivered after it was answered gets no second answer: the first one is
    (re-)sent instead."""

    type: Literal["command_result"] = "command_result"
    command_id: uuid.UUID = Field(description="The command's idempotency key, as the server issued it.")
    outcome: CommandOutcome = Field(description="applied, rejected, expired or failed.")
    detail: str = Field(default="", max_length=200, description="Short reason or summary; no personal data.")
    applied_at: AwareDatetime = Field(description="Terminal wall clock when the command was answered.")


class SignedRecordKind(StrEnum):
    """Records that must be non-repudiable (S-28…S-32): the terminal signs them with its SM2 identity key."""

    REVIEW_DECISION = "review_decision"
    """A pharmacist's prescription review decision, confirmed by face on the terminal."""
    BINDING_APPLICATION = "binding_application"
    """An institution head's application to bind this terminal."""
    SIGN_IN = "sign_in"
    SIGN_OUT = "sign_out"
    POS_VERIFICATION = "pos_verification"
    """The outcome of a POS-requested buyer verification (H-03, K-07; `protocol.purchase.PosVerificationRecord`)."""
    PHARMACIST_ENROLMENT = "pharmacist_enrolment"
    """A pharmacist's face enrolment: live face matched the ID-card photo, consent recorded (protocol.pharmacist)."""


class SignedRecord(_Closed):
    """A record plus the device's SM2 signature over its canonical encoding (`protocol.evidence`). The server
    verifies it against the device's enrolled key of `key_epoch` before storing it, and keeps the signature so that
    anyone holding the public key can verify the record again later."""

    type: Literal["signed_record"] = "signed_record"
    record_type: SignedRecordKind
    record: dict[_Short, JsonValue] = Field(max_length=64, description="The record; no raw personal data.")
    key_epoch: int = Field(ge=1, description="Which of the device's enrolled identity keys signed it.")
    signature: str = Field(pattern=r"^[0-9a-f]{128}$", description="SM2 signature r||s over the canonical form, hex.")


Payload = Heartbeat | AuditEvent | CommandResult | SignedRecord

PAYLOAD_MODELS: dict[PayloadType, type[Heartbeat] | type[AuditEvent] | type[CommandResult] | type[SignedRecord]] = {
    PayloadType.HEARTBEAT: Heartbeat,
    PayloadType.AUDIT_EVENT: AuditEvent,
    PayloadType.COMMAND_RESULT: CommandResult,
    PayloadType.SIGNED_RECORD: SignedRecord,
}
