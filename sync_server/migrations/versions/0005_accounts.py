"""Operator accounts, their password history and login sessions.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Adds `accounts` (roles as a JSON list of role values, an institution for institution roles, a regulator's region
prefix, the operator's own personal data masked in responses, an argon2id hash, lockout and expiry columns),
`account_password_history` (argon2id hashes for the reuse rule) and `account_sessions` (SHA-256 of opaque bearer
tokens). Checked by tests/sync_server/test_db.py against the ORM metadata on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("roles", sa.JSON(), nullable=False, comment="Role values (sync_server.accounts.Role), sorted."),
        sa.Column("institution_id", _BigId, nullable=True, comment="Set for institution roles only."),
        sa.Column("region_prefix", sa.String(length=6), nullable=True, comment="A regulator's 医保区划 code prefix."),
        sa.Column(
            "name", sa.String(length=50), nullable=True, comment="人员姓名 (personal data: masked in responses)."
        ),
        sa.Column(
            "phone", sa.String(length=20), nullable=True, comment="联系电话 (personal data: masked in responses)."
        ),
        sa.Column(
            "id_number", sa.String(length=20), nullable=True, comment="证件号码 (personal data: masked in responses)."
        ),
        sa.Column("password_hash", sa.String(length=200), nullable=False, comment="argon2id; never a clear password."),
        sa.Column("password_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "must_change_password", sa.Boolean(), nullable=False, comment="Set by a generated or reset password."
        ),
        sa.Column(
            "failed_logins", sa.Integer(), nullable=False, comment="Consecutive failures since the last success."
        ),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["institution_id"], ["institutions.id"], name=op.f("fk_accounts_institution_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("username", name=op.f("uq_accounts_username")),
    )
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_accounts_institution_id"), ["institution_id"], unique=False)

    op.create_table(
        "account_password_history",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("account_id", _BigId, nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_account_password_history_account_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_account_password_history")),
    )
    with op.batch_alter_table("account_password_history", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_account_password_history_account_id"), ["account_id"], unique=False)

    op.create_table(
        "account_sessions",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("account_id", _BigId, nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=False, comment="For the idle timeout."),
        sa.Column(
            "revoked_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="Logout, idle timeout, disable or password reset.",
        ),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_account_sessions_account_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_account_sessions")),
        sa.UniqueConstraint("sha256", name=op.f("uq_account_sessions_sha256")),
    )
    with op.batch_alter_table("account_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_account_sessions_account_id"), ["account_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("account_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_account_sessions_account_id"))
    op.drop_table("account_sessions")
    with op.batch_alter_table("account_password_history", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_account_password_history_account_id"))
    op.drop_table("account_password_history")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_accounts_institution_id"))
    op.drop_table("accounts")
