"""Purchases (proxy purchase), their lines with traceability codes, proxy relationships and POS verifications.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01

Adds `pos_verifications` (terminals' signed `pos_verification` records), `proxy_relationships` (代购药关系 registered
by an institution's HIS), `purchases` (settled purchase (proxy) registrations, unique per institution and settlement
number), `purchase_lines` (drug, quantity, amount and 追溯码 per line) and `purchase_trace_codes` (every 追溯码 sold,
indexed, to find a package sold twice). Portable SQL only (SQLite and PostgreSQL);
checked by tests/sync_server/test_db.py against the ORM metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "pos_verifications",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False, comment="The envelope carrying the signed record."),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column(
            "institution_id", _BigId, nullable=True, comment="The device's institution when the record arrived."
        ),
        sa.Column(
            "verification_id", sa.String(length=64), nullable=False, comment="The kiosk's id of the verification."
        ),
        sa.Column("client_id", sa.String(length=64), nullable=False, comment="The POS client that asked."),
        sa.Column(
            "transaction_code",
            sa.String(length=64),
            nullable=True,
            comment="交易流水号 (医保交易码); set when verified.",
        ),
        sa.Column(
            "method", sa.String(length=16), nullable=False, comment="evoucher | id_card_face | ss_card_face."
        ),
        sa.Column("check", sa.String(length=64), nullable=True, comment="What exactly was verified."),
        sa.Column("outcome", sa.String(length=16), nullable=False, comment="verified | refused | cancelled."),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("buyer_ref", sa.String(length=32), nullable=True, comment="person_ref of the buyer."),
        sa.Column("buyer_masked_id", sa.String(length=32), nullable=True, comment="证件号码, masked."),
        sa.Column("buyer_cert_type", sa.String(length=3), nullable=True, comment="证件类型."),
        sa.Column("insuplc_admdvs", sa.String(length=6), nullable=True, comment="参保地医保区划."),
        sa.Column("proxy", sa.Boolean(), nullable=False),
        sa.Column("agent_kind", sa.String(length=8), nullable=True, comment="face | manual (proxy only)."),
        sa.Column("agent_ref", sa.String(length=32), nullable=True),
        sa.Column("agent_masked_id", sa.String(length=32), nullable=True),
        sa.Column("relationship_id", sa.String(length=64), nullable=True),
        sa.Column("findings", sa.JSON(), nullable=False, comment="Drug-rule hits: [{rule_id, action}]."),
        sa.Column("rules_version", sa.Integer(), nullable=True),
        sa.Column("verified_at", _When, nullable=False, comment="Terminal wall clock, inside the signature."),
        sa.Column("received_at", _When, nullable=False),
        sa.Column("key_epoch", sa.Integer(), nullable=False),
        sa.Column("signature", sa.String(length=128), nullable=False, comment="SM2 r||s hex; verifiable again later."),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"], name=op.f("fk_pos_verifications_device_id")),
        sa.ForeignKeyConstraint(
            ["institution_id"], ["institutions.id"], name=op.f("fk_pos_verifications_institution_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pos_verifications")),
        sa.UniqueConstraint("message_id", name=op.f("uq_pos_verifications_message_id")),
        sa.UniqueConstraint("transaction_code", name=op.f("uq_pos_verifications_transaction_code")),
    )
    op.create_index(op.f("ix_pos_verifications_buyer_ref"), "pos_verifications", ["buyer_ref"], unique=False)
    op.create_index(
        op.f("ix_pos_verifications_institution_id_verified_at"),
        "pos_verifications",
        ["institution_id", "verified_at"],
        unique=False,
    )
    op.create_index(op.f("ix_pos_verifications_outcome"), "pos_verifications", ["outcome"], unique=False)

    op.create_table(
        "proxy_relationships",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("institution_id", _BigId, nullable=False),
        sa.Column(
            "beneficiary_ref", sa.String(length=32), nullable=False, comment="person_ref of the insured bought for."
        ),
        sa.Column("beneficiary_cert_type", sa.String(length=3), nullable=False),
        sa.Column("beneficiary_masked_id", sa.String(length=32), nullable=True),
        sa.Column("beneficiary_masked_name", sa.String(length=50), nullable=True),
        sa.Column("agent_ref", sa.String(length=32), nullable=False, comment="person_ref of the agent (代购人)."),
        sa.Column("agent_cert_type", sa.String(length=3), nullable=False),
        sa.Column("agent_masked_id", sa.String(length=32), nullable=True),
        sa.Column("agent_masked_name", sa.String(length=50), nullable=True),
        sa.Column("relation", sa.String(length=16), nullable=False),
        sa.Column("valid_from", _When, nullable=True),
        sa.Column("valid_until", _When, nullable=True),
        sa.Column("created_at", _When, nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False, comment="The HIS client that registered it."),
        sa.Column("ended_at", _When, nullable=True),
        sa.Column("ended_by", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["institution_id"], ["institutions.id"], name=op.f("fk_proxy_relationships_institution_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_proxy_relationships")),
    )
    op.create_index(
        op.f("ix_proxy_relationships_beneficiary_ref_agent_ref"),
        "proxy_relationships",
        ["beneficiary_ref", "agent_ref"],
        unique=False,
    )
    op.create_index(
        op.f("ix_proxy_relationships_institution_id_ended_at"),
        "proxy_relationships",
        ["institution_id", "ended_at"],
        unique=False,
    )

    op.create_table(
        "purchases",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("institution_id", _BigId, nullable=False),
        sa.Column("his_client", sa.String(length=64), nullable=False, comment="The HIS client that registered it."),
        sa.Column("settlement_no", sa.String(length=64), nullable=False, comment="医保结算ID (setl_id, C64)."),
        sa.Column("transaction_code", sa.String(length=64), nullable=False, comment="交易流水号 from the kiosk."),
        sa.Column("settled_at", _When, nullable=False),
        sa.Column(
            "buyer_ref", sa.String(length=32), nullable=False, comment="person_ref of the buyer (beneficiary)."
        ),
        sa.Column("buyer_cert_type", sa.String(length=3), nullable=False),
        sa.Column("buyer_masked_id", sa.String(length=32), nullable=True),
        sa.Column("buyer_masked_name", sa.String(length=50), nullable=True),
        sa.Column("proxy", sa.Boolean(), nullable=False),
        sa.Column("agent_kind", sa.String(length=8), nullable=True, comment="face | manual."),
        sa.Column("agent_ref", sa.String(length=32), nullable=True),
        sa.Column("agent_cert_type", sa.String(length=3), nullable=True),
        sa.Column("agent_masked_id", sa.String(length=32), nullable=True),
        sa.Column("agent_masked_name", sa.String(length=50), nullable=True),
        sa.Column("relationship_id", _BigId, nullable=True),
        sa.Column("total_amount_fen", sa.BigInteger(), nullable=False),
        sa.Column(
            "body_digest",
            sa.String(length=64),
            nullable=False,
            comment="SHA-256 of the canonical request (idempotency).",
        ),
        sa.Column("verification_state", sa.String(length=16), nullable=False),
        sa.Column("verification_note", sa.String(length=64), nullable=True, comment="Why mismatch."),
        sa.Column("pos_verification_id", _BigId, nullable=True),
        sa.Column("received_at", _When, nullable=False),
        sa.Column("linked_at", _When, nullable=True),
        sa.Column(
            "reused_trace_codes",
            sa.JSON(),
            nullable=False,
            comment="追溯码 of this purchase already sold in an earlier registered purchase (any institution).",
        ),
        sa.ForeignKeyConstraint(["institution_id"], ["institutions.id"], name=op.f("fk_purchases_institution_id")),
        sa.ForeignKeyConstraint(
            ["relationship_id"], ["proxy_relationships.id"], name=op.f("fk_purchases_relationship_id")
        ),
        sa.ForeignKeyConstraint(
            ["pos_verification_id"], ["pos_verifications.id"], name=op.f("fk_purchases_pos_verification_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_purchases")),
        sa.UniqueConstraint(
            "institution_id", "settlement_no", name=op.f("uq_purchases_institution_id_settlement_no")
        ),
    )
    op.create_index(op.f("ix_purchases_buyer_ref"), "purchases", ["buyer_ref"], unique=False)
    op.create_index(
        op.f("ix_purchases_institution_id_settled_at"), "purchases", ["institution_id", "settled_at"], unique=False
    )
    op.create_index(op.f("ix_purchases_transaction_code"), "purchases", ["transaction_code"], unique=False)
    op.create_index(op.f("ix_purchases_verification_state"), "purchases", ["verification_state"], unique=False)

    op.create_table(
        "purchase_lines",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("purchase_id", _BigId, nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("med_list_codg", sa.String(length=50), nullable=False, comment="医保目录编码."),
        sa.Column("drug_name", sa.String(length=128), nullable=True),
        sa.Column("quantity", sa.Float(), nullable=False, comment="数量 in sale units."),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False, comment="金额 in fen."),
        sa.Column("trace_codes", sa.JSON(), nullable=False, comment="药品追溯码 of the packages sold."),
        sa.ForeignKeyConstraint(["purchase_id"], ["purchases.id"], name=op.f("fk_purchase_lines_purchase_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_purchase_lines")),
        sa.UniqueConstraint("purchase_id", "line_no", name=op.f("uq_purchase_lines_purchase_id_line_no")),
    )
    op.create_index(op.f("ix_purchase_lines_med_list_codg"), "purchase_lines", ["med_list_codg"], unique=False)

    op.create_table(
        "purchase_trace_codes",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("purchase_id", _BigId, nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["purchase_id"], ["purchases.id"], name=op.f("fk_purchase_trace_codes_purchase_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_purchase_trace_codes")),
    )
    op.create_index(op.f("ix_purchase_trace_codes_code"), "purchase_trace_codes", ["code"], unique=False)
    op.create_index(
        op.f("ix_purchase_trace_codes_purchase_id"), "purchase_trace_codes", ["purchase_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_purchase_trace_codes_purchase_id"), table_name="purchase_trace_codes")
    op.drop_index(op.f("ix_purchase_trace_codes_code"), table_name="purchase_trace_codes")
    op.drop_table("purchase_trace_codes")
    op.drop_index(op.f("ix_purchase_lines_med_list_codg"), table_name="purchase_lines")
    op.drop_table("purchase_lines")
    op.drop_index(op.f("ix_purchases_verification_state"), table_name="purchases")
    op.drop_index(op.f("ix_purchases_transaction_code"), table_name="purchases")
    op.drop_index(op.f("ix_purchases_institution_id_settled_at"), table_name="purchases")
    op.drop_index(op.f("ix_purchases_buyer_ref"), table_name="purchases")
    op.drop_table("purchases")
    op.drop_index(op.f("ix_proxy_relationships_institution_id_ended_at"), table_name="proxy_relationships")
    op.drop_index(op.f("ix_proxy_relationships_beneficiary_ref_agent_ref"), table_name="proxy_relationships")
    op.drop_table("proxy_relationships")
    op.drop_index(op.f("ix_pos_verifications_outcome"), table_name="pos_verifications")
    op.drop_index(op.f("ix_pos_verifications_institution_id_verified_at"), table_name="pos_verifications")
    op.drop_index(op.f("ix_pos_verifications_buyer_ref"), table_name="pos_verifications")
    op.drop_table("pos_verifications")
