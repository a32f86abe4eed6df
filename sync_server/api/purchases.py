"""Purchases, proxy relationships and POS verifications over HTTP (H-02…H-04, K-03…K-07, B-11; docs/purchases.md,
docs/his-integration.md).

Routes (policies in `sync_server.authz`):

* HIS clients of an institution (signed requests, `HIS_CLIENTS`): `POST /his/v1/purchases` (register a settled
  purchase: 201 created, 200 the same body again, 409 a different body for the settlement number),
  `GET /his/v1/purchases/{settlement_no}`, `POST /his/v1/proxy-relationships` (201 / 200 identical / 409),
  `DELETE /his/v1/proxy-relationships/{relationship_id}`. A client sees and changes its own institution's data only;
  anything else is 404.
* terminals (`DEVICE_SESSION`): `GET /device/v1/proxy-relationships`, the caller's institution's current set.
* operators: `GET /api/v1/purchases`, `GET /api/v1/verifications` (a regulator within its region prefix, an
  institution head within its institution), masked.

Every change is recorded in the server's audit chain after its commit, and the dispatcher is woken when relationship
notices were queued. The rules live in `sync_server.purchases`; this module validates, translates errors to
404/409/422 and renders masked or pseudonymous data, never raw personal data.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, false, func, or_, select
from sqlalchemy.orm import Session

from protocol.purchase import (
    MAX_HISTORY_DAYS,
    PERSON_REF_PATTERN,
    PurchaseHistory,
    PurchaseHistoryLine,
)
from sync_server import purchases
from sync_server.accounts import Role
from sync_server.api.deps import (
    ClockDep,
    DeviceCallerDep,
    HisCallDep,
    Principal,
    PrincipalDep,
    RuntimeDep,
    SessionDep,
    WriterSessionDep,
)
from sync_server.api.schemas import model_response
from sync_server.db.models import (
    Institution,
    PosVerification,
    ProxyRelation,
    ProxyRelationshipRow,
    Purchase,
    PurchaseVerificationState,
)
from sync_server.purchases import ProxyRelationshipIn, PurchaseIn
from sync_server.runtime import ServerRuntime

router = APIRouter(tags=["purchases"])

MAX_PAGE = 500
SettlementPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z_-]+$")]
RelationshipPath = Annotated[int, Path(ge=1, le=2**62)]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProblemOut(_Out):
    detail: str = Field(description="What went wrong, in words.")


class PersonOut(_Out):
    person_ref: str = Field(description="Pseudonymous reference (HMAC-SM3 of type and number).")
    psn_cert_type: str | None
    certno_masked: str | None
    psn_name_masked: str | None


class AgentOut(PersonOut):
    kind: str = Field(description="face | manual")


class LineOut(_Out):
    line_no: int
    med_list_codg: str
    drug_name: str | None
    cnt: float
    amount_fen: int
    trace_codes: list[str]


class VerificationRef(_Out):
    device_id: str
    method: str
    check: str | None
    outcome: str
    verified_at: datetime
    proxy: bool
    agent_kind: str | None


class PurchaseOut(_Out):
    id: int
    institution_code: str
    settlement_no: str
    transaction_code: str
    settled_at: datetime
    buyer: PersonOut
    proxy: bool
    agent: AgentOut | None
    relationship_id: str | None
    total_amount_fen: int
    lines: list[LineOut]
    verification: PurchaseVerificationState = Field(
        description="pending: the kiosk's record has not arrived yet; linked: it backs this purchase; mismatch: "
        "it exists but does not (verification_note says why)."
    )
    verification_note: str | None
    verification_detail: VerificationRef | None
    received_at: datetime
    linked_at: datetime | None
    reused_trace_codes: list[str] = Field(
        description="追溯码 of this purchase that an earlier registered purchase sold already (a package sold twice)."
    )


class PurchasePage(_Out):
    items: list[PurchaseOut]
    total: int


class RelationshipOut(_Out):
    relationship_id: str
    institution_code: str
    beneficiary: PersonOut
    agent: PersonOut
    relation: ProxyRelation
    valid_from: datetime | None
    valid_until: datetime | None
    created_at: datetime
    ended_at: datetime | None


class DeviceRelationshipOut(_Out):
    relationship_id: str
    beneficiary_ref: str
    agent_ref: str
    valid_from: datetime | None
    valid_until: datetime | None


class DeviceRelationshipPage(_Out):
    items: list[DeviceRelationshipOut]
    total: int


class VerificationOut(_Out):
    id: int
    device_id: str
    institution_code: str | None
    verification_id: str
    transaction_code: str | None
    method: str
    check: str | None
    outcome: str
    reason: str | None
    buyer_ref: str | None
    buyer_masked_id: str | None
    buyer_cert_type: str | None
    insuplc_admdvs: str | None
    proxy: bool
    agent_kind: str | None
    agent_ref: str | None
    agent_masked_id: str | None
    relationship_id: str | None
    findings: list[dict[str, Any]]
    rules_version: int | None
    verified_at: datetime
    received_at: datetime
    key_epoch: int
    signature: str = Field(description="The device's SM2 signature (r||s hex): the evidence can be checked again.")


class VerificationPage(_Out):
    items: list[VerificationOut]
    total: int


# ---------------------------------------------------------------------------------------------------- rendering


def _purchase_out(session: Session, row: Purchase, institution_code: str | None = None) -> PurchaseOut:
    """`row` as answered; `institution_code` when the caller knows it already (a HIS client's principal)."""
    code = institution_code
    if code is None:
        code = session.scalar(select(Institution.code).where(Institution.id == row.institution_id)) or ""
    linked = None if row.pos_verification_id is None else session.get(PosVerification, row.pos_verification_id)
    return _purchase_answer(row, code, linked)


def _purchase_answer(
    row: Purchase | purchases.PurchaseView,
    code: str,
    v: PosVerification | purchases.LinkedVerification | None,
) -> PurchaseOut:
    """`row` as answered, with its institution's code and the kiosk verification it is linked to (if any)."""
    detail: VerificationRef | None = None
    if v is not None:
        detail = VerificationRef(
            device_id=v.device_id,
            method=v.method,
            check=v.check,
            outcome=v.outcome,
            verified_at=v.verified_at,
            proxy=v.proxy,
            agent_kind=v.agent_kind,
        )
    agent = None
    if row.proxy and row.agent_ref is not None:
        agent = AgentOut(
            kind=row.agent_kind or "",
            person_ref=row.agent_ref,
            psn_cert_type=row.agent_cert_type,
            certno_masked=row.agent_masked_id,
            psn_name_masked=row.agent_masked_name,
        )
    return PurchaseOut(
        id=row.id,
        institution_code=code,
        settlement_no=row.settlement_no,
        transaction_code=row.transaction_code,
        settled_at=row.settled_at,
        buyer=PersonOut(
            person_ref=row.buyer_ref,
            psn_cert_type=row.buyer_cert_type,
            certno_masked=row.buyer_masked_id,
            psn_name_masked=row.buyer_masked_name,
        ),
        proxy=row.proxy,
        agent=agent,
        relationship_id=None if row.relationship_id is None else str(row.relationship_id),
        total_amount_fen=row.total_amount_fen,
        lines=[
            LineOut(
                line_no=line.line_no,
                med_list_codg=line.med_list_codg,
                drug_name=line.drug_name,
                cnt=line.quantity,
                amount_fen=line.amount_fen,
                trace_codes=[str(c) for c in line.trace_codes],
            )
            for line in row.lines
        ],
        verification=row.verification_state,
        verification_note=row.verification_note,
        verification_detail=detail,
        received_at=row.received_at,
        linked_at=row.linked_at,
        reused_trace_codes=[str(c) for c in row.reused_trace_codes],
    )


def _relationship_out(session: Session, row: ProxyRelationshipRow) -> RelationshipOut:
    code = session.scalar(select(Institution.code).where(Institution.id == row.institution_id)) or ""
    return RelationshipOut(
        relationship_id=str(row.id),
        institution_code=code,
        beneficiary=PersonOut(
            person_ref=row.beneficiary_ref,
            psn_cert_type=row.beneficiary_cert_type,
            certno_masked=row.beneficiary_masked_id,
            psn_name_masked=row.beneficiary_masked_name,
        ),
        agent=PersonOut(
            person_ref=row.agent_ref,
            psn_cert_type=row.agent_cert_type,
            certno_masked=row.agent_masked_id,
            psn_name_masked=row.agent_masked_name,
        ),
        relation=row.relation,
        valid_from=row.valid_from,
        valid_until=row.valid_until,
        created_at=row.created_at,
        ended_at=row.ended_at,
    )


def _his_institution(principal: Principal) -> int:
    if principal.institution_id is None:  # HIS clients always belong to one institution; belt and braces
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="this caller belongs to no institution")
    return principal.institution_id


def _http(exc: purchases.PurchaseError) -> HTTPException:
    if isinstance(exc, purchases.PurchaseNotFoundError):
        return HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc))
    if isinstance(exc, purchases.PurchaseInvalidError):
        # The shape of FastAPI's own 422, so a client handles both the same way.
        return HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=[{"loc": ["body", "proxy", "relationship_id"], "msg": str(exc), "type": "value_error"}],
        )
    return HTTPException(status.HTTP_409_CONFLICT, detail=str(exc))


# ---------------------------------------------------------------------------------------------------- HIS


@router.post(
    "/his/v1/purchases",
    response_model=PurchaseOut,
    status_code=status.HTTP_201_CREATED,
    summary="购药(代购)登记 / register a settled purchase",
    responses={
        200: {"model": PurchaseOut, "description": "The same settlement registered before with the same body."},
        409: {"model": ProblemOut, "description": "The settlement number is registered with a different body."},
    },
)
async def register_purchase(body: PurchaseIn, his: HisCallDep) -> Response:
    """After a successful settlement, HIS pushes the buyer, the proxy (代购) details and the sale lines with their
    traceability codes (H-04). Idempotent by (institution, settlement_no). A purchase whose kiosk verification has
    not arrived yet is accepted with `verification: pending` and linked when it arrives."""
    now = his.now()
    try:
        done = await his.runtime.run_steps(
            lambda: purchases.register_purchase_steps(his.institution_id, body, his_client=his.client, now=now),
            write=True,
        )
    except purchases.PurchaseError as exc:
        raise _http(exc) from exc
    out = _purchase_answer(done.purchase, his.institution_code, done.verification)
    if not done.created:
        return model_response(out)
    await his.audit(
        "purchase.registered",
        settlement_no=out.settlement_no,
        institution_code=out.institution_code,
        proxy=out.proxy,
        verification=out.verification.value,
    )
    return model_response(out, status.HTTP_201_CREATED)


@router.get(
    "/his/v1/purchases/{settlement_no}",
    response_model=PurchaseOut,
    summary="查询购药登记 / a registered purchase",
    responses={404: {"model": ProblemOut}},
)
async def get_purchase(settlement_no: SettlementPath, his: HisCallDep) -> Response:
    """The purchase with this settlement number in the caller's institution, with its verification state."""
    try:
        row, linked = await his.runtime.run_steps(
            lambda: purchases.purchase_steps(his.institution_id, settlement_no), write=False
        )
    except purchases.PurchaseError as exc:
        raise _http(exc) from exc
    return model_response(_purchase_answer(row, his.institution_code, linked))


@router.post(
    "/his/v1/proxy-relationships",
    response_model=RelationshipOut,
    status_code=status.HTTP_201_CREATED,
    summary="登记代购药关系 / register a proxy-purchase relationship",
    responses={
        200: {"model": RelationshipOut, "description": "An identical active relationship exists already."},
        409: {"model": ProblemOut, "description": "The pair has an active relationship with other terms."},
    },
)
def register_relationship(
    body: ProxyRelationshipIn,
    response: Response,
    principal: PrincipalDep,
    session: WriterSessionDep,
    clock: ClockDep,
    runtime: RuntimeDep,
) -> RelationshipOut:
    """The agent may buy for the beneficiary at this institution's terminals (face + the beneficiary's 医保码);
    the institution's terminals are told to fetch the new set."""
    institution_id = _his_institution(principal)
    with session.begin():
        try:
            change = purchases.register_relationship(
                session, institution_id, body, his_client=principal.name, now=clock.now()
            )
        except purchases.PurchaseError as exc:
            raise _http(exc) from exc
        out = _relationship_out(session, change.relationship)
    if change.changed:
        _announce(runtime, "proxy_relationship.registered", out, principal.name, len(change.notices))
    else:
        response.status_code = status.HTTP_200_OK
    return out


def _announce(runtime: ServerRuntime, action: str, out: RelationshipOut, his_client: str, notices: int) -> None:
    """After the commit: the audit entry of a relationship change, and the dispatcher woken for its notices."""
    runtime.audit.record(
        action,
        relationship_id=out.relationship_id,
        institution_code=out.institution_code,
        his_client=his_client,
        notices=notices,
    )
    if notices and runtime.dispatcher is not None:
        runtime.dispatcher.wake()


@router.delete(
    "/his/v1/proxy-relationships/{relationship_id}",
    response_model=RelationshipOut,
    summary="解除代购药关系 / end a proxy-purchase relationship",
    responses={404: {"model": ProblemOut}},
)
def end_relationship(
    relationship_id: RelationshipPath,
    principal: PrincipalDep,
    session: WriterSessionDep,
    clock: ClockDep,
    runtime: RuntimeDep,
) -> RelationshipOut:
    """End the relationship now (idempotent: an ended one is returned as it is)."""
    institution_id = _his_institution(principal)
    with session.begin():
        try:
            change = purchases.end_relationship(
                session, institution_id, relationship_id, his_client=principal.name, now=clock.now()
            )
        except purchases.PurchaseError as exc:
            raise _http(exc) from exc
        out = _relationship_out(session, change.relationship)
    if change.changed:
        _announce(runtime, "proxy_relationship.ended", out, principal.name, len(change.notices))
    return out


# ---------------------------------------------------------------------------------------------------- device


@router.get(
    "/device/v1/proxy-relationships",
    response_model=DeviceRelationshipPage,
    summary="本机构代购药关系 / the caller terminal's institution's proxy relationships",
)
def device_relationships(
    caller: DeviceCallerDep,
    session: SessionDep,
    clock: ClockDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DeviceRelationshipPage:
    """Relationships neither ended nor expired, by id (person references only); empty for an unbound terminal."""
    if caller.institution_id is None:
        return DeviceRelationshipPage(items=[], total=0)
    rows, total = purchases.active_relationships(
        session, caller.institution_id, now=clock.now(), limit=limit, offset=offset
    )
    items = [
        DeviceRelationshipOut(
            relationship_id=str(r.id),
            beneficiary_ref=r.beneficiary_ref,
            agent_ref=r.agent_ref,
            valid_from=r.valid_from,
            valid_until=r.valid_until,
        )
        for r in rows
    ]
    return DeviceRelationshipPage(items=items, total=total)


@router.get(
    "/device/v1/purchase-history",
    response_model=PurchaseHistory,
    summary="购药记录回溯 / a person's registered purchases, for the period drug rules (P-06, K-35)",
)
def device_purchase_history(
    caller: DeviceCallerDep,
    session: SessionDep,
    clock: ClockDep,
    runtime: RuntimeDep,
    person_ref: Annotated[str, Query(pattern=PERSON_REF_PATTERN, description="The verified buyer's `person_ref`.")],
    days: Annotated[int, Query(ge=1, le=MAX_HISTORY_DAYS)] = MAX_HISTORY_DAYS,
) -> PurchaseHistory:
    """The person's purchases registered by any institution's HIS in the last `days` days, newest first: drug codes,
    quantities and times only. A terminal asks while it verifies that very person (it computes the reference from
    the document it just read); every lookup is written to the audit chain."""
    since = clock.now() - timedelta(days=days)
    lines, complete = purchases.purchase_history(session, person_ref, since=since)
    runtime.audit.record(
        "purchase_history.read", device_id=caller.device_id, person_ref=person_ref, days=days, lines=len(lines)
    )
    return PurchaseHistory(
        person_ref=person_ref,
        since=since,
        lines=[
            PurchaseHistoryLine(purchase_id=pid, settled_at=at, med_list_codg=code, quantity=qty)
            for pid, at, code, qty in lines
        ],
        complete=complete,
    )


# ---------------------------------------------------------------------------------------------------- operators


def _scope(principal: Principal, institution_column: Any) -> list[ColumnElement[bool]]:
    """What an operator may see: a regulator its region prefix (all with none), an institution head its own
    institution (nothing without one). An account with both roles sees the union."""
    allowed: list[ColumnElement[bool]] = []
    if Role.REGULATOR in principal.roles:
        if principal.region_prefix is None:
            return []
        in_region = select(Institution.id).where(Institution.region_code.startswith(principal.region_prefix))
        allowed.append(institution_column.in_(in_region))
    if Role.INSTITUTION_HEAD in principal.roles and principal.institution_id is not None:
        allowed.append(institution_column == principal.institution_id)
    if not allowed:
        return [false()]
    return [or_(*allowed)]


def _institution_filter(code: str | None, column: Any) -> list[ColumnElement[bool]]:
    if code is None:
        return []
    return [column == select(Institution.id).where(Institution.code == code).scalar_subquery()]


@router.get("/api/v1/purchases", response_model=PurchasePage, summary="购药登记 / registered purchases")
def list_purchases(
    principal: PrincipalDep,
    session: SessionDep,
    institution_code: Annotated[str | None, Query(max_length=32)] = None,
    verification: Annotated[PurchaseVerificationState | None, Query()] = None,
    proxy: Annotated[bool | None, Query()] = None,
    settled_from: Annotated[datetime | None, Query()] = None,
    settled_to: Annotated[datetime | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> PurchasePage:
    """Purchases, newest settlement first, masked; a regulator sees its region's, an institution head its own."""
    where = _scope(principal, Purchase.institution_id)
    where += _institution_filter(institution_code, Purchase.institution_id)
    if verification is not None:
        where.append(Purchase.verification_state == verification)
    if proxy is not None:
        where.append(Purchase.proxy == proxy)
    if settled_from is not None:
        where.append(Purchase.settled_at >= settled_from)
    if settled_to is not None:
        where.append(Purchase.settled_at < settled_to)
    total = session.scalar(select(func.count()).select_from(Purchase).where(*where)) or 0
    rows = session.scalars(
        select(Purchase)
        .where(*where)
        .order_by(Purchase.settled_at.desc(), Purchase.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return PurchasePage(items=[_purchase_out(session, r) for r in rows], total=total)


@router.get("/api/v1/verifications", response_model=VerificationPage, summary="POS 核验记录 / POS verifications")
def list_verifications(
    principal: PrincipalDep,
    session: SessionDep,
    institution_code: Annotated[str | None, Query(max_length=32)] = None,
    outcome: Annotated[str | None, Query(pattern=r"^(verified|refused|cancelled)$")] = None,
    proxy: Annotated[bool | None, Query()] = None,
    device_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> VerificationPage:
    """The terminals' signed POS verifications, newest first, masked (with the signature, so the evidence can be
    checked again); a regulator sees its region's, an institution head its own institution's."""
    where = _scope(principal, PosVerification.institution_id)
    where += _institution_filter(institution_code, PosVerification.institution_id)
    if outcome is not None:
        where.append(PosVerification.outcome == outcome)
    if proxy is not None:
        where.append(PosVerification.proxy == proxy)
    if device_id is not None:
        where.append(PosVerification.device_id == device_id)
    total = session.scalar(select(func.count()).select_from(PosVerification).where(*where)) or 0
    rows = session.execute(
        select(PosVerification, Institution.code)
        .outerjoin(Institution, Institution.id == PosVerification.institution_id)
        .where(*where)
        .order_by(PosVerification.verified_at.desc(), PosVerification.id.desc())
        .limit(limit)
        .offset(offset)
    )
    items = [
        VerificationOut(
            id=v.id,
            device_id=v.device_id,
            institution_code=code,
            verification_id=v.verification_id,
            transaction_code=v.transaction_code,
            method=v.method,
            check=v.check,
            outcome=v.outcome,
            reason=v.reason,
            buyer_ref=v.buyer_ref,
            buyer_masked_id=v.buyer_masked_id,
            buyer_cert_type=v.buyer_cert_type,
            insuplc_admdvs=v.insuplc_admdvs,
            proxy=v.proxy,
            agent_kind=v.agent_kind,
            agent_ref=v.agent_ref,
            agent_masked_id=v.agent_masked_id,
            relationship_id=v.relationship_id,
            findings=[dict(f) for f in v.findings],
            rules_version=v.rules_version,
            verified_at=v.verified_at,
            received_at=v.received_at,
            key_epoch=v.key_epoch,
            signature=v.signature,
        )
        for v, code in rows
    ]
    return VerificationPage(items=items, total=total)
