"""Initial schema: institutions, devices, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Written by hand from an autogenerate run and checked by tests/sync_server/test_migrations.py, which asserts that the
migrated schema equals the ORM metadata on SQLite and PostgreSQL. Types are spelled portably here (no imports from
the application, whose types may change after this revision is frozen): timestamps are DateTime(timezone=True),
enums are VARCHAR, JSON is sa.JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "institutions",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False, comment="医保 institution code (定点机构编码)."),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column(
            "region_code", sa.String(length=6), nullable=False, comment="6-digit 医保区划 (administrative division) code."
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_institutions")),
        sa.UniqueConstraint("code", name=op.f("uq_institutions_code")),
    )
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("institution_id", _BigId, nullable=True),
        sa.Column("registration", sa.String(length=16), nullable=False),
        sa.Column(
            "link_state",
            sa.String(length=16),
            nullable=False,
            comment="Last retained status (online on connect, offline as last will).",
        ),
        sa.Column(
            "link_state_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="When the server received the last status.",
        ),
        sa.Column(
            "online",
            sa.Boolean(),
            nullable=False,
            comment="Derived: link_state is online and the last heartbeat has not timed out. Kept by ingest + sweeper.",
        ),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "last_seen_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="Server time of the last envelope received.",
        ),
        sa.Column(
            "last_heartbeat_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="Server time the last heartbeat arrived.",
        ),
        sa.Column(
            "heartbeat_expires_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="last_heartbeat_at + timeout factor x interval_s; the sweeper's key.",
        ),
        sa.Column(
            "last_heartbeat_seq",
            sa.BigInteger(),
            nullable=True,
            comment="seq of the stored heartbeat; only a higher seq replaces it (redelivery is unordered).",
        ),
        sa.Column("last_heartbeat", sa.JSON(), nullable=True, comment="The last heartbeat payload as JSON."),
        sa.Column("software_version", sa.String(length=64), nullable=True),
        sa.Column("config_version", sa.String(length=64), nullable=True),
        sa.Column("boot_id", sa.Uuid(), nullable=True, comment="boot_id of the last heartbeat."),
        sa.Column("last_seq", sa.BigInteger(), nullable=False, comment="Highest envelope seq received."),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["institution_id"], ["institutions.id"], name=op.f("fk_devices_institution_id"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_devices")),
    )
    op.create_index(op.f("ix_devices_heartbeat_expires_at"), "devices", ["heartbeat_expires_at"], unique=False)
    op.create_index(op.f("ix_devices_institution_id"), "devices", ["institution_id"], unique=False)
    op.create_table(
        "events",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("payload_type", sa.String(length=32), nullable=False),
        sa.Column("device_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("boot_id", sa.Uuid(), nullable=False),
        sa.Column("monotonic_ns", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"], name=op.f("fk_events_device_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint("device_id", "seq", name=op.f("uq_events_device_id_seq")),
        sa.UniqueConstraint("message_id", name=op.f("uq_events_message_id")),
    )
    op.create_index(op.f("ix_events_payload_type"), "events", ["payload_type"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_events_payload_type"), table_name="events")
    op.drop_table("events")
    op.drop_index(op.f("ix_devices_institution_id"), table_name="devices")
    op.drop_index(op.f("ix_devices_heartbeat_expires_at"), table_name="devices")
    op.drop_table("devices")
    op.drop_table("institutions")
