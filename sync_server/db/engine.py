"""Engine and session factory for the supported databases.

Owns how connections are made: SQLite gets WAL, a busy timeout, foreign keys, `synchronous=FULL` (we acknowledge to
the broker only after commit, so a committed row must survive a power cut) and SQLAlchemy's documented fix for
pysqlite's transaction handling, so SAVEPOINTs work and writers can take the write lock up front with
`BEGIN IMMEDIATE`. PostgreSQL goes through psycopg 3. A URL whose driver is not installed stops start-up with a clear
message. This module must never create tables (that is `sync_server.db.migrate`) or hold module-level engines.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from sync_server.errors import ConfigurationError

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000
POSTGRES_POOL_RECYCLE_S = 1800
WRITE_INTENT_OPTION = "yibao_write_intent"
"""Execution option: on SQLite, begin the transaction with BEGIN IMMEDIATE (take the write lock first)."""

_SUPPORTED_HINT = "use 'sqlite:///path/to/file.sqlite3' or 'postgresql+psycopg://user@host:5432/dbname'"


def create_db_engine(database_url: str, **kwargs: Any) -> Engine:
    """Create an engine for `database_url`, configured for this server. The caller owns it and must `dispose()` it."""
    try:
        url = make_url(database_url)
    except ArgumentError as exc:
        raise ConfigurationError(f"not a database URL ({_SUPPORTED_HINT}): {exc}") from exc
    if url.get_backend_name() == "postgresql" and url.get_driver_name() != "psycopg":
        raise ConfigurationError(
            f"PostgreSQL driver {url.get_driver_name()!r} is not installed; use 'postgresql+psycopg://…'"
        )
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    # Bound parameters are payloads that may reference people: keep them out of exception texts and logs.
    kwargs.setdefault("hide_parameters", True)
    if url.get_backend_name() == "postgresql":
        # No pre-ping: it costs a round trip on every checkout, and a signed HIS request checks out two connections
        # (its nonce, its work). A connection the database dropped (a restart) raises a disconnect error instead;
        # SQLAlchemy then invalidates every pooled connection of that age, so the one request that met it gets a 503
        # (`database unavailable`, which HIS clients and the ingest retry) and the next ones reconnect. Recycling
        # stays ahead of idle-connection timeouts in proxies and firewalls (docs/benchmarks.md, HIS under load).
        kwargs.setdefault("pool_pre_ping", False)
        kwargs.setdefault("pool_recycle", POSTGRES_POOL_RECYCLE_S)
    try:
        engine = create_engine(url, **kwargs)
    except (NoSuchModuleError, ImportError) as exc:
        raise ConfigurationError(
            f"no usable driver for database URL scheme {url.drivername!r} ({_SUPPORTED_HINT}): {exc}"
        ) from exc
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        # Hand transaction control to SQLAlchemy (pysqlite's own BEGIN handling breaks SAVEPOINT).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(WRITE_INTENT_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def session_factory(
    engine: Engine, *, write_intent: bool = False, statement_reads: bool = False
) -> sessionmaker[Session]:
    """Sessions bound to `engine`. With `write_intent`, SQLite transactions take the write lock when they begin, so
    a read-then-write transaction cannot fail with SQLITE_BUSY halfway when another writer committed meanwhile.

    `statement_reads`: for requests that only read. On PostgreSQL each statement runs in autocommit, which spares
    the BEGIN and the ROLLBACK round trips of a transaction that would change nothing (at READ COMMITTED every
    statement takes its own snapshot, in a transaction or not); such a session must never write. Elsewhere the same
    as a plain session."""
    bind = engine
    if write_intent:
        bind = bind.execution_options(**{WRITE_INTENT_OPTION: True})
    if statement_reads and engine.dialect.name == "postgresql":
        bind = bind.execution_options(isolation_level="AUTOCOMMIT")
    return sessionmaker(bind=bind, expire_on_commit=False)
