"""Proxy-purchase relationships (代购药关系, REQUIREMENTS E-11, K-05, B-11) as the terminal sees them.

Owns `ProxyRegistry`, the seam the POS API (`terminal.pos_api`) asks "may this agent buy for this beneficiary?",
`SqliteProxyRegistry`, the local store of the relationships of this terminal's institution, and
`ProxyRelationshipSync`, which fills it from the server: HIS registers and ends relationships on the server
(`POST/DELETE /his/v1/proxy-relationships`), the server sends a `proxy_relationships` notice command to the terminals
of the institution, and the sync thread fetches the whole current set (`GET /device/v1/proxy-relationships`) at start,
on each notice (`ProxyRelationshipsHandler`) and, after a failure, again with back-off. A fetched set replaces the
stored one in one transaction, so a relationship ended on the server disappears here too (docs/purchases.md).

It must never store a name or an ID number: a relationship is two `person_ref`s (`protocol.purchase.person_ref`, a
keyed SM3 digest of certificate type + number) plus a validity window and the server's id. It never talks to the
network on the downlink thread: the command handler only wakes the sync thread.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from protocol import CommandOutcome, DeviceCommand
from protocol.purchase import PERSON_REF_DOMAIN, PersonRef, person_ref
from terminal.commands import HandlerOutcome

__all__ = [
    "PERSON_REF_DOMAIN",
    "ProxyRegistry",
    "ProxyRelationship",
    "ProxyRelationshipSync",
    "ProxyRelationshipsHandler",
    "SqliteProxyRegistry",
    "person_ref",
]

logger = logging.getLogger(__name__)

RELATIONSHIPS_PATH: Final = "/device/v1/proxy-relationships"
PAGE_SIZE: Final = 500
MAX_RELATIONSHIPS: Final = 100_000
"""A fetch stops (and fails) beyond this many relationships: an institution never has that many."""


@dataclass(frozen=True, slots=True)
class ProxyRelationship:
    """One binding: `agent_ref` may buy on behalf of `beneficiary_ref` between `valid_from` and `valid_until`."""

    beneficiary_ref: str
    agent_ref: str
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    relationship_id: str | None = None
    """The server's id of the binding (opaque), reported with the verification when known."""

    def valid_at(self, when: datetime) -> bool:
        if self.valid_from is not None and when < self.valid_from:
            return False
        return self.valid_until is None or when < self.valid_until


class ProxyRegistry(Protocol):
    """Where the terminal looks up proxy relationships. Implementations must be thread-safe (the POS API's worker
    threads call them)."""

    def agents_of(self, beneficiary_ref: str, when: datetime) -> list[ProxyRelationship]:
        """The relationships of `beneficiary_ref` valid at `when` (empty when none)."""
        ...


class SqliteProxyRegistry:
    """A `ProxyRegistry` in one SQLite file (or ":memory:"). Holds person references only, never personal data."""

    def __init__(self, path: Path | str = ":memory:") -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS proxy_relationship ("
            " beneficiary_ref TEXT NOT NULL, agent_ref TEXT NOT NULL,"
            " valid_from TEXT, valid_until TEXT, relationship_id TEXT,"
            " PRIMARY KEY (beneficiary_ref, agent_ref))"
        )

    def register(self, relationship: ProxyRelationship) -> None:
        """Insert or replace the binding of this beneficiary/agent pair."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO proxy_relationship VALUES (?, ?, ?, ?, ?)",
                (
                    relationship.beneficiary_ref,
                    relationship.agent_ref,
                    None if relationship.valid_from is None else relationship.valid_from.isoformat(),
                    None if relationship.valid_until is None else relationship.valid_until.isoformat(),
                    relationship.relationship_id,
                ),
            )

    def replace_all(self, relationships: Sequence[ProxyRelationship]) -> None:
        """Make `relationships` the whole stored set, in one transaction (the server's current set)."""
        rows = [
            (
                r.beneficiary_ref,
                r.agent_ref,
                None if r.valid_from is None else r.valid_from.isoformat(),
                None if r.valid_until is None else r.valid_until.isoformat(),
                r.relationship_id,
            )
            for r in relationships
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM proxy_relationship")
                self._db.executemany("INSERT OR REPLACE INTO proxy_relationship VALUES (?, ?, ?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM proxy_relationship").fetchone()[0])

    def revoke(self, beneficiary_ref: str, agent_ref: str) -> bool:
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM proxy_relationship WHERE beneficiary_ref = ? AND agent_ref = ?",
                (beneficiary_ref, agent_ref),
            )
            return cursor.rowcount > 0

    def agents_of(self, beneficiary_ref: str, when: datetime) -> list[ProxyRelationship]:
        with self._lock:
            rows = self._db.execute(
                "SELECT beneficiary_ref, agent_ref, valid_from, valid_until, relationship_id"
                " FROM proxy_relationship WHERE beneficiary_ref = ? ORDER BY agent_ref",
                (beneficiary_ref,),
            ).fetchall()
        found = [
            ProxyRelationship(
                beneficiary_ref=row[0],
                agent_ref=row[1],
                valid_from=None if row[2] is None else datetime.fromisoformat(row[2]),
                valid_until=None if row[3] is None else datetime.fromisoformat(row[3]),
                relationship_id=row[4],
            )
            for row in rows
        ]
        return [r for r in found if r.valid_at(when)]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ---------------------------------------------------------------------------------------------------- sync


class DeviceApi(Protocol):
    """The part of the terminal's signed device API (`terminal.server_api.ServerApi`) the sync needs."""

    def get_json(self, path: str, params: Mapping[str, str | int] | None = None) -> Any: ...


class _RelationshipIn(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    relationship_id: str = Field(min_length=1, max_length=64)
    beneficiary_ref: PersonRef
    agent_ref: PersonRef
    valid_from: AwareDatetime | None = None
    valid_until: AwareDatetime | None = None


class _PageIn(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    items: list[_RelationshipIn]
    total: int = Field(ge=0)


class ProxySyncError(Exception):
    """The server's relationships could not be fetched or understood (the stored set is kept)."""


def fetch_relationships(api: DeviceApi) -> list[ProxyRelationship]:
    """Every relationship of this terminal's institution, page by page. Raises `ProxySyncError`."""
    found: list[ProxyRelationship] = []
    offset = 0
    while True:
        try:
            raw = api.get_json(RELATIONSHIPS_PATH, {"limit": PAGE_SIZE, "offset": offset})
            page = _PageIn.model_validate(raw)
        except ValidationError as exc:
            raise ProxySyncError("the server's proxy relationships do not match the contract") from exc
        except Exception as exc:  # the device API's own errors (offline, refused): kept as one kind here
            raise ProxySyncError(f"fetching proxy relationships failed: {type(exc).__name__}") from exc
        found += [
            ProxyRelationship(r.beneficiary_ref, r.agent_ref, r.valid_from, r.valid_until, r.relationship_id)
            for r in page.items
        ]
        offset += len(page.items)
        if not page.items or offset >= page.total:
            return found
        if offset > MAX_RELATIONSHIPS:
            raise ProxySyncError(f"more than {MAX_RELATIONSHIPS} proxy relationships; refused")


class ProxyRelationshipSync:
    """Keeps a `SqliteProxyRegistry` equal to the server's set: one daemon thread that fetches at start, whenever
    `request()` is called (the `proxy_relationships` notice) and, after a failure, again after a back-off that doubles
    from `retry_s` up to `max_retry_s`. `sync()` does one fetch in the caller's thread (tests, CLI)."""

    def __init__(
        self,
        registry: SqliteProxyRegistry,
        api: DeviceApi | None,
        *,
        retry_s: float = 5.0,
        max_retry_s: float = 300.0,
        on_synced: Callable[[int], None] | None = None,
    ) -> None:
        self.registry = registry
        self.api = api
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self._on_synced = on_synced
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.synced = 0
        """Successful fetches since start."""

    def sync(self) -> int:
        """Fetch and store the server's set; the number of relationships stored. Raises `ProxySyncError`."""
        if self.api is None:
            raise ProxySyncError("no device API (the terminal is not enrolled)")
        relationships = fetch_relationships(self.api)
        self.registry.replace_all(relationships)
        self.synced += 1
        if self._failing:
            logger.info("proxy relationships: fetched again after failures (%d stored)", len(relationships))
            self._failing = False
        else:
            logger.info("proxy relationships: %d stored", len(relationships))
        if self._on_synced is not None:
            self._on_synced(len(relationships))
        return len(relationships)

    def request(self) -> bool:
        """Ask the thread to fetch soon; False when there is no device API to fetch from."""
        if self.api is None:
            return False
        self._wake.set()
        return True

    def start(self) -> None:
        if self.api is None or self._thread is not None:
            return
        self._wake.set()  # the first fetch at start
        self._thread = threading.Thread(target=self._run, name="proxy-sync", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        delay = self.retry_s
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.sync()
                delay = self.retry_s
            except ProxySyncError as exc:
                if not self._failing:
                    logger.warning("proxy relationships: %s; keeping the stored set and retrying", exc)
                    self._failing = True
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.max_retry_s)
                self._wake.set()
            except Exception:
                logger.exception("proxy relationships: sync failed")
                if self._stop.wait(delay):
                    return
                self._wake.set()


@dataclass(frozen=True, slots=True)
class ProxyRelationshipsHandler:
    """`proxy_relationships`: wake the sync thread (the fetch runs there, never on the downlink thread)."""

    sync: ProxyRelationshipSync

    def __call__(self, command: DeviceCommand) -> HandlerOutcome:
        if not self.sync.request():
            return HandlerOutcome(CommandOutcome.REJECTED, "no device API to fetch proxy relationships from")
        return HandlerOutcome(CommandOutcome.APPLIED, "proxy relationships fetch scheduled")
