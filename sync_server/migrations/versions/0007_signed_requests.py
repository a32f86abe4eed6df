"""HIS clients and the nonces of signed HTTP requests.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

Adds `his_clients` (a HIS / POS vendor system of one institution, its HMAC-SM3 secret sealed) and `request_nonces`
(single-use nonces of signed requests from HIS clients and from terminals on the device API). Portable SQL only;
checked by tests/sync_server/test_db.py against the ORM metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "his_clients",
        sa.Column("client_id", sa.String(length=32), nullable=False),
        sa.Column("institution_id", _BigId, nullable=False),
        sa.Column("label", sa.String(length=100), nullable=False, comment="Vendor / system name, for people."),
        sa.Column("sealed_secret", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _When, nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("revoked_at", _When, nullable=True),
        sa.ForeignKeyConstraint(["institution_id"], ["institutions.id"], name=op.f("fk_his_clients_institution_id")),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_his_clients")),
    )
    op.create_index(op.f("ix_his_clients_institution_id"), "his_clients", ["institution_id"], unique=False)
    op.create_table(
        "request_nonces",
        sa.Column(
            "caller", sa.String(length=80), nullable=False, comment="his:<client_id> | device:<key_id>."
        ),
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("seen_at", _When, nullable=False),
        sa.PrimaryKeyConstraint("caller", "nonce", name=op.f("pk_request_nonces")),
    )
    op.create_index(op.f("ix_request_nonces_seen_at"), "request_nonces", ["seen_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_request_nonces_seen_at"), table_name="request_nonces")
    op.drop_table("request_nonces")
    op.drop_index(op.f("ix_his_clients_institution_id"), table_name="his_clients")
    op.drop_table("his_clients")
