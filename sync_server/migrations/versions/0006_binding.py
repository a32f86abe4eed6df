"""Institution details, device binding applications and the binding history.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

Adds the E-06 columns the requirements name to `institutions` (address, masked head and contact, source, updated_at),
`binding_applications` (a terminal's signed application and its decision) and `device_binding_history` (every change
of a device's institution). Portable SQL only (SQLite and PostgreSQL); checked by tests/sync_server/test_db.py
against the ORM metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_When = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("institutions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("address", sa.String(length=256), nullable=True, comment="地址 (E-06)."))
        batch_op.add_column(
            sa.Column(
                "head_masked", sa.String(length=50), nullable=True, comment="机构负责人, masked name only (E-06)."
            )
        )
        batch_op.add_column(
            sa.Column(
                "contact_masked", sa.String(length=20), nullable=True, comment="联系方式, masked phone only (E-06)."
            )
        )
        batch_op.add_column(
            sa.Column("source", sa.String(length=32), nullable=True, comment="Where the record came from (D-02).")
        )
        batch_op.add_column(sa.Column("updated_at", _When, nullable=True))

    op.create_table(
        "binding_applications",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False, comment="The envelope carrying the signed record."),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column(
            "institution_code", sa.String(length=32), nullable=False, comment="As applied for; resolved when decided."
        ),
        sa.Column(
            "applicant_ref", sa.String(length=64), nullable=False, comment="Pseudonymous reference of the head."
        ),
        sa.Column("applicant_masked", sa.String(length=50), nullable=True),
        sa.Column("verification", sa.String(length=32), nullable=False, comment="face_yibao_code | face_id_card."),
        sa.Column("face_template_hash", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.String(length=256), nullable=False),
        sa.Column("applied_at", _When, nullable=False, comment="Terminal wall clock, inside the signature."),
        sa.Column("received_at", _When, nullable=False),
        sa.Column("key_epoch", sa.Integer(), nullable=False),
        sa.Column("signature", sa.String(length=128), nullable=False, comment="SM2 r||s hex; verifiable again later."),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decided_at", _When, nullable=True),
        sa.Column("decided_by", sa.String(length=64), nullable=True),
        sa.Column("decision_reason", sa.String(length=256), nullable=True),
        sa.Column("command_id", sa.Uuid(), nullable=True, comment="The binding_decision command sent."),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.device_id"], name=op.f("fk_binding_applications_device_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_binding_applications")),
        sa.UniqueConstraint("message_id", name=op.f("uq_binding_applications_message_id")),
    )
    op.create_index(
        op.f("ix_binding_applications_device_id_status"),
        "binding_applications",
        ["device_id", "status"],
        unique=False,
    )
    op.create_index(op.f("ix_binding_applications_status"), "binding_applications", ["status"], unique=False)

    op.create_table(
        "device_binding_history",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("at", _When, nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False, comment="bind | unbind."),
        sa.Column("from_institution_id", _BigId, nullable=True),
        sa.Column("to_institution_id", _BigId, nullable=True),
        sa.Column("application_id", _BigId, nullable=True),
        sa.Column("reason", sa.String(length=256), nullable=False),
        sa.Column("command_id", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.device_id"], name=op.f("fk_device_binding_history_device_id")
        ),
        sa.ForeignKeyConstraint(
            ["from_institution_id"],
            ["institutions.id"],
            name=op.f("fk_device_binding_history_from_institution_id"),
        ),
        sa.ForeignKeyConstraint(
            ["to_institution_id"], ["institutions.id"], name=op.f("fk_device_binding_history_to_institution_id")
        ),
        sa.ForeignKeyConstraint(
            ["application_id"],
            ["binding_applications.id"],
            name=op.f("fk_device_binding_history_application_id"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_binding_history")),
    )
    op.create_index(
        op.f("ix_device_binding_history_device_id_at"), "device_binding_history", ["device_id", "at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_device_binding_history_device_id_at"), table_name="device_binding_history")
    op.drop_table("device_binding_history")
    op.drop_index(op.f("ix_binding_applications_status"), table_name="binding_applications")
    op.drop_index(op.f("ix_binding_applications_device_id_status"), table_name="binding_applications")
    op.drop_table("binding_applications")
    with op.batch_alter_table("institutions", schema=None) as batch_op:
        batch_op.drop_column("updated_at")
        batch_op.drop_column("source")
        batch_op.drop_column("contact_masked")
        batch_op.drop_column("head_masked")
        batch_op.drop_column("address")
