"""Prescriptions and their review (H-05…H-07, P-03…P-06, E-02, E-03): what HIS, the server and a terminal agree on.

Three shapes (docs/prescriptions.md):

* `Prescription` — a prescription as the pharmacy's HIS registers it (`POST /his/v1/prescriptions`) and as a
  terminal receives it among its institution's pending ones (`PendingPrescriptions`). Field lengths follow the
  requirements' §4 (E-02): 医保处方编号 C20, 开方机构编号 C20, 开方机构名称 C128, 开方科室 C20/C128, 开方医师代码 C20,
  开方医师名称 C20, 处方来源/渠道 C3; drug lines carry the 医保药品编码, name, 规格, quantity, unit, 用法用量 and
  用药天数. The patient is a pseudonymous reference plus a masked name (never a name or an ID number); the
  prescriber's name is masked by the server before it is stored or served;
* `ReviewDecisionRecord` — the content of a `review_decision` SignedRecord: which prescription (number,
  institution, `prescription_digest`), which pharmacist (医保药师代码 only), the decision, the reasons (处方审核意见),
  the rule findings shown and whether each was acknowledged, the face confirmation's scores and decision, and when.
  No names, no ID numbers, no face: the template is represented by its hash;
* `prescription_digest` — SM3 over the canonical JSON of a `Prescription` as served: the decision names the exact
  content the pharmacist saw.

This module owns those shapes and their invariants (an approval needs an accepted face, every finding acknowledged
and no blocking finding). It must never carry raw personal data and never grow behaviour of either side.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protocol.drug_rules import RuleAction, RuleKind, Sex
from protocol.envelope import ContractError, DeviceId, summarise_validation_error
from protocol.gm.records import canonical_json
from protocol.gm.sm3 import sm3_digest
from protocol.purchase import PersonRef

MAX_LINES: Final = 50
MAX_PENDING: Final = 200
"""At most this many pending prescriptions are served to a terminal at once (oldest first)."""
MAX_FINDINGS: Final = 32

RxNo = Annotated[
    str, Field(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_-]+$", description="医保处方编号 (C20).")
]
InstitutionCode = Annotated[
    str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$", description="定点医药机构编号.")
]
PharmacistCode = Annotated[
    str, Field(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_-]+$", description="审方医保药师代码 (C20).")
]
DrugCode = Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9]{9,29}$", description="医保药品编码 (national drug code).")]
_Code20 = Annotated[str, Field(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9._-]+$")]
_Code3 = Annotated[str, Field(min_length=1, max_length=3, pattern=r"^[A-Za-z0-9]+$")]
_Reason = Annotated[str, Field(min_length=1, max_length=256)]
_Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

_ID_NUMBER = re.compile(r"^[0-9]{17}[0-9Xx]$|^[0-9]{15}$")
"""A resident ID number (18 or 15 characters): never acceptable as a 'reference'."""


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _masked(value: str | None) -> str | None:
    if value is not None and "*" not in value:
        raise ValueError("must be masked (e.g. '张**'), never a name in clear")
    return value


class PrescriptionLine(_Closed):
    """One drug line of a prescription."""

    line_no: int = Field(ge=1, le=MAX_LINES, description="Line number within the prescription, from 1.")
    drug_code: DrugCode
    drug_name: str = Field(min_length=1, max_length=128, description="药品名称 as prescribed.")
    generic_name: str | None = Field(
        default=None, max_length=128, description="通用名; the terminal prefers the one in its held catalogue."
    )
    specification: str | None = Field(default=None, max_length=128, description="规格.")
    quantity: int = Field(ge=1, le=9999, description="Quantity in sale units (`unit`).")
    unit: str = Field(min_length=1, max_length=16, description="Sale unit, e.g. '盒'.")
    dosage: str | None = Field(default=None, max_length=128, description="用法用量, e.g. '口服 一次2片 一日3次'.")
    days_supply: int | None = Field(default=None, ge=1, le=366, description="用药天数.")
    amount_fen: int | None = Field(
        default=None, ge=0, le=10**10, description="Line amount in fen, when HIS knows it (at most 1 亿元)."
    )


class Prescription(_Closed):
    """A prescription as HIS registers it at the platform (H-06) and a terminal shows it for review (P-03)."""

    rx_no: RxNo
    prescribing_institution_code: _Code20 = Field(description="开方机构编号 (C20).")
    prescribing_institution_name: str = Field(min_length=1, max_length=128, description="开方机构名称 (C128).")
    department_code: _Code20 | None = Field(default=None, description="开方科室编号 (C20).")
    department_name: str | None = Field(default=None, max_length=128, description="开方科室名称 (C128).")
    prescriber_code: _Code20 = Field(description="开方医师代码 (C20).")
    prescriber_name: str | None = Field(
        default=None, max_length=20, description="开方医师名称 (C20); the server masks it before storing or serving."
    )
    prescribed_at: AwareDatetime = Field(description="开方时间.")
    source: _Code3 | None = Field(default=None, description="处方来源 (C3).")
    channel: _Code3 | None = Field(default=None, description="处方渠道 (C3).")
    patient_ref: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Pseudonymous reference of the patient (HIS's own patient number or a keyed hash); never an ID "
        "number.",
    )
    patient_masked: str | None = Field(default=None, max_length=50, description="Masked patient name, e.g. '李*'.")
    patient_person_ref: PersonRef | None = Field(
        default=None,
        description="The patient's `person_ref` (32 hex digits of HMAC-SM3 over 'psn_cert_type:certno', "
        "docs/his-integration.md): the same reference the purchases carry, so the drug rules' period limits "
        "count the patient's earlier purchases at review (K-35, P-05). Never the number itself.",
    )
    patient_age_years: int | None = Field(default=None, ge=0, le=150, description="For age rules (P-05).")
    patient_sex: Sex | None = Field(default=None, description="性别 (gend 1/2), for sex rules (P-05).")
    diagnosis_codes: list[_Code20] = Field(default_factory=list, max_length=20, description="诊断代码 (ICD-10).")
    lines: list[PrescriptionLine] = Field(min_length=1, max_length=MAX_LINES)

    @field_validator("patient_ref")
    @classmethod
    def _not_an_id_number(cls, value: str) -> str:
        if _ID_NUMBER.match(value):
            raise ValueError("must be a pseudonymous reference, not an ID number")
        return value

    @field_validator("patient_masked")
    @classmethod
    def _patient_masked(cls, value: str | None) -> str | None:
        return _masked(value)

    @model_validator(mode="after")
    def _line_numbers(self) -> Self:
        numbers = [ln.line_no for ln in self.lines]
        if len(set(numbers)) != len(numbers):
            raise ValueError("line numbers are not unique")
        return self


def prescription_digest(prescription: Prescription) -> str:
    """SM3 (hex) over the canonical JSON of the prescription: what a review decision names as 'the content seen'."""
    return sm3_digest(canonical_json(prescription.model_dump(mode="json"))).hex()


class PrescriptionStatus(StrEnum):
    """处方状态 on the platform (docs/prescriptions.md has the state diagram)."""

    PENDING = "pending"
    """Registered by HIS; waiting for a pharmacist's review on a terminal of the institution."""
    APPROVED = "approved"
    """Reviewed and approved: HIS may settle."""
    REJECTED = "rejected"
    """Reviewed and refused: not to be dispensed or settled."""
    RETURNED = "returned"
    """Sent back (e.g. to the prescriber for correction): not to be settled as it is."""
    SETTLED = "settled"
    """Approved and settled by HIS (医保结算ID recorded)."""


class PendingPrescription(_Closed):
    """One pending prescription as the server serves it to a terminal (prescriber name masked)."""

    prescription_id: int = Field(ge=1, description="The server's id.")
    institution_code: InstitutionCode = Field(description="The pharmacy the prescription is filed at.")
    registered_at: AwareDatetime
    content_digest: _Hex64 = Field(description="`prescription_digest(prescription)`.")
    prescription: Prescription

    @model_validator(mode="after")
    def _digest_matches(self) -> Self:
        if prescription_digest(self.prescription) != self.content_digest:
            raise ValueError("content_digest does not match the prescription")
        return self


class PendingPrescriptions(_Closed):
    """`GET /device/v1/prescriptions/pending`: the caller terminal's institution's pending prescriptions, oldest
    first, at most `MAX_PENDING`; `total` counts all of them."""

    type: Literal["pending_prescriptions"] = "pending_prescriptions"
    institution_code: InstitutionCode
    items: list[PendingPrescription] = Field(max_length=MAX_PENDING)
    total: int = Field(ge=0)


class ReviewOutcome(StrEnum):
    """处方审核状态: the pharmacist's decision."""

    APPROVED = "approved"
    REJECTED = "rejected"
    RETURNED = "returned"


class ReviewedPrescription(PendingPrescription):
    """One of the institution's reviewed prescriptions (P-03), with the stored decision: on whichever terminal of
    the pharmacy it was made."""

    decision: ReviewOutcome
    reviewed_at: AwareDatetime = Field(description="处方审核时间 (the reviewing terminal's clock, signed).")
    pharmacist_code: PharmacistCode
    device_id: DeviceId = Field(description="The terminal the review was made on.")


class ReviewedPrescriptions(_Closed):
    """`GET /device/v1/prescriptions/reviewed`: the caller terminal's institution's prescriptions reviewed since
    `since`, newest first, at most `MAX_PENDING`; `total` counts all of them."""

    type: Literal["reviewed_prescriptions"] = "reviewed_prescriptions"
    institution_code: InstitutionCode
    since: AwareDatetime
    items: list[ReviewedPrescription] = Field(max_length=MAX_PENDING)
    total: int = Field(ge=0)


class FindingShown(_Closed):
    """A drug-rule finding (`protocol.drug_rules.Finding`) the terminal showed during the review, by reference: the
    message is the rule's own text and is not repeated here."""

    rule_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    rule_kind: RuleKind
    action: RuleAction
    drug_codes: list[DrugCode] = Field(max_length=MAX_LINES)
    limit: int | None = None
    observed: int | None = None
    checkable: bool = True
    acknowledged: bool = Field(description="The pharmacist acknowledged it before deciding.")


class FaceConfirmation(_Closed):
    """The face check that confirmed the decision (P-04): decision and scores only, never a face or template."""

    decision: str = Field(max_length=16, description="FaceDecision outcome; only 'accepted' confirms a decision.")
    method: str = Field(max_length=16, description="face_1to1 against the signed-in pharmacist's template.")
    similarity: float | None = Field(default=None, ge=-1, le=1)
    threshold: float = Field(ge=-1, le=1)
    live: bool | None = Field(default=None, description="Liveness verdict; None when it did not run.")
    liveness_method: str | None = Field(default=None, max_length=64)
    template_hash: str | None = Field(default=None, max_length=64, description="FaceDecision.template_hash.")
    model_sha256: str = Field(max_length=16, description="First 16 hex digits of the embedder's sha256.")


class HistoryUse(StrEnum):
    """What the period and refill rules saw of the patient's earlier purchases at this review."""

    SERVER = "server"
    """The platform's lookback (every institution, the last six months) by the prescription's `patient_person_ref`."""
    UNAVAILABLE = "unavailable"
    """The prescription names the patient, but the lookback failed or this terminal has no server: this prescription
    only."""
    NOT_IDENTIFIED = "not_identified"
    """HIS sent no `patient_person_ref`: this prescription only."""


class ReviewDecisionRecord(_Closed):
    """The signed content of a `review_decision` record (E-03)."""

    rx_no: RxNo
    institution_code: InstitutionCode
    prescription_id: int = Field(ge=1, description="The server's id, as served to the terminal.")
    content_digest: _Hex64 = Field(description="`prescription_digest` of the prescription reviewed.")
    pharmacist_code: PharmacistCode
    decision: ReviewOutcome
    reasons: list[_Reason] = Field(default_factory=list, max_length=8, description="处方审核意见 (C256 each).")
    rule_set_version: int | None = Field(default=None, ge=1, description="Drug rules held at the review; None: none.")
    findings: list[FindingShown] = Field(default_factory=list, max_length=MAX_FINDINGS)
    purchase_history: HistoryUse | None = Field(
        default=None,
        description="What the period rules counted: the patient's earlier purchases from the platform (`server`), or "
        "this prescription only (`unavailable`, `not_identified`); None from a terminal before this field.",
    )
    face: FaceConfirmation
    reviewed_at: AwareDatetime = Field(description="处方审核时间, terminal wall clock.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.face.decision != "accepted":
            raise ValueError("a review decision is confirmed by an accepted face verification")
        if self.decision is ReviewOutcome.APPROVED:
            if any(f.action is RuleAction.BLOCK for f in self.findings):
                raise ValueError("a prescription with a blocking rule finding cannot be approved")
            if not all(f.acknowledged for f in self.findings):
                raise ValueError("every rule warning must be acknowledged before approving")
        elif not self.reasons:
            raise ValueError("a rejection or return needs a reason")
        return self

    def to_record(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_review_decision(record: dict[str, Any]) -> ReviewDecisionRecord:
    """The decision in a verified signed record, or `ContractError` naming what is wrong (never a value)."""
    try:
        return ReviewDecisionRecord.model_validate(record)
    except ValidationError as exc:
        raise ContractError(f"invalid review decision: {summarise_validation_error(exc)}") from exc


def parse_reviewed(raw: Any) -> ReviewedPrescriptions:
    """The server's reviewed list (decoded JSON), or `ContractError`."""
    try:
        return ReviewedPrescriptions.model_validate(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid reviewed prescriptions: {summarise_validation_error(exc)}") from exc


def parse_pending(raw: Any) -> PendingPrescriptions:
    """The server's pending list (decoded JSON), or `ContractError`."""
    try:
        return PendingPrescriptions.model_validate(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid pending prescriptions: {summarise_validation_error(exc)}") from exc
