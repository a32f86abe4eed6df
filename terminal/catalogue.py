"""The terminal's catalogue store: the synced 医保 catalogues and drug-usage rules, searchable offline.

Owns one SQLite file (its own, never the outbox's) holding, per catalogue kind (`protocol.catalogue.CatalogueKind`),
exactly one verified version, and the current `protocol.drug_rules.DrugRuleSet`:

    server publishes v1 ──snapshot──► apply_snapshot ─┐                 (hash checked before and after storing)
    server publishes v2 ──delta 1→2─► apply_delta ────┼─► held version, content hash, entries ─► search / get
    delta 3→4 while holding v2 ─────► CatalogueGapError: nothing changes; the caller asks for a snapshot
    hash mismatch after applying ───► CatalogueHashError: rolled back; nothing changes; ask for a snapshot

Every apply is one `BEGIN IMMEDIATE` transaction that ends with the stored state's content hash recomputed from the
stored per-entry digests and compared with the document's: the transaction commits only when they agree, so the held
version is always a proven one. A redelivered document for the version already held is a no-op (at-least-once
delivery); an older snapshot or rule set is refused (no rollback by replay).

Search (`search`) runs on an in-memory index rebuilt from the file after each commit: name substring, code (exact and
prefix) and pinyin initials (`pinyin_initials`: every reading of a 多音字 is indexed, so 长春西汀 is found by 'ccxt'
and 'zcxt'). Ranking: exact code, code prefix, exact name, name prefix, initials prefix, name substring, initials
substring; then shorter names first, then code. One process owns the file (an exclusive lock beside it), as with the
outbox. `sqlite3` errors never escape: they become `CatalogueError`.

It must never talk to the network (fetching documents is the sync layer's job), never store personal data (the
engine's proposals are evaluated, never stored here), and never hold a version whose hash it has not checked.
"""

from __future__ import annotations

import bisect
import fcntl
import heapq
import itertools
import json
import logging
import os
import sqlite3
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Final

from pydantic import TypeAdapter, ValidationError
from pypinyin import Style, pinyin

from protocol import ContractError
from protocol.catalogue import (
    CatalogueDelta,
    CatalogueEntry,
    CatalogueHolding,
    CatalogueKind,
    CatalogueSnapshot,
    DesignatedInstitution,
    DrugEntry,
    TreatmentItem,
    content_hash_of_digests,
    entry_digest,
)
from protocol.drug_rules import DrugRuleSet, Evaluation, Proposal, ProposedLine, evaluate
from terminal.errors import TerminalError

logger = logging.getLogger(__name__)

CATALOGUE_DB_SCHEMA_VERSION: Final = 1
BUSY_TIMEOUT_MS: Final = 5000
MAX_PINYIN_VARIANTS: Final = 32
"""Readings indexed per name at most: a name of many 多音字 would otherwise multiply out (2^n); the first readings
pypinyin gives are the common ones, and they come first."""

MIN_CODE_PREFIX: Final = 3
"""Shorter queries are not matched against codes (one or two characters select most of a catalogue)."""
MIN_INITIALS_SUBSTRING: Final = 2
"""Initials shorter than this match only at the start of a name's initials."""

_ENTRY: Final[TypeAdapter[DrugEntry | TreatmentItem | DesignatedInstitution]] = TypeAdapter(CatalogueEntry)

_SCHEMA: Final = """
CREATE TABLE catalogue_version (
    kind TEXT PRIMARY KEY,
    version INTEGER NOT NULL CHECK (version >= 1),
    content_hash TEXT NOT NULL,
    published_at TEXT NOT NULL,
    entries INTEGER NOT NULL
);
CREATE TABLE entry (
    kind TEXT NOT NULL,
    code TEXT NOT NULL,
    name TEXT NOT NULL,
    alt_name TEXT NOT NULL,
    region_code TEXT,
    digest BLOB NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, code)
) WITHOUT ROWID;
CREATE TABLE name_initials (
    name TEXT PRIMARY KEY,
    initials TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE rule_set (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    body TEXT NOT NULL
);
"""


class CatalogueError(TerminalError):
    """The catalogue store failed or refused a document; what it held before is unchanged."""


class CatalogueGapError(CatalogueError):
    """A delta does not start at the version held: ask the server for a snapshot (or the right delta)."""

    def __init__(self, kind: CatalogueKind, held_version: int, from_version: int) -> None:
        super().__init__(
            f"{kind.value} catalogue: delta from v{from_version} does not follow the held v{held_version}; "
            "a snapshot is needed"
        )
        self.kind = kind
        self.held_version = held_version
        self.from_version = from_version


class CatalogueHashError(CatalogueError):
    """A document's content hash does not match its entries, or the state it leads to: refused, rolled back."""


class CatalogueStaleError(CatalogueError):
    """A snapshot or rule set older than the one held: refused (an old document must not roll the terminal back)."""


# ------------------------------------------------------------------------------------------------------ pinyin


@lru_cache(maxsize=20_000)
def _char_initials(char: str) -> tuple[str, ...]:
    if char.isascii():
        return (char.lower(),) if char.isalnum() else ()
    if not ("\u3400" <= char <= "\u9fff" or "\uf900" <= char <= "\ufaff"):
        return ()  # full-width punctuation, symbols: not typed when searching
    readings = pinyin(char, style=Style.FIRST_LETTER, heteronym=True, errors="ignore")
    return tuple(dict.fromkeys(r.lower() for r in (readings[0] if readings else []) if r.isascii() and r))


def pinyin_initials(name: str, *, limit: int = MAX_PINYIN_VARIANTS) -> list[str]:
    """Every string of pinyin initials `name` can be typed as (all readings of each 多音字), common readings first;
    ASCII letters and digits stay as they are (lowercased), punctuation is dropped. At most `limit` strings."""
    choices = [c for c in (_char_initials(ch) for ch in name) if c]
    if not choices:
        return []
    return ["".join(p) for p in itertools.islice(itertools.product(*choices), limit)]


# ------------------------------------------------------------------------------------------------------ search


class MatchKind(IntEnum):
    """How a hit matched; lower ranks first."""

    CODE_EXACT = 0
    CODE_PREFIX = 1
    NAME_EXACT = 2
    NAME_PREFIX = 3
    INITIALS_PREFIX = 4
    NAME_SUBSTRING = 5
    INITIALS_SUBSTRING = 6


@dataclass(frozen=True)
class SearchHit:
    kind: CatalogueKind
    code: str
    name: str
    match: MatchKind


@dataclass(frozen=True)
class SearchResult:
    hits: tuple[SearchHit, ...]
    total: int
    """Entries that matched (of which `hits` are the best `limit`), counted up to the search's `count_cap`."""
    capped: bool = False
    """True when counting stopped at the cap: at least `total` entries matched."""


class _Haystack:
    """Many short strings searched at C speed: one NUL-joined text and `str.find`, instead of a Python-level loop
    over tens of thousands of strings (a query never contains NUL, so a match never straddles two strings)."""

    def __init__(self, strings: Sequence[str], owners: Sequence[str]) -> None:
        self._text = "\0".join(strings)
        self._starts: list[int] = []
        pos = 0
        for s in strings:
            self._starts.append(pos)
            pos += len(s) + 1
        self._lengths = [len(s) for s in strings]
        self._owners = list(owners)
        self._sorted = sorted(zip(strings, owners, strict=True))

    def starting_with(self, prefix: str) -> Iterator[tuple[str, bool]]:
        """(owner, whole string) for each string that starts with `prefix`: a bisect, not a scan."""
        for i in range(bisect.bisect_left(self._sorted, (prefix,)), len(self._sorted)):
            string, owner = self._sorted[i]
            if not string.startswith(prefix):
                return
            yield owner, len(string) == len(prefix)

    def find(self, needle: str) -> Iterator[tuple[str, bool, bool]]:
        """(owner, match at the start, whole string) for each string containing `needle`, first occurrence."""
        if not needle or "\0" in needle or not self._owners:
            return
        pos = self._text.find(needle)
        while pos != -1:
            i = bisect.bisect_right(self._starts, pos) - 1
            at_start = pos == self._starts[i]
            yield self._owners[i], at_start, at_start and len(needle) == self._lengths[i]
            if i + 1 >= len(self._starts):
                return
            pos = self._text.find(needle, self._starts[i + 1])


@dataclass
class _KindIndex:
    codes: list[str]
    """Sorted, for exact and prefix lookup."""
    name_of: dict[str, str]
    region_of: dict[str, str]
    codes_by_name: dict[str, list[str]]
    """Distinct searchable names (display and generic) → their entries' codes, sorted."""
    names: _Haystack
    """Lowercased distinct names, owned by the name."""
    initials: _Haystack
    """Every initials variant of every distinct name, owned by the name."""


def _empty_index() -> _KindIndex:
    return _KindIndex([], {}, {}, {}, _Haystack([], []), _Haystack([], []))


# ------------------------------------------------------------------------------------------------------ the store


class CatalogueStore:
    """The terminal's catalogues and rules. Thread-safe; open once per process with `CatalogueStore.open(path)`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, owner_fd: int) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._owner_fd: int | None = owner_fd
        self._lock = threading.Lock()
        self._index: dict[CatalogueKind, _KindIndex] = {k: _empty_index() for k in CatalogueKind}
        self._rules: DrugRuleSet | None = None

    @classmethod
    def open(cls, path: Path) -> CatalogueStore:
        """Open (creating if needed) the catalogue file and load the search index and rules."""
        owner_fd = _take_ownership(path)
        try:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            os.close(owner_fd)
            raise CatalogueError(f"cannot open catalogue store {path}: {exc}") from exc
        store = cls(conn, path, owner_fd)
        try:
            with store._translated("open"):
                store._prepare()
                for kind in CatalogueKind:
                    store._index[kind] = store._build_index(kind)
                store._rules = store._load_rules()
        except BaseException:
            store.close()
            raise
        return store

    def _prepare(self) -> None:
        conn = self._require_conn()
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise CatalogueError(f"catalogue store {self._path}: WAL journal mode unavailable (got {mode!r})")
        # NORMAL is durable enough here: a catalogue lost to a power cut is fetched again; the outbox is FULL.
        conn.execute("PRAGMA synchronous = NORMAL")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > CATALOGUE_DB_SCHEMA_VERSION:
            raise CatalogueError(f"catalogue store {self._path} has schema version {version}, newer than this software")
        if version == 0:
            with self._transaction() as tx:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        tx.execute(statement)
                tx.execute(f"PRAGMA user_version = {CATALOGUE_DB_SCHEMA_VERSION}")

    def close(self) -> None:
        """Checkpoint and close; idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
            owner_fd, self._owner_fd = self._owner_fd, None
        try:
            if conn is not None:
                try:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:
                    logger.warning("catalogue store: WAL checkpoint at close failed: %s", exc)
                finally:
                    conn.close()
        finally:
            if owner_fd is not None:
                os.close(owner_fd)

    def __enter__(self) -> CatalogueStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ versions

    def holding(self, kind: CatalogueKind) -> CatalogueHolding:
        """What this terminal holds of `kind` (version 0 when nothing)."""
        with self._lock, self._translated("read version"):
            row = (
                self._require_conn()
                .execute("SELECT version, content_hash, entries FROM catalogue_version WHERE kind = ?", (kind.value,))
                .fetchone()
            )
        if row is None:
            return CatalogueHolding(kind=kind, version=0, content_hash=None, entries=0)
        return CatalogueHolding(kind=kind, version=int(row[0]), content_hash=str(row[1]), entries=int(row[2]))

    def apply(self, document: CatalogueSnapshot | CatalogueDelta) -> CatalogueHolding:
        if isinstance(document, CatalogueSnapshot):
            return self.apply_snapshot(document)
        return self.apply_delta(document)

    def apply_snapshot(self, snapshot: CatalogueSnapshot) -> CatalogueHolding:
        """Replace everything held of `snapshot.kind` by the snapshot, atomically, after checking its hash.

        Raises `CatalogueHashError` (hash does not match the entries) or `CatalogueStaleError` (older than held)."""
        kind = snapshot.kind
        digests = [(e, entry_digest(e)) for e in snapshot.entries]
        if content_hash_of_digests(kind, snapshot.version, ((e.code, d) for e, d in digests)) != snapshot.content_hash:
            raise CatalogueHashError(f"{kind.value} snapshot v{snapshot.version}: content hash does not match entries")
        rows = [_entry_row(kind, e, d) for e, d in digests]
        with self._lock, self._translated("apply snapshot"):
            held = self._held(kind)
            if held is not None and held[0] > snapshot.version:
                raise CatalogueStaleError(
                    f"{kind.value} snapshot v{snapshot.version} is older than the held v{held[0]}; refused"
                )
            if held is not None and held == (snapshot.version, snapshot.content_hash):
                return self._holding_locked(kind)
            try:
                with self._transaction() as tx:
                    tx.execute("DELETE FROM entry WHERE kind = ?", (kind.value,))
                    tx.executemany("INSERT INTO entry VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                    # A snapshot is the moment to forget initials of names no catalogue uses any more.
                    tx.execute(
                        "DELETE FROM name_initials "
                        "WHERE name NOT IN (SELECT name FROM entry UNION SELECT alt_name FROM entry)"
                    )
                    self._store_initials(tx, {r[2] for r in rows} | {r[3] for r in rows})
                    self._finish(tx, kind, snapshot.version, snapshot.content_hash, snapshot.published_at.isoformat())
            except _HashMismatchError as exc:  # checked above, so only a store that lost rows mid-write gets here
                raise CatalogueHashError(
                    f"{kind.value} snapshot v{snapshot.version}: stored state does not match"
                ) from exc
            self._index[kind] = self._build_index(kind)
            holding = self._holding_locked(kind)
        logger.info("catalogue %s: snapshot v%d applied (%d entries)", kind.value, holding.version, holding.entries)
        return holding

    def apply_delta(self, delta: CatalogueDelta) -> CatalogueHolding:
        """Apply `delta` on top of the held version, atomically; the resulting state's hash must match.

        Raises `CatalogueGapError` when the held version is not `delta.from_version` (a delta for the version already
        held is a no-op instead), `CatalogueStaleError` when the held version is already at or past `to_version` with
        other content, and `CatalogueHashError` when the result does not hash to `delta.content_hash`."""
        kind = delta.kind
        rows = [_entry_row(kind, e, entry_digest(e)) for e in delta.upserts]
        with self._lock, self._translated("apply delta"):
            held = self._held(kind)
            held_version = held[0] if held is not None else 0
            if held == (delta.to_version, delta.content_hash):
                return self._holding_locked(kind)
            if held_version >= delta.to_version:
                raise CatalogueStaleError(
                    f"{kind.value} delta to v{delta.to_version}: already at v{held_version}; refused"
                )
            if held_version != delta.from_version:
                raise CatalogueGapError(kind, held_version, delta.from_version)
            try:
                with self._transaction() as tx:
                    tx.executemany(
                        "DELETE FROM entry WHERE kind = ? AND code = ?", [(kind.value, c) for c in delta.deletions]
                    )
                    tx.executemany("INSERT OR REPLACE INTO entry VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                    self._store_initials(tx, {r[2] for r in rows} | {r[3] for r in rows})
                    self._finish(tx, kind, delta.to_version, delta.content_hash, delta.published_at.isoformat())
            except _HashMismatchError as exc:
                raise CatalogueHashError(
                    f"{kind.value} delta v{delta.from_version}->v{delta.to_version}: the result does not match its "
                    "content hash; rolled back, a snapshot is needed"
                ) from exc
            self._index[kind] = self._build_index(kind)
            holding = self._holding_locked(kind)
        logger.info(
            "catalogue %s: delta v%d->v%d applied (%d upserts, %d deletions)",
            kind.value,
            delta.from_version,
            delta.to_version,
            len(delta.upserts),
            len(delta.deletions),
        )
        return holding

    def _finish(self, tx: sqlite3.Connection, kind: CatalogueKind, version: int, expected: str, published: str) -> None:
        """Inside the apply transaction: recompute the stored state's hash; raise (rolling back) unless it matches."""
        pairs = [
            (str(c), bytes(d)) for c, d in tx.execute("SELECT code, digest FROM entry WHERE kind = ?", (kind.value,))
        ]
        if content_hash_of_digests(kind, version, pairs) != expected:
            raise _HashMismatchError
        tx.execute(
            "INSERT OR REPLACE INTO catalogue_version (kind, version, content_hash, published_at, entries) "
            "VALUES (?, ?, ?, ?, ?)",
            (kind.value, version, expected, published, len(pairs)),
        )

    @staticmethod
    def _store_initials(tx: sqlite3.Connection, names: set[str]) -> None:
        tx.executemany(
            "INSERT OR IGNORE INTO name_initials (name, initials) VALUES (?, ?)",
            [(n, json.dumps(pinyin_initials(n))) for n in sorted(names) if n],
        )

    def _held(self, kind: CatalogueKind) -> tuple[int, str] | None:
        row = (
            self._require_conn()
            .execute("SELECT version, content_hash FROM catalogue_version WHERE kind = ?", (kind.value,))
            .fetchone()
        )
        return None if row is None else (int(row[0]), str(row[1]))

    def _holding_locked(self, kind: CatalogueKind) -> CatalogueHolding:
        row = (
            self._require_conn()
            .execute("SELECT version, content_hash, entries FROM catalogue_version WHERE kind = ?", (kind.value,))
            .fetchone()
        )
        return CatalogueHolding(kind=kind, version=int(row[0]), content_hash=str(row[1]), entries=int(row[2]))

    # ------------------------------------------------------------------ reading

    def get(self, kind: CatalogueKind, code: str) -> DrugEntry | TreatmentItem | DesignatedInstitution | None:
        with self._lock, self._translated("read entry"):
            row = (
                self._require_conn()
                .execute("SELECT body FROM entry WHERE kind = ? AND code = ?", (kind.value, code))
                .fetchone()
            )
        if row is None:
            return None
        try:
            return _ENTRY.validate_json(row[0])
        except ValidationError as exc:  # written by us after validation: only a damaged file gets here
            raise CatalogueError(f"catalogue store {self._path}: stored entry {code} is unreadable") from exc

    def drug(self, code: str) -> DrugEntry | None:
        entry = self.get(CatalogueKind.DRUG, code)
        return entry if isinstance(entry, DrugEntry) else None

    def search(
        self,
        query: str,
        kind: CatalogueKind = CatalogueKind.DRUG,
        *,
        limit: int = 20,
        region_code: str | None = None,
        count_cap: int = 1000,
    ) -> SearchResult:
        """The best `limit` entries of `kind` for `query` (name substring, code, or pinyin initials), ranked by
        `MatchKind`, then shorter name, then code. `region_code` keeps only institutions of that 医保区划."""
        q = _fold(query).strip()  # full-width letters typed on a Chinese IME match too
        if not q:
            return SearchResult((), 0)
        with self._lock:
            index = self._index[kind]
        best: dict[str, MatchKind] = {}  # name -> best match (names expand to entries below)
        code_hits: dict[str, MatchKind] = {}
        if q.isascii() and q.replace(" ", "").isalnum():
            code_query = q.upper().replace(" ", "")
            if len(code_query) >= MIN_CODE_PREFIX:
                _code_prefix(index.codes, code_query, code_hits, count_cap)
            letters = q.replace(" ", "")
            if len(letters) < MIN_INITIALS_SUBSTRING:
                # One letter inside initials matches most of the catalogue and says nothing: prefix only.
                for name, _whole in index.initials.starting_with(letters):
                    _better(best, name, MatchKind.INITIALS_PREFIX)
            else:
                for name, at_start, _whole in index.initials.find(letters):
                    _better(best, name, MatchKind.INITIALS_PREFIX if at_start else MatchKind.INITIALS_SUBSTRING)
        for name, at_start, whole in index.names.find(q):
            if whole:
                match = MatchKind.NAME_EXACT
            elif at_start:
                match = MatchKind.NAME_PREFIX
            else:
                match = MatchKind.NAME_SUBSTRING
            _better(best, name, match)

        def keep(code: str) -> bool:
            return region_code is None or index.region_of.get(code) == region_code

        # Code hits come in code order (the exact one first): codes are structured, so neighbours are related products.
        ranked_codes = sorted((c for c in code_hits if keep(c)), key=lambda c: (code_hits[c], c))
        hits = [SearchHit(kind, c, index.name_of[c], code_hits[c]) for c in ranked_codes[:limit]]
        taken = {h.code for h in hits}

        # Rank names, not entries (one generic name has dozens of products), and only as many as the page needs.
        def name_key(nm: tuple[str, MatchKind]) -> tuple[MatchKind, int, str]:
            return nm[1], len(nm[0]), nm[0]

        top = heapq.nsmallest(limit, best.items(), key=name_key)
        if len(top) < len(best):
            needed = sum(1 for name, _ in top for c in index.codes_by_name.get(name, ()) if keep(c))
            if needed < limit:  # the best names are all filtered out or too small: rank them all
                top = sorted(best.items(), key=name_key)
        for name, match in top:
            for code in index.codes_by_name.get(name, ()):
                if len(hits) >= limit:
                    break
                if code not in taken and keep(code):
                    taken.add(code)
                    hits.append(SearchHit(kind, code, index.name_of[code], match))
        # The count is exact up to `count_cap`, then stops: a one-letter query may match half the catalogue, and
        # nobody pages through thousands of drugs.
        counted = set(ranked_codes[:count_cap])
        for name in best:
            if len(counted) >= count_cap:
                break
            counted.update(c for c in index.codes_by_name.get(name, ()) if keep(c))
        return SearchResult(tuple(hits), min(len(counted), count_cap), capped=len(counted) >= count_cap)

    def _build_index(self, kind: CatalogueKind) -> _KindIndex:
        conn = self._require_conn()
        rows = conn.execute(
            "SELECT code, name, alt_name, region_code FROM entry WHERE kind = ? ORDER BY code", (kind.value,)
        ).fetchall()
        codes_by_name: dict[str, list[str]] = {}
        name_of: dict[str, str] = {}
        region_of: dict[str, str] = {}
        for code, name, alt, region in rows:
            name_of[code] = name
            if region is not None:
                region_of[code] = region
            for n in {name, alt} - {""}:
                codes_by_name.setdefault(n, []).append(code)
        names = sorted(codes_by_name)
        variants: list[str] = []
        owners: list[str] = []
        stored = dict(conn.execute("SELECT name, initials FROM name_initials").fetchall()) if names else {}
        for n in names:
            raw = stored.get(n)
            for v in json.loads(raw) if raw is not None else pinyin_initials(n):
                variants.append(str(v))
                owners.append(n)
        return _KindIndex(
            codes=[r[0] for r in rows],
            name_of=name_of,
            region_of=region_of,
            codes_by_name=codes_by_name,
            names=_Haystack([_fold(n) for n in names], names),
            initials=_Haystack(variants, owners),
        )

    # ------------------------------------------------------------------ rules

    def apply_rule_set(self, rule_set: DrugRuleSet) -> None:
        """Store `rule_set` after checking its hash; refuses an older version (`CatalogueStaleError`)."""
        try:
            rule_set.verify_hash()
        except ContractError as exc:
            raise CatalogueHashError(str(exc)) from exc
        with self._lock, self._translated("apply rule set"):
            current = self._rules
            if current is not None and current.version > rule_set.version:
                raise CatalogueStaleError(
                    f"drug rule set v{rule_set.version} is older than the held v{current.version}; refused"
                )
            with self._transaction() as tx:
                tx.execute(
                    "INSERT OR REPLACE INTO rule_set (id, version, content_hash, body) VALUES (1, ?, ?, ?)",
                    (rule_set.version, rule_set.content_hash, rule_set.model_dump_json()),
                )
            self._rules = rule_set
        logger.info("drug rules: v%d applied (%d rules)", rule_set.version, len(rule_set.rules))

    @property
    def rule_set(self) -> DrugRuleSet | None:
        with self._lock:
            return self._rules

    def _load_rules(self) -> DrugRuleSet | None:
        row = self._require_conn().execute("SELECT body FROM rule_set WHERE id = 1").fetchone()
        if row is None:
            return None
        try:
            rule_set = DrugRuleSet.model_validate_json(row[0])
            rule_set.verify_hash()
        except (ValidationError, ContractError) as exc:
            raise CatalogueError(f"catalogue store {self._path}: stored drug rules are damaged") from exc
        return rule_set

    def proposed_line(
        self, drug_code: str, quantity: int, *, days_supply: int | None = None, amount_fen: int | None = None
    ) -> ProposedLine:
        """A line for the engine with the generic name from the catalogue and, if not given, the amount from the
        catalogue price. Raises `CatalogueError` for a code the held catalogue does not list."""
        drug = self.drug(drug_code)
        if drug is None:
            raise CatalogueError(f"drug {drug_code} is not in the held drug catalogue")
        if amount_fen is None and drug.price_fen is not None:
            amount_fen = drug.price_fen * quantity
        return ProposedLine(drug_code, drug.generic_name, quantity, days_supply=days_supply, amount_fen=amount_fen)

    def evaluate(self, proposal: Proposal) -> Evaluation:
        """The held rules on `proposal` (no rules held: no findings; the caller shows the rules' version)."""
        with self._lock:
            rules = self._rules
        return evaluate(rules.rules if rules is not None else (), proposal)

    # ------------------------------------------------------------------ plumbing

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise CatalogueError("catalogue store is closed")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._require_conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as rollback_exc:
                    logger.error("catalogue store: rollback failed: %s", rollback_exc)
            raise

    @contextmanager
    def _translated(self, operation: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise CatalogueError(f"catalogue store {self._path}: {operation} failed: {exc}") from exc


class _HashMismatchError(Exception):
    """Internal: raised inside the apply transaction so that it rolls back."""


def _entry_row(
    kind: CatalogueKind, entry: DrugEntry | TreatmentItem | DesignatedInstitution, digest: bytes
) -> tuple[str, str, str, str, str | None, bytes, str]:
    alt = entry.generic_name if isinstance(entry, DrugEntry) and entry.generic_name != entry.name else ""
    region = entry.region_code if isinstance(entry, DesignatedInstitution) else None
    return (kind.value, entry.code, entry.name, alt, region, digest, entry.model_dump_json())


def _fold(text: str) -> str:
    """NFKC (full-width ＡＢ１ and （） become AB1 and ()) then lower case: how names and queries are compared."""
    return unicodedata.normalize("NFKC", text).lower()


def _better(best: dict[str, MatchKind], name: str, match: MatchKind) -> None:
    if name not in best or match < best[name]:
        best[name] = match


def _code_prefix(codes: Sequence[str], prefix: str, out: dict[str, MatchKind], cap: int) -> None:
    """Codes starting with `prefix`, the first `cap` of them in code order (more are never ranked or counted)."""
    start = bisect.bisect_left(codes, prefix)
    for i in range(start, min(len(codes), start + cap)):
        code = codes[i]
        if not code.startswith(prefix):
            break
        out[code] = MatchKind.CODE_EXACT if code == prefix else MatchKind.CODE_PREFIX


def _take_ownership(path: Path) -> int:
    """Lock `<file>.lock` exclusively for this process's lifetime: one process owns the catalogue file."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CatalogueError(f"cannot open catalogue store {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise CatalogueError(f"catalogue store {path} is already in use by another process") from exc
    return fd
