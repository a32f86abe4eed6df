"""Prescriptions over HTTP (H-05…H-07, P-03, I-06, R-02, R-08; docs/prescriptions.md).

Routes (policies in `sync_server.authz`):

* HIS clients of an institution (`Role.HIS_CLIENT`, signed requests): `POST /his/v1/prescriptions` registers
  (201 created; the same body again 200 with the same result; another body for the number 409),
  `GET /his/v1/prescriptions/{rx_no}` gives the status and the review result, `POST
  /his/v1/prescriptions/{rx_no}/settlement` records the settlement (409 unless approved; idempotent);
* terminals (device-signed): `GET /device/v1/prescriptions/pending`, their institution's pending prescriptions;
* operators: `GET /api/v1/prescriptions` and `GET /api/v1/prescriptions/{prescription_id}`: a regulator sees its
  region's institutions, an institution head or pharmacist their own institution; 404 outside the scope.

Registration and settlement are recorded in the server's audit chain after their commit, and a registration wakes
the dispatcher so the `prescriptions_pending` notices reach online terminals at once. The rules live in
`sync_server.prescriptions`; this module validates, scopes, translates errors to 404/409 and renders masked or
pseudonymous data only.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from protocol.prescription import (
    PendingPrescription,
    PendingPrescriptions,
    Prescription,
    PrescriptionStatus,
    ReviewedPrescription,
    ReviewedPrescriptions,
    ReviewOutcome,
)
from sync_server import prescriptions
from sync_server.api.deps import (
    ClockDep,
    DeviceCallerDep,
    HisCallDep,
    Principal,
    PrincipalDep,
    SessionDep,
)
from sync_server.api.schemas import ErrorOut, UnprocessableOut, model_response
from sync_server.db.models import Institution, PrescriptionRow, PrescriptionState

his_router = APIRouter(prefix="/his/v1/prescriptions", tags=["prescriptions (HIS)"])
device_router = APIRouter(prefix="/device/v1/prescriptions", tags=["prescriptions (device)"])
operator_router = APIRouter(prefix="/api/v1/prescriptions", tags=["prescriptions"])

MAX_PAGE = 500
RxNoPath = Annotated[str, Path(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_-]+$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SettlementIn(_In):
    settlement_id: str = Field(min_length=1, max_length=64, description="医保结算ID (C64).")


class ReviewOut(_Out):
    """处方审核结果 (E-03): the decision, opinion, pharmacist code and time; no names, no ID numbers."""

    decision: str = Field(description="处方审核状态: approved | rejected | returned.")
    reasons: list[str] = Field(description="处方审核意见.")
    pharmacist_code: str = Field(description="审方医保药师代码.")
    reviewed_at: datetime = Field(description="处方审核时间 (terminal clock, signed).")
    received_at: datetime
    device_id: str
    face_decision: str
    face_similarity: float | None
    rule_set_version: int | None
    findings: list[dict[str, Any]] = Field(description="Rule findings shown at review, and whether acknowledged.")
    purchase_history: str | None = Field(
        description="What the period rules counted at review: `server` (the patient's earlier purchases, by "
        "`patient_person_ref`), `unavailable` or `not_identified` (this prescription only); null: not recorded."
    )

    @classmethod
    def of(cls, review: prescriptions.ReviewView) -> ReviewOut:
        return cls(
            decision=review.decision,
            reasons=review.reasons,
            pharmacist_code=review.pharmacist_code,
            reviewed_at=review.reviewed_at,
            received_at=review.received_at,
            device_id=review.device_id,
            face_decision=review.face_decision,
            face_similarity=review.face_similarity,
            rule_set_version=review.rule_set_version,
            findings=review.findings,
            purchase_history=review.purchase_history,
        )


class PrescriptionResultOut(_Out):
    """What HIS sees of its prescription: status, review result, settlement."""

    rx_no: str
    institution_code: str
    status: PrescriptionStatus
    may_settle: bool = Field(description="True only when approved and not yet settled (I-06).")
    registered_at: datetime
    content_digest: str
    review: ReviewOut | None
    settlement_id: str | None
    settled_at: datetime | None


class PrescriptionSummaryOut(_Out):
    id: int
    institution_code: str
    rx_no: str
    status: PrescriptionStatus
    registered_at: datetime
    prescribed_at: datetime
    prescribing_institution_code: str
    prescriber_code: str
    patient_ref: str = Field(description="Pseudonymous; never an ID number.")
    reviewed_at: datetime | None
    settled_at: datetime | None
    refused_decisions: int


class PrescriptionPage(_Out):
    items: list[PrescriptionSummaryOut]
    total: int


class PrescriptionDetailOut(PrescriptionSummaryOut):
    prescription: Prescription = Field(description="As served to terminals: names masked.")
    content_digest: str
    review: ReviewOut | None
    settlement_id: str | None


def _http(exc: prescriptions.PrescriptionError) -> HTTPException:
    not_found = isinstance(exc, prescriptions.PrescriptionNotFoundError)
    return HTTPException(
        status_code=status.HTTP_404_NOT_FOUND if not_found else status.HTTP_409_CONFLICT, detail=str(exc)
    )


def _result(view: prescriptions.HisView, institution_code: str) -> PrescriptionResultOut:
    """HIS's view of the prescription."""
    return PrescriptionResultOut(
        rx_no=view.rx_no,
        institution_code=institution_code,
        status=PrescriptionStatus(view.status.value),
        may_settle=view.status is PrescriptionState.APPROVED,
        registered_at=view.registered_at,
        content_digest=view.content_digest,
        review=None if view.review is None else ReviewOut.of(view.review),
        settlement_id=view.settlement_id,
        settled_at=view.settled_at,
    )


_HIS_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut},
    409: {"model": ErrorOut},
    422: {"model": UnprocessableOut},
}


@his_router.post("", response_model=PrescriptionResultOut, status_code=201, responses=_HIS_RESPONSES)
async def register_prescription(body: Prescription, his: HisCallDep) -> Response:
    """Register a prescription at the caller's institution (H-06). 201 when new; the same body again is answered
    200 with the stored result; another body for the same 医保处方编号 is 409."""
    now = his.now()
    try:
        done = await his.runtime.run_steps(
            lambda: prescriptions.register_steps(body, institution_id=his.institution_id, client=his.client, now=now),
            write=True,
        )
    except prescriptions.PrescriptionError as exc:
        raise _http(exc) from exc
    out = _result(done.view, his.institution_code)
    if not done.created:
        return model_response(out)
    await his.audit(
        "prescription.registered",
        rx_no=out.rx_no,
        institution_code=out.institution_code,
        notices=len(done.notices),
    )
    if his.runtime.dispatcher is not None and done.notices:
        his.runtime.dispatcher.wake()
    return model_response(out, status.HTTP_201_CREATED)


@his_router.get("/{rx_no}", response_model=PrescriptionResultOut, responses={404: {"model": ErrorOut}})
async def get_prescription_result(rx_no: RxNoPath, his: HisCallDep) -> Response:
    """The status and review result of one of the caller's institution's prescriptions (H-05, H-07 step 3)."""
    view = await his.runtime.run_steps(lambda: prescriptions.his_view_steps(his.institution_id, rx_no), write=False)
    if view is None:
        raise HTTPException(status_code=404, detail=f"prescription {rx_no} is not registered at this institution")
    return model_response(_result(view, his.institution_code))


@his_router.post("/{rx_no}/settlement", response_model=PrescriptionResultOut, responses=_HIS_RESPONSES)
async def settle_prescription(rx_no: RxNoPath, body: SettlementIn, his: HisCallDep) -> Response:
    """Record that HIS settled the prescription (I-06): 409 unless it is approved; the same settlement again is
    answered with the stored result; another settlement of a settled prescription is 409 (F-07)."""
    now = his.now()
    try:
        view, first = await his.runtime.run_steps(
            lambda: prescriptions.settle_steps(
                institution_id=his.institution_id, rx_no=rx_no, settlement_id=body.settlement_id, now=now
            ),
            write=True,
        )
    except prescriptions.PrescriptionError as exc:
        raise _http(exc) from exc
    out = _result(view, his.institution_code)
    if first:
        await his.audit(
            "prescription.settled",
            rx_no=rx_no,
            institution_code=out.institution_code,
            settlement_id=body.settlement_id,
        )
    return model_response(out)


def pending_document(session: Session, institution: Institution) -> PendingPrescriptions:
    rows, total = prescriptions.pending_page(session, institution.id)
    items = [
        PendingPrescription(
            prescription_id=row.id,
            institution_code=institution.code,
            registered_at=row.registered_at,
            content_digest=row.content_digest,
            prescription=prescriptions.stored_prescription(row),
        )
        for row in rows
    ]
    return PendingPrescriptions(institution_code=institution.code, items=items, total=total)


@device_router.get("/pending", response_model=PendingPrescriptions, responses={409: {"model": ErrorOut}})
def pending_prescriptions(session: SessionDep, caller: DeviceCallerDep) -> PendingPrescriptions:
    """The caller terminal's institution's pending prescriptions, oldest first (P-03); 409 for an unbound terminal."""
    institution = None if caller.institution_id is None else session.get(Institution, caller.institution_id)
    if institution is None:
        raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail="this terminal is not bound to an institution")
    return pending_document(session, institution)


REVIEWED_MAX_DAYS = 30
"""As far back as a terminal lists reviewed prescriptions (`terminal.review.REVIEWED_KEEP_DAYS`)."""


@device_router.get("/reviewed", response_model=ReviewedPrescriptions, responses={409: {"model": ErrorOut}})
def reviewed_prescriptions(
    session: SessionDep,
    caller: DeviceCallerDep,
    clock: ClockDep,
    days: Annotated[int, Query(ge=1, le=REVIEWED_MAX_DAYS, description="Reviewed in the last this many days.")] = 30,
) -> ReviewedPrescriptions:
    """The caller terminal's institution's prescriptions reviewed in the last `days` days, newest first, on any of
    its terminals, with the decision (P-03); 409 for an unbound terminal."""
    institution = None if caller.institution_id is None else session.get(Institution, caller.institution_id)
    if institution is None:
        raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail="this terminal is not bound to an institution")
    since = clock.now() - timedelta(days=days)
    rows, total = prescriptions.reviewed_page(session, institution.id, since=since)
    items = [
        ReviewedPrescription(
            prescription_id=row.id,
            institution_code=institution.code,
            registered_at=row.registered_at,
            content_digest=row.content_digest,
            prescription=prescriptions.stored_prescription(row),
            decision=ReviewOutcome(review.decision),
            reviewed_at=review.reviewed_at,
            pharmacist_code=review.pharmacist_code,
            device_id=review.device_id,
        )
        for row, review in rows
    ]
    return ReviewedPrescriptions(institution_code=institution.code, since=since, items=items, total=total)


# ------------------------------------------------------------------------------------ operators


def _scope(principal: Principal) -> list[ColumnElement[bool]]:
    institution_id, region = principal.institution_id, principal.region_prefix
    if institution_id is not None:
        return [PrescriptionRow.institution_id == institution_id]
    if region is not None:
        in_region = select(Institution.id).where(Institution.region_code.startswith(region))
        return [PrescriptionRow.institution_id.in_(in_region)]
    raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="no institution or region scope")


def _summary(row: PrescriptionRow, institution_code: str) -> dict[str, Any]:
    return {
        "id": row.id,
        "institution_code": institution_code,
        "rx_no": row.rx_no,
        "status": PrescriptionStatus(row.status.value),
        "registered_at": row.registered_at,
        "prescribed_at": row.prescribed_at,
        "prescribing_institution_code": row.prescribing_institution_code,
        "prescriber_code": row.prescriber_code,
        "patient_ref": row.patient_ref,
        "reviewed_at": row.reviewed_at,
        "settled_at": row.settled_at,
        "refused_decisions": row.refused_decisions,
    }


@operator_router.get("", response_model=PrescriptionPage)
def list_prescriptions(
    session: SessionDep,
    principal: PrincipalDep,
    status_: Annotated[PrescriptionStatus | None, Query(alias="status")] = None,
    institution_code: Annotated[str | None, Query(max_length=32, description="Only this institution's.")] = None,
    since: Annotated[AwareDatetime | None, Query(description="Registered at or after this (ISO 8601).")] = None,
    until: Annotated[AwareDatetime | None, Query(description="Registered before this (ISO 8601).")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> PrescriptionPage:
    """Prescriptions, newest first (P-03, R-02): a regulator sees its region's, an institution head or pharmacist
    their own institution's. Patients are pseudonymous references."""
    if since is not None and until is not None and since >= until:
        raise HTTPException(status_code=422, detail="'since' must be earlier than 'until'")
    scope = _scope(principal)
    if status_ is not None:
        scope.append(PrescriptionRow.status == PrescriptionState(status_.value))
    if institution_code is not None:
        scope.append(Institution.code == institution_code)
    if since is not None:
        scope.append(PrescriptionRow.registered_at >= since)
    if until is not None:
        scope.append(PrescriptionRow.registered_at < until)
    total = (
        session.scalar(
            select(func.count())
            .select_from(PrescriptionRow)
            .join(Institution, Institution.id == PrescriptionRow.institution_id)
            .where(*scope)
        )
        or 0
    )
    rows = session.execute(
        select(PrescriptionRow, Institution.code)
        .join(Institution, Institution.id == PrescriptionRow.institution_id)
        .where(*scope)
        .order_by(PrescriptionRow.registered_at.desc(), PrescriptionRow.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return PrescriptionPage(items=[PrescriptionSummaryOut(**_summary(r, code)) for r, code in rows], total=total)


@operator_router.get("/{prescription_id}", response_model=PrescriptionDetailOut, responses={404: {"model": ErrorOut}})
def get_prescription(prescription_id: int, session: SessionDep, principal: PrincipalDep) -> PrescriptionDetailOut:
    """One prescription with its lines and review (404 outside the caller's scope)."""
    found = session.execute(
        select(PrescriptionRow, Institution.code)
        .join(Institution, Institution.id == PrescriptionRow.institution_id)
        .where(PrescriptionRow.id == prescription_id, *_scope(principal))
    ).first()
    if found is None:
        raise HTTPException(status_code=404, detail=f"prescription {prescription_id} is not visible to you")
    row, code = found
    review = prescriptions.review_of(session, row.id)
    return PrescriptionDetailOut(
        **_summary(row, code),
        prescription=prescriptions.stored_prescription(row),
        content_digest=row.content_digest,
        review=None if review is None else ReviewOut.of(prescriptions.ReviewView.of(review)),
        settlement_id=row.settlement_id,
    )


router = APIRouter()
"""Every prescription route, for `create_app`'s one `include_router`."""
router.include_router(his_router)
router.include_router(device_router)
router.include_router(operator_router)
