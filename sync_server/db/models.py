"""The ORM schema of the sync server (SQLAlchemy 2 typed declarative).

It owns the tables and their constraints; Alembic migrations in `sync_server/migrations` must produce exactly this
schema (a test compares them). Types are portable on purpose (`JSON`, `Uuid`, plain strings for enums, no
PostgreSQL-only features) because the buyer's databases are Dameng/Kingbase-class. It must never contain query
logic or behaviour beyond small derived properties.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from sync_server.db.types import UtcDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}
"""Deterministic constraint names, so migrations can drop or alter them on every database."""

# BIGINT everywhere except SQLite, where only INTEGER PRIMARY KEY is the auto-incrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON(), datetime: UtcDateTime(), uuid.UUID: Uuid()}


def _str_enum(enum: type[StrEnum], length: int) -> Enum:
    """Store enum values (not names) as VARCHAR without a database enum type or CHECK constraint, so adding a
    member later needs no migration on any database."""
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class InstitutionKind(StrEnum):
    """What sort of 定点医药机构 (designated medical institution) a terminal stands in."""

    PHARMACY = "pharmacy"
    CLINIC = "clinic"
    HOSPITAL = "hospital"
    SERVICE_HALL = "service_hall"
    OTHER = "other"
    # I-09: the other supervised 两定 institutions named by the requirements.
    OUTPATIENT = "outpatient"
    TCM_MASSAGE = "tcm_massage"
    ACUPUNCTURE = "acupuncture"
    DIALYSIS = "dialysis"


class RegistrationState(StrEnum):
    """Where a device is in its life cycle on the server (docs/identity.md).

    unprovisioned (auto-registered by plaintext traffic in dev) -> registered (an admin issued a claim token) ->
    enrolled (the device proved its SM2 key) -> revoked; a reset returns enrolled/revoked to registered.
    """

    UNPROVISIONED = "unprovisioned"
    REGISTERED = "registered"
    ENROLLED = "enrolled"
    REVOKED = "revoked"


class LinkStateColumn(StrEnum):
    """Mirror of `protocol.LinkState`, kept here so the schema does not change when the wire enum grows."""

    ONLINE = "online"
    OFFLINE = "offline"


class Institution(Base):
    __tablename__ = "institutions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(String(32), unique=True, comment="医保 institution code (定点机构编码).")
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[InstitutionKind] = mapped_column(_str_enum(InstitutionKind, 32))
    region_code: Mapped[str] = mapped_column(String(6), comment="6-digit 医保区划 (administrative division) code.")
    created_at: Mapped[datetime]
    address: Mapped[str | None] = mapped_column(String(256), comment="地址 (E-06).")
    head_masked: Mapped[str | None] = mapped_column(String(50), comment="机构负责人, masked name only (E-06).")
    contact_masked: Mapped[str | None] = mapped_column(String(20), comment="联系方式, masked phone only (E-06).")
    source: Mapped[str | None] = mapped_column(String(32), comment="Where the record came from (D-02).")
    updated_at: Mapped[datetime | None]

    devices: Mapped[list[Device]] = relationship(back_populates="institution")


class Device(Base):
    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    institution_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("institutions.id", ondelete="SET NULL"), index=True
    )
    registration: Mapped[RegistrationState] = mapped_column(_str_enum(RegistrationState, 16))
    link_state: Mapped[LinkStateColumn] = mapped_column(
        _str_enum(LinkStateColumn, 16), comment="Last retained status (online on connect, offline as last will)."
    )
    link_state_at: Mapped[datetime | None] = mapped_column(comment="When the server received the last status.")
    online: Mapped[bool] = mapped_column(
        comment="Derived: link_state is online and the last heartbeat has not timed out. Kept by ingest + sweeper."
    )
    first_seen_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None] = mapped_column(comment="Server time of the last envelope received.")
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(comment="Server time the last heartbeat arrived.")
    heartbeat_expires_at: Mapped[datetime | None] = mapped_column(
        index=True, comment="last_heartbeat_at + timeout factor x interval_s; the sweeper's key."
    )
    last_heartbeat_seq: Mapped[int | None] = mapped_column(
        BigInteger, comment="seq of the stored heartbeat; only a higher seq replaces it (redelivery is unordered)."
    )
    last_heartbeat: Mapped[dict[str, Any] | None] = mapped_column(comment="The last heartbeat payload as JSON.")
    software_version: Mapped[str | None] = mapped_column(String(64))
    config_version: Mapped[str | None] = mapped_column(String(64))
    boot_id: Mapped[uuid.UUID | None] = mapped_column(comment="boot_id of the last heartbeat.")
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0, comment="Highest envelope seq received.")
    acked_through_seq: Mapped[int] = mapped_column(
        BigInteger,
        default=0,
        server_default="0",
        comment="Every seq 1..N of this device is stored; the value of the last uplink_ack sent to it.",
    )
    seq_gap_from: Mapped[int | None] = mapped_column(
        BigInteger, comment="First missing seq of the open hole (acked_through_seq + 1); null when there is none."
    )
    seq_gap_to: Mapped[int | None] = mapped_column(
        BigInteger, comment="Last missing seq of that hole (the next stored seq - 1) when it was last computed."
    )
    seq_gap_since: Mapped[datetime | None] = mapped_column(
        comment="Server time the open hole was first seen; null when there is none."
    )
    seq_gap_alarm_at: Mapped[datetime | None] = mapped_column(
        comment="When the 'seq_gap' alarm was raised (the hole outlived seq_gap_alarm_after_s); null when not raised."
    )
    created_at: Mapped[datetime]
    hardware_id: Mapped[str | None] = mapped_column(
        String(128), unique=True, comment="Hardware the device is enrolled on (kept when revoked, cleared by reset)."
    )
    expected_hardware_id: Mapped[str | None] = mapped_column(
        String(128), comment="Set at registration: enrolment is refused from any other hardware."
    )
    key_epoch: Mapped[int | None] = mapped_column(Integer, comment="Epoch of the current identity key, if enrolled.")
    enrolled_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    state_reason: Mapped[str | None] = mapped_column(String(200), comment="The admin's reason for a revoke or reset.")

    institution: Mapped[Institution | None] = relationship(back_populates="devices")


class Event(Base):
    """One uplink envelope, stored exactly once (unique by message_id and by (device_id, seq))."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("device_id", "seq"),
        # Per-device daily reconciliation counts a device's events by device_time.
        Index(None, "device_id", "device_time"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[uuid.UUID] = mapped_column(unique=True)
    payload_type: Mapped[str] = mapped_column(String(32), index=True)
    device_time: Mapped[datetime]
    received_at: Mapped[datetime]
    boot_id: Mapped[uuid.UUID]
    monotonic_ns: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]]


class PresenceReason(StrEnum):
    """What moved a device's presence (`device_presence.reason`)."""

    HEARTBEAT = "heartbeat"
    """A heartbeat or other uplink arrived while the link was up: online from its arrival."""
    STATUS = "status"
    """The retained link status changed ('online' / 'offline', the broker's will on a lost connection)."""
    TIMEOUT = "timeout"
    """The last heartbeat's deadline passed with nothing new: offline from that deadline."""
    HISTORY_START = "history_start"
    """The presence history began (migration 0012) with the device online: online from then."""


class DevicePresence(Base):
    """One change of a device's `online` flag: the history behind the statistics' time online (docs/statistics.md).
    Written by ingest and the presence sweeper in the transaction that changes the flag; never updated."""

    __tablename__ = "device_presence"
    __table_args__ = (Index(None, "device_id", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id", ondelete="CASCADE"))
    online: Mapped[bool]
    at: Mapped[datetime]
    reason: Mapped[PresenceReason] = mapped_column(_str_enum(PresenceReason, 16))


class CommandState(StrEnum):
    """Where a command issued to a device is (see `sync_server.commands`)."""

    QUEUED = "queued"
    """Issued; not yet published."""
    DELIVERED = "delivered"
    """Published QoS 1 on the device's downlink topic at least once; no answer stored yet."""
    ACKNOWLEDGED = "acknowledged"
    """The device's `CommandResult` is stored (its outcome is in `result_outcome`)."""
    EXPIRED = "expired"
    """`expires_at` passed without an answer; never published again."""


class IssuedCommand(Base):
    """One command to one device, unique by `command_id`, with its delivery state and the device's answer."""

    __tablename__ = "device_commands"
    __table_args__ = (Index(None, "device_id", "issued_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    command_id: Mapped[uuid.UUID] = mapped_column(unique=True, comment="Idempotency key; the terminal remembers it.")
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"))
    kind: Mapped[str] = mapped_column(String(32))
    args: Mapped[dict[str, Any]]
    issued_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    state: Mapped[CommandState] = mapped_column(
        _str_enum(CommandState, 16),
        index=True,
        comment="queued -> delivered (published QoS 1) -> acknowledged (result stored) | expired.",
    )
    attempts: Mapped[int] = mapped_column(Integer, comment="Times published to the device's downlink.")
    last_published_at: Mapped[datetime | None]
    acknowledged_at: Mapped[datetime | None] = mapped_column(comment="When the result was stored.")
    result_outcome: Mapped[str | None] = mapped_column(String(16))
    result_detail: Mapped[str | None] = mapped_column(String(200))
    result_at: Mapped[datetime | None] = mapped_column(comment="The terminal's applied_at.")


class DeviceKey(Base):
    """An SM2 identity key of a device. Retired keys stay: old signed records name their epoch."""

    __tablename__ = "device_keys"
    __table_args__ = (UniqueConstraint("device_id", "key_epoch"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"))
    key_epoch: Mapped[int] = mapped_column(Integer)
    public_key: Mapped[str] = mapped_column(String(130), comment="Uncompressed SM2 public key, hex.")
    fingerprint: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    retired_at: Mapped[datetime | None] = mapped_column(comment="Replaced by rotation, or retired by a reset.")


class ClaimToken(Base):
    """A one-time enrolment token; only its SHA-256 is stored."""

    __tablename__ = "claim_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"), index=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None] = mapped_column(comment="Set in the transaction that stores the device key.")
    created_by: Mapped[str] = mapped_column(String(64), comment="Name of the admin token that issued it.")


class AdminToken(Base):
    """A bearer token for the admin API; only its SHA-256 is stored."""

    __tablename__ = "admin_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class DeviceSession(Base):
    """A session key granted to a device, sealed (SM4-GCM) under a key derived from the server's secret_key."""

    __tablename__ = "device_sessions"

    key_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"), index=True)
    key_epoch: Mapped[int] = mapped_column(Integer, comment="The identity key that authenticated the handshake.")
    sealed_key: Mapped[bytes] = mapped_column(LargeBinary)
    request_nonce: Mapped[str] = mapped_column(String(32), unique=True, comment="A handshake nonce is used once.")
    issued_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class SecurityEvent(Base):
    """A refused request or message (docs/identity.md), aggregated per device and kind per ingest batch."""

    __tablename__ = "security_events"
    __table_args__ = (Index(None, "device_id", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(index=True)
    device_id: Mapped[str | None] = mapped_column(String(64), comment="As claimed (topic or request); not a key.")
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(String(300))
    topic: Mapped[str | None] = mapped_column(String(200))
    count: Mapped[int] = mapped_column(Integer)


class Account(Base):
    """An operator account (docs/accounts.md); the rules live in `sync_server.accounts`."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    roles: Mapped[list[str]] = mapped_column(JSON, comment="Role values (sync_server.accounts.Role), sorted.")
    institution_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("institutions.id"), index=True, comment="Set for institution roles only."
    )
    region_prefix: Mapped[str | None] = mapped_column(String(6), comment="A regulator's 医保区划 code prefix.")
    name: Mapped[str | None] = mapped_column(String(50), comment="人员姓名 (personal data: masked in responses).")
    phone: Mapped[str | None] = mapped_column(String(20), comment="联系电话 (personal data: masked in responses).")
    id_number: Mapped[str | None] = mapped_column(String(20), comment="证件号码 (personal data: masked in responses).")
    password_hash: Mapped[str] = mapped_column(String(200), comment="argon2id; never a clear password.")
    password_changed_at: Mapped[datetime]
    must_change_password: Mapped[bool] = mapped_column(comment="Set by a generated or reset password.")
    failed_logins: Mapped[int] = mapped_column(Integer, comment="Consecutive failures since the last success.")
    locked_until: Mapped[datetime | None]
    disabled_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(64))


class PasswordHistory(Base):
    """Past password hashes of an account (argon2id), for the reuse rule."""

    __tablename__ = "account_password_history"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(BigId, ForeignKey("accounts.id"), index=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]


class AccountSession(Base):
    """A login session: an opaque bearer token of which only the SHA-256 is stored."""

    __tablename__ = "account_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(BigId, ForeignKey("accounts.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    last_used_at: Mapped[datetime] = mapped_column(comment="For the idle timeout.")
    revoked_at: Mapped[datetime | None] = mapped_column(comment="Logout, idle timeout, disable or password reset.")


class BindingStatus(StrEnum):
    """Where a binding application is (docs/binding.md)."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"
    """Closed without a decision: another application of the same device was approved."""


class BindingApplication(Base):
    """An institution head's signed application to bind a device (I-01, D-03), and its decision."""

    __tablename__ = "binding_applications"
    __table_args__ = (Index(None, "device_id", "status"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[uuid.UUID] = mapped_column(unique=True, comment="The envelope carrying the signed record.")
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"))
    institution_code: Mapped[str] = mapped_column(String(32), comment="As applied for; resolved when decided.")
    applicant_ref: Mapped[str] = mapped_column(String(64), comment="Pseudonymous reference of the head.")
    applicant_masked: Mapped[str | None] = mapped_column(String(50))
    verification: Mapped[str] = mapped_column(String(32), comment="face_yibao_code | face_id_card.")
    face_template_hash: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(256))
    applied_at: Mapped[datetime] = mapped_column(comment="Terminal wall clock, inside the signature.")
    received_at: Mapped[datetime]
    key_epoch: Mapped[int] = mapped_column(Integer)
    signature: Mapped[str] = mapped_column(String(128), comment="SM2 r||s hex; verifiable again later.")
    status: Mapped[BindingStatus] = mapped_column(_str_enum(BindingStatus, 16), index=True)
    decided_at: Mapped[datetime | None]
    decided_by: Mapped[str | None] = mapped_column(String(64))
    decision_reason: Mapped[str | None] = mapped_column(String(256))
    command_id: Mapped[uuid.UUID | None] = mapped_column(comment="The binding_decision command sent.")


class DeviceBindingHistory(Base):
    """Every change of a device's institution: who, when, from, to, why (D-03, E-07 change history)."""

    __tablename__ = "device_binding_history"
    __table_args__ = (Index(None, "device_id", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"))
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16), comment="bind | unbind.")
    from_institution_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("institutions.id"))
    to_institution_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("institutions.id"))
    application_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("binding_applications.id"))
    reason: Mapped[str] = mapped_column(String(256))
    command_id: Mapped[uuid.UUID | None]


class HisClient(Base):
    """A HIS / POS vendor system of one institution calling the `/his/v1` interfaces (docs/his-integration.md).

    It signs each request with HMAC-SM3 under a shared secret (`protocol.request_signing`); the secret is shown once
    at creation and kept sealed (SM4-GCM under a key derived from the server's secret_key), because the server must
    recompute the MAC."""

    __tablename__ = "his_clients"

    client_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    institution_id: Mapped[int] = mapped_column(BigId, ForeignKey("institutions.id"), index=True)
    label: Mapped[str] = mapped_column(String(100), comment="Vendor / system name, for people.")
    sealed_secret: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(64))
    revoked_at: Mapped[datetime | None]


class RequestNonce(Base):
    """A nonce of a signed HTTP request (HIS client or device API), kept for twice the time window: a replay finds
    its row and is refused, whichever server process it reaches."""

    __tablename__ = "request_nonces"

    caller: Mapped[str] = mapped_column(String(80), primary_key=True, comment="his:<client_id> | device:<key_id>.")
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(index=True)


# ------------------------------------------------------------ prescriptions and their review (docs/prescriptions.md)


class PrescriptionState(StrEnum):
    """Mirror of `protocol.prescription.PrescriptionStatus`, kept here so the schema does not change with the wire."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    RETURNED = "returned"
    SETTLED = "settled"


class PrescriptionRow(Base):
    """A prescription registered by the HIS of the institution it is filed at (H-06, E-02); masked data only."""

    __tablename__ = "prescriptions"
    __table_args__ = (
        UniqueConstraint("institution_id", "rx_no"),
        Index(None, "institution_id", "status", "registered_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    institution_id: Mapped[int] = mapped_column(BigId, ForeignKey("institutions.id"), comment="Filed at (pharmacy).")
    rx_no: Mapped[str] = mapped_column(String(20), comment="医保处方编号 (C20).")
    request_digest: Mapped[str] = mapped_column(
        String(64), comment="SM3 of the canonical registration body: same body again is a replay, else a conflict."
    )
    content_digest: Mapped[str] = mapped_column(String(64), comment="prescription_digest of the served form.")
    body: Mapped[dict[str, Any]] = mapped_column(comment="The prescription as served (prescriber name masked).")
    prescribing_institution_code: Mapped[str] = mapped_column(String(20), comment="开方机构编号.")
    prescriber_code: Mapped[str] = mapped_column(String(20), comment="开方医师代码.")
    prescribed_at: Mapped[datetime] = mapped_column(comment="开方时间.")
    patient_ref: Mapped[str] = mapped_column(String(64), comment="Pseudonymous; never an ID number.")
    status: Mapped[PrescriptionState] = mapped_column(_str_enum(PrescriptionState, 16), comment="处方状态.")
    registered_at: Mapped[datetime]
    registered_by: Mapped[str] = mapped_column(String(64), comment="The HIS client that registered it.")
    reviewed_at: Mapped[datetime | None] = mapped_column(comment="处方审核时间 of the decision stored.")
    settled_at: Mapped[datetime | None] = mapped_column(comment="When HIS reported the settlement.")
    settlement_id: Mapped[str | None] = mapped_column(String(64), comment="医保结算ID (C64).")
    refused_decisions: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", comment="Signed decisions refused after the first one (never applied)."
    )


class PrescriptionLineRow(Base):
    """One drug line of a registered prescription."""

    __tablename__ = "prescription_lines"
    __table_args__ = (UniqueConstraint("prescription_id", "line_no"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    prescription_id: Mapped[int] = mapped_column(BigId, ForeignKey("prescriptions.id"))
    line_no: Mapped[int] = mapped_column(Integer)
    drug_code: Mapped[str] = mapped_column(String(30), index=True, comment="医保药品编码.")
    drug_name: Mapped[str] = mapped_column(String(128))
    generic_name: Mapped[str | None] = mapped_column(String(128))
    specification: Mapped[str | None] = mapped_column(String(128))
    quantity: Mapped[int] = mapped_column(Integer)
    unit: Mapped[str] = mapped_column(String(16))
    dosage: Mapped[str | None] = mapped_column(String(128))
    days_supply: Mapped[int | None] = mapped_column(Integer)
    amount_fen: Mapped[int | None] = mapped_column(BigInteger)


class PrescriptionReview(Base):
    """The one review decision stored for a prescription: a terminal's signed `review_decision` record (E-03)."""

    __tablename__ = "prescription_reviews"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    prescription_id: Mapped[int] = mapped_column(BigId, ForeignKey("prescriptions.id"), unique=True)
    message_id: Mapped[uuid.UUID] = mapped_column(unique=True, comment="The envelope carrying the signed record.")
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"), index=True)
    pharmacist_code: Mapped[str] = mapped_column(String(20), index=True, comment="审方医保药师代码.")
    decision: Mapped[str] = mapped_column(String(16), comment="approved | rejected | returned.")
    reasons: Mapped[list[str]] = mapped_column(JSON, comment="处方审核意见.")
    findings: Mapped[list[dict[str, Any]]] = mapped_column(JSON, comment="Rule findings shown and acknowledged.")
    rule_set_version: Mapped[int | None] = mapped_column(Integer)
    face_decision: Mapped[str] = mapped_column(String(16))
    face_similarity: Mapped[float | None] = mapped_column(Float)
    reviewed_at: Mapped[datetime] = mapped_column(comment="Terminal wall clock, inside the signature.")
    received_at: Mapped[datetime]
    key_epoch: Mapped[int] = mapped_column(Integer)
    record: Mapped[dict[str, Any]] = mapped_column(comment="The signed record as received: verifiable again later.")
    signature: Mapped[str] = mapped_column(String(128), comment="SM2 r||s hex.")


class CatalogueVersion(Base):
    """One published version of one catalogue (docs/catalogue.md): its hash, the delta from the version before it,
    and the whole entry list on the latest version only (older bodies are dropped at the next publish)."""

    __tablename__ = "catalogue_versions"
    __table_args__ = (UniqueConstraint("kind", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16), comment="protocol.catalogue.CatalogueKind value.")
    version: Mapped[int] = mapped_column(Integer, comment="1, 2, 3 … per kind.")
    content_hash: Mapped[str] = mapped_column(String(64), comment="protocol.catalogue.content_hash (SM3 hex).")
    entry_count: Mapped[int] = mapped_column(Integer)
    upsert_count: Mapped[int] = mapped_column(Integer, comment="Entries new or changed since the version before.")
    deletion_count: Mapped[int] = mapped_column(Integer, comment="Codes removed since the version before.")
    published_at: Mapped[datetime]
    published_by: Mapped[str] = mapped_column(String(64), comment="Audit name of the publisher.")
    delta: Mapped[dict[str, Any] | None] = mapped_column(
        comment="{'upserts': [entry…], 'deletions': [code…]} from version - 1; null for version 1."
    )
    snapshot: Mapped[list[Any] | None] = mapped_column(JSON, comment="Every entry; kept on the latest version only.")


class DrugRuleVersion(Base):
    """One version of the regulator's drug-usage knowledge base (protocol.drug_rules.DrugRuleSet), kept whole."""

    __tablename__ = "drug_rule_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    content_hash: Mapped[str] = mapped_column(String(64), comment="protocol.drug_rules.rules_hash (SM3 hex).")
    rule_count: Mapped[int] = mapped_column(Integer)
    published_at: Mapped[datetime]
    published_by: Mapped[str] = mapped_column(String(64), comment="Audit name of the regulator.")
    rules: Mapped[list[Any]] = mapped_column(JSON, comment="The rules as JSON, in rule-id order.")


# ---------------------------------------------------------------- purchases and proxy purchase (docs/purchases.md)


class PurchaseVerificationState(StrEnum):
    """Whether a registered purchase is backed by the kiosk's signed verification of the same transaction code."""

    PENDING = "pending"
    """The verification has not arrived (the terminal may be offline); linked when it does."""
    LINKED = "linked"
    """A verified record of this institution's terminal with the same transaction code and buyer."""
    MISMATCH = "mismatch"
    """A record with the code exists but does not back this purchase (`verification_note` says why)."""


class PosVerification(Base):
    """A terminal's signed `pos_verification` record (H-03, K-07, E-09): evidence of who was verified for the POS."""

    __tablename__ = "pos_verifications"
    __table_args__ = (Index(None, "institution_id", "verified_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[uuid.UUID] = mapped_column(unique=True, comment="The envelope carrying the signed record.")
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"))
    institution_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("institutions.id"), comment="The device's institution when the record arrived."
    )
    verification_id: Mapped[str] = mapped_column(String(64), comment="The kiosk's id of the verification.")
    client_id: Mapped[str] = mapped_column(String(64), comment="The POS client that asked.")
    transaction_code: Mapped[str | None] = mapped_column(
        String(64), unique=True, comment="交易流水号 (医保交易码); set when verified."
    )
    method: Mapped[str] = mapped_column(String(16), comment="evoucher | id_card_face | ss_card_face.")
    check: Mapped[str | None] = mapped_column(String(64), comment="What exactly was verified.")
    outcome: Mapped[str] = mapped_column(String(16), index=True, comment="verified | refused | cancelled.")
    reason: Mapped[str | None] = mapped_column(String(64))
    buyer_ref: Mapped[str | None] = mapped_column(String(32), index=True, comment="person_ref of the buyer.")
    buyer_masked_id: Mapped[str | None] = mapped_column(String(32), comment="证件号码, masked.")
    buyer_cert_type: Mapped[str | None] = mapped_column(String(3), comment="证件类型.")
    insuplc_admdvs: Mapped[str | None] = mapped_column(String(6), comment="参保地医保区划.")
    proxy: Mapped[bool]
    agent_kind: Mapped[str | None] = mapped_column(String(8), comment="face | manual (proxy only).")
    agent_ref: Mapped[str | None] = mapped_column(String(32))
    agent_masked_id: Mapped[str | None] = mapped_column(String(32))
    relationship_id: Mapped[str | None] = mapped_column(String(64))
    findings: Mapped[list[Any]] = mapped_column(JSON, comment="Drug-rule hits: [{rule_id, action}].")
    rules_version: Mapped[int | None] = mapped_column(Integer)
    verified_at: Mapped[datetime] = mapped_column(comment="Terminal wall clock, inside the signature.")
    received_at: Mapped[datetime]
    key_epoch: Mapped[int] = mapped_column(Integer)
    signature: Mapped[str] = mapped_column(String(128), comment="SM2 r||s hex; verifiable again later.")


class ProxyRelation(StrEnum):
    """How the agent is related to the beneficiary (代购药关系, E-11)."""

    SPOUSE = "spouse"
    PARENT = "parent"
    CHILD = "child"
    SIBLING = "sibling"
    RELATIVE = "relative"
    CARER = "carer"
    NEIGHBOUR = "neighbour"
    """邻居: a neighbour buying for an elderly person living alone."""
    OTHER = "other"


class ProxyRelationshipRow(Base):
    """A proxy-purchase relationship registered by an institution's HIS (B-11, K-05): people by reference only."""

    __tablename__ = "proxy_relationships"
    __table_args__ = (Index(None, "institution_id", "ended_at"), Index(None, "beneficiary_ref", "agent_ref"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    institution_id: Mapped[int] = mapped_column(BigId, ForeignKey("institutions.id"))
    beneficiary_ref: Mapped[str] = mapped_column(String(32), comment="person_ref of the insured bought for.")
    beneficiary_cert_type: Mapped[str] = mapped_column(String(3))
    beneficiary_masked_id: Mapped[str | None] = mapped_column(String(32))
    beneficiary_masked_name: Mapped[str | None] = mapped_column(String(50))
    agent_ref: Mapped[str] = mapped_column(String(32), comment="person_ref of the agent (代购人).")
    agent_cert_type: Mapped[str] = mapped_column(String(3))
    agent_masked_id: Mapped[str | None] = mapped_column(String(32))
    agent_masked_name: Mapped[str | None] = mapped_column(String(50))
    relation: Mapped[ProxyRelation] = mapped_column(_str_enum(ProxyRelation, 16))
    valid_from: Mapped[datetime | None]
    valid_until: Mapped[datetime | None]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(64), comment="The HIS client that registered it.")
    ended_at: Mapped[datetime | None]
    ended_by: Mapped[str | None] = mapped_column(String(64))


class Purchase(Base):
    """A settled purchase (proxy) registration pushed by an institution's HIS (H-02, H-04, E-10)."""

    __tablename__ = "purchases"
    __table_args__ = (
        UniqueConstraint("institution_id", "settlement_no"),
        Index(None, "institution_id", "settled_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    institution_id: Mapped[int] = mapped_column(BigId, ForeignKey("institutions.id"))
    his_client: Mapped[str] = mapped_column(String(64), comment="The HIS client that registered it.")
    settlement_no: Mapped[str] = mapped_column(String(64), comment="医保结算ID (setl_id, C64).")
    transaction_code: Mapped[str] = mapped_column(String(64), index=True, comment="交易流水号 from the kiosk.")
    settled_at: Mapped[datetime]
    buyer_ref: Mapped[str] = mapped_column(String(32), index=True, comment="person_ref of the buyer (beneficiary).")
    buyer_cert_type: Mapped[str] = mapped_column(String(3))
    buyer_masked_id: Mapped[str | None] = mapped_column(String(32))
    buyer_masked_name: Mapped[str | None] = mapped_column(String(50))
    proxy: Mapped[bool]
    agent_kind: Mapped[str | None] = mapped_column(String(8), comment="face | manual.")
    agent_ref: Mapped[str | None] = mapped_column(String(32))
    agent_cert_type: Mapped[str | None] = mapped_column(String(3))
    agent_masked_id: Mapped[str | None] = mapped_column(String(32))
    agent_masked_name: Mapped[str | None] = mapped_column(String(50))
    relationship_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("proxy_relationships.id"))
    total_amount_fen: Mapped[int] = mapped_column(BigInteger)
    body_digest: Mapped[str] = mapped_column(String(64), comment="SHA-256 of the canonical request (idempotency).")
    verification_state: Mapped[PurchaseVerificationState] = mapped_column(
        _str_enum(PurchaseVerificationState, 16), index=True
    )
    verification_note: Mapped[str | None] = mapped_column(String(64), comment="Why mismatch.")
    pos_verification_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("pos_verifications.id"))
    received_at: Mapped[datetime]
    linked_at: Mapped[datetime | None]
    reused_trace_codes: Mapped[list[Any]] = mapped_column(
        JSON, comment="追溯码 of this purchase already sold in an earlier registered purchase (any institution)."
    )

    lines: Mapped[list[PurchaseLine]] = relationship(order_by="PurchaseLine.line_no")


class PurchaseLine(Base):
    """One sale line of a purchase with its drug traceability codes (药品追溯码)."""

    __tablename__ = "purchase_lines"
    __table_args__ = (UniqueConstraint("purchase_id", "line_no"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    purchase_id: Mapped[int] = mapped_column(BigId, ForeignKey("purchases.id"))
    line_no: Mapped[int] = mapped_column(Integer)
    med_list_codg: Mapped[str] = mapped_column(String(50), index=True, comment="医保目录编码.")
    drug_name: Mapped[str | None] = mapped_column(String(128))
    quantity: Mapped[float] = mapped_column(Float, comment="数量 in sale units.")
    amount_fen: Mapped[int] = mapped_column(BigInteger, comment="金额 in fen.")
    trace_codes: Mapped[list[Any]] = mapped_column(JSON, comment="药品追溯码 of the packages sold.")


class PurchaseTraceCode(Base):
    """One 药品追溯码 sold, indexed, so a package sold twice (追溯码重复销售) is found across all purchases."""

    __tablename__ = "purchase_trace_codes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    purchase_id: Mapped[int] = mapped_column(BigId, ForeignKey("purchases.id"), index=True)
    line_no: Mapped[int] = mapped_column(Integer)
    code: Mapped[str] = mapped_column(String(64), index=True)


# ---------------------------------------------------------------- pharmacists (docs/pharmacists.md)


class PharmacistStatus(StrEnum):
    ACTIVE = "active"
    LEFT = "left"
    """离职 or 有效标志 = 0 in the HIS sync: the template is deleted and terminals purge it."""


class Pharmacist(Base):
    """A pharmacist of an institution as the HIS base-info sync (H-08, E-04) keeps it: codes, masked identity, the
    practising-certificate fields. Never a clear name or ID number; `id_number_ref` is a keyed hash that links a
    pharmacist's own account to their records without keeping the number."""

    __tablename__ = "pharmacists"
    __table_args__ = (UniqueConstraint("institution_id", "code"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    institution_id: Mapped[int] = mapped_column(BigId, ForeignKey("institutions.id"), index=True)
    code: Mapped[str] = mapped_column(String(20), comment="医保药师代码 / 医师代码 (C20).")
    his_person_id: Mapped[str | None] = mapped_column(String(32), comment="医师id in the HIS (C32).")
    name_masked: Mapped[str] = mapped_column(String(20), comment="医师姓名, masked only.")
    cert_type: Mapped[str | None] = mapped_column(String(3), comment="证件类型 (psn_cert_type).")
    id_number_masked: Mapped[str | None] = mapped_column(String(20), comment="证件号码, masked only.")
    id_number_ref: Mapped[str | None] = mapped_column(String(64), index=True, comment="HMAC-SM3 of the 证件号码.")
    practising_cert_no: Mapped[str | None] = mapped_column(String(20), comment="执业证书编号 (C20).")
    practising_type: Mapped[str | None] = mapped_column(String(6), comment="执业类别 (dr_prac_type).")
    practising_scope: Mapped[str | None] = mapped_column(String(6), comment="执业范围代码 (dr_prac_scp_code).")
    practising_region: Mapped[str | None] = mapped_column(String(6), comment="执业地区 (C6).")
    multi_site: Mapped[bool | None] = mapped_column(comment="多点执业标志.")
    tech_duty: Mapped[str | None] = mapped_column(String(6), comment="专业技术职务 (dr_pro_tech_duty).")
    psn_role: Mapped[str | None] = mapped_column(String(6), comment="人员角色 (psn_role).")
    left_on: Mapped[str | None] = mapped_column(String(10), comment="离职时间 (YYYY-MM-DD).")
    status: Mapped[PharmacistStatus] = mapped_column(_str_enum(PharmacistStatus, 8))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class PharmacistTemplate(Base):
    """A pharmacist's face template, sealed (SM4-GCM) under a key derived from the server secret, bound to the
    pharmacist row and the model; kept only to reach the other terminals of the same institution."""

    __tablename__ = "pharmacist_templates"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    pharmacist_id: Mapped[int] = mapped_column(BigId, ForeignKey("pharmacists.id"), unique=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    dims: Mapped[int] = mapped_column(Integer)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64), comment="Of the sealed bytes: an integrity reference, not a face.")
    enrolled_device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"))
    enrolled_at: Mapped[datetime]
    consent_version: Mapped[str] = mapped_column(String(32))
    consent_at: Mapped[datetime]
    id_photo_similarity: Mapped[float] = mapped_column(comment="人证比对 score of the enrolment.")


class PharmacistSession(Base):
    """One attendance session (签到/签退, P-01, E-05) from the terminal's signed records."""

    __tablename__ = "pharmacist_sessions"
    __table_args__ = (Index(None, "institution_id", "signed_in_at"), Index(None, "pharmacist_id", "signed_in_at"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    session_id: Mapped[uuid.UUID] = mapped_column(unique=True, comment="Chosen by the terminal at sign-in.")
    pharmacist_id: Mapped[int] = mapped_column(BigId, ForeignKey("pharmacists.id"))
    institution_id: Mapped[int] = mapped_column(BigId, ForeignKey("institutions.id"))
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.device_id"))
    signed_in_at: Mapped[datetime]
    signed_out_at: Mapped[datetime | None] = mapped_column(index=True)
    closed_reason: Mapped[str | None] = mapped_column(String(32), comment="protocol.pharmacist.SignOutReason.")
    sign_in_similarity: Mapped[float | None]
    sign_out_similarity: Mapped[float | None]
    face_threshold: Mapped[float | None]
    sign_in_message_id: Mapped[uuid.UUID | None]
    sign_out_message_id: Mapped[uuid.UUID | None]
    key_epoch: Mapped[int | None] = mapped_column(Integer, comment="Of the sign-in signature.")
    signature: Mapped[str | None] = mapped_column(String(128), comment="Sign-in SM2 r||s hex; verifiable again.")
    received_at: Mapped[datetime]
