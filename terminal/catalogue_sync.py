"""Keeping the terminal's catalogue store at the versions the server publishes (docs/catalogue.md, "The sync model").

Owns `CatalogueSync`, one background thread that fetches catalogue documents and the drug-usage rule set over the
device HTTP API (`terminal.server_api`, signed with the session key) and applies them to the `CatalogueStore`, and
the `catalogue_update` command handler that wakes it:

    start ─────────────────────► GET /device/v1/catalogues (what is published: kind → version, hash; rules)
    catalogue_update notice ──►  for each kind whose held (version, hash) differs:
                                   GET /device/v1/catalogues/{kind}?from_version=<held> ─► store.apply
                                   gap or hash error ─► GET …?from_version=0 (a snapshot) ─► store.apply
                                 rules differ ─► GET /device/v1/drug-rules ─► store.apply_rule_set
    server unreachable ───────►  the held versions stay as they are (search and rules keep working offline);
                                 retried with back-off, logged once on failure and once on recovery

The command handler never talks to the network (the command applier's rule): it answers `applied` ("already held"
or "fetch scheduled") and wakes the thread. A notice that repeats or arrives late is harmless: the store refuses to
go backwards and ignores a version it holds. It must never apply a document whose hash the store has not checked
(the store checks every one), and never log catalogue content beyond kinds, versions and counts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from pydantic import TypeAdapter, ValidationError

from protocol import CommandKind, CommandOutcome, ContractError, DeviceCommand
from protocol.catalogue import CatalogueDelta, CatalogueDocument, CatalogueKind, CatalogueSnapshot
from protocol.downlink import CatalogueUpdateArgs
from protocol.drug_rules import DrugRuleSet
from terminal.catalogue import (
    CatalogueError,
    CatalogueGapError,
    CatalogueHashError,
    CatalogueStore,
)
from terminal.commands import CommandHandler, HandlerOutcome
from terminal.errors import TerminalError

logger = logging.getLogger(__name__)

INDEX_PATH: Final = "/device/v1/catalogues"
RULES_PATH: Final = "/device/v1/drug-rules"
RULES_KIND: Final = "drug_rules"
RETRY_MIN_S: Final = 30.0
RETRY_MAX_S: Final = 900.0
RECHECK_S: Final = 6 * 3600.0
"""Even without a notice the thread asks what is published this often (a notice lost while offline is caught up)."""

_DOCUMENT: Final[TypeAdapter[CatalogueSnapshot | CatalogueDelta]] = TypeAdapter(CatalogueDocument)


class DocumentSource(Protocol):
    """What the sync needs of `terminal.server_api.ServerApi`: a signed GET answering JSON (None for no content).
    It raises a `TerminalError` when the server cannot be reached or refuses."""

    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> Any: ...


class CatalogueSyncError(TerminalError):
    """A fetched document was not usable (not the shape the protocol says); what the store held is unchanged."""


@dataclass
class SyncReport:
    """What one pass did, per kind ('drug', 'treatment', 'institution', 'drug_rules')."""

    applied: dict[str, int] = field(default_factory=dict)
    """kind → the version now held, for kinds that moved."""
    unchanged: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    """kind → why the server's document was refused (the held version stays)."""


class CatalogueSync:
    """One owner of catalogue fetching for one terminal. `sync_once` runs a pass in the caller's thread (tests and
    start-up checks); `start` runs passes in a daemon thread on notices, at start and every `RECHECK_S`."""

    def __init__(self, store: CatalogueStore, source: DocumentSource) -> None:
        self._store = store
        self._source = source
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.passes = 0
        self.last_report: SyncReport | None = None

    # ------------------------------------------------------------------ one pass

    def sync_once(self) -> SyncReport:
        """Bring every kind to the published version. Raises the source's `TerminalError` when the server cannot
        be reached (nothing changed); refusals of single documents are reported, not raised."""
        index = self._source.get_json(INDEX_PATH)
        if not isinstance(index, dict):
            raise CatalogueSyncError("the catalogue index is not a JSON object")
        report = SyncReport()
        for notice in index.get("catalogues") or []:
            try:
                notice_args = CatalogueUpdateArgs.model_validate(
                    {"kind": notice["kind"], "version": notice["version"], "content_hash": notice["content_hash"]}
                )
            except (KeyError, TypeError, ValidationError):
                # A kind this software does not know (a newer server) or a malformed entry: the others still sync.
                report.refused[str(notice.get("kind") if isinstance(notice, dict) else "?")[:32]] = "not understood"
                continue
            if notice_args.kind == RULES_KIND:  # the rules have their own field in the index
                continue
            self._sync_catalogue(CatalogueKind(notice_args.kind), notice_args.version, notice_args.content_hash, report)
        rules = index.get("drug_rules")
        if isinstance(rules, dict):
            self._sync_rules(int(rules["version"]), str(rules["content_hash"]), report)
        self.passes += 1
        self.last_report = report
        return report

    def _sync_catalogue(self, kind: CatalogueKind, version: int, digest: str, report: SyncReport) -> None:
        held = self._store.holding(kind)
        if held.version == version and held.content_hash == digest:
            report.unchanged.append(kind.value)
            return
        if held.version > version:
            report.refused[kind.value] = f"the server publishes v{version}, older than the held v{held.version}"
            logger.warning("catalogue %s: server at v%d, terminal holds v%d; kept", kind.value, version, held.version)
            return
        from_version = held.version if held.version < version else 0  # same version, other hash: a snapshot
        try:
            self._fetch_and_apply(kind, from_version)
        except (CatalogueGapError, CatalogueHashError) as exc:
            if from_version == 0:
                report.refused[kind.value] = str(exc)
                return
            logger.info("catalogue %s: %s; fetching a snapshot", kind.value, type(exc).__name__)
            try:
                self._fetch_and_apply(kind, 0)
            except CatalogueError as again:
                report.refused[kind.value] = str(again)
                return
        except CatalogueError as exc:
            report.refused[kind.value] = str(exc)
            return
        report.applied[kind.value] = self._store.holding(kind).version

    def _fetch_and_apply(self, kind: CatalogueKind, from_version: int) -> None:
        raw = self._source.get_json(f"{INDEX_PATH}/{kind.value}", {"from_version": from_version})
        if raw is None:  # 204: the server says we already hold the latest
            return
        try:
            document = _DOCUMENT.validate_python(raw)
        except ValidationError as exc:
            raise CatalogueSyncError(f"the {kind.value} catalogue document is not valid") from exc
        if document.kind is not kind:
            raise CatalogueSyncError(f"asked for the {kind.value} catalogue, got a {document.kind.value} document")
        self._store.apply(document)

    def _sync_rules(self, version: int, digest: str, report: SyncReport) -> None:
        held = self._store.rule_set
        if held is not None and held.version == version and held.content_hash == digest:
            report.unchanged.append(RULES_KIND)
            return
        raw = self._source.get_json(RULES_PATH)
        if raw is None:
            report.refused[RULES_KIND] = "the server sent no rule set"
            return
        try:
            rule_set = DrugRuleSet.model_validate(raw)
            rule_set.verify_hash()
            self._store.apply_rule_set(rule_set)
        except (ValidationError, ContractError, CatalogueError) as exc:
            report.refused[RULES_KIND] = str(exc) if not isinstance(exc, ValidationError) else "invalid rule set"
            return
        report.applied[RULES_KIND] = rule_set.version

    # ------------------------------------------------------------------ notices

    def handle_notice(self, command: DeviceCommand) -> HandlerOutcome:
        """The `catalogue_update` handler: never fetches itself; wakes the thread unless the version is held."""
        args = CatalogueUpdateArgs.model_validate(command.args)
        if self._holds(args):
            return HandlerOutcome(CommandOutcome.APPLIED, f"{args.kind} v{args.version} already held")
        self._wake.set()
        return HandlerOutcome(CommandOutcome.APPLIED, f"{args.kind} v{args.version}: fetch scheduled")

    def handlers(self) -> dict[CommandKind, CommandHandler]:
        """For `terminal.commands.default_handlers(..., extra=...)`."""
        return {CommandKind.CATALOGUE_UPDATE: self.handle_notice}

    def _holds(self, args: CatalogueUpdateArgs) -> bool:
        if args.kind == RULES_KIND:
            rules = self._store.rule_set
            return rules is not None and (rules.version, rules.content_hash) == (args.version, args.content_hash)
        held = self._store.holding(CatalogueKind(args.kind))
        return (held.version, held.content_hash) == (args.version, args.content_hash)

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        if self._thread is not None:
            return
        self._wake.set()  # a pass at start
        self._thread = threading.Thread(target=self._run, name="catalogue-sync", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        delay = RETRY_MIN_S
        wait_s = 0.0
        while not self._stop.is_set():
            self._wake.wait(wait_s)
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                report = self.sync_once()
            except TerminalError as exc:
                if not self._failing:
                    logger.warning("catalogue sync: %s; keeping the held versions, retrying", type(exc).__name__)
                self._failing = True
                wait_s, delay = delay, min(delay * 2, RETRY_MAX_S)
                continue
            if self._failing:
                logger.info("catalogue sync: the server is reachable again")
            self._failing = False
            delay = RETRY_MIN_S
            wait_s = RECHECK_S
            if report.applied:
                logger.info("catalogue sync: now holding %s", report.applied)
            for kind, why in report.refused.items():
                logger.warning("catalogue sync: %s refused: %s", kind, why)
