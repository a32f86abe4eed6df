"""Fixtures every test package shares: real infrastructure, never mocks.

* `broker`: a private Mosquitto on a free port for one test (tests may kill and restart it).
* `secure_broker`: the same with the dynamic-security plugin and no anonymous access; its `admin_username`/
  `admin_password` administer it, `server_username`/`server_password` are the server's own user.
* `pg_database` (session): one fresh, uniquely named PostgreSQL database per test session, dropped at the end.
  It comes from `YIBAO_TEST_PG_URL` (scripts/test.sh makes one reachable). Unreachable is a FAILURE with a clear
  message, never a skip.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

from yibao.broker import MosquittoBroker

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


@pytest.fixture
def secure_broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker(dynsec=True) as b:
        yield b


def pg_admin_url() -> URL:
    return make_url(os.environ.get("YIBAO_TEST_PG_URL", DEFAULT_PG_URL))


@contextmanager
def fresh_pg_database(prefix: str) -> Iterator[URL]:
    """Create a uniquely named PostgreSQL database, yield its URL, drop it afterwards (even if still connected)."""
    admin_url = pg_admin_url()
    name = f"{prefix}_{secrets.token_hex(5)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except OperationalError as exc:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is unreachable at {admin_url.render_as_string(hide_password=True)} "
            f"(start it with scripts/ensure_postgres.sh or set YIBAO_TEST_PG_URL): {exc.orig}",
            pytrace=False,
        )
    try:
        yield admin_url.set(database=name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[URL]:
    with fresh_pg_database("yibao_t") as url:
        yield url
