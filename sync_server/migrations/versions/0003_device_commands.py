"""Durable commands to devices: the device_commands table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

One row per command issued to one device, unique by `command_id` (the idempotency key the terminal remembers), with
its state (`queued` -> `delivered` -> `acknowledged` | `expired`), publish bookkeeping and the device's answer.
Indexes serve the dispatcher (by state) and the per-device listing (device_id, issued_at). Checked by
tests/sync_server/test_db.py against the ORM metadata on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "device_commands",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("command_id", sa.Uuid(), nullable=False, comment="Idempotency key; the terminal remembers it."),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "state",
            sa.String(length=16),
            nullable=False,
            comment="queued -> delivered (published QoS 1) -> acknowledged (result stored) | expired.",
        ),
        sa.Column("attempts", sa.Integer(), nullable=False, comment="Times published to the device's downlink."),
        sa.Column("last_published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True, comment="When the result was stored."),
        sa.Column("result_outcome", sa.String(length=16), nullable=True),
        sa.Column("result_detail", sa.String(length=200), nullable=True),
        sa.Column("result_at", sa.DateTime(timezone=True), nullable=True, comment="The terminal's applied_at."),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"], name=op.f("fk_device_commands_device_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_commands")),
        sa.UniqueConstraint("command_id", name=op.f("uq_device_commands_command_id")),
    )
    op.create_index(
        op.f("ix_device_commands_device_id_issued_at"), "device_commands", ["device_id", "issued_at"], unique=False
    )
    op.create_index(op.f("ix_device_commands_state"), "device_commands", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_device_commands_state"), table_name="device_commands")
    op.drop_index(op.f("ix_device_commands_device_id_issued_at"), table_name="device_commands")
    op.drop_table("device_commands")
