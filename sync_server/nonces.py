"""Spent nonces of signed HTTP requests (HIS clients, the device API): `NonceStore`.

A nonce is spent by inserting `(caller, nonce)` into `request_nonces`; the primary key refuses a second spend,
whichever server process the replay reaches. Rows older than twice the signing window are pruned at most once a
minute per process.

Two ways in, one table:

* `claim` (sync, SQLAlchemy Core on the server's engine): SQLite, and callers already in a worker thread;
* `claim_async` (on the event loop): on PostgreSQL, one autocommit INSERT on a small per-process pool of psycopg
  async connections (`open` / `close` in the app's lifespan). A signed HIS request is then authenticated entirely
  on the event loop, without a worker-thread hop of its own: the hop and the Core round trip cost about 0.3 ms of
  CPU per request, which the HIS bar (p95 ≤ 100 ms at 200 requests/s on 2 cores) cannot spare
  (docs/benchmarks.md, "HIS interfaces under load"). Its SQL is compiled from the same table definition. Without
  an open pool (SQLite, or a store used outside the lifespan) `claim_async` runs `claim` in a worker thread.

Errors: `ReplayedNonceError` for a spent nonce; `NonceStoreUnavailableError` when the database cannot be reached
(the API answers 503, as for any database failure). It must never log a nonce or a caller's secret.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, timedelta
from typing import Final

import psycopg
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine, bindparam, delete, insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.concurrency import run_in_threadpool

from protocol import Clock
from sync_server.db.models import RequestNonce

logger = logging.getLogger(__name__)

PRUNE_EVERY_S: Final = 60.0
ASYNC_POOL_MAX: Final = 4
"""Async connections per server process: a claim holds one for a single round trip (well under a millisecond)."""
ASYNC_POOL_TIMEOUT_S: Final = 10.0

_INSERT = insert(RequestNonce)
_PRUNE = delete(RequestNonce).where(RequestNonce.seen_at < bindparam("cutoff", type_=RequestNonce.seen_at.type))


class ReplayedNonceError(Exception):
    """The nonce was spent already: the request is a replay (or a client reusing nonces)."""


class NonceStoreUnavailableError(Exception):
    """The database did not take the nonce (down, restarting, out of connections): try again shortly."""


class NonceStore:
    """The spent nonces of one server process. Thread-safe; `claim_async` must run on the app's event loop."""

    def __init__(self, engine: Engine, clock: Clock, *, keep_s: float) -> None:
        # On PostgreSQL the sync path is also one autocommit INSERT (no BEGIN/COMMIT round trips); SQLite takes its
        # write lock for the INSERT itself, so a plain transaction there.
        self._engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else engine
        )
        self._clock = clock
        self._keep = timedelta(seconds=keep_s)
        self._lock = threading.Lock()
        self._pruned_at = float("-inf")
        self._pool: AsyncConnectionPool | None = None
        self._conninfo: str | None = None
        if engine.dialect.name == "postgresql":
            self._conninfo = make_url(engine.url).set(drivername="postgresql").render_as_string(hide_password=False)
            # psycopg's placeholders (%(name)s), from the same table definition the sync path uses.
            self._insert_sql = str(_INSERT.compile(dialect=engine.dialect))
            self._prune_sql = str(_PRUNE.compile(dialect=engine.dialect))

    # ------------------------------------------------------------------ lifecycle (the app's lifespan)

    async def open(self) -> None:
        """Open the async pool (PostgreSQL only; a no-op otherwise). Connections are made on first use."""
        if self._conninfo is None or self._pool is not None:
            return
        pool = AsyncConnectionPool(
            self._conninfo,
            min_size=0,
            max_size=ASYNC_POOL_MAX,
            kwargs={"autocommit": True},
            timeout=ASYNC_POOL_TIMEOUT_S,
            open=False,
            name="request-nonces",
        )
        await pool.open(wait=False)
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # ------------------------------------------------------------------ claims

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
        pool = self._pool
        if pool is None:
            await run_in_threadpool(self.claim, caller, nonce)
            return
        now = self._clock.now().astimezone(UTC)
        try:
            async with pool.connection() as conn:
                await conn.execute(self._insert_sql, {"caller": caller, "nonce": nonce, "seen_at": now})
                if self._prune_due():
                    await conn.execute(self._prune_sql, {"cutoff": now - self._keep})
        except psycopg.errors.UniqueViolation:
            raise ReplayedNonceError("the request nonce was already used") from None
        except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as exc:
            # A connection the database dropped is discarded by the pool when it comes back broken: this request
            # gets a 503, the next one reconnects.
            logger.warning("request nonce not stored: %s", type(exc).__name__)
            raise NonceStoreUnavailableError("the database is unavailable") from exc

    def _prune_due(self) -> bool:
        tick = self._clock.monotonic()
        with self._lock:
            if tick - self._pruned_at < PRUNE_EVERY_S:
                return False
            self._pruned_at = tick
            return True
