"""Prescriptions registered by HIS, their drug lines, and the review decisions signed on terminals.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01

Adds `prescriptions` (one per institution and 医保处方编号, masked data only, with its status), `prescription_lines`
and `prescription_reviews` (the one signed `review_decision` stored per prescription). docs/prescriptions.md. Portable
SQL only (SQLite and PostgreSQL); checked by tests/sync_server/test_db.py against the ORM metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "prescriptions",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("institution_id", _BigId, nullable=False, comment="Filed at (pharmacy)."),
        sa.Column("rx_no", sa.String(length=20), nullable=False, comment="医保处方编号 (C20)."),
        sa.Column(
            "request_digest",
            sa.String(length=64),
            nullable=False,
            comment="SM3 of the canonical registration body: same body again is a replay, else a conflict.",
        ),
        sa.Column(
            "content_digest", sa.String(length=64), nullable=False, comment="prescription_digest of the served form."
        ),
        sa.Column("body", sa.JSON(), nullable=False, comment="The prescription as served (prescriber name masked)."),
        sa.Column("prescribing_institution_code", sa.String(length=20), nullable=False, comment="开方机构编号."),
        sa.Column("prescriber_code", sa.String(length=20), nullable=False, comment="开方医师代码."),
        sa.Column("prescribed_at", _When, nullable=False, comment="开方时间."),
        sa.Column("patient_ref", sa.String(length=64), nullable=False, comment="Pseudonymous; never an ID number."),
        sa.Column("status", sa.String(length=16), nullable=False, comment="处方状态."),
        sa.Column("registered_at", _When, nullable=False),
        sa.Column("registered_by", sa.String(length=64), nullable=False, comment="The HIS client that registered it."),
        sa.Column("reviewed_at", _When, nullable=True, comment="处方审核时间 of the decision stored."),
        sa.Column("settled_at", _When, nullable=True, comment="When HIS reported the settlement."),
        sa.Column("settlement_id", sa.String(length=64), nullable=True, comment="医保结算ID (C64)."),
        sa.Column(
            "refused_decisions",
            sa.Integer(),
            server_default="0",
            nullable=False,
            comment="Signed decisions refused after the first one (never applied).",
        ),
        sa.ForeignKeyConstraint(["institution_id"], ["institutions.id"], name=op.f("fk_prescriptions_institution_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prescriptions")),
        sa.UniqueConstraint("institution_id", "rx_no", name=op.f("uq_prescriptions_institution_id_rx_no")),
    )
    op.create_index(
        op.f("ix_prescriptions_institution_id_status_registered_at"),
        "prescriptions",
        ["institution_id", "status", "registered_at"],
        unique=False,
    )

    op.create_table(
        "prescription_lines",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("prescription_id", _BigId, nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("drug_code", sa.String(length=30), nullable=False, comment="医保药品编码."),
        sa.Column("drug_name", sa.String(length=128), nullable=False),
        sa.Column("generic_name", sa.String(length=128), nullable=True),
        sa.Column("specification", sa.String(length=128), nullable=True),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("unit", sa.String(length=16), nullable=False),
        sa.Column("dosage", sa.String(length=128), nullable=True),
        sa.Column("days_supply", sa.Integer(), nullable=True),
        sa.Column("amount_fen", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["prescription_id"], ["prescriptions.id"], name=op.f("fk_prescription_lines_prescription_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prescription_lines")),
        sa.UniqueConstraint("prescription_id", "line_no", name=op.f("uq_prescription_lines_prescription_id_line_no")),
    )
    op.create_index(op.f("ix_prescription_lines_drug_code"), "prescription_lines", ["drug_code"], unique=False)

    op.create_table(
        "prescription_reviews",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("prescription_id", _BigId, nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False, comment="The envelope carrying the signed record."),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("pharmacist_code", sa.String(length=20), nullable=False, comment="审方医保药师代码."),
        sa.Column("decision", sa.String(length=16), nullable=False, comment="approved | rejected | returned."),
        sa.Column("reasons", sa.JSON(), nullable=False, comment="处方审核意见."),
        sa.Column("findings", sa.JSON(), nullable=False, comment="Rule findings shown and acknowledged."),
        sa.Column("rule_set_version", sa.Integer(), nullable=True),
        sa.Column("face_decision", sa.String(length=16), nullable=False),
        sa.Column("face_similarity", sa.Float(), nullable=True),
        sa.Column("reviewed_at", _When, nullable=False, comment="Terminal wall clock, inside the signature."),
        sa.Column("received_at", _When, nullable=False),
        sa.Column("key_epoch", sa.Integer(), nullable=False),
        sa.Column(
            "record", sa.JSON(), nullable=False, comment="The signed record as received: verifiable again later."
        ),
        sa.Column("signature", sa.String(length=128), nullable=False, comment="SM2 r||s hex."),
        sa.ForeignKeyConstraint(
            ["prescription_id"], ["prescriptions.id"], name=op.f("fk_prescription_reviews_prescription_id")
        ),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"], name=op.f("fk_prescription_reviews_device_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prescription_reviews")),
        sa.UniqueConstraint("message_id", name=op.f("uq_prescription_reviews_message_id")),
        sa.UniqueConstraint("prescription_id", name=op.f("uq_prescription_reviews_prescription_id")),
    )
    op.create_index(op.f("ix_prescription_reviews_device_id"), "prescription_reviews", ["device_id"], unique=False)
    op.create_index(
        op.f("ix_prescription_reviews_pharmacist_code"), "prescription_reviews", ["pharmacist_code"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_prescription_reviews_pharmacist_code"), table_name="prescription_reviews")
    op.drop_index(op.f("ix_prescription_reviews_device_id"), table_name="prescription_reviews")
    op.drop_table("prescription_reviews")
    op.drop_index(op.f("ix_prescription_lines_drug_code"), table_name="prescription_lines")
    op.drop_table("prescription_lines")
    op.drop_index(op.f("ix_prescriptions_institution_id_status_registered_at"), table_name="prescriptions")
    op.drop_table("prescriptions")
