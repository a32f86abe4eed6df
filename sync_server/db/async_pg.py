"""The hottest single statements on the event loop: `AsyncPostgres`, a small per-process pool of psycopg async
connections in autocommit (PostgreSQL only).

Which statements: a signed request's nonce (`sync_server.nonces`) and HIS's reads of its prescriptions and purchases
(`sync_server.prescriptions.his_view_async`, `sync_server.purchases.purchase_of_async`). They are SQLAlchemy Core
statements defined once next to their sync form and compiled here for PostgreSQL (`sql_of`), so both paths run the
same SQL. On the loop a request needs no worker-thread hop, no ORM session and no transaction round trips: together
about half the CPU such a request cost (docs/benchmarks.md, "HIS interfaces under load"). SQLite has no async
driver here: its callers keep the sync path.

Errors: `AsyncDatabaseError` when the database cannot be reached (the API answers 503, as for any database
failure); other psycopg errors (a constraint) propagate to the caller. It must never log a parameter.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.sql import ClauseElement

logger = logging.getLogger(__name__)

POOL_MAX: Final = 8
"""Connections per server process: each statement holds one for a single round trip, and a burst of requests
waits for one when all are busy."""
POOL_TIMEOUT_S: Final = 10.0
APPLICATION_NAME: Final = "yibao-hot-statements"
"""How these connections show in `pg_stat_activity`."""


class AsyncDatabaseError(Exception):
    """The database did not answer (down, restarting, out of connections): try again shortly."""


class AsyncPostgres:
    """Run compiled Core statements on a psycopg async pool. Create with `for_engine`; `open`/`close` in the app's
    lifespan; every other method must run on the app's event loop."""

    def __init__(self, engine: Engine) -> None:
        self._dialect = engine.dialect
        self._conninfo = make_url(engine.url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._pool: AsyncConnectionPool | None = None
        # Keyed by the statement itself (held here), not by id(): a collected statement's id can be reused.
        self._sql: dict[ClauseElement, tuple[str, dict[str, Any]]] = {}

    @classmethod
    def for_engine(cls, engine: Engine) -> AsyncPostgres | None:
        """One for a PostgreSQL engine; None for any other database."""
        return cls(engine) if engine.dialect.name == "postgresql" else None

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def open(self) -> None:
        """Open the pool; connections are made on first use (the server starts while the database restarts)."""
        if self._pool is not None:
            return
        pool = AsyncConnectionPool(
            self._conninfo,
            min_size=0,
            max_size=POOL_MAX,
            kwargs={"autocommit": True, "application_name": APPLICATION_NAME},
            timeout=POOL_TIMEOUT_S,
            open=False,
            name="hot-statements",
        )
        await pool.open(wait=False)
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def sql_of(self, statement: ClauseElement) -> tuple[str, dict[str, Any]]:
        """`statement` compiled for PostgreSQL with psycopg's `%(name)s` placeholders, and the values of its literal
        parameters (a JSON key, say); cached per statement. Bind processors do not run on this path: callers pass
        values the driver takes as they are (aware datetimes, strings, numbers)."""
        hit = self._sql.get(statement)
        if hit is None:
            compiled = statement.compile(dialect=self._dialect)
            hit = (str(compiled), {k: v for k, v in compiled.params.items() if v is not None})
            self._sql[statement] = hit
        return hit

    async def execute(self, statement: ClauseElement, params: dict[str, Any]) -> None:
        await self._run(statement, params, fetch=False)

    async def fetch_all(self, statement: ClauseElement, params: dict[str, Any]) -> list[dict[str, Any]]:
        return await self._run(statement, params, fetch=True)

    async def fetch_one(self, statement: ClauseElement, params: dict[str, Any]) -> dict[str, Any] | None:
        rows = await self._run(statement, params, fetch=True)
        return rows[0] if rows else None

    async def _run(self, statement: ClauseElement, params: dict[str, Any], *, fetch: bool) -> list[dict[str, Any]]:
        pool = self._pool
        if pool is None:
            raise AsyncDatabaseError("the async database pool is not open")
        sql, literals = self.sql_of(statement)
        try:
            async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
                await cursor.execute(sql, {**literals, **params} if literals else params)
                return await cursor.fetchall() if fetch else []
        except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as exc:
            # A connection the database dropped comes back broken and the pool discards it: this request gets a
            # 503, the next one reconnects.
            logger.warning("statement not run on the async pool: %s", type(exc).__name__)
            raise AsyncDatabaseError("the database is unavailable; try again shortly") from exc
