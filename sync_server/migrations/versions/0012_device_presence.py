"""The history of device presence.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02

Adds `device_presence`: one row per change of a device's `online` flag (online from a heartbeat or status, offline
from a status or from the heartbeat's deadline), so the statistics count time online exactly instead of estimating
it from heartbeat counts. The history starts here: every device online now gets a `history_start` row. Portable
SQL only (SQLite and PostgreSQL); checked by tests/sync_server/test_db.py against the ORM metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "device_presence",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("at", _When, nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.device_id"], name=op.f("fk_device_presence_device_id"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_presence")),
    )
    op.create_index(op.f("ix_device_presence_device_id_at"), "device_presence", ["device_id", "at"], unique=False)
    presence = sa.table(
        "device_presence",
        sa.column("device_id", sa.String()),
        sa.column("online", sa.Boolean()),
        sa.column("at", _When),
        sa.column("reason", sa.String()),
    )
    devices = sa.table("devices", sa.column("device_id", sa.String()), sa.column("online", sa.Boolean()))
    now = datetime.now(UTC)
    online = [row[0] for row in op.get_bind().execute(sa.select(devices.c.device_id).where(devices.c.online.is_(True)))]
    if online:
        op.bulk_insert(
            presence,
            [{"device_id": d, "online": True, "at": now, "reason": "history_start"} for d in online],
        )


def downgrade() -> None:
    op.drop_index(op.f("ix_device_presence_device_id_at"), table_name="device_presence")
    op.drop_table("device_presence")
