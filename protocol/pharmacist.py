"""Pharmacists on the wire (P-01, P-02, H-08, E-04, E-05): the signed attendance and enrolment records, and how a
face template travels between a terminal and the server.

Records (signed by the terminal's SM2 identity key, `protocol.evidence`; checked again by the server):

* `pharmacist_enrolment` (`PharmacistEnrolmentRecord`): a pharmacist enrolled their face at this terminal after the
  live face matched the ID-card photo (人证比对) and they gave consent (version and time);
* `sign_in` / `sign_out` (`SignInRecord` / `SignOutRecord`): one attendance session, identified by `session_id`,
  opened by face (1:N among the institution's pharmacists) and closed by face, at the configured closing hour, or
  after a failed re-verification.

They name the pharmacist by the HIS pharmacist code (医保药师代码, C20) and the institution by its code; never by a
name, an ID number or a template. Faces appear as scores, thresholds, decisions and the device-keyed template hash.

Templates travel only sealed (SM4-GCM, `seal_template` / `open_template`) under the session key the terminal also
signs its request with; the associated data binds the direction, the device, the pharmacist code and the embedding
model, so a sealed template cannot be replayed for another pharmacist, device or model. This module owns those
shapes and that binding; it must never carry raw personal data or a template in clear.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import uuid
from enum import StrEnum
from typing import Annotated, Any, Final, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol.envelope import ContractError, summarise_validation_error
from protocol.gm import sm4
from protocol.gm.errors import CryptoError

PharmacistCode = Annotated[
    str, Field(min_length=1, max_length=20, pattern=r"^[A-Za-z0-9_-]+$", description="医保药师代码 (HIS, C20).")
]
InstitutionCode = Annotated[
    str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$", description="定点医药机构编码.")
]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

TEMPLATE_DIMS: Final = 128
"""The embedding model's template length (dlib ResNet); a template of another length is refused on both sides."""
MAX_TEMPLATE_DIMS: Final = 2048
"""An upper bound for operator models with wider templates (ArcFace-class: 512)."""


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FaceDecisionValue(StrEnum):
    """The outcome of the face attempt behind a record (terminal.verification.FaceOutcome values)."""

    ACCEPTED = "accepted"
    NO_MATCH = "no_match"
    LIVENESS_FAILED = "liveness_failed"
    TIMEOUT = "timeout"
    CAMERA_FAULT = "camera_fault"
    NOT_ENROLLED = "not_enrolled"


class LivenessValue(StrEnum):
    LIVE = "live"
    ATTACK_SUSPECTED = "attack_suspected"


class FaceEvidence(_Closed):
    """What a record says about the face attempt: scores and decisions, never a face."""

    face_similarity: float | None = Field(default=None, ge=-1, le=1, description="Cosine similarity.")
    face_threshold: float = Field(ge=-1, le=1, description="The calibrated threshold in force.")
    face_decision: FaceDecisionValue
    liveness: LivenessValue | None = Field(default=None, description="None when no live check ran.")
    liveness_method: str | None = Field(default=None, max_length=64)
    template_hash: str | None = Field(default=None, max_length=64, description="Device-keyed hash, not linkable.")
    model_sha256: str | None = Field(default=None, max_length=64)


class PharmacistEnrolmentRecord(FaceEvidence):
    """A pharmacist's face enrolment at a terminal: live face vs ID-card photo (人证比对), consent recorded."""

    pharmacist_code: PharmacistCode
    institution_code: InstitutionCode
    id_photo_similarity: float = Field(ge=-1, le=1, description="人证比对: live face vs the ID-card photo.")
    consent_version: str = Field(min_length=1, max_length=32, description="Version of the consent text shown.")
    consent_at: AwareDatetime = Field(description="When the pharmacist agreed (terminal wall clock).")
    enrolled_at: AwareDatetime

    def to_record(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class SignOutReason(StrEnum):
    """Why a session closed."""

    SIGNED_OUT = "signed_out"
    """The pharmacist signed out by face."""
    AUTO_CLOSED = "auto_closed"
    """The terminal closed it at the configured closing hour."""
    REVERIFICATION_FAILED = "reverification_failed"
    """A periodic re-verification did not find the pharmacist in front of the terminal."""
    SERVER_CLOSED = "server_closed"
    """Server only: the terminal never sent a sign-out before the closing hour (it was off or offline)."""


class SignInRecord(FaceEvidence):
    """The start of an attendance session (签到), by face 1:N among the institution's pharmacists."""

    pharmacist_code: PharmacistCode
    institution_code: InstitutionCode
    session_id: uuid.UUID
    signed_in_at: AwareDatetime

    def to_record(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class SignOutRecord(_Closed):
    """The end of an attendance session (签退). Face fields are absent when the terminal closed it by itself."""

    pharmacist_code: PharmacistCode
    institution_code: InstitutionCode
    session_id: uuid.UUID
    signed_in_at: AwareDatetime
    signed_out_at: AwareDatetime
    reason: SignOutReason = Field(description="Never 'server_closed' (that one only the server sets).")
    face: FaceEvidence | None = None

    @field_validator("reason")
    @classmethod
    def _terminal_reason(cls, value: SignOutReason) -> SignOutReason:
        if value is SignOutReason.SERVER_CLOSED:
            raise ValueError("a terminal never closes a session as 'server_closed'")
        return value

    def to_record(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_M = TypeVar("_M", bound=BaseModel)


def _parse(model: type[_M], what: str, record: dict[str, Any]) -> _M:
    try:
        return model.model_validate(record)
    except ValidationError as exc:
        raise ContractError(f"invalid {what}: {summarise_validation_error(exc)}") from exc


def parse_enrolment(record: dict[str, Any]) -> PharmacistEnrolmentRecord:
    """The enrolment in a verified signed record, or `ContractError` naming what is wrong (never a value)."""
    return _parse(PharmacistEnrolmentRecord, "pharmacist enrolment", record)


def parse_sign_in(record: dict[str, Any]) -> SignInRecord:
    return _parse(SignInRecord, "sign-in record", record)


def parse_sign_out(record: dict[str, Any]) -> SignOutRecord:
    return _parse(SignOutRecord, "sign-out record", record)


# ---------------------------------------------------------------- templates in transit


class TemplateDirection(StrEnum):
    UPLOAD = "upload"
    """Terminal -> server (the enrolling terminal)."""
    DOWNLOAD = "download"
    """Server -> terminal (every terminal bound to the pharmacist's institution)."""


def template_aad(direction: TemplateDirection, device_id: str, pharmacist_code: str, model_sha256: str) -> bytes:
    """What a sealed template in transit is bound to."""
    parts = ("yibao/pharmacist-template/v1", direction.value, device_id, pharmacist_code, model_sha256)
    return "\x00".join(parts).encode("utf-8")


def template_bytes(template: NDArray[np.floating]) -> bytes:
    """The wire form of a template: L2-normalised float32, little-endian. `ContractError` for an unusable one."""
    vector = np.asarray(template, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector)) if vector.size else 0.0
    if not 0 < vector.size <= MAX_TEMPLATE_DIMS or not np.isfinite(norm) or norm == 0.0:
        raise ContractError("a template must be a non-empty, finite, non-zero vector")
    return (vector / norm).astype("<f4").tobytes()


def template_from_bytes(raw: bytes, dims: int) -> NDArray[np.float32]:
    """The template in `raw` (exactly `dims` float32 values, finite and non-zero), or `ContractError`."""
    if not 0 < dims <= MAX_TEMPLATE_DIMS or len(raw) != 4 * dims:
        raise ContractError(f"a template of {dims} dimensions must be {4 * dims} bytes")
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ContractError("a template must be finite and non-zero")
    return vector


def seal_template(key: bytes, template: NDArray[np.floating], aad: bytes) -> str:
    """The template sealed (SM4-GCM) under `key`, base64 for JSON."""
    return base64.b64encode(sm4.seal(key, template_bytes(template), aad)).decode("ascii")


def open_template(key: bytes, sealed_b64: str, aad: bytes, dims: int) -> NDArray[np.float32]:
    """Open what `seal_template` made; `ContractError` for bad base64, a wrong key or aad, or a bad template."""
    try:
        sealed = base64.b64decode(sealed_b64.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ContractError("the sealed template is not base64") from exc
    try:
        raw = sm4.open(key, sealed, aad)
    except CryptoError as exc:
        raise ContractError("the sealed template does not open under this key (altered or misdirected)") from exc
    return template_from_bytes(raw, dims)


class SealedTemplate(_Closed):
    """A template in transit: sealed under the session key `key_id`, for `model_sha256`."""

    key_id: uuid.UUID = Field(description="The session key it is sealed under (the request's signing key).")
    sealed: str = Field(min_length=1, max_length=16 * 1024, description="base64(nonce || ciphertext || tag).")
    model_sha256: Sha256Hex
    dims: int = Field(ge=1, le=MAX_TEMPLATE_DIMS)


class TemplateUpload(SealedTemplate):
    """`POST /device/v1/pharmacists/{code}/template`: the enrolling terminal's template and the consent behind it."""

    consent_version: str = Field(min_length=1, max_length=32)
    consent_at: AwareDatetime
    id_photo_similarity: float = Field(ge=-1, le=1, description="人证比对 score of the enrolment.")


class RosterEntry(_Closed):
    """One active pharmacist of the terminal's institution, as `GET /device/v1/pharmacists` lists them."""

    code: PharmacistCode
    name_masked: str = Field(max_length=20, description="Masked name, for the terminal's screens.")
    id_number_masked: str | None = Field(default=None, max_length=20, description="Masked 证件号码.")
    template: SealedTemplate | None = Field(default=None, description="Sealed under the caller's session key.")


class Roster(_Closed):
    """`GET /device/v1/pharmacists`: the calling terminal's institution and its active pharmacists."""

    institution_code: InstitutionCode
    pharmacists: list[RosterEntry] = Field(max_length=2000)


class Attendance(_Closed):
    """One attendance session as the server knows it (`GET /device/v1/pharmacist-sessions`, P-02)."""

    session_id: uuid.UUID
    pharmacist_code: PharmacistCode
    pharmacist_masked: str = Field(max_length=20)
    institution_code: InstitutionCode
    device_id: str = Field(max_length=64)
    signed_in_at: AwareDatetime
    signed_out_at: AwareDatetime | None
    closed_reason: SignOutReason | None
    sign_in_similarity: float | None
    sign_out_similarity: float | None
    face_threshold: float | None


class AttendancePage(_Closed):
    items: list[Attendance]
    total: int = Field(ge=0)


def close_moment(signed_in_at: dt.datetime, close_hour: int, tz: dt.tzinfo) -> dt.datetime:
    """When a session opened at `signed_in_at` closes by itself: the first `close_hour`:00 local time after it
    (24 = midnight at the end of that day). Terminal and server use this one rule."""
    if not 1 <= close_hour <= 24:
        raise ValueError("close_hour is 1..24")
    local = signed_in_at.astimezone(tz)
    candidate = (dt.datetime.combine(local.date(), dt.time(), tzinfo=tz) + dt.timedelta(hours=close_hour)).astimezone(
        tz
    )
    if candidate <= local:
        candidate = (
            dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), tzinfo=tz)
            + dt.timedelta(hours=close_hour)
        ).astimezone(tz)
    return candidate.astimezone(dt.UTC)
