"""Server acknowledgements and gap detection: devices.acked_through_seq and the open sequence hole.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Adds the highest contiguous stored seq per device (sent to the terminal as `uplink_ack`) and the bookkeeping of an
open hole above it (`seq_gap_*`). Existing devices start at 0 and are advanced by the next batch that touches them
(the walk from 0 reads only that device's rows through the unique (device_id, seq) index), and an index on
events (device_id, device_time) for the per-device daily reconciliation. Checked by
tests/sync_server/test_db.py against the ORM metadata on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(
            sa.Column(
                "acked_through_seq",
                sa.BigInteger(),
                server_default="0",
                nullable=False,
                comment="Every seq 1..N of this device is stored; the value of the last uplink_ack sent to it.",
            )
        )
        batch.add_column(
            sa.Column(
                "seq_gap_from",
                sa.BigInteger(),
                nullable=True,
                comment="First missing seq of the open hole (acked_through_seq + 1); null when there is none.",
            )
        )
        batch.add_column(
            sa.Column(
                "seq_gap_to",
                sa.BigInteger(),
                nullable=True,
                comment="Last missing seq of that hole (the next stored seq - 1) when it was last computed.",
            )
        )
        batch.add_column(
            sa.Column(
                "seq_gap_since",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="Server time the open hole was first seen; null when there is none.",
            )
        )
        batch.add_column(
            sa.Column(
                "seq_gap_alarm_at",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="When the 'seq_gap' alarm was raised (the hole outlived seq_gap_alarm_after_s); null when "
                "not raised.",
            )
        )
    op.create_index(op.f("ix_events_device_id_device_time"), "events", ["device_id", "device_time"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_events_device_id_device_time"), table_name="events")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("seq_gap_alarm_at")
        batch.drop_column("seq_gap_since")
        batch.drop_column("seq_gap_to")
        batch.drop_column("seq_gap_from")
        batch.drop_column("acked_through_seq")
