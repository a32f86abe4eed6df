"""Publishing catalogues and the drug-usage rules to terminals (K-17…K-19, Y-15, E-13; B-09/B-10/E-14, P-05/P-06).

Owns the server half of docs/catalogue.md: storing each published version of a catalogue (`CatalogueVersion`: kind,
version, content hash, the delta from the version before, and the whole entry list on the latest version only),
computing that delta when a device admin or the regulator publishes a full entry list, serving a terminal the
document it needs (`catalogue_document`: a snapshot, or one delta composed from the stored steps), keeping the
regulator's rule set as whole versions (`DrugRuleVersion`), and queueing the small `catalogue_update` notice to
every enrolled terminal when something is published (the documents themselves travel over HTTPS).

    publish drug v1 ─► row v1 {hash, snapshot}                   terminal holds v1, asks from_version=1
    publish drug v2 ─► row v2 {hash, delta 1→2, snapshot}; row v1 loses its snapshot   ─► delta 1→2
    publish drug v3 ─► row v3 {hash, delta 2→3, snapshot}        terminal holds v1 ─► deltas 1→2, 2→3 composed
                                                                 holds 0 or a composed delta ≥ the catalogue ─► snapshot

Publishing an unchanged list (or rule set) creates no version: the current one is returned (a retried publish is
harmless). `base_version`, when given, must be the current version (optimistic concurrency between two editors); a
race on the same new version number is refused by the database's unique key and reported as a conflict.

Store functions work inside the caller's transaction and never commit. This module must never hold personal data
(catalogues describe drugs, services and institutions; rules describe drugs), never serve a version whose hash it did
not compute itself, and never publish a notice before the version it names is stored in the same transaction.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from protocol import CommandKind
from protocol.catalogue import (
    CatalogueDelta,
    CatalogueEntry,
    CatalogueKind,
    CatalogueSnapshot,
    DesignatedInstitution,
    DrugEntry,
    TreatmentItem,
    build_delta,
    content_hash,
)
from protocol.downlink import CatalogueUpdateArgs
from protocol.drug_rules import AnyRule, DrugRule, DrugRuleSet, rules_hash
from sync_server.commands import issue_command
from sync_server.db.models import (
    CatalogueVersion,
    CommandState,
    Device,
    DrugRuleVersion,
    IssuedCommand,
    RegistrationState,
)
from sync_server.errors import ServerError

logger = logging.getLogger(__name__)

NOTICE_TTL_S: Final = 7 * 24 * 3600.0
"""A catalogue notice stays deliverable this long; a terminal offline longer catches up at its next start."""
MAX_DELTA_CHAIN: Final = 100
"""Deltas composed at most; a terminal further behind gets a snapshot."""
DRUG_RULES_KIND: Final = "drug_rules"
"""The `catalogue_update` kind for the rule set."""

AnyEntry = DrugEntry | TreatmentItem | DesignatedInstitution
_ENTRIES: Final[TypeAdapter[list[AnyEntry]]] = TypeAdapter(list[CatalogueEntry])
_RULES: Final[TypeAdapter[list[AnyRule]]] = TypeAdapter(list[DrugRule])


class CatalogueError(ServerError):
    """Base of the errors of catalogue and rule publishing."""


class CatalogueInputError(CatalogueError):
    """The published list is not acceptable (entries of another kind, duplicate codes, duplicate rule ids)."""


class CatalogueConflictError(CatalogueError):
    """`base_version` is not the current version, or another publish took the same version number first."""


class CatalogueNotFoundError(CatalogueError):
    """Nothing is published yet (or the terminal asks from a version this server never published)."""


@dataclass(frozen=True, slots=True)
class Published:
    """The outcome of a publish: the version now current, and whether this call created it."""

    kind: str
    version: int
    content_hash: str
    count: int
    created: bool
    upserts: int = 0
    deletions: int = 0
    notified: int = 0
    """Terminals a `catalogue_update` notice was queued for."""


# ------------------------------------------------------------------------------------------------------ catalogues


def latest_version(session: Session, kind: CatalogueKind) -> CatalogueVersion | None:
    """The latest version's row; its bodies (`snapshot`, `delta`) load on first access only."""
    return session.scalars(
        select(CatalogueVersion)
        .options(defer(CatalogueVersion.snapshot), defer(CatalogueVersion.delta))
        .where(CatalogueVersion.kind == kind.value)
        .order_by(CatalogueVersion.version.desc())
        .limit(1)
    ).first()


def _entries_of(raw: list[Any]) -> list[AnyEntry]:
    try:
        return _ENTRIES.validate_python(raw)
    except ValidationError as exc:  # only a damaged row gets here: every stored list was validated on the way in
        raise CatalogueError("a stored catalogue body no longer validates") from exc


def _dump(entries: Sequence[AnyEntry]) -> list[dict[str, Any]]:
    return [e.model_dump(mode="json") for e in entries]


def publish_catalogue(
    session: Session,
    kind: CatalogueKind,
    entries: Sequence[AnyEntry],
    *,
    actor: str,
    now: datetime,
    base_version: int | None = None,
) -> Published:
    """Store `entries` as the next version of `kind` (the delta from the current one is computed here) and queue the
    notice to every enrolled terminal. An unchanged list returns the current version with `created=False`."""
    ordered = sorted(entries, key=lambda e: e.code)
    codes = [e.code for e in ordered]
    wrong = next((e for e in ordered if e.kind != kind.value), None)
    if wrong is not None:
        raise CatalogueInputError(f"entry {wrong.code} is a {wrong.kind} entry, not a {kind.value} entry")
    duplicate = next((a for a, b in itertools.pairwise(codes) if a == b), None)
    if duplicate is not None:
        raise CatalogueInputError(f"code {duplicate} appears more than once")
    current = latest_version(session, kind)
    held = current.version if current is not None else 0
    if base_version is not None and base_version != held:
        raise CatalogueConflictError(
            f"{kind.value} catalogue is at v{held}, not v{base_version}: reload and publish again"
        )
    new_version = held + 1
    if current is not None:
        if current.snapshot is None:
            raise CatalogueError(f"{kind.value} v{held} lost its entry list; cannot compute a delta")
        old = _entries_of(current.snapshot)
        step = build_delta(kind, held, old, new_version, _typed(ordered), now)
        if not step.upserts and not step.deletions:
            return Published(kind.value, held, current.content_hash, current.entry_count, created=False)
        current.snapshot = None  # only the latest version keeps its whole list
        digest = step.content_hash
        delta: CatalogueDelta | None = step
    else:
        delta = None
        digest = content_hash(kind, new_version, ordered)
    row = CatalogueVersion(
        kind=kind.value,
        version=new_version,
        content_hash=digest,
        entry_count=len(ordered),
        upsert_count=len(delta.upserts) if delta is not None else len(ordered),
        deletion_count=len(delta.deletions) if delta is not None else 0,
        published_at=now,
        published_by=actor[:64],
        delta=None if delta is None else {"upserts": _dump(delta.upserts), "deletions": list(delta.deletions)},
        snapshot=_dump(ordered),
    )
    session.add(row)
    _flush(session, f"{kind.value} catalogue v{new_version}")
    notified = notify_terminals(session, kind.value, new_version, digest, now=now)
    logger.info(
        "catalogue %s v%d published: %d entries (%d upserts, %d deletions), %d terminals notified",
        kind.value,
        new_version,
        row.entry_count,
        row.upsert_count,
        row.deletion_count,
        len(notified),
    )
    return Published(
        kind.value,
        new_version,
        digest,
        row.entry_count,
        created=True,
        upserts=row.upsert_count,
        deletions=row.deletion_count,
        notified=len(notified),
    )


def _flush(session: Session, what: str) -> None:
    try:
        session.flush()
    except IntegrityError as exc:  # the unique (kind, version) key: another publisher took this number first
        raise CatalogueConflictError(f"{what} was published by another editor at the same time; reload") from exc


def _typed(entries: list[AnyEntry]) -> list[DrugEntry] | list[TreatmentItem] | list[DesignatedInstitution]:
    # build_delta / CatalogueSnapshot.build take a list of one entry type; the kinds were checked by the caller.
    return entries  # type: ignore[return-value]


def catalogue_document(
    session: Session, kind: CatalogueKind, from_version: int = 0
) -> CatalogueSnapshot | CatalogueDelta | None:
    """What a terminal holding `from_version` (0: nothing) needs to reach the latest version: one delta (the stored
    steps composed) when that is smaller than the catalogue, a snapshot otherwise, None when it is already there.

    `CatalogueNotFoundError` when nothing is published, or `from_version` is ahead of the latest (a terminal that
    holds a version this server never published is told so rather than sent backwards)."""
    latest = _latest_for(session, kind, from_version)
    if latest is None:
        return None
    return _build_document(session, kind, from_version, latest)


def _latest_for(session: Session, kind: CatalogueKind, from_version: int) -> CatalogueVersion | None:
    latest = latest_version(session, kind)
    if latest is None:
        raise CatalogueNotFoundError(f"no {kind.value} catalogue is published yet")
    if from_version == latest.version:
        return None
    if from_version > latest.version:
        raise CatalogueNotFoundError(
            f"{kind.value} catalogue v{from_version} was never published here (latest is v{latest.version})"
        )
    return latest


def _build_document(
    session: Session, kind: CatalogueKind, from_version: int, latest: CatalogueVersion
) -> CatalogueSnapshot | CatalogueDelta:
    if from_version >= 1 and latest.version - from_version <= MAX_DELTA_CHAIN:
        delta = _composed_delta(session, kind, from_version, latest)
        if delta is not None:
            return delta
    if latest.snapshot is None:
        raise CatalogueError(f"{kind.value} v{latest.version} lost its entry list")
    return CatalogueSnapshot(
        kind=kind,
        version=latest.version,
        published_at=latest.published_at,
        content_hash=latest.content_hash,
        entries=_entries_of(latest.snapshot),
    )


class DocumentCache:
    """Serialised documents, so that the document every terminal fetches after a publish is built once per process
    (a 20,000-drug snapshot takes about a second to build). Keyed by kind, latest version, its hash and the
    terminal's from_version; bounded by total bytes, oldest out first; thread-safe."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int, str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, int, str, int]) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple[str, int, str, int], value: bytes) -> None:
        with self._lock:
            if key in self._items or len(value) > self._max_bytes:
                return
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self._max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


def document_bytes(session: Session, kind: CatalogueKind, from_version: int, cache: DocumentCache) -> bytes | None:
    """`catalogue_document` serialised, through `cache`."""
    latest = _latest_for(session, kind, from_version)
    if latest is None:
        return None
    key = (kind.value, latest.version, latest.content_hash, from_version)
    cached = cache.get(key)
    if cached is not None:
        return cached
    raw = _build_document(session, kind, from_version, latest).to_bytes()
    cache.put(key, raw)
    return raw


def _composed_delta(
    session: Session, kind: CatalogueKind, from_version: int, latest: CatalogueVersion
) -> CatalogueDelta | None:
    steps = session.execute(
        select(CatalogueVersion.version, CatalogueVersion.delta)
        .where(CatalogueVersion.kind == kind.value, CatalogueVersion.version > from_version)
        .order_by(CatalogueVersion.version)
    ).all()
    if [v for v, _ in steps] != list(range(from_version + 1, latest.version + 1)):
        return None
    upserts: dict[str, Any] = {}
    deletions: set[str] = set()
    for _, step in steps:
        if step is None:
            return None
        for code in step["deletions"]:
            upserts.pop(code, None)
            deletions.add(code)
        for entry in step["upserts"]:
            upserts[entry["code"]] = entry
            deletions.discard(entry["code"])
    if len(upserts) + len(deletions) >= latest.entry_count:
        return None  # as big as the catalogue itself: the snapshot is simpler to apply
    return CatalogueDelta(
        kind=kind,
        from_version=from_version,
        to_version=latest.version,
        published_at=latest.published_at,
        content_hash=latest.content_hash,
        upserts=_entries_of([upserts[c] for c in sorted(upserts)]),
        deletions=sorted(deletions),
    )


def version_page(
    session: Session, kind: CatalogueKind | None = None, *, limit: int = 100, offset: int = 0
) -> tuple[list[CatalogueVersion], int]:
    """Published versions, newest first within each kind (bodies are not loaded by the caller's schema)."""
    scope = [CatalogueVersion.kind == kind.value] if kind is not None else []
    total = session.scalar(select(func.count()).select_from(CatalogueVersion).where(*scope)) or 0
    rows = session.scalars(
        select(CatalogueVersion)
        .where(*scope)
        .order_by(CatalogueVersion.kind, CatalogueVersion.version.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total


def latest_versions(session: Session) -> dict[CatalogueKind, tuple[int, str]]:
    """(version, content_hash) of the latest version of every kind published so far."""
    newest = (
        select(CatalogueVersion.kind, func.max(CatalogueVersion.version).label("version"))
        .group_by(CatalogueVersion.kind)
        .subquery()
    )
    rows = session.execute(
        select(CatalogueVersion.kind, CatalogueVersion.version, CatalogueVersion.content_hash).join(
            newest, (CatalogueVersion.kind == newest.c.kind) & (CatalogueVersion.version == newest.c.version)
        )
    ).all()
    return {CatalogueKind(k): (int(v), str(h)) for k, v, h in rows}


# ------------------------------------------------------------------------------------------------------ drug rules


def current_rules_version(session: Session) -> tuple[int, str] | None:
    """(version, content_hash) of the current rule set, without loading the rules."""
    row = session.execute(
        select(DrugRuleVersion.version, DrugRuleVersion.content_hash).order_by(DrugRuleVersion.version.desc()).limit(1)
    ).first()
    return None if row is None else (int(row[0]), str(row[1]))


def current_rules(session: Session) -> DrugRuleSet | None:
    row = session.scalars(select(DrugRuleVersion).order_by(DrugRuleVersion.version.desc()).limit(1)).first()
    if row is None:
        return None
    try:
        rules = _RULES.validate_python(row.rules)
    except ValidationError as exc:
        raise CatalogueError(f"stored drug rules v{row.version} no longer validate") from exc
    return DrugRuleSet(version=row.version, published_at=row.published_at, content_hash=row.content_hash, rules=rules)


@dataclass(frozen=True, slots=True)
class RuleChanges:
    """Which rule ids a new version added, changed and removed (ids describe drugs, never people)."""

    added: list[str]
    changed: list[str]
    removed: list[str]


def publish_rules(
    session: Session,
    rules: Sequence[AnyRule],
    *,
    actor: str,
    now: datetime,
    base_version: int | None = None,
) -> tuple[Published, RuleChanges]:
    """Store `rules` (validated by `protocol.drug_rules`) as the next version of the knowledge base and notify the
    terminals. An unchanged set returns the current version with `created=False`."""
    ordered = sorted(rules, key=lambda r: r.rule_id)
    ids = [r.rule_id for r in ordered]
    duplicate = next((a for a, b in itertools.pairwise(ids) if a == b), None)
    if duplicate is not None:
        raise CatalogueInputError(f"rule id {duplicate} appears more than once")
    current = current_rules(session)
    held = current.version if current is not None else 0
    if base_version is not None and base_version != held:
        raise CatalogueConflictError(f"the drug rules are at v{held}, not v{base_version}: reload and edit again")
    before = {r.rule_id: r for r in current.rules} if current is not None else {}
    after = {r.rule_id: r for r in ordered}
    changes = RuleChanges(
        added=sorted(after.keys() - before.keys()),
        changed=sorted(i for i in after.keys() & before.keys() if after[i] != before[i]),
        removed=sorted(before.keys() - after.keys()),
    )
    if current is not None and not (changes.added or changes.changed or changes.removed):
        return Published(DRUG_RULES_KIND, held, current.content_hash, len(current.rules), created=False), changes
    version = held + 1
    digest = rules_hash(version, ordered)
    session.add(
        DrugRuleVersion(
            version=version,
            content_hash=digest,
            rule_count=len(ordered),
            published_at=now,
            published_by=actor[:64],
            rules=[r.model_dump(mode="json") for r in ordered],
        )
    )
    _flush(session, f"drug rules v{version}")
    notified = notify_terminals(session, DRUG_RULES_KIND, version, digest, now=now)
    logger.info("drug rules v%d published: %d rules, %d terminals notified", version, len(ordered), len(notified))
    published = Published(
        DRUG_RULES_KIND,
        version,
        digest,
        len(ordered),
        created=True,
        upserts=len(changes.added) + len(changes.changed),
        deletions=len(changes.removed),
        notified=len(notified),
    )
    return published, changes


# ------------------------------------------------------------------------------------------------------ notices


def notify_terminals(session: Session, kind: str, version: int, digest: str, *, now: datetime) -> list[IssuedCommand]:
    """Queue a `catalogue_update` notice to every enrolled terminal; earlier notices of the same kind that are not
    answered yet are expired first (the newest notice makes them pointless)."""
    args = CatalogueUpdateArgs.model_validate({"kind": kind, "version": version, "content_hash": digest}).model_dump()
    devices = list(
        session.scalars(
            select(Device.device_id).where(Device.registration == RegistrationState.ENROLLED).order_by(Device.device_id)
        )
    )
    _expire_older_notices(session, kind)
    return [
        issue_command(session, device_id=d, kind=CommandKind.CATALOGUE_UPDATE, args=args, ttl_s=NOTICE_TTL_S, now=now)
        for d in devices
    ]


def _expire_older_notices(session: Session, kind: str) -> None:
    pending = session.execute(
        select(IssuedCommand.command_id, IssuedCommand.args).where(
            IssuedCommand.kind == CommandKind.CATALOGUE_UPDATE.value,
            IssuedCommand.state.in_([CommandState.QUEUED, CommandState.DELIVERED]),
        )
    ).all()
    stale = [cid for cid, args in pending if isinstance(args, dict) and args.get("kind") == kind]
    if stale:
        session.execute(
            update(IssuedCommand)
            .where(IssuedCommand.command_id.in_(stale))
            .values(state=CommandState.EXPIRED)
            .execution_options(synchronize_session=False)
        )
