"""Fixtures for end-to-end tests: a throwaway PostgreSQL database, and the `yibao` command."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def yibao_cmd() -> list[str]:
    return [sys.executable, "-m", "yibao"]


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database for one test, dropped afterwards.

    Fails (never skips) when PostgreSQL is unreachable: `scripts/test.sh` makes it reachable."""
    admin = make_url(os.environ.get("YIBAO_TEST_PG_URL", DEFAULT_PG_URL))
    name = f"yibao_e2e_{secrets.token_hex(4)}"
    dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL unreachable at {admin!r} (run scripts/test.sh, or set YIBAO_TEST_PG_URL): {exc}")
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
