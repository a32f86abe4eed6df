"""`yibao server account create`: the first accounts (a security admin, an auditor) straight in the database.

Owns reading a password from stdin (or generating one, printed once by the caller), resolving an institution code to
its id, and recording the action in the server's audit chain. It must never log a password, and never print one it
did not generate.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from protocol import SystemClock
from sync_server import accounts
from sync_server.audit import ServerAudit
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.migrate import upgrade
from sync_server.db.models import Institution
from sync_server.settings import ServerSettings

CLI_ACTOR = "cli"


@dataclass(frozen=True)
class Created:
    username: str
    roles: list[str]
    generated_password: str | None
    """The generated initial password (None when the caller gave one); shown once, never stored in clear."""


def create_account(
    settings: ServerSettings,
    *,
    username: str,
    roles: list[accounts.Role],
    institution_code: str | None = None,
    region_prefix: str | None = None,
    password: str | None = None,
) -> Created:
    """Create an account (migrating the database first); raises `accounts.AccountError` with the reason."""
    upgrade(settings.database_url)
    engine = create_db_engine(settings.database_url)
    clock = SystemClock()
    try:
        with session_factory(engine, write_intent=True).begin() as session:
            institution_id = None
            if institution_code is not None:
                institution_id = session.scalar(select(Institution.id).where(Institution.code == institution_code))
                if institution_id is None:
                    raise accounts.AccountError(f"no institution with code {institution_code!r}")
            account, generated = accounts.create_account(
                session,
                username=username,
                roles=frozenset(roles),
                password=password,
                policy=settings.account_policy,
                now=clock.now(),
                created_by=CLI_ACTOR,
                institution_id=institution_id,
                region_prefix=region_prefix,
            )
            created = Created(username=account.username, roles=list(account.roles), generated_password=generated)
    finally:
        engine.dispose()
    audit = ServerAudit(settings.data_dir, clock)
    audit.record("account.created", username=username, roles=created.roles, by=CLI_ACTOR)
    audit.close()
    return created


def create_his_client(settings: ServerSettings, *, institution_code: str, label: str) -> tuple[str, str]:
    """Create a HIS client of the institution (migrating first): (client id, secret hex). Raises
    `sync_server.signed_requests.UnknownInstitutionError`."""
    from sync_server.identity import ServerIdentity
    from sync_server.signed_requests import create_his_client as create

    upgrade(settings.database_url)
    engine = create_db_engine(settings.database_url)
    clock = SystemClock()
    try:
        with session_factory(engine, write_intent=True).begin() as session:
            view, secret = create(
                session,
                ServerIdentity(settings),
                institution_code=institution_code,
                label=label,
                actor=CLI_ACTOR,
                now=clock.now(),
            )
    finally:
        engine.dispose()
    audit = ServerAudit(settings.data_dir, clock)
    audit.record("his_client.created", client_id=view.client_id, institution=institution_code, admin=CLI_ACTOR)
    audit.close()
    return view.client_id, secret
