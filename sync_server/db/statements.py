"""Core statements that differ by dialect, built once per table.

`InsertIfNew`: `INSERT … ON CONFLICT (key) DO NOTHING RETURNING id` on PostgreSQL and SQLite (both have it, with
different constructs in SQLAlchemy). A registration tries the INSERT first: a new row costs one round trip, and a
row already there (a replay, or a concurrent registration of the same key) gives no id, with no error and no
savepoint. This module must never execute anything itself.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import InstrumentedAttribute

from sync_server.errors import ConfigurationError


class InsertIfNew:
    """`INSERT INTO <model> … ON CONFLICT (<key>) DO NOTHING RETURNING <returning>`, per dialect."""

    def __init__(
        self, model: type[Any], key: tuple[InstrumentedAttribute[Any], ...], returning: InstrumentedAttribute[Any]
    ) -> None:
        self._by_dialect: dict[str, Insert] = {
            "postgresql": postgresql.insert(model).on_conflict_do_nothing(index_elements=key).returning(returning),
            "sqlite": sqlite.insert(model).on_conflict_do_nothing(index_elements=key).returning(returning),
        }

    def on(self, dialect: str) -> Insert:
        try:
            return self._by_dialect[dialect]
        except KeyError:
            raise ConfigurationError(f"the server runs on PostgreSQL or SQLite, not on {dialect}") from None
