"""Pharmacists from the HIS base-info sync, their sealed face templates, and attendance sessions.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

Adds `pharmacists` (E-04 fields the platform needs, masked identity only), `pharmacist_templates` (SM4-GCM sealed
at rest, one per pharmacist) and `pharmacist_sessions` (sign-in / sign-out from the terminals' signed records, E-05).
Portable SQL only (SQLite and PostgreSQL); checked by tests/sync_server/test_db.py against the ORM metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "pharmacists",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("institution_id", _BigId, nullable=False),
        sa.Column("code", sa.String(length=20), nullable=False, comment="医保药师代码 / 医师代码 (C20)."),
        sa.Column("his_person_id", sa.String(length=32), nullable=True, comment="医师id in the HIS (C32)."),
        sa.Column("name_masked", sa.String(length=20), nullable=False, comment="医师姓名, masked only."),
        sa.Column("cert_type", sa.String(length=3), nullable=True, comment="证件类型 (psn_cert_type)."),
        sa.Column("id_number_masked", sa.String(length=20), nullable=True, comment="证件号码, masked only."),
        sa.Column("id_number_ref", sa.String(length=64), nullable=True, comment="HMAC-SM3 of the 证件号码."),
        sa.Column("practising_cert_no", sa.String(length=20), nullable=True, comment="执业证书编号 (C20)."),
        sa.Column("practising_type", sa.String(length=6), nullable=True, comment="执业类别 (dr_prac_type)."),
        sa.Column(
            "practising_scope", sa.String(length=6), nullable=True, comment="执业范围代码 (dr_prac_scp_code)."
        ),
        sa.Column("practising_region", sa.String(length=6), nullable=True, comment="执业地区 (C6)."),
        sa.Column("multi_site", sa.Boolean(), nullable=True, comment="多点执业标志."),
        sa.Column("tech_duty", sa.String(length=6), nullable=True, comment="专业技术职务 (dr_pro_tech_duty)."),
        sa.Column("psn_role", sa.String(length=6), nullable=True, comment="人员角色 (psn_role)."),
        sa.Column("left_on", sa.String(length=10), nullable=True, comment="离职时间 (YYYY-MM-DD)."),
        sa.Column("status", sa.String(length=8), nullable=False),
        sa.Column("created_at", _When, nullable=False),
        sa.Column("updated_at", _When, nullable=False),
        sa.ForeignKeyConstraint(["institution_id"], ["institutions.id"], name=op.f("fk_pharmacists_institution_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pharmacists")),
        sa.UniqueConstraint("institution_id", "code", name=op.f("uq_pharmacists_institution_id_code")),
    )
    op.create_index(op.f("ix_pharmacists_institution_id"), "pharmacists", ["institution_id"], unique=False)
    op.create_index(op.f("ix_pharmacists_id_number_ref"), "pharmacists", ["id_number_ref"], unique=False)

    op.create_table(
        "pharmacist_templates",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("pharmacist_id", _BigId, nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("dims", sa.Integer(), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column(
            "sha256",
            sa.String(length=64),
            nullable=False,
            comment="Of the sealed bytes: an integrity reference, not a face.",
        ),
        sa.Column("enrolled_device_id", sa.String(length=64), nullable=False),
        sa.Column("enrolled_at", _When, nullable=False),
        sa.Column("consent_version", sa.String(length=32), nullable=False),
        sa.Column("consent_at", _When, nullable=False),
        sa.Column("id_photo_similarity", sa.Double(), nullable=False, comment="人证比对 score of the enrolment."),
        sa.ForeignKeyConstraint(
            ["pharmacist_id"], ["pharmacists.id"], name=op.f("fk_pharmacist_templates_pharmacist_id")
        ),
        sa.ForeignKeyConstraint(
            ["enrolled_device_id"], ["devices.device_id"], name=op.f("fk_pharmacist_templates_enrolled_device_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pharmacist_templates")),
        sa.UniqueConstraint("pharmacist_id", name=op.f("uq_pharmacist_templates_pharmacist_id")),
    )

    op.create_table(
        "pharmacist_sessions",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("session_id", sa.Uuid(), nullable=False, comment="Chosen by the terminal at sign-in."),
        sa.Column("pharmacist_id", _BigId, nullable=False),
        sa.Column("institution_id", _BigId, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("signed_in_at", _When, nullable=False),
        sa.Column("signed_out_at", _When, nullable=True),
        sa.Column("closed_reason", sa.String(length=32), nullable=True, comment="protocol.pharmacist.SignOutReason."),
        sa.Column("sign_in_similarity", sa.Double(), nullable=True),
        sa.Column("sign_out_similarity", sa.Double(), nullable=True),
        sa.Column("face_threshold", sa.Double(), nullable=True),
        sa.Column("sign_in_message_id", sa.Uuid(), nullable=True),
        sa.Column("sign_out_message_id", sa.Uuid(), nullable=True),
        sa.Column("key_epoch", sa.Integer(), nullable=True, comment="Of the sign-in signature."),
        sa.Column(
            "signature", sa.String(length=128), nullable=True, comment="Sign-in SM2 r||s hex; verifiable again."
        ),
        sa.Column("received_at", _When, nullable=False),
        sa.ForeignKeyConstraint(
            ["pharmacist_id"], ["pharmacists.id"], name=op.f("fk_pharmacist_sessions_pharmacist_id")
        ),
        sa.ForeignKeyConstraint(
            ["institution_id"], ["institutions.id"], name=op.f("fk_pharmacist_sessions_institution_id")
        ),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"], name=op.f("fk_pharmacist_sessions_device_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pharmacist_sessions")),
        sa.UniqueConstraint("session_id", name=op.f("uq_pharmacist_sessions_session_id")),
    )
    op.create_index(
        op.f("ix_pharmacist_sessions_institution_id_signed_in_at"),
        "pharmacist_sessions",
        ["institution_id", "signed_in_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_pharmacist_sessions_pharmacist_id_signed_in_at"),
        "pharmacist_sessions",
        ["pharmacist_id", "signed_in_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_pharmacist_sessions_signed_out_at"), "pharmacist_sessions", ["signed_out_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_pharmacist_sessions_signed_out_at"), table_name="pharmacist_sessions")
    op.drop_index(op.f("ix_pharmacist_sessions_pharmacist_id_signed_in_at"), table_name="pharmacist_sessions")
    op.drop_index(op.f("ix_pharmacist_sessions_institution_id_signed_in_at"), table_name="pharmacist_sessions")
    op.drop_table("pharmacist_sessions")
    op.drop_table("pharmacist_templates")
    op.drop_index(op.f("ix_pharmacists_id_number_ref"), table_name="pharmacists")
    op.drop_index(op.f("ix_pharmacists_institution_id"), table_name="pharmacists")
    op.drop_table("pharmacists")
