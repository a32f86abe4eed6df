"""Proxy-purchase relationships (代购药关系, REQUIREMENTS E-11, K-05, B-11) as the terminal sees them.

Owns `ProxyRegistry`, the seam the POS API (`terminal.pos_api`) asks "may this agent buy for this beneficiary?",
`person_ref` (the pseudonymous reference both sides of a relationship are stored under) and `SqliteProxyRegistry`, a
small local store the tests (and, later, the server's downlink) fill.

The relationships are bound on the server (B-11: 医保代购药管理系统); pushing them to the terminal is not built yet, so
for now whoever composes the terminal fills the registry. It must never store a name or an ID number: a relationship
is two `person_ref`s (a keyed SM3 digest of certificate type + number) plus a validity window.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from protocol.gm.sm3 import hmac_sm3

PERSON_REF_DOMAIN = b"yibao/person-ref/v1"
"""Key of the keyed digest behind `person_ref`. A fixed, public domain separator: the reference is pseudonymous
(it hides the number from logs and records), not anonymous (anyone holding a number can compute its reference)."""


def person_ref(cert_type: str, cert_number: str) -> str:
    """The pseudonymous reference of a person: 32 hex digits of HMAC-SM3 over "type:NUMBER" (number upper-cased,
    so an 'x' check character matches an 'X')."""
    data = f"{cert_type}:{cert_number.strip().upper()}".encode()
    return hmac_sm3(PERSON_REF_DOMAIN, data).hex()[:32]


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
