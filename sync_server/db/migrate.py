"""Programmatic schema migrations (`alembic upgrade head` without an alembic.ini).

Owns building the Alembic `Config` in code, pointing at the migration scripts shipped inside this package, and
running them on a connection it opens. It must never create tables any other way (no `metadata.create_all` outside
tests): the migration history is the schema's single source of truth.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from sync_server.db.engine import create_db_engine
from sync_server.errors import DatabaseError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config() -> Config:
    """An Alembic configuration for our scripts, built in code."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise DatabaseError("no migration scripts found")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_engine(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind `engine` to `revision` in one transaction (where the database allows DDL in
    transactions)."""
    config = alembic_config()
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"migrating the database to {revision} failed: {exc}") from exc
    finally:
        config.attributes.pop("connection", None)


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database at `database_url` to `revision` (default: the newest)."""
    engine = create_db_engine(database_url)
    try:
        before = current_revision(engine)
        upgrade_engine(engine, revision)
        after = current_revision(engine)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot reach the database {engine.url!r}: {exc}") from exc
    finally:
        engine.dispose()
    if before != after:
        logger.info("database migrated from %s to %s", before or "empty", after)
    else:
        logger.info("database schema is current (%s)", after)
