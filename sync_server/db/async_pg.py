"""HIS's bulk traffic on the event loop: `AsyncPostgres`, a small per-process pool of psycopg async connections
(PostgreSQL only).

What runs here: a signed request's nonce (`sync_server.nonces`) and HIS's registrations and reads of prescriptions
and purchases, written once as steps of SQLAlchemy Core statements (`sync_server.db.steps`) that `run` executes in
autocommit or in one transaction. Each statement is compiled here for PostgreSQL once (`CompiledStatement`), with
its parameters and our own result types passed through SQLAlchemy's type processors, so the sync driver
(`sync_server.db.steps.run_steps`, SQLite) and this one run the same SQL and answer alike. On the loop a request
needs no worker-thread hop, no ORM session and no SQLAlchemy execution context: together about half the CPU such a
request cost (docs/benchmarks.md, "HIS interfaces under load").

Errors: `AsyncDatabaseError` when the database cannot be reached (the API answers 503, as for any database
failure); other psycopg errors (a constraint) propagate to the caller. It must never log a parameter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine, Enum, Executable, Insert, TypeDecorator, bindparam
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from sync_server.db.steps import Step, Steps, T, execute, statement_for

logger = logging.getLogger(__name__)

POOL_MAX: Final = 8
"""Connections per server process: each statement holds one for a single round trip, and a burst of requests
waits for one when all are busy."""
POOL_TIMEOUT_S: Final = 10.0
MULTI_ROW_INSERT_MAX: Final = 100
"""An INSERT for up to this many rows is sent as one multi-row INSERT (a sale's lines, its traceability codes)."""
EXECUTE_EACH_UP_TO: Final = 4
"""Another statement run for up to this many parameter sets is sent once per set: psycopg's `executemany` enters
pipeline mode, which costs more CPU than a few plain round trips."""
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
        self._compiled: dict[tuple[Executable, tuple[str, ...] | None], CompiledStatement] = {}
        self._multi_rows: dict[tuple[Insert, tuple[str, ...], int], CompiledStatement] = {}

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

    def compiled(self, statement: Executable, keys: tuple[str, ...] | None = None) -> CompiledStatement:
        """`statement` compiled for PostgreSQL (an INSERT for the parameter names `keys`), cached per statement."""
        hit = self._compiled.get((statement, keys))
        if hit is None:
            hit = CompiledStatement.of(statement, self._dialect, keys)
            self._compiled[(statement, keys)] = hit
        return hit

    async def execute(self, statement: Executable, params: dict[str, Any]) -> None:
        await self.run(_single(execute(statement, params)))

    async def run(self, steps: Steps[T], *, transaction: bool = False) -> T:
        """Run `steps` (`sync_server.db.steps`) on one pooled connection: statement by statement in autocommit, or
        all in one transaction (committed when the steps return; rolled back when anything raises)."""
        pool = self._pool
        if pool is None:
            raise AsyncDatabaseError("the async database pool is not open")
        try:
            async with pool.connection() as conn:
                if not transaction:
                    return await self._drive(conn, steps)
                async with conn.transaction():
                    return await self._drive(conn, steps)
        except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as exc:
            # A connection the database dropped comes back broken and the pool discards it: this request gets a
            # 503, the next one reconnects.
            logger.warning("statements not run on the async pool: %s", type(exc).__name__)
            raise AsyncDatabaseError("the database is unavailable; try again shortly") from exc

    async def _drive(self, conn: psycopg.AsyncConnection[Any], steps: Steps[T]) -> T:
        try:
            step = next(steps)
            while True:
                step = steps.send(await self._step(conn, step))
        except StopIteration as done:
            result: T = done.value
            return result

    async def _step(self, conn: psycopg.AsyncConnection[Any], step: Step) -> Any:
        statement = statement_for(step, "postgresql")
        params = step.params
        async with conn.cursor(row_factory=dict_row) as cursor:
            if not isinstance(params, Mapping):
                if step.fetch != "none":
                    raise ValueError("a statement run once per parameter set answers nothing")
                if params:
                    await self._execute_many(cursor, statement, params)
                return None
            compiled = self.compiled(statement, tuple(params) if isinstance(statement, Insert) else None)
            await cursor.execute(compiled.sql, compiled.bind(params))
            if step.fetch == "none":
                return None
            found = await cursor.fetchall()
        if step.fetch == "scalar":
            return next(iter(found[0].values())) if found else None
        if step.fetch == "one":
            return compiled.result(found[0]) if found else None
        return [compiled.result(row) for row in found]

    async def _execute_many(
        self, cursor: psycopg.AsyncCursor[Any], statement: Executable, params: Sequence[Mapping[str, Any]]
    ) -> None:
        """One statement for every parameter set: an INSERT of up to `MULTI_ROW_INSERT_MAX` rows as one multi-row
        INSERT (one round trip), anything else once per set up to `EXECUTE_EACH_UP_TO`, beyond that psycopg's
        `executemany`."""
        keys = tuple(params[0])
        if isinstance(statement, Insert) and len(params) <= MULTI_ROW_INSERT_MAX:
            compiled = self._multi_row(statement, keys, len(params))
            flat = {f"{key}_{n}": row[key] for n, row in enumerate(params) for key in keys}
            await cursor.execute(compiled.sql, compiled.bind(flat))
            return
        compiled = self.compiled(statement, keys)
        if len(params) <= EXECUTE_EACH_UP_TO:
            for each in params:
                await cursor.execute(compiled.sql, compiled.bind(each))
        else:
            await cursor.executemany(compiled.sql, [compiled.bind(p) for p in params])

    def _multi_row(self, statement: Insert, keys: tuple[str, ...], rows: int) -> CompiledStatement:
        """`INSERT … VALUES (…), (…)` of `statement` for `rows` rows of `keys`, parameters named `<key>_<row>`;
        built and compiled once per row count."""
        hit = self._multi_rows.get((statement, keys, rows))
        if hit is None:
            columns = statement.table.c
            values = [{key: bindparam(f"{key}_{n}", type_=columns[key].type) for key in keys} for n in range(rows)]
            hit = CompiledStatement.of(statement.values(values), self._dialect, None)
            self._multi_rows[(statement, keys, rows)] = hit
        return hit


@dataclass(frozen=True, slots=True)
class CompiledStatement:
    """A Core statement as psycopg runs it: its SQL with `%(name)s` placeholders, the values of its literal
    parameters, and the SQLAlchemy type processors of its parameters and of the result columns of our own types
    (`UtcDateTime`, `_str_enum`), so both drivers answer alike (`sync_server.db.steps`)."""

    sql: str
    literals: dict[str, Any]
    binders: dict[str, Callable[[Any], Any]]
    results: dict[str, Callable[[Any], Any]]

    @classmethod
    def of(cls, statement: Executable, dialect: Dialect, keys: tuple[str, ...] | None) -> CompiledStatement:
        if not isinstance(statement, ClauseElement):
            raise TypeError(f"not a Core statement: {type(statement).__name__}")
        compiled = statement.compile(dialect=dialect, column_keys=None if keys is None else list(keys))
        if not isinstance(compiled, SQLCompiler):
            raise TypeError(f"not a SQL statement: {type(statement).__name__}")
        binders: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                binders[name] = process
        results: dict[str, Callable[[Any], Any]] = {}
        for column in getattr(statement, "selected_columns", ()):
            kind = column.type
            if isinstance(kind, TypeDecorator | Enum) and isinstance(column.name, str):
                process = kind.dialect_impl(dialect).result_processor(dialect, None)
                if process is not None:
                    results[column.name] = process
        literals = {k: v for k, v in compiled.params.items() if v is not None and k not in (keys or ())}
        return cls(str(compiled), literals, binders, results)

    def bind(self, params: Mapping[str, Any]) -> dict[str, Any]:
        bound = {**self.literals, **params} if self.literals else dict(params)
        for name, process in self.binders.items():
            if name in bound:
                bound[name] = process(bound[name])
        return bound

    def result(self, row: dict[str, Any]) -> dict[str, Any]:
        for name, process in self.results.items():
            if name in row:
                row[name] = process(row[name])
        return row


def _single(step: Step) -> Steps[Any]:
    return (yield step)
