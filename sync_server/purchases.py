"""Purchases and proxy purchase on the server (H-02…H-04, K-03…K-07, B-11; docs/purchases.md).

Owns, in the caller's transaction:

* `record_pos_verifications`, the ingest hook: a terminal's signed `pos_verification` records
  (`protocol.purchase.PosVerificationRecord`) become `pos_verifications` rows, once per envelope (`message_id`) and
  once per transaction code. The signature is verified again here against the device's enrolled key of the record's
  epoch: an unsigned, forged or malformed record never becomes a row (it is counted and logged without its contents).
  A purchase already registered with the same transaction code is linked now (the terminal was offline);
* `register_purchase`: the settled purchase (proxy) registration HIS pushes (H-04), idempotent by (institution,
  settlement number): the same body again returns the stored purchase, a different one is a `PurchaseConflictError`.
  It is linked to the verification with the same transaction code when that has arrived (`linked`, or `mismatch` with
  a reason when the verification does not back it), else it stays `pending` until it does. It and `purchase_of` are
  HIS's bulk traffic, written once as steps of Core statements (`register_purchase_steps`, `purchase_steps`;
  `sync_server.db.steps`) with no ORM unit of work, which the API runs on PostgreSQL's async pool;
* proxy relationships (代购药关系, B-11): `register_relationship`, `end_relationship`, `active_relationships`; each
  change queues one `proxy_relationships` notice command to every terminal of the institution that has none pending,
  so the terminals fetch the new set (`terminal.proxy.ProxyRelationshipSync`);
* the request contract HIS speaks (`PurchaseIn`, `ProxyRelationshipIn`, `PersonIn`), because the rules above are
  stated in its terms; the HTTP layer is `sync_server.api.purchases`.

People are stored as `person_ref` (`protocol.purchase.person_ref`, computed here from the certificate number HIS
sends, or given by HIS as the kiosk returned it), masked number and masked name: never a full ID number or a name.
It must never commit, publish, audit (the API does that after the commit) or log personal data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import ColumnElement, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from protocol import CommandKind, ContractError, Envelope
from protocol.downlink import ProxyRelationshipsArgs
from protocol.gm.records import canonical_json
from protocol.payloads import SignedRecord, SignedRecordKind
from protocol.purchase import (
    MAX_HISTORY_LINES,
    AgentKind,
    PersonRef,
    PosVerificationRecord,
    VerificationOutcome,
    parse_pos_verification,
    person_ref,
)
from sync_server.commands import issue_command
from sync_server.db import steps
from sync_server.db.models import (
    CommandState,
    Device,
    IssuedCommand,
    PosVerification,
    ProxyRelation,
    ProxyRelationshipRow,
    Purchase,
    PurchaseLine,
    PurchaseTraceCode,
    PurchaseVerificationState,
)
from sync_server.db.statements import InsertIfNew
from sync_server.db.steps import Steps, run_steps
from sync_server.masking import mask_id_number, mask_name
from sync_server.signed_records import verify_signed_record

logger = logging.getLogger(__name__)

NOTICE_TTL_S: Final = 24 * 3600.0
"""A relationship notice waits a day for a terminal that is off; the terminal fetches the whole set at start anyway."""
MAX_LINES: Final = 200
MAX_TRACE_CODES: Final = 1000


class PurchaseError(Exception):
    """A purchase or relationship request the rules refuse."""


class PurchaseNotFoundError(PurchaseError):
    """No such purchase or relationship in the caller's institution."""


class PurchaseConflictError(PurchaseError):
    """The request contradicts what is stored (a different body for a settlement number already registered; an
    active relationship for the same pair with other terms)."""


class PurchaseInvalidError(PurchaseError):
    """The request names something that does not exist for the caller (an unknown relationship id)."""


# ---------------------------------------------------------------------------------------------------- the contract

_Code = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z_-]+$")]
_CertType = Annotated[str, Field(pattern=r"^[0-9]{2,3}$", description="证件类型 (psn_cert_type, C3; 01 = 居民身份证).")]
_ID_WEIGHTS: Final = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def _id_number_ok(number: str) -> bool:
    """18 characters, 17 digits and the GB 11643 (ISO 7064 MOD 11-2) check character."""
    if len(number) != 18 or not number[:17].isascii() or not number[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS, strict=True))
    return "10X98765432"[total % 11] == number[17]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PersonIn(_In):
    """A person as HIS knows them. Stored as `person_ref` + masked number + masked name only."""

    psn_cert_type: _CertType = "01"
    certno: str | None = Field(
        default=None,
        min_length=1,
        max_length=20,
        pattern=r"^[0-9A-Za-z]+$",
        description="证件号码 (C20); turned into person_ref and a mask, never stored.",
    )
    person_ref: PersonRef | None = Field(default=None, description="As the kiosk returned it (instead of certno).")
    psn_name: str | None = Field(default=None, min_length=1, max_length=50, description="人员姓名; stored masked.")

    @model_validator(mode="after")
    def _identified(self) -> Self:
        if self.certno is None and self.person_ref is None:
            raise ValueError("certno or person_ref is required")
        if self.certno is not None:
            if self.psn_cert_type == "01" and not _id_number_ok(self.certno.upper()):
                raise ValueError("certno is not a valid resident identity number")  # never the number itself
            if self.person_ref is not None and person_ref(self.psn_cert_type, self.certno) != self.person_ref:
                raise ValueError("person_ref does not belong to certno")
        return self

    def ref(self) -> str:
        if self.certno is not None:
            return person_ref(self.psn_cert_type, self.certno)
        if self.person_ref is None:
            raise ValueError("certno or person_ref is required")  # the validator already refused this
        return self.person_ref

    def masked_id(self) -> str | None:
        return None if self.certno is None else mask_id_number(self.certno.upper())

    def masked_name(self) -> str | None:
        return None if self.psn_name is None else mask_name(self.psn_name)


class AgentIn(PersonIn):
    """The proxy purchase's agent (代购人): `face` (registered, verified by face at the kiosk) or `manual` (a
    non-insured agent entered by hand, K-04: certno and name required)."""

    kind: AgentKind

    @model_validator(mode="after")
    def _manual_complete(self) -> Self:
        if self.kind is AgentKind.MANUAL and (self.certno is None or self.psn_name is None):
            raise ValueError("a manual agent needs certno and psn_name")
        return self


class ProxyIn(_In):
    agent: AgentIn
    relationship_id: str | None = Field(
        default=None,
        max_length=20,
        pattern=r"^[0-9]+$",
        description="The relationship the kiosk reported (face agents); looked up when absent.",
    )


class LineIn(_In):
    med_list_codg: str = Field(min_length=1, max_length=50, description="医保目录编码 / national drug code.")
    drug_name: str | None = Field(default=None, max_length=128, description="药品名称 (informational).")
    cnt: float = Field(gt=0, le=100000, description="数量 in sale units.")
    amount_fen: int = Field(ge=0, le=10**10, description="金额 in fen (分).")
    trace_codes: list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z]+$")]] = Field(
        default_factory=list, max_length=MAX_TRACE_CODES, description="药品追溯码 of the packages sold."
    )


_PURCHASE_EXAMPLE: Final[dict[str, Any]] = {
    "settlement_no": "SETL-20260301-000001",
    "transaction_code": "KIOSK-00120260301160000" + "0001",
    "settled_at": "2026-03-01T08:03:00+00:00",
    "buyer": {"psn_cert_type": "01", "certno": "11010519491231002X", "psn_name": "王小明"},
    "proxy": {"agent": {"kind": "manual", "psn_cert_type": "01", "certno": "110105198001010016", "psn_name": "李四"}},
    "lines": [
        {
            "med_list_codg": "XJ01CAA040A001010100534",
            "drug_name": "阿莫西林胶囊",
            "cnt": 2,
            "amount_fen": 2560,
            "trace_codes": ["81234567890123456789", "81234567890123456790"],
        }
    ],
}


class PurchaseIn(_In):
    """A settled purchase (proxy) registration (H-04)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [_PURCHASE_EXAMPLE]})

    settlement_no: _Code = Field(description="医保结算ID (setl_id, C64): unique per institution.")
    transaction_code: _Code = Field(description="交易流水号 the kiosk returned with the verification.")
    settled_at: AwareDatetime = Field(description="When the settlement succeeded.")
    buyer: PersonIn = Field(description="购药人: the insured person (the beneficiary for a proxy purchase).")
    proxy: ProxyIn | None = Field(default=None, description="代购: absent when the buyer bought in person.")
    lines: list[LineIn] = Field(min_length=1, max_length=MAX_LINES)

    @model_validator(mode="after")
    def _distinct_trace_codes(self) -> Self:
        codes = [c for line in self.lines for c in line.trace_codes]
        if len(codes) != len(set(codes)):
            raise ValueError("a traceability code appears twice in one purchase")
        if self.proxy is not None and self.proxy.agent.ref() == self.buyer.ref():
            raise ValueError("the agent of a proxy purchase cannot be the buyer")
        return self

    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.model_dump(mode="json"))).hexdigest()


class ProxyRelationshipIn(_In):
    """A proxy-purchase relationship (代购药关系) HIS registers for its institution (B-11)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "beneficiary": {"psn_cert_type": "01", "certno": "11010519491231002X", "psn_name": "王小明"},
                    "agent": {"psn_cert_type": "01", "certno": "110105198001010016", "psn_name": "王小红"},
                    "relation": "child",
                    "valid_from": "2026-03-01T00:00:00+00:00",
                    "valid_until": "2027-03-01T00:00:00+00:00",
                }
            ]
        },
    )

    beneficiary: PersonIn = Field(description="The insured person bought for (elderly, immobile).")
    agent: PersonIn = Field(description="The person allowed to buy for them (an enrolled agent buys by face).")
    relation: ProxyRelation
    valid_from: AwareDatetime | None = None
    valid_until: AwareDatetime | None = None

    @model_validator(mode="after")
    def _sane(self) -> Self:
        if self.beneficiary.ref() == self.agent.ref():
            raise ValueError("the agent cannot be the beneficiary")
        if self.valid_from is not None and self.valid_until is not None and self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be after valid_from")
        return self


# ---------------------------------------------------------------------------------------------------- ingest hook


@dataclass(frozen=True, slots=True)
class VerificationsRecorded:
    created: int
    refused: int
    linked: int


def _verified_record(session: Session, envelope: Envelope, payload: SignedRecord) -> PosVerificationRecord:
    verify_signed_record(session, envelope, payload)
    return parse_pos_verification(dict(payload.record))


def record_pos_verifications(
    session: Session, envelopes: Sequence[Envelope], *, now: datetime
) -> VerificationsRecorded:
    """Verification rows for the batch's verified `pos_verification` records (redeliveries ignored), and the
    pending purchases they back linked."""
    created = refused = linked = 0
    for envelope in envelopes:
        payload = envelope.payload
        if not isinstance(payload, SignedRecord) or payload.record_type is not SignedRecordKind.POS_VERIFICATION:
            continue
        if session.scalar(select(PosVerification.id).where(PosVerification.message_id == envelope.message_id)):
            continue
        try:
            record = _verified_record(session, envelope, payload)
        except ContractError as exc:
            refused += 1
            logger.warning("pos verification %s of %s refused: %s", envelope.message_id, envelope.device_id, exc)
            continue
        institution_id = session.scalar(select(Device.institution_id).where(Device.device_id == envelope.device_id))
        proxy = record.proxy
        row = PosVerification(
            message_id=envelope.message_id,
            device_id=envelope.device_id,
            institution_id=institution_id,
            verification_id=record.verification_id,
            client_id=record.client_id,
            transaction_code=record.transaction_code,
            method=record.method.value,
            check=record.check,
            outcome=record.outcome.value,
            reason=record.reason,
            buyer_ref=record.buyer_ref,
            buyer_masked_id=record.buyer_masked_id,
            buyer_cert_type=record.buyer_cert_type,
            insuplc_admdvs=record.insuplc_admdvs,
            proxy=proxy is not None,
            agent_kind=None if proxy is None else proxy.agent_kind.value,
            agent_ref=None if proxy is None else proxy.agent_ref,
            agent_masked_id=None if proxy is None else proxy.agent_masked_id,
            relationship_id=None if proxy is None else proxy.relationship_id,
            findings=[f.model_dump(mode="json") for f in record.findings],
            rules_version=record.rules_version,
            verified_at=record.verified_at,
            received_at=now,
            key_epoch=payload.key_epoch,
            signature=payload.signature,
        )
        try:
            with session.begin_nested():
                session.add(row)
                session.flush()
        except IntegrityError:
            # Another record already holds this transaction code: a replay under a new message id, or a forgery.
            refused += 1
            logger.warning(
                "pos verification %s of %s refused: its transaction code is already recorded",
                envelope.message_id,
                envelope.device_id,
            )
            continue
        created += 1
        if record.transaction_code is not None:
            waiting = session.scalars(
                select(Purchase)
                .where(
                    Purchase.transaction_code == record.transaction_code,
                    Purchase.pos_verification_id.is_(None),
                )
                .order_by(Purchase.id)
                .with_for_update()
            )
            for purchase in waiting:
                _link(session, purchase, row, now=now)
                linked += 1
    if created:
        session.flush()
    return VerificationsRecorded(created, refused, linked)


def _link(session: Session, purchase: Purchase, verification: PosVerification, *, now: datetime) -> None:
    """Tie `purchase` to `verification` and say whether the evidence backs it (the session's pending links are
    flushed first, so two purchases in one batch cannot both take one verification)."""
    note = _mismatch(purchase, verification)
    if note is None and session.scalar(_LINKED_ELSEWHERE, _linked_elsewhere(purchase, verification)) is not None:
        note = "code_reused"
    _set_link(purchase, verification, note, now)


def _mismatch(purchase: Purchase | PurchaseView, verification: PosVerification | LinkedVerification) -> str | None:
    """Why the kiosk's verification does not back the purchase, None when it does."""
    if verification.outcome != VerificationOutcome.VERIFIED.value:
        return "not_verified"
    if verification.institution_id != purchase.institution_id:
        return "other_institution"
    if verification.buyer_ref != purchase.buyer_ref:
        return "buyer_differs"
    if verification.proxy != purchase.proxy:
        return "proxy_differs"
    if purchase.proxy and verification.agent_ref != purchase.agent_ref:
        return "agent_differs"
    return None


_LINKED_ELSEWHERE = (
    select(Purchase.id)
    .where(
        Purchase.pos_verification_id == bindparam("verification_id"),
        Purchase.id != bindparam("purchase_id"),
        Purchase.verification_state == PurchaseVerificationState.LINKED,
    )
    .limit(1)
)


def _linked_elsewhere(
    purchase: Purchase | PurchaseView, verification: PosVerification | LinkedVerification
) -> dict[str, Any]:
    return {"verification_id": verification.id, "purchase_id": purchase.id}


def _set_link(
    purchase: Purchase | PurchaseView,
    verification: PosVerification | LinkedVerification,
    note: str | None,
    now: datetime,
) -> None:
    purchase.pos_verification_id = verification.id
    purchase.linked_at = now
    purchase.verification_state = (
        PurchaseVerificationState.LINKED if note is None else PurchaseVerificationState.MISMATCH
    )
    purchase.verification_note = note


_SET_LINK = (
    update(Purchase)
    .where(Purchase.id == bindparam("purchase_id"))
    .values(
        pos_verification_id=bindparam("pos_verification_id"),
        linked_at=bindparam("linked_at", type_=Purchase.linked_at.type),
        verification_state=bindparam("verification_state", type_=Purchase.verification_state.type),
        verification_note=bindparam("verification_note"),
    )
)


# ---------------------------------------------------------------------------------------------------- purchases


@dataclass(slots=True)
class PurchaseLineView:
    """A sale line as stored (the columns of `PurchaseLine` but its id)."""

    purchase_id: int
    line_no: int
    med_list_codg: str
    drug_name: str | None
    quantity: float
    amount_fen: int
    trace_codes: list[str]


@dataclass(slots=True)
class PurchaseView:
    """A purchase as stored: the columns of `Purchase` and its lines. HIS's registrations and reads build and answer
    these plain objects, not ORM instances (an ORM instance costs about a hundred times more to make; HIS's traffic
    is the server's bulk)."""

    id: int
    institution_id: int
    his_client: str
    settlement_no: str
    transaction_code: str
    settled_at: datetime
    buyer_ref: str
    buyer_cert_type: str
    buyer_masked_id: str | None
    buyer_masked_name: str | None
    proxy: bool
    agent_kind: str | None
    agent_ref: str | None
    agent_cert_type: str | None
    agent_masked_id: str | None
    agent_masked_name: str | None
    relationship_id: int | None
    total_amount_fen: int
    body_digest: str
    verification_state: PurchaseVerificationState
    verification_note: str | None
    pos_verification_id: int | None
    received_at: datetime
    linked_at: datetime | None
    reused_trace_codes: list[str]
    lines: list[PurchaseLineView] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LinkedVerification:
    """What a purchase's answer shows of the kiosk verification it is linked to, and what linking compares."""

    id: int
    device_id: str
    institution_id: int | None
    method: str
    check: str | None
    outcome: str
    verified_at: datetime
    proxy: bool
    agent_kind: str | None
    buyer_ref: str | None
    agent_ref: str | None


@dataclass(frozen=True, slots=True)
class Registered:
    purchase: PurchaseView
    created: bool
    verification: LinkedVerification | None = None
    """The kiosk verification the purchase is linked to, if any."""


def purchase_of(
    session: Session, institution_id: int, settlement_no: str
) -> tuple[PurchaseView, LinkedVerification | None]:
    return run_steps(session.connection(), purchase_steps(institution_id, settlement_no))


def purchase_steps(institution_id: int, settlement_no: str) -> Steps[tuple[PurchaseView, LinkedVerification | None]]:
    """The institution's purchase with this settlement number and its lines, and the kiosk verification it is linked
    to (if any), read by Core statements (not loaded into a session: HIS reads them often)."""
    row = yield steps.one(_PURCHASE_BY_NUMBER, {"institution_id": institution_id, "settlement_no": settlement_no})
    if row is None:
        raise PurchaseNotFoundError(f"no purchase with settlement number {settlement_no} in this institution")
    purchase = PurchaseView(**row)
    lines: list[dict[str, Any]] = yield steps.rows(_LINES_OF, {"purchase_id": purchase.id})
    purchase.lines = [PurchaseLineView(**line) for line in lines]
    linked = None
    if purchase.pos_verification_id is not None:
        found = yield steps.one(_VERIFICATION_BY_ID, {"verification_id": purchase.pos_verification_id})
        linked = None if found is None else LinkedVerification(**found)
    return purchase, linked


def _columns_of(table: Any, view: type[Any]) -> list[Any]:
    """The columns of `table` that the dataclass `view` holds, in its order."""
    return [table.c[f.name] for f in fields(view) if f.name in table.c]


_VERIFICATION_BY_ID = select(*_columns_of(PosVerification.__table__, LinkedVerification)).where(
    PosVerification.id == bindparam("verification_id")
)
_PURCHASE_BY_NUMBER = select(*_columns_of(Purchase.__table__, PurchaseView)).where(
    Purchase.institution_id == bindparam("institution_id"), Purchase.settlement_no == bindparam("settlement_no")
)
_LINES_OF = (
    select(*_columns_of(PurchaseLine.__table__, PurchaseLineView))
    .where(PurchaseLine.purchase_id == bindparam("purchase_id"))
    .order_by(PurchaseLine.line_no)
)


def _valid_at(when: datetime | ColumnElement[datetime]) -> list[Any]:
    return [
        ProxyRelationshipRow.ended_at.is_(None),
        or_(ProxyRelationshipRow.valid_from.is_(None), ProxyRelationshipRow.valid_from <= when),
        or_(ProxyRelationshipRow.valid_until.is_(None), ProxyRelationshipRow.valid_until > when),
    ]


_RELATIONSHIP_INSTITUTION = select(ProxyRelationshipRow.institution_id).where(
    ProxyRelationshipRow.id == bindparam("relationship_id")
)
_FACE_RELATIONSHIP = (
    select(ProxyRelationshipRow.id)
    .where(
        ProxyRelationshipRow.institution_id == bindparam("institution_id"),
        ProxyRelationshipRow.beneficiary_ref == bindparam("beneficiary_ref"),
        ProxyRelationshipRow.agent_ref == bindparam("agent_ref"),
        *_valid_at(bindparam("at", type_=ProxyRelationshipRow.valid_from.type)),
    )
    .order_by(ProxyRelationshipRow.id.desc())
    .limit(1)
)


def _relationship_steps(institution_id: int, body: PurchaseIn, beneficiary_ref: str) -> Steps[int | None]:
    """The registered proxy relationship the purchase names or (a face-verified agent) falls under, if any."""
    proxy = body.proxy
    if proxy is None:
        return None
    if proxy.relationship_id is not None:
        relationship_id = int(proxy.relationship_id)
        owner = yield steps.scalar(_RELATIONSHIP_INSTITUTION, {"relationship_id": relationship_id})
        if owner != institution_id:
            raise PurchaseInvalidError(f"proxy relationship {proxy.relationship_id} is not known to this institution")
        return relationship_id
    if proxy.agent.kind is not AgentKind.FACE:
        return None
    keys = {
        "institution_id": institution_id,
        "beneficiary_ref": beneficiary_ref,
        "agent_ref": proxy.agent.ref(),
        "at": body.settled_at,
    }
    found: int | None = yield steps.scalar(_FACE_RELATIONSHIP, keys)
    return found


def register_purchase(
    session: Session, institution_id: int, body: PurchaseIn, *, his_client: str, now: datetime
) -> Registered:
    return run_steps(
        session.connection(), register_purchase_steps(institution_id, body, his_client=his_client, now=now)
    )


def register_purchase_steps(
    institution_id: int, body: PurchaseIn, *, his_client: str, now: datetime
) -> Steps[Registered]:
    """Store the purchase (created=True) or return the one already registered with the same body (created=False);
    `PurchaseConflictError` when the settlement number is registered with a different body. Run in a transaction.

    HIS's bulk traffic: Core statements built once, no ORM unit of work (docs/benchmarks.md, "HIS interfaces under
    load"). The answer is built from what was stored, with the verification it was linked to."""
    digest = body.digest()
    buyer_ref = body.buyer.ref()
    relationship_id = yield from _relationship_steps(institution_id, body, buyer_ref)
    agent = None if body.proxy is None else body.proxy.agent
    values: dict[str, Any] = {
        "institution_id": institution_id,
        "his_client": his_client,
        "settlement_no": body.settlement_no,
        "transaction_code": body.transaction_code,
        "settled_at": body.settled_at,
        "buyer_ref": buyer_ref,
        "buyer_cert_type": body.buyer.psn_cert_type,
        "buyer_masked_id": body.buyer.masked_id(),
        "buyer_masked_name": body.buyer.masked_name(),
        "proxy": agent is not None,
        "agent_kind": None if agent is None else agent.kind.value,
        "agent_ref": None if agent is None else agent.ref(),
        "agent_cert_type": None if agent is None else agent.psn_cert_type,
        "agent_masked_id": None if agent is None else agent.masked_id(),
        "agent_masked_name": None if agent is None else agent.masked_name(),
        "relationship_id": relationship_id,
        "total_amount_fen": sum(line.amount_fen for line in body.lines),
        "body_digest": digest,
        "verification_state": PurchaseVerificationState.PENDING,
        "verification_note": None,
        "pos_verification_id": None,
        "received_at": now,
        "linked_at": None,
        "reused_trace_codes": [],
    }
    # Inserted first: a settlement number registered already (a replay, or another request a moment earlier: the
    # unique key) gives no id, and this request answers with what is stored.
    purchase_id: int | None = yield steps.scalar(_INSERT_PURCHASE, values)
    if purchase_id is None:
        keys = {"institution_id": institution_id, "settlement_no": body.settlement_no}
        if (yield steps.scalar(_STORED_BODY_DIGEST, keys)) != digest:
            raise PurchaseConflictError(
                f"settlement number {body.settlement_no} is already registered with different content"
            )
        stored, linked = yield from purchase_steps(institution_id, body.settlement_no)
        return Registered(stored, False, linked)
    purchase = PurchaseView(id=purchase_id, **values)
    purchase.lines = [
        PurchaseLineView(
            purchase_id=purchase_id,
            line_no=n,
            med_list_codg=line.med_list_codg,
            drug_name=line.drug_name,
            quantity=line.cnt,
            amount_fen=line.amount_fen,
            trace_codes=list(line.trace_codes),
        )
        for n, line in enumerate(body.lines, start=1)
    ]
    yield steps.execute(
        _INSERT_PURCHASE_LINES, [{c: getattr(line, c) for c in _LINE_COLUMNS} for line in purchase.lines]
    )
    purchase.reused_trace_codes = yield from _trace_code_steps(purchase_id, body)
    verification_id = yield steps.scalar(_VERIFICATION_OF, {"transaction_code": body.transaction_code})
    if verification_id is None:
        return Registered(purchase, True)
    found = yield steps.one(_VERIFICATION_BY_ID, {"verification_id": verification_id})
    if found is None:  # seen a moment ago in this transaction; verifications are never deleted
        raise PurchaseNotFoundError(f"the verification of purchase {body.settlement_no} vanished while linking")
    verification = LinkedVerification(**found)
    note = _mismatch(purchase, verification)
    if note is None and (yield steps.scalar(_LINKED_ELSEWHERE, _linked_elsewhere(purchase, verification))):
        note = "code_reused"
    _set_link(purchase, verification, note, now)
    yield steps.execute(
        _SET_LINK,
        {
            "purchase_id": purchase_id,
            "pos_verification_id": verification.id,
            "linked_at": now,
            "verification_state": purchase.verification_state,
            "verification_note": note,
        },
    )
    return Registered(purchase, True, verification)


_STORED_BODY_DIGEST = select(Purchase.body_digest).where(
    Purchase.institution_id == bindparam("institution_id"), Purchase.settlement_no == bindparam("settlement_no")
)
_LINE_COLUMNS: Final = tuple(c.key for c in PurchaseLine.__table__.columns if c.key != "id")
_INSERT_PURCHASE_LINES = insert(PurchaseLine)
_INSERT_TRACE_CODES = insert(PurchaseTraceCode)
_OTHER_SALES = aliased(PurchaseTraceCode)
_REUSED_TRACE_CODES = (
    select(PurchaseTraceCode.code)
    .distinct()
    .join(
        _OTHER_SALES,
        and_(_OTHER_SALES.code == PurchaseTraceCode.code, _OTHER_SALES.purchase_id != PurchaseTraceCode.purchase_id),
    )
    .where(PurchaseTraceCode.purchase_id == bindparam("purchase_id"))
    .order_by(PurchaseTraceCode.code)
)
_SET_REUSED = (
    update(Purchase)
    .where(Purchase.id == bindparam("purchase_id"))
    .values(reused_trace_codes=bindparam("reused", type_=Purchase.reused_trace_codes.type))
)
_VERIFICATION_OF = (
    select(PosVerification.id)
    .where(PosVerification.transaction_code == bindparam("transaction_code"))
    .order_by(PosVerification.id)
    .limit(1)
)
_INSERT_PURCHASE = InsertIfNew(Purchase, (Purchase.institution_id, Purchase.settlement_no), Purchase.id)


def _trace_code_steps(purchase_id: int, body: PurchaseIn) -> Steps[list[str]]:
    """Index the purchase's 追溯码 and return those an earlier purchase sold already (a package sold twice: returned
    stock resold, or a code copied onto another box), which are also stored on the purchase. Registered, not
    refused: the sale has happened."""
    sold = [(n, code) for n, line in enumerate(body.lines, start=1) for code in line.trace_codes]
    if not sold:
        return []
    yield steps.execute(
        _INSERT_TRACE_CODES, [{"purchase_id": purchase_id, "line_no": n, "code": code} for n, code in sold]
    )
    found: list[dict[str, Any]] = yield steps.rows(_REUSED_TRACE_CODES, {"purchase_id": purchase_id})
    reused = [row["code"] for row in found]
    if reused:
        yield steps.execute(_SET_REUSED, {"purchase_id": purchase_id, "reused": reused})
    return reused


# ---------------------------------------------------------------------------------------------------- relationships


def _notify_institution(session: Session, institution_id: int, *, now: datetime) -> list[IssuedCommand]:
    """One `proxy_relationships` notice per terminal of the institution, unless one is still on its way."""
    devices = list(session.scalars(select(Device.device_id).where(Device.institution_id == institution_id)))
    if not devices:
        return []
    waiting = set(
        session.scalars(
            select(IssuedCommand.device_id).where(
                IssuedCommand.device_id.in_(devices),
                IssuedCommand.kind == CommandKind.PROXY_RELATIONSHIPS.value,
                IssuedCommand.state.in_([CommandState.QUEUED, CommandState.DELIVERED]),
                IssuedCommand.expires_at > now,
            )
        )
    )
    args = ProxyRelationshipsArgs(changed_at=now.isoformat()).model_dump()
    return [
        issue_command(
            session, device_id=d, kind=CommandKind.PROXY_RELATIONSHIPS, args=args, ttl_s=NOTICE_TTL_S, now=now
        )
        for d in sorted(set(devices) - waiting)
    ]


@dataclass(frozen=True, slots=True)
class RelationshipChange:
    relationship: ProxyRelationshipRow
    changed: bool
    notices: list[IssuedCommand]


def register_relationship(
    session: Session, institution_id: int, body: ProxyRelationshipIn, *, his_client: str, now: datetime
) -> RelationshipChange:
    """Register the relationship (changed=True) or return the identical active one (changed=False);
    `PurchaseConflictError` when the pair has an active relationship with other terms."""
    beneficiary_ref, agent_ref = body.beneficiary.ref(), body.agent.ref()
    active = session.scalar(
        select(ProxyRelationshipRow)
        .where(
            ProxyRelationshipRow.institution_id == institution_id,
            ProxyRelationshipRow.beneficiary_ref == beneficiary_ref,
            ProxyRelationshipRow.agent_ref == agent_ref,
            ProxyRelationshipRow.ended_at.is_(None),
        )
        .with_for_update()
    )
    if active is not None:
        same = (active.relation, _utc(active.valid_from), _utc(active.valid_until)) == (
            body.relation,
            _utc(body.valid_from),
            _utc(body.valid_until),
        )
        if not same:
            raise PurchaseConflictError(
                f"proxy relationship {active.id} of this beneficiary and agent is active with other terms; end it first"
            )
        return RelationshipChange(active, False, [])
    row = ProxyRelationshipRow(
        institution_id=institution_id,
        beneficiary_ref=beneficiary_ref,
        beneficiary_cert_type=body.beneficiary.psn_cert_type,
        beneficiary_masked_id=body.beneficiary.masked_id(),
        beneficiary_masked_name=body.beneficiary.masked_name(),
        agent_ref=agent_ref,
        agent_cert_type=body.agent.psn_cert_type,
        agent_masked_id=body.agent.masked_id(),
        agent_masked_name=body.agent.masked_name(),
        relation=body.relation,
        valid_from=body.valid_from,
        valid_until=body.valid_until,
        created_at=now,
        created_by=his_client,
    )
    session.add(row)
    session.flush()
    return RelationshipChange(row, True, _notify_institution(session, institution_id, now=now))


def end_relationship(
    session: Session, institution_id: int, relationship_id: int, *, his_client: str, now: datetime
) -> RelationshipChange:
    """End the relationship (changed=True), or return it unchanged when it has ended already."""
    row = session.get(ProxyRelationshipRow, relationship_id, with_for_update=True)
    if row is None or row.institution_id != institution_id:
        raise PurchaseNotFoundError(f"proxy relationship {relationship_id} is not known to this institution")
    if row.ended_at is not None:
        return RelationshipChange(row, False, [])
    row.ended_at, row.ended_by = now, his_client
    session.flush()
    return RelationshipChange(row, True, _notify_institution(session, institution_id, now=now))


def active_relationships(
    session: Session, institution_id: int, *, now: datetime, limit: int, offset: int
) -> tuple[list[ProxyRelationshipRow], int]:
    """The institution's relationships not ended and not expired at `now` (future ones included), by id."""
    scope = and_(
        ProxyRelationshipRow.institution_id == institution_id,
        ProxyRelationshipRow.ended_at.is_(None),
        or_(ProxyRelationshipRow.valid_until.is_(None), ProxyRelationshipRow.valid_until > now),
    )
    total = session.scalar(select(func.count()).select_from(ProxyRelationshipRow).where(scope)) or 0
    rows = session.scalars(
        select(ProxyRelationshipRow).where(scope).order_by(ProxyRelationshipRow.id).limit(limit).offset(offset)
    )
    return list(rows), total


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def purchase_history(
    session: Session, person_ref: str, *, since: datetime, limit: int = MAX_HISTORY_LINES
) -> tuple[list[tuple[int, datetime, str, float]], bool]:
    """A person's registered purchase lines settled at or after `since`, at every institution, newest first: (purchase
    id, settled at, 医保目录编码, quantity), at most `limit`, and whether that is all of them (period rules, P-06)."""
    rows = session.execute(
        select(Purchase.id, Purchase.settled_at, PurchaseLine.med_list_codg, PurchaseLine.quantity)
        .join(PurchaseLine, PurchaseLine.purchase_id == Purchase.id)
        .where(Purchase.buyer_ref == person_ref, Purchase.settled_at >= since)
        .order_by(Purchase.settled_at.desc(), Purchase.id.desc(), PurchaseLine.line_no)
        .limit(limit + 1)
    ).all()
    lines = [(int(r[0]), r[1], str(r[2]), float(r[3])) for r in rows[:limit]]
    return lines, len(rows) <= limit
