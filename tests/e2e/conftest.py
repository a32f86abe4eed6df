"""Fixtures for end-to-end tests: the `yibao` command, and a throwaway PostgreSQL database for one test."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.conftest import fresh_pg_database


@pytest.fixture
def yibao_cmd() -> list[str]:
    return [sys.executable, "-m", "yibao"]


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    """A database of its own for one server process (which migrates and owns all of it), dropped afterwards."""
    with fresh_pg_database("yibao_e2e") as url:
        yield url.render_as_string(hide_password=False)
