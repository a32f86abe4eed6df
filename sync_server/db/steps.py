"""Database work written once and run on either driver (sans-I/O).

A `Steps[T]` is a generator that yields `Step`s, one Core statement each with what it wants back, receives each
result and returns T. Two drivers run it:

    HIS handler ──▶ ServerRuntime.run_steps(make, write=…)
                      ├─ PostgreSQL: AsyncPostgres.run(steps)   on the event loop, psycopg async pool
                      └─ otherwise:  run_steps(conn, steps)     in a worker thread, SQLAlchemy connection

`run_steps` here runs it on a SQLAlchemy `Connection` in the caller's transaction; `sync_server.db.async_pg` runs
the same statements on PostgreSQL's async pool. Both answer alike: a row is a dict keyed by column label, and the
values of our own column types (`UtcDateTime`: UTC instants; `_str_enum`: enum members) have been through the
types' processors. This is how HIS's bulk traffic runs without an ORM unit of work or a worker thread on
PostgreSQL while SQLite keeps working (docs/benchmarks.md, "HIS interfaces under load"). This module must never
hold a connection, commit, or log a parameter.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sqlalchemy import Connection, Executable

from sync_server.db.statements import InsertIfNew

T = TypeVar("T")

Fetch = Literal["none", "scalar", "one", "all"]


@dataclass(frozen=True, slots=True)
class Step:
    """One statement and what it answers: `none`, `scalar` (the first column of the first row, or None), `one` (the
    first row as a dict, or None) or `all` (every row as a dict). `params` as a sequence of mappings runs the
    statement once per mapping (`none` only)."""

    statement: Executable | InsertIfNew
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    fetch: Fetch = "none"


Steps = Generator[Step, Any, T]


def execute(statement: Executable | InsertIfNew, params: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Step:
    return Step(statement, params, "none")


def scalar(statement: Executable | InsertIfNew, params: Mapping[str, Any]) -> Step:
    return Step(statement, params, "scalar")


def one(statement: Executable, params: Mapping[str, Any]) -> Step:
    return Step(statement, params, "one")


def rows(statement: Executable, params: Mapping[str, Any]) -> Step:
    return Step(statement, params, "all")


def statement_for(step: Step, dialect: str) -> Executable:
    return step.statement.on(dialect) if isinstance(step.statement, InsertIfNew) else step.statement


def run_steps(conn: Connection, steps: Steps[T]) -> T:
    """Run `steps` on `conn`, in the caller's transaction."""
    try:
        step = next(steps)
        while True:
            step = steps.send(_run(conn, step))
    except StopIteration as done:
        result: T = done.value
        return result


def _run(conn: Connection, step: Step) -> Any:
    statement = statement_for(step, conn.dialect.name)
    params = step.params
    if not isinstance(params, Mapping):
        if step.fetch != "none":
            raise ValueError("a statement run once per parameter set answers nothing")
        if params:
            conn.execute(statement, [dict(p) for p in params])
        return None
    result = conn.execute(statement, dict(params))
    if step.fetch == "none":
        return None
    if step.fetch == "scalar":
        return result.scalar()
    if step.fetch == "one":
        row = result.mappings().first()
        return None if row is None else dict(row)
    return [dict(row) for row in result.mappings()]
