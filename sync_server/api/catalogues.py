"""Catalogue and drug-rule publishing over HTTP (docs/catalogue.md): the operator routes under `/api/v1` and the
terminals' document routes under `/device/v1`.

* `POST /api/v1/catalogues/{kind}/versions` (device_admin, regulator): publish a full entry list as the next version;
  the server computes the delta and queues a `catalogue_update` notice to every enrolled terminal. 201 with the new
  version, 200 when the list equals the current version (nothing published), 409 when `base_version` is stale.
* `GET /api/v1/catalogues` (device_admin, regulator): the published versions, without their bodies.
* `GET /api/v1/drug-rules` (device_admin, regulator) and `PUT /api/v1/drug-rules` (regulator): the drug-usage
  knowledge base; each accepted change is a new version, validated by `protocol.drug_rules`, audited and noticed.
* `GET /device/v1/catalogues` (a terminal): the latest version and hash of each catalogue and of the rules.
* `GET /device/v1/catalogues/{kind}?from_version=N`: the snapshot or delta document (protocol.catalogue) that takes a
  terminal holding N to the latest version; 204 when it already holds it.
* `GET /device/v1/drug-rules`: the current `DrugRuleSet` document.

Publishing is recorded in the audit chain after its commit and wakes the command dispatcher. The rules live in
`sync_server.catalogues`; this module validates, maps its errors to 404/409/422 and renders. It must never log or
return personal data (there is none in catalogues or rules).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from protocol.catalogue import MAX_CATALOGUE_DOCUMENT_BYTES, CatalogueEntry, CatalogueKind, CatalogueVersionNotice
from protocol.drug_rules import MAX_RULE_SET_BYTES, DrugRule, DrugRulesNotice
from sync_server import catalogues
from sync_server.api.deps import (
    ClockDep,
    DeviceCallerDep,
    PrincipalDep,
    RuntimeDep,
    SessionDep,
    WriterSessionDep,
)
from sync_server.db.models import CatalogueVersion

router = APIRouter(tags=["catalogues"])

MAX_AUDITED_IDS = 50
"""Rule ids listed per change kind in an audit record (the counts are always complete)."""


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CataloguePublishIn(_Closed):
    entries: list[CatalogueEntry] = Field(
        max_length=200_000, description="Every entry of the new version (whole list; the server computes the delta)."
    )
    base_version: int | None = Field(
        default=None, ge=0, description="The version the publisher edited; refused (409) if another came since."
    )


class DrugRulesIn(_Closed):
    rules: list[DrugRule] = Field(max_length=5000, description="The whole knowledge base (protocol.drug_rules).")
    base_version: int | None = Field(
        default=None, ge=0, description="The version the regulator edited; refused (409) if another came since."
    )


class PublishOut(BaseModel):
    kind: str
    version: int
    content_hash: str
    count: int = Field(description="Entries (or rules) in the version.")
    created: bool = Field(description="False: the list equals the current version, nothing was published.")
    upserts: int
    deletions: int
    notified: int = Field(description="Enrolled terminals a catalogue_update notice was queued for.")


class CatalogueVersionOut(BaseModel):
    kind: str
    version: int
    content_hash: str
    entries: int
    upserts: int
    deletions: int
    published_at: datetime
    published_by: str

    @classmethod
    def of(cls, row: CatalogueVersion) -> CatalogueVersionOut:
        return cls(
            kind=row.kind,
            version=row.version,
            content_hash=row.content_hash,
            entries=row.entry_count,
            upserts=row.upsert_count,
            deletions=row.deletion_count,
            published_at=row.published_at,
            published_by=row.published_by,
        )


class CatalogueVersionPage(BaseModel):
    items: list[CatalogueVersionOut]
    total: int


class DrugRulesOut(BaseModel):
    version: int = Field(description="0 when nothing is published yet.")
    content_hash: str | None
    published_at: datetime | None
    rules: list[DrugRule]


class CatalogueIndexOut(BaseModel):
    """What a terminal should hold: the latest notice of each published catalogue and of the rules."""

    catalogues: list[CatalogueVersionNotice]
    drug_rules: DrugRulesNotice | None


def _http(exc: catalogues.CatalogueError) -> HTTPException:
    if isinstance(exc, catalogues.CatalogueConflictError):
        return HTTPException(status_code=status.HTTP_409_CONFLICT, detail=str(exc))
    if isinstance(exc, catalogues.CatalogueNotFoundError):
        return HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=str(exc))
    if isinstance(exc, catalogues.CatalogueInputError):
        return HTTPException(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc))
    return HTTPException(status_code=status.HTTP_500_INTERNAL_SERVER_ERROR, detail="the stored catalogue is damaged")


def _out(published: catalogues.Published) -> PublishOut:
    return PublishOut(
        kind=published.kind,
        version=published.version,
        content_hash=published.content_hash,
        count=published.count,
        created=published.created,
        upserts=published.upserts,
        deletions=published.deletions,
        notified=published.notified,
    )


# ------------------------------------------------------------------------------------------------------ operators


@router.post(
    "/api/v1/catalogues/{kind}/versions",
    response_model=PublishOut,
    status_code=status.HTTP_201_CREATED,
    max_body_size=MAX_CATALOGUE_DOCUMENT_BYTES,
)
def publish_catalogue(
    kind: CatalogueKind,
    body: CataloguePublishIn,
    response: Response,
    session: WriterSessionDep,
    clock: ClockDep,
    runtime: RuntimeDep,
    principal: PrincipalDep,
) -> PublishOut:
    """Publish the whole entry list of `kind` as its next version (the delta is computed here)."""
    with session.begin():
        try:
            published = catalogues.publish_catalogue(
                session, kind, body.entries, actor=principal.name, now=clock.now(), base_version=body.base_version
            )
        except catalogues.CatalogueError as exc:
            raise _http(exc) from exc
    if not published.created:
        response.status_code = status.HTTP_200_OK
        return _out(published)
    runtime.audit.record(
        "catalogue.published",
        kind=kind.value,
        version=published.version,
        content_hash=published.content_hash,
        entries=published.count,
        upserts=published.upserts,
        deletions=published.deletions,
        notified=published.notified,
        admin=principal.name,
    )
    if runtime.dispatcher is not None:
        runtime.dispatcher.wake()
    return _out(published)


@router.get("/api/v1/catalogues", response_model=CatalogueVersionPage)
def list_catalogue_versions(
    session: SessionDep,
    kind: Annotated[CatalogueKind | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> CatalogueVersionPage:
    """Published versions (newest first per kind), without their entries."""
    rows, total = catalogues.version_page(session, kind, limit=limit, offset=offset)
    return CatalogueVersionPage(items=[CatalogueVersionOut.of(r) for r in rows], total=total)


@router.get("/api/v1/drug-rules", response_model=DrugRulesOut)
def get_drug_rules(session: SessionDep) -> DrugRulesOut:
    """The current drug-usage knowledge base (version 0 and no rules before the first publish)."""
    try:
        current = catalogues.current_rules(session)
    except catalogues.CatalogueError as exc:
        raise _http(exc) from exc
    if current is None:
        return DrugRulesOut(version=0, content_hash=None, published_at=None, rules=[])
    return DrugRulesOut(
        version=current.version,
        content_hash=current.content_hash,
        published_at=current.published_at,
        rules=current.rules,
    )


@router.put("/api/v1/drug-rules", response_model=PublishOut, max_body_size=MAX_RULE_SET_BYTES)
def put_drug_rules(
    body: DrugRulesIn,
    response: Response,
    session: WriterSessionDep,
    clock: ClockDep,
    runtime: RuntimeDep,
    principal: PrincipalDep,
) -> PublishOut:
    """Replace the knowledge base: a new version when anything changed (201), the current one otherwise (200)."""
    with session.begin():
        try:
            published, changes = catalogues.publish_rules(
                session, body.rules, actor=principal.name, now=clock.now(), base_version=body.base_version
            )
        except catalogues.CatalogueError as exc:
            raise _http(exc) from exc
    if not published.created:
        return _out(published)
    response.status_code = status.HTTP_201_CREATED
    runtime.audit.record(
        "drug_rules.published",
        version=published.version,
        content_hash=published.content_hash,
        rules=published.count,
        added=changes.added[:MAX_AUDITED_IDS],
        changed=changes.changed[:MAX_AUDITED_IDS],
        removed=changes.removed[:MAX_AUDITED_IDS],
        counts={"added": len(changes.added), "changed": len(changes.changed), "removed": len(changes.removed)},
        notified=published.notified,
        admin=principal.name,
    )
    if runtime.dispatcher is not None:
        runtime.dispatcher.wake()
    return _out(published)


# ------------------------------------------------------------------------------------------------------ terminals


@router.get("/device/v1/catalogues", response_model=CatalogueIndexOut)
def catalogue_index(session: SessionDep, caller: DeviceCallerDep) -> CatalogueIndexOut:
    """The latest version and hash of every published catalogue and of the rules."""
    del caller  # authenticated by the dependency; every terminal sees the same catalogues
    latest = catalogues.latest_versions(session)
    rules = catalogues.current_rules_version(session)
    return CatalogueIndexOut(
        catalogues=[
            CatalogueVersionNotice(kind=kind, version=version, content_hash=digest)
            for kind, (version, digest) in sorted(latest.items())
        ],
        drug_rules=None if rules is None else DrugRulesNotice(version=rules[0], content_hash=rules[1]),
    )


@router.get(
    "/device/v1/catalogues/{kind}",
    responses={200: {"description": "A CatalogueSnapshot or CatalogueDelta document."}, 204: {}, 404: {}},
)
def catalogue_document(
    kind: CatalogueKind,
    session: SessionDep,
    runtime: RuntimeDep,
    caller: DeviceCallerDep,
    from_version: Annotated[int, Query(ge=0, description="The version the terminal holds; 0 for none.")] = 0,
) -> Response:
    """The document taking a terminal from `from_version` to the latest version (204: it is already there)."""
    del caller
    try:
        document = catalogues.document_bytes(session, kind, from_version, runtime.catalogue_documents)
    except catalogues.CatalogueError as exc:
        raise _http(exc) from exc
    if document is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return Response(content=document, media_type="application/json")


@router.get("/device/v1/drug-rules", responses={200: {"description": "A DrugRuleSet document."}, 404: {}})
def drug_rules_document(session: SessionDep, caller: DeviceCallerDep) -> Response:
    """The current drug-usage rule set (404 before the first publish)."""
    del caller
    try:
        current = catalogues.current_rules(session)
    except catalogues.CatalogueError as exc:
        raise _http(exc) from exc
    if current is None:
        raise HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail="no drug rules are published yet")
    return Response(content=current.to_bytes(), media_type="application/json")
