"""Published catalogue versions and the drug-usage rule versions.

Revision ID: 0011
Revises: 0009
Create Date: 2026-12-01

Adds `catalogue_versions` (per kind: version, content hash, counts, publisher, the delta from the version before and
the whole entry list on the latest version) and `drug_rule_versions` (the regulator's knowledge base, kept whole per
version). Portable SQL only (SQLite and PostgreSQL); checked by tests/sync_server/test_db.py against the ORM metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "catalogue_versions",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False, comment="protocol.catalogue.CatalogueKind value."),
        sa.Column("version", sa.Integer(), nullable=False, comment="1, 2, 3 … per kind."),
        sa.Column(
            "content_hash", sa.String(length=64), nullable=False, comment="protocol.catalogue.content_hash (SM3 hex)."
        ),
        sa.Column("entry_count", sa.Integer(), nullable=False),
        sa.Column(
            "upsert_count", sa.Integer(), nullable=False, comment="Entries new or changed since the version before."
        ),
        sa.Column("deletion_count", sa.Integer(), nullable=False, comment="Codes removed since the version before."),
        sa.Column("published_at", _When, nullable=False),
        sa.Column("published_by", sa.String(length=64), nullable=False, comment="Audit name of the publisher."),
        sa.Column(
            "delta",
            sa.JSON(),
            nullable=True,
            comment="{'upserts': [entry…], 'deletions': [code…]} from version - 1; null for version 1.",
        ),
        sa.Column("snapshot", sa.JSON(), nullable=True, comment="Every entry; kept on the latest version only."),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_catalogue_versions")),
        sa.UniqueConstraint("kind", "version", name=op.f("uq_catalogue_versions_kind_version")),
    )
    op.create_table(
        "drug_rule_versions",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column(
            "content_hash", sa.String(length=64), nullable=False, comment="protocol.drug_rules.rules_hash (SM3 hex)."
        ),
        sa.Column("rule_count", sa.Integer(), nullable=False),
        sa.Column("published_at", _When, nullable=False),
        sa.Column("published_by", sa.String(length=64), nullable=False, comment="Audit name of the regulator."),
        sa.Column("rules", sa.JSON(), nullable=False, comment="The rules as JSON, in rule-id order."),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_drug_rule_versions")),
    )


def downgrade() -> None:
    op.drop_table("drug_rule_versions")
    op.drop_table("catalogue_versions")
