"""The record inside a `pos_verification` SignedRecord (H-03, K-03…K-07, E-09): what the kiosk vouches for when the
pharmacy POS asked it to verify a buyer, and `person_ref`, the pseudonymous reference both sides use for people.

The terminal's POS API (`terminal.pos_api`) signs one record per finished verification (verified, refused or
cancelled) with its SM2 identity key (`protocol.evidence`); the server verifies the signature before the record
becomes a verification row, links it to the purchase HIS registers with the same transaction code (交易流水号), and
keeps the signature so the evidence can be checked again later.

A record carries the transaction code, how the buyer was verified, the buyer's `person_ref` and MASKED certificate
number, for a proxy purchase (代购) the beneficiary's reference, how the agent was established (`face`: a live face
matched an agent registered for the beneficiary; `manual`: a non-insured agent entered by hand at the POS, K-04), the
agent's reference and masked number, the relationship id, the outcome and the instant. Never a name, a full ID number,
a phone number or a face image or template.

This module owns the record's shape, `parse_pos_verification` and `person_ref`. It must never carry raw personal data.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocol.envelope import ContractError, summarise_validation_error
from protocol.gm.sm3 import hmac_sm3

PERSON_REF_DOMAIN = b"yibao/person-ref/v1"
"""Key of the keyed digest behind `person_ref`. A fixed, public domain separator: the reference is pseudonymous
(it hides the number from logs and records), not anonymous (anyone holding a number can compute its reference)."""

PERSON_REF_PATTERN = r"^[0-9a-f]{32}$"


def person_ref(cert_type: str, cert_number: str) -> str:
    """The pseudonymous reference of a person: 32 hex digits of HMAC-SM3 over "type:NUMBER" (number stripped and
    upper-cased, so an 'x' check character matches an 'X'). Terminal and server compute it the same way."""
    data = f"{cert_type}:{cert_number.strip().upper()}".encode()
    return hmac_sm3(PERSON_REF_DOMAIN, data).hex()[:32]


PersonRef = Annotated[str, Field(pattern=PERSON_REF_PATTERN, description="`person_ref`: 32 lower-case hex digits.")]
MaskedId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=32,
        pattern=r"^[^*]{0,6}\*+[^*]{0,4}$",
        description="证件号码, masked (at most 6 leading and 4 trailing characters in clear).",
    ),
]
CertType = Annotated[str, Field(pattern=r"^[0-9]{2,3}$", description="证件类型 (psn_cert_type, C3; 01 = 居民身份证).")]


class VerificationMethod(StrEnum):
    """How the buyer proved identity at the kiosk (the POS API's `method`)."""

    EVOUCHER = "evoucher"
    """医保电子凭证 (医保码) on the QR scanner, vouched for by the national platform."""
    ID_CARD_FACE = "id_card_face"
    SS_CARD_FACE = "ss_card_face"


class AgentKind(StrEnum):
    """How a proxy purchase's agent (代购人) was established."""

    FACE = "face"
    """The agent's live face matched an enrolled agent registered for the beneficiary (K-05)."""
    MANUAL = "manual"
    """A non-insured agent entered by hand at the POS (K-04): no relationship, reviewed by supervision."""


class VerificationOutcome(StrEnum):
    VERIFIED = "verified"
    REFUSED = "refused"
    CANCELLED = "cancelled"


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProxyEvidence(_Closed):
    """The proxy part of a verification: who was bought for, and how the agent was established."""

    beneficiary_ref: PersonRef = Field(description="The insured person bought for (the record's buyer).")
    agent_kind: AgentKind
    agent_ref: PersonRef | None = Field(default=None, description="The agent, when established (face or manual).")
    agent_masked_id: MaskedId | None = Field(default=None, description="Manual agents only: the masked number.")
    agent_cert_type: CertType | None = Field(default=None, description="Manual agents only.")
    relationship_id: str | None = Field(
        default=None, max_length=64, description="The server's id of the registered relationship (face agents)."
    )


class RuleFindingRef(_Closed):
    """A drug-usage rule the purchase's lines hit at verification time (the rule's id and action only)."""

    rule_id: str = Field(min_length=1, max_length=64)
    action: str = Field(min_length=1, max_length=16, description="warn | block (protocol.drug_rules.RuleAction).")


class PosVerificationRecord(_Closed):
    """The signed content of one finished POS verification."""

    verification_id: str = Field(min_length=1, max_length=64, description="The kiosk's id of the verification.")
    client_id: str = Field(min_length=1, max_length=64, description="The POS client that asked.")
    transaction_code: str | None = Field(
        default=None, min_length=1, max_length=64, description="交易流水号; set when (and only when) verified."
    )
    method: VerificationMethod
    check: str | None = Field(default=None, max_length=64, description="What exactly was verified (docs/pos-api.md).")
    outcome: VerificationOutcome
    reason: str | None = Field(default=None, max_length=64, description="Why refused or cancelled.")
    buyer_ref: PersonRef | None = Field(default=None, description="The verified person (the beneficiary for proxy).")
    buyer_masked_id: MaskedId | None = None
    buyer_cert_type: CertType | None = None
    insuplc_admdvs: str | None = Field(default=None, pattern=r"^[0-9]{6}$", description="参保地医保区划 when known.")
    proxy: ProxyEvidence | None = None
    findings: list[RuleFindingRef] = Field(default_factory=list, max_length=64)
    rules_version: int | None = Field(default=None, ge=1, description="The drug-rule set evaluated, if any.")
    verified_at: AwareDatetime = Field(description="Terminal wall clock when the verification finished.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        verified = self.outcome is VerificationOutcome.VERIFIED
        if verified != (self.transaction_code is not None):
            raise ValueError("a transaction code is set exactly when the outcome is verified")
        if verified and self.buyer_ref is None:
            raise ValueError("a verified record names the buyer's reference")
        if self.proxy is not None:
            if self.buyer_ref is not None and self.proxy.beneficiary_ref != self.buyer_ref:
                raise ValueError("the beneficiary of a proxy purchase is the verified buyer")
            if verified and self.proxy.agent_ref is None:
                raise ValueError("a verified proxy purchase names the agent's reference")
        return self

    def to_record(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_pos_verification(record: dict[str, Any]) -> PosVerificationRecord:
    """The verification in a verified signed record, or `ContractError` naming what is wrong (never a value)."""
    try:
        return PosVerificationRecord.model_validate(record)
    except ValidationError as exc:
        raise ContractError(f"invalid pos verification: {summarise_validation_error(exc)}") from exc


# ---------------------------------------------------------------------- purchase history (period rules, K-35)

MAX_HISTORY_LINES: Final = 500
MAX_HISTORY_DAYS: Final = 183
"""About six months (K-35: the patient's prescription-drug records of the last 6 months)."""


class PurchaseHistoryLine(_Closed):
    """One line of a registered purchase: what was sold, when, in how many sale units."""

    purchase_id: int = Field(ge=1, description="The server's purchase id (lines of one purchase share it).")
    settled_at: AwareDatetime
    med_list_codg: str = Field(min_length=1, max_length=50, description="医保目录编码.")
    quantity: float = Field(ge=0, description="数量 in sale units.")


class PurchaseHistory(_Closed):
    """`GET /device/v1/purchase-history`: a person's registered purchases since `since`, at every institution,
    newest first. `complete` is false when more lines than `MAX_HISTORY_LINES` exist (the oldest are left out)."""

    type: Literal["purchase_history"] = "purchase_history"
    person_ref: PersonRef
    since: AwareDatetime
    lines: list[PurchaseHistoryLine] = Field(max_length=MAX_HISTORY_LINES)
    complete: bool


def parse_purchase_history(raw: Any) -> PurchaseHistory:
    """The server's purchase history (decoded JSON), or `ContractError`."""
    try:
        return PurchaseHistory.model_validate(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid purchase history: {summarise_validation_error(exc)}") from exc
