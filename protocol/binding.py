"""The record inside a `binding_application` SignedRecord (I-01, D-03): what a terminal and the server agree on.

The institution head applies on the terminal after identifying themselves (face + 医保码, or face + ID card). The
record carries the verification method, a pseudonymous applicant reference and the FaceDecision's template hash
(an audit reference), never a name, an ID number, a phone number or a face. The terminal signs the record with its
SM2 identity key (`protocol.evidence`); the server verifies the signature before it becomes an application.

This module owns the record's shape and `parse_binding_application`. It must never carry raw personal data.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from protocol.envelope import ContractError, summarise_validation_error


class ApplicantVerification(StrEnum):
    """How the institution head was identified on the terminal before applying."""

    FACE_YIBAO_CODE = "face_yibao_code"
    """Face verification plus the 医保电子凭证 (医保码)."""
    FACE_ID_CARD = "face_id_card"
    """Face verification plus the resident ID card."""


class BindingApplicationRecord(BaseModel):
    """The signed content of an application to bind this terminal to an institution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    institution_code: str = Field(min_length=1, max_length=32, description="定点医药机构编码 applied for.")
    applicant_ref: str = Field(
        min_length=1, max_length=64, description="Pseudonymous reference of the institution head (never an ID no.)."
    )
    applicant_masked: str | None = Field(default=None, max_length=50, description="Masked name, e.g. '张**'.")
    verification: ApplicantVerification
    face_template_hash: str | None = Field(default=None, max_length=64, description="FaceDecision.template_hash.")
    face_decision: str = Field(max_length=16, description="FaceDecision outcome value; only 'accepted' is applied.")
    reason: str = Field(min_length=1, max_length=256)
    applied_at: AwareDatetime = Field(description="Terminal wall clock.")

    def to_record(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_binding_application(record: dict[str, Any]) -> BindingApplicationRecord:
    """The application in a verified signed record, or `ContractError` naming what is wrong (never a value)."""
    try:
        return BindingApplicationRecord.model_validate(record)
    except ValidationError as exc:
        raise ContractError(f"invalid binding application: {summarise_validation_error(exc)}") from exc
