"""Spent nonces of signed HTTP requests (HIS clients, the device API): `NonceStore`.

A nonce is spent by inserting `(caller, nonce)` into `request_nonces`; the primary key refuses a second spend,
whichever server process the replay reaches. Rows older than twice the signing window are pruned at most once a
minute per process.

Two ways in, one table and one statement:

* `claim` (sync, SQLAlchemy Core on the server's engine): SQLite, and callers already in a worker thread;
* `claim_async` (on the event loop): on PostgreSQL the same INSERT in autocommit on the process's
  `sync_server.db.async_pg.AsyncPostgres` pool, so a signed HIS request is authenticated without a worker-thread
  hop of its own (docs/benchmarks.md, "HIS interfaces under load"). Without an open pool (SQLite, or a store used
  outside the app's lifespan) it runs `claim` in a worker thread.

Errors: `ReplayedNonceError` for a spent nonce; `NonceStoreUnavailableError` when the database cannot be reached
(the API answers 503, as for any database failure). It must never log a nonce or a caller's secret.
"""

from __future__ import annotations

import threading
from datetime import UTC, timedelta
from typing import Final

import psycopg
from sqlalchemy import Engine, bindparam, delete, insert
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.concurrency import run_in_threadpool

from protocol import Clock
from sync_server.db.async_pg import AsyncDatabaseError, AsyncPostgres
from sync_server.db.models import RequestNonce

PRUNE_EVERY_S: Final = 60.0

_INSERT = insert(RequestNonce)
_PRUNE = delete(RequestNonce).where(RequestNonce.seen_at < bindparam("cutoff", type_=RequestNonce.seen_at.type))


class ReplayedNonceError(Exception):
    """The nonce was spent already: the request is a replay (or a client reusing nonces)."""


class NonceStoreUnavailableError(Exception):
    """The database did not take the nonce (down, restarting, out of connections): try again shortly."""


class NonceStore:
    """The spent nonces of one server process. Thread-safe; `claim_async` must run on the app's event loop."""

    def __init__(self, engine: Engine, clock: Clock, *, keep_s: float, hot: AsyncPostgres | None = None) -> None:
        # On PostgreSQL the sync path is also one autocommit INSERT (no BEGIN/COMMIT round trips); SQLite takes its
        # write lock for the INSERT itself, so a plain transaction there.
        self._engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else engine
        )
        self._clock = clock
        self._keep = timedelta(seconds=keep_s)
        self._hot = hot
        self._lock = threading.Lock()
        self._pruned_at = float("-inf")

    def claim(self, caller: str, nonce: str) -> None:
        """Spend `nonce` for `caller` (sync); `ReplayedNonceError` when it was spent already."""
        now = self._clock.now()
        try:
            with self._engine.begin() as conn:
                conn.execute(_INSERT, {"caller": caller, "nonce": nonce, "seen_at": now})
        except IntegrityError:
            raise ReplayedNonceError("the request nonce was already used") from None
        except OperationalError as exc:
            raise NonceStoreUnavailableError("the database is unavailable") from exc
        if self._prune_due():
            with self._engine.begin() as conn:
                conn.execute(_PRUNE, {"cutoff": now - self._keep})

    async def claim_async(self, caller: str, nonce: str) -> None:
        """Spend `nonce` for `caller` from the event loop; `ReplayedNonceError` when it was spent already."""
        hot = self._hot
        if hot is None or not hot.is_open:
            await run_in_threadpool(self.claim, caller, nonce)
            return
        now = self._clock.now().astimezone(UTC)
        try:
            await hot.execute(_INSERT, {"caller": caller, "nonce": nonce, "seen_at": now})
            if self._prune_due():
                await hot.execute(_PRUNE, {"cutoff": now - self._keep})
        except psycopg.errors.UniqueViolation:
            raise ReplayedNonceError("the request nonce was already used") from None
        except AsyncDatabaseError as exc:
            raise NonceStoreUnavailableError("the database is unavailable") from exc

    def _prune_due(self) -> bool:
        tick = self._clock.monotonic()
        with self._lock:
            if tick - self._pruned_at < PRUNE_EVERY_S:
                return False
            self._pruned_at = tick
            return True
