"""Device identity: keys, claim and admin tokens, session keys, security events; device life-cycle columns.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

Adds `device_keys` (every SM2 identity key a device had, retired ones kept to verify old signed records),
`claim_tokens` and `admin_tokens` (SHA-256 only), `device_sessions` (session keys sealed under a key derived from the
server's secret; a handshake nonce is unique), `security_events` (refusals, aggregated), and on `devices` the
enrolled hardware id (unique; NULL allowed many times on every database), the current key epoch and the enrol/revoke
times. The new registration state 'registered' needs no migration (states are plain strings). Checked by
tests/sync_server/test_db.py against the ORM metadata on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "admin_tokens",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_tokens")),
        sa.UniqueConstraint("sha256", name=op.f("uq_admin_tokens_sha256")),
    )
    op.create_table(
        "security_events",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "device_id", sa.String(length=64), nullable=True, comment="As claimed (topic or request); not a key."
        ),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.String(length=300), nullable=False),
        sa.Column("topic", sa.String(length=200), nullable=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_security_events")),
    )
    with op.batch_alter_table("security_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_security_events_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_security_events_device_id_at"), ["device_id", "at"], unique=False)

    op.create_table(
        "claim_tokens",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "used_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="Set in the transaction that stores the device key.",
        ),
        sa.Column(
            "created_by", sa.String(length=64), nullable=False, comment="Name of the admin token that issued it."
        ),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"], name=op.f("fk_claim_tokens_device_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_claim_tokens")),
        sa.UniqueConstraint("sha256", name=op.f("uq_claim_tokens_sha256")),
    )
    with op.batch_alter_table("claim_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_claim_tokens_device_id"), ["device_id"], unique=False)

    op.create_table(
        "device_keys",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("key_epoch", sa.Integer(), nullable=False),
        sa.Column("public_key", sa.String(length=130), nullable=False, comment="Uncompressed SM2 public key, hex."),
        sa.Column("fingerprint", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "retired_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="Replaced by rotation, or retired by a reset.",
        ),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"], name=op.f("fk_device_keys_device_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_keys")),
        sa.UniqueConstraint("device_id", "key_epoch", name=op.f("uq_device_keys_device_id_key_epoch")),
    )
    op.create_table(
        "device_sessions",
        sa.Column("key_id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column(
            "key_epoch", sa.Integer(), nullable=False, comment="The identity key that authenticated the handshake."
        ),
        sa.Column("sealed_key", sa.LargeBinary(), nullable=False),
        sa.Column("request_nonce", sa.String(length=32), nullable=False, comment="A handshake nonce is used once."),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"], name=op.f("fk_device_sessions_device_id")),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_device_sessions")),
        sa.UniqueConstraint("request_nonce", name=op.f("uq_device_sessions_request_nonce")),
    )
    with op.batch_alter_table("device_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_sessions_device_id"), ["device_id"], unique=False)

    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "hardware_id",
                sa.String(length=128),
                nullable=True,
                comment="Hardware the device is enrolled on (kept when revoked, cleared by reset).",
            )
        )
        batch_op.add_column(
            sa.Column(
                "expected_hardware_id",
                sa.String(length=128),
                nullable=True,
                comment="Set at registration: enrolment is refused from any other hardware.",
            )
        )
        batch_op.add_column(
            sa.Column(
                "key_epoch", sa.Integer(), nullable=True, comment="Epoch of the current identity key, if enrolled."
            )
        )
        batch_op.add_column(sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column(
                "state_reason",
                sa.String(length=200),
                nullable=True,
                comment="The admin's reason for a revoke or reset.",
            )
        )
        batch_op.create_unique_constraint(batch_op.f("uq_devices_hardware_id"), ["hardware_id"])


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_devices_hardware_id"), type_="unique")
        batch_op.drop_column("state_reason")
        batch_op.drop_column("revoked_at")
        batch_op.drop_column("enrolled_at")
        batch_op.drop_column("key_epoch")
        batch_op.drop_column("expected_hardware_id")
        batch_op.drop_column("hardware_id")

    with op.batch_alter_table("device_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_sessions_device_id"))

    op.drop_table("device_sessions")
    op.drop_table("device_keys")
    with op.batch_alter_table("claim_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_claim_tokens_device_id"))

    op.drop_table("claim_tokens")
    with op.batch_alter_table("security_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_security_events_device_id_at"))
        batch_op.drop_index(batch_op.f("ix_security_events_at"))

    op.drop_table("security_events")
    op.drop_table("admin_tokens")
