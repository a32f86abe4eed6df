"""Engine configuration, migrations and the portable column types."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, select, text
from sqlalchemy.exc import OperationalError, StatementError

from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.migrate import alembic_config, current_revision, head_revision, upgrade
from sync_server.db.models import Base, Device, Institution, InstitutionKind
from sync_server.errors import ConfigurationError
from sync_server.store import register_devices
from tests.sync_server.conftest import T0

T0_NAIVE = T0.replace(tzinfo=None)


def test_migrated_schema_equals_the_orm_metadata(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)  # idempotent
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []
        assert current_revision(engine) == head_revision()
        assert set(inspect(engine).get_table_names()) >= {"institutions", "devices", "events", "alembic_version"}
    finally:
        engine.dispose()


def test_downgrade_to_base_removes_everything_and_upgrade_restores_it(db_url: str) -> None:
    upgrade(db_url)
    engine = create_db_engine(db_url)
    try:
        config = alembic_config()
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert current_revision(engine) is None
    finally:
        engine.dispose()
    upgrade(db_url)


def test_sqlite_runs_in_wal_with_foreign_keys_and_a_busy_timeout(sqlite_engine: Engine) -> None:
    with sqlite_engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_writer_sessions_take_the_sqlite_write_lock_when_they_begin(sqlite_engine: Engine, sqlite_url: str) -> None:
    path = sqlite_url.removeprefix("sqlite:///")
    writer = session_factory(sqlite_engine, write_intent=True)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with writer.begin() as session:
            session.execute(text("SELECT 1"))  # only read so far, yet the lock is already held
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # released at commit
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_savepoints_work_on_sqlite(sqlite_engine: Engine) -> None:
    sessions = session_factory(sqlite_engine, write_intent=True)
    with sessions.begin() as session:
        register_devices(session, ["dev-keep"], now=datetime.now(UTC))
        nested = session.begin_nested()
        register_devices(session, ["dev-undo"], now=datetime.now(UTC))
        nested.rollback()
    with sessions() as session:
        assert list(session.scalars(select(Device.device_id))) == ["dev-keep"]


def test_times_come_back_aware_utc_and_naive_times_are_refused(engine: Engine) -> None:
    sessions = session_factory(engine)
    shanghai = timezone(timedelta(hours=8))
    created = datetime(2026, 1, 2, 11, 0, tzinfo=shanghai)
    with sessions.begin() as session:
        session.add(
            Institution(
                code="H31011500001",
                name="示例药房",
                kind=InstitutionKind.PHARMACY,
                region_code="310115",
                created_at=created,
            )
        )
    with sessions() as session:
        row = session.scalars(select(Institution)).one()
        assert row.created_at == created
        assert row.created_at.tzinfo is not None
        assert row.created_at.utcoffset() == timedelta(0)
    with pytest.raises(StatementError, match="naive datetime refused"), sessions.begin() as session:
        session.add(
            Institution(code="X", name="x", kind=InstitutionKind.OTHER, region_code="000000", created_at=T0_NAIVE)
        )


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://postgres@127.0.0.1/x",
        "postgresql+asyncpg://p@h/x",
        "mysql://u@127.0.0.1/x",
        "nonsense://x",
        "not a url",
    ],
)
def test_unusable_database_urls_stop_with_a_clear_message(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"driver|not a database URL"):
        create_db_engine(url)


def test_sqlite_directory_is_created(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "dir" / "db.sqlite3"
    upgrade(f"sqlite:///{target}")
    assert target.exists()


@pytest.mark.postgres
def test_postgres_connections_the_server_dropped_cost_one_failed_use_then_the_pool_reconnects(pg_url: str) -> None:
    # The engine does not pre-ping (a round trip per checkout on every request): a restart of the database must
    # then fail exactly one use, after which every pooled connection of that age is replaced.
    eng = create_db_engine(pg_url)
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as first, eng.connect() as second:  # two pooled connections
            pids = [c.exec_driver_sql("SELECT pg_backend_pid()").scalar() for c in (first, second)]
            first.rollback()
            second.rollback()
        with admin.connect() as conn:
            for pid in pids:
                conn.exec_driver_sql("SELECT pg_terminate_backend(%(pid)s)", {"pid": pid})
        with pytest.raises(OperationalError) as failed, eng.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        assert failed.value.connection_invalidated
        with eng.connect() as first, eng.connect() as second:  # both replaced, neither fails
            assert [c.exec_driver_sql("SELECT 1").scalar() for c in (first, second)] == [1, 1]
            fresh = {c.exec_driver_sql("SELECT pg_backend_pid()").scalar() for c in (first, second)}
        assert not fresh & set(pids)
    finally:
        admin.dispose()
        eng.dispose()
