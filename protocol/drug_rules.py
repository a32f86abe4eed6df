"""The drug-usage knowledge base (药品用量知识库, REQUIREMENTS B-09/B-10/E-14) and its evaluation engine (F-08, F-09,
P-05, R-11, K-26).

The regulator maintains rules about key drugs; the server publishes them as a versioned `DrugRuleSet` (always whole:
a few hundred rules are a few tens of kilobytes), terminals store it and evaluate every proposed review or purchase
offline with `evaluate`. A rule selects drugs (`DrugSelector`: national drug codes and/or generic names) and says
what is allowed; its `action` says whether a breach warns (the pharmacist may go on, and the override is logged by
the caller) or blocks.

Rule kinds (`RuleKind`) and their exact boundaries ("the period" is the half-open window (at − P days, at]):

=============================  =====================================================================================
max_quantity_per_purchase      Σ quantity of matching lines in this purchase > max_quantity
max_quantity_per_period        Σ matching quantity in the period's history + this purchase > max_quantity
max_days_supply_per_period     Σ matching days' supply in the period's history + this purchase > max_days
max_purchases_per_period       distinct earlier purchases with a matching line in the period + 1 > max_purchases
max_amount_per_purchase        Σ amount (fen) of matching lines in this purchase > max_amount_fen
age_range                      age < min_age_years or age > max_age_years (both bounds inclusive)
sex_restriction                sex ≠ allowed_sex
prescription_required          a matching line and no prescription
combination_limit              distinct generic names among matching lines in this purchase > max_distinct
early_refill                   at < (latest end of supply of a matching earlier line) − grace_days   (F-09)
=============================  =====================================================================================

A fact the rule needs but the proposal lacks (age, sex, days' supply, amount) never passes silently: it yields a
`warn` finding saying the rule could not be checked.

Messages are written from the rule alone (its title and parameters), never from the person: the same breach of the
same rule reads the same for everybody, so a message can be shown, logged and synced without carrying personal data.
What was observed (a total, a count) is in the finding's numeric `observed` field, for the screen and for R-11.

This module owns the rule model, the rule-set hash and the engine. The engine is pure and deterministic: no I/O, no
clock (the proposal carries its instant), no randomness; the same input gives the same findings in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Final, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from protocol.envelope import ContractError, summarise_validation_error
from protocol.gm.records import canonical_json
from protocol.gm.sm3 import sm3_digest

RULES_SCHEMA_VERSION: Final = 1
RULES_HASH_PURPOSE: Final = "yibao-drug-rules-v1"
MAX_RULES: Final = 5000
MAX_RULE_SET_BYTES: Final = 8 * 1024 * 1024

_DrugCode = Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9]{9,29}$")]
_GenericName = Annotated[str, Field(min_length=1, max_length=128)]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleKind(StrEnum):
    MAX_QUANTITY_PER_PURCHASE = "max_quantity_per_purchase"
    MAX_QUANTITY_PER_PERIOD = "max_quantity_per_period"
    MAX_DAYS_SUPPLY_PER_PERIOD = "max_days_supply_per_period"
    MAX_PURCHASES_PER_PERIOD = "max_purchases_per_period"
    MAX_AMOUNT_PER_PURCHASE = "max_amount_per_purchase"
    AGE_RANGE = "age_range"
    SEX_RESTRICTION = "sex_restriction"
    PRESCRIPTION_REQUIRED = "prescription_required"
    COMBINATION_LIMIT = "combination_limit"
    EARLY_REFILL = "early_refill"


class RuleAction(StrEnum):
    """What a breach does (F-32's first two actions; the rest are server-side)."""

    WARN = "warn"
    """Shown; the pharmacist or cashier may go on, and the caller records that they did."""
    BLOCK = "block"
    """The terminal refuses to go on (review cannot approve, purchase cannot be registered)."""


class RuleStage(StrEnum):
    """Where a rule is evaluated (P-05: at review; R-11/K-26: at purchase)."""

    REVIEW = "review"
    PURCHASE = "purchase"


class Sex(StrEnum):
    """性别 (字典 gend)."""

    MALE = "1"
    FEMALE = "2"


class DrugSelector(_Closed):
    """Which drugs a rule is about: any listed national drug code, or any product of a listed generic name."""

    drug_codes: list[_DrugCode] = Field(default_factory=list, max_length=1000)
    generic_names: list[_GenericName] = Field(default_factory=list, max_length=200)

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if not self.drug_codes and not self.generic_names:
            raise ValueError("a drug selector names at least one drug code or generic name")
        return self

    def matches(self, drug_code: str, generic_name: str) -> bool:
        return drug_code in self.drug_codes or generic_name in self.generic_names


class _Rule(_Closed):
    rule_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Stable id, cited by findings.")
    title: str = Field(
        min_length=1, max_length=64, description="What the rule is about, in Chinese, e.g. '复方甘草片'. No people."
    )
    title_en: str = Field(min_length=1, max_length=64, description="The same in English, e.g. 'compound liquorice'.")
    drugs: DrugSelector
    action: RuleAction
    stages: list[RuleStage] = Field(
        default_factory=lambda: [RuleStage.REVIEW, RuleStage.PURCHASE], min_length=1, max_length=2
    )
    basis: str = Field(default="", max_length=256, description="Why (policy document, 说明书), for the regulator.")


class MaxQuantityPerPurchase(_Rule):
    kind: Literal["max_quantity_per_purchase"] = "max_quantity_per_purchase"
    max_quantity: int = Field(ge=1, description="Sale units (DrugEntry.unit) allowed in one purchase.")


class MaxQuantityPerPeriod(_Rule):
    kind: Literal["max_quantity_per_period"] = "max_quantity_per_period"
    period_days: int = Field(ge=1, le=3660)
    max_quantity: int = Field(ge=1)


class MaxDaysSupplyPerPeriod(_Rule):
    kind: Literal["max_days_supply_per_period"] = "max_days_supply_per_period"
    period_days: int = Field(ge=1, le=3660)
    max_days: int = Field(ge=1)


class MaxPurchasesPerPeriod(_Rule):
    kind: Literal["max_purchases_per_period"] = "max_purchases_per_period"
    period_days: int = Field(ge=1, le=3660)
    max_purchases: int = Field(ge=1)


class MaxAmountPerPurchase(_Rule):
    kind: Literal["max_amount_per_purchase"] = "max_amount_per_purchase"
    max_amount_fen: int = Field(ge=1)


class AgeRange(_Rule):
    kind: Literal["age_range"] = "age_range"
    min_age_years: int | None = Field(default=None, ge=0, le=150)
    max_age_years: int | None = Field(default=None, ge=0, le=150)

    @model_validator(mode="after")
    def _a_bound(self) -> Self:
        if self.min_age_years is None and self.max_age_years is None:
            raise ValueError("an age rule has a lower or an upper bound")
        if (
            self.min_age_years is not None
            and self.max_age_years is not None
            and self.min_age_years > self.max_age_years
        ):
            raise ValueError("min_age_years is above max_age_years")
        return self


class SexRestriction(_Rule):
    kind: Literal["sex_restriction"] = "sex_restriction"
    allowed_sex: Sex


class PrescriptionRequired(_Rule):
    kind: Literal["prescription_required"] = "prescription_required"


class CombinationLimit(_Rule):
    kind: Literal["combination_limit"] = "combination_limit"
    max_distinct: int = Field(ge=1, description="Distinct generic names of the selection allowed in one purchase.")


class EarlyRefill(_Rule):
    kind: Literal["early_refill"] = "early_refill"
    grace_days: int = Field(default=3, ge=0, le=365, description="000:884 uses 3 days.")


DrugRule = Annotated[
    MaxQuantityPerPurchase
    | MaxQuantityPerPeriod
    | MaxDaysSupplyPerPeriod
    | MaxPurchasesPerPeriod
    | MaxAmountPerPurchase
    | AgeRange
    | SexRestriction
    | PrescriptionRequired
    | CombinationLimit
    | EarlyRefill,
    Field(discriminator="kind"),
]
AnyRule = (
    MaxQuantityPerPurchase
    | MaxQuantityPerPeriod
    | MaxDaysSupplyPerPeriod
    | MaxPurchasesPerPeriod
    | MaxAmountPerPurchase
    | AgeRange
    | SexRestriction
    | PrescriptionRequired
    | CombinationLimit
    | EarlyRefill
)


def rules_hash(version: int, rules: Iterable[AnyRule]) -> str:
    """SM3 over the canonical JSON of the purpose, the version and the rules sorted by id: lowercase hex."""
    body = {
        "purpose": RULES_HASH_PURPOSE,
        "version": version,
        "rules": sorted((r.model_dump(mode="json") for r in rules), key=lambda d: str(d["rule_id"])),
    }
    return sm3_digest(canonical_json(body)).hex()


class DrugRuleSet(_Closed):
    """The whole knowledge base at one version, as the server publishes it and a terminal stores it."""

    schema_version: Literal[1] = Field(default=RULES_SCHEMA_VERSION)
    type: Literal["drug_rule_set"] = "drug_rule_set"
    version: int = Field(ge=1)
    published_at: AwareDatetime
    content_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="`rules_hash(version, rules)`.")
    rules: list[DrugRule] = Field(max_length=MAX_RULES)

    @model_validator(mode="after")
    def _unique_ids(self) -> Self:
        ids = [r.rule_id for r in self.rules]
        if len(set(ids)) != len(ids):
            raise ValueError("rule ids are not unique")
        return self

    @classmethod
    def build(cls, version: int, rules: Sequence[AnyRule], published_at: AwareDatetime) -> DrugRuleSet:
        return cls(
            version=version, published_at=published_at, content_hash=rules_hash(version, rules), rules=list(rules)
        )

    def verify_hash(self) -> None:
        if rules_hash(self.version, self.rules) != self.content_hash:
            raise ContractError(f"drug rule set v{self.version}: content hash does not match its rules")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class DrugRulesNotice(_Closed):
    """'Rule set version N is published': flat and small, so it fits a downlink command's arguments. The terminal
    then fetches the whole set (over HTTPS) unless it already holds that version and hash."""

    schema_version: Literal[1] = Field(default=RULES_SCHEMA_VERSION)
    type: Literal["drug_rules_version"] = "drug_rules_version"
    version: int = Field(ge=1)
    content_hash: str = Field(pattern=r"^[0-9a-f]{64}$")


_RULE_SET: Final[TypeAdapter[DrugRuleSet]] = TypeAdapter(DrugRuleSet)


def decode_rule_set(raw: bytes) -> DrugRuleSet:
    """Parse a rule-set document and check its hash, or raise `ContractError`."""
    if len(raw) > MAX_RULE_SET_BYTES:
        raise ContractError(f"drug rule set of {len(raw)} bytes exceeds {MAX_RULE_SET_BYTES}")
    try:
        rule_set = _RULE_SET.validate_json(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid drug rule set: {summarise_validation_error(exc)}") from exc
    rule_set.verify_hash()
    return rule_set


# ------------------------------------------------------------------------------------------------------ the engine


@dataclass(frozen=True)
class PersonFacts:
    """The only facts about the person the engine sees: age in whole years and sex, each possibly unknown."""

    age_years: int | None
    sex: Sex | None


@dataclass(frozen=True)
class ProposedLine:
    """One drug line of the purchase or prescription under review."""

    drug_code: str
    generic_name: str
    quantity: int
    """In sale units (DrugEntry.unit)."""
    days_supply: int | None = None
    """用药天数, when the prescription or the cashier gives it."""
    amount_fen: int | None = None


@dataclass(frozen=True)
class HistoryLine:
    """One line of an earlier purchase by the same person (local outbox records or a server lookback, K-35)."""

    purchase_ref: str
    """Identifies the earlier purchase (lines of one purchase share it); any opaque string."""
    at: datetime
    drug_code: str
    generic_name: str
    quantity: int
    days_supply: int | None = None


@dataclass(frozen=True)
class Proposal:
    stage: RuleStage
    at: datetime
    """The instant of the proposed purchase/review (the caller's clock): history windows end here."""
    person: PersonFacts
    lines: tuple[ProposedLine, ...]
    has_prescription: bool
    history: tuple[HistoryLine, ...] = ()
    """Earlier purchases of the same person, never this proposal's own lines (a purchase after its review must not
    count its reviewed lines twice)."""


@dataclass(frozen=True)
class Finding:
    """One rule hit. `message_zh`/`message_en` come from the rule only; `observed` is what tripped it."""

    rule_id: str
    rule_kind: RuleKind
    action: RuleAction
    drug_codes: tuple[str, ...]
    message_zh: str
    message_en: str
    limit: int | None = None
    observed: int | None = None
    checkable: bool = True
    """False when a needed fact was missing: the finding then only warns that the rule could not be checked."""


@dataclass(frozen=True)
class Evaluation:
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def blocked(self) -> bool:
        return any(f.action is RuleAction.BLOCK for f in self.findings)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.action is RuleAction.WARN)

    @property
    def blocks(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.action is RuleAction.BLOCK)


def _unchecked(rule: AnyRule, codes: tuple[str, ...], what_zh: str, what_en: str) -> Finding:
    return Finding(
        rule_id=rule.rule_id,
        rule_kind=RuleKind(rule.kind),
        action=RuleAction.WARN,
        drug_codes=codes,
        message_zh=f"【{rule.title}】{what_zh}未知，无法核对本规则，请人工确认。",
        message_en=f"[{rule.title_en}] {what_en} unknown: this rule could not be checked; confirm by hand.",
        checkable=False,
    )


def _hit(rule: AnyRule, codes: tuple[str, ...], zh: str, en: str, limit: int | None, observed: int | None) -> Finding:
    verb_zh = "禁止" if rule.action is RuleAction.BLOCK else "提醒"
    verb_en = "blocked" if rule.action is RuleAction.BLOCK else "warning"
    return Finding(
        rule_id=rule.rule_id,
        rule_kind=RuleKind(rule.kind),
        action=rule.action,
        drug_codes=codes,
        message_zh=f"【{rule.title}】{zh}（{verb_zh}）",
        message_en=f"[{rule.title_en}] {en} ({verb_en})",
        limit=limit,
        observed=observed,
    )


def _in_window(proposal: Proposal, period_days: int, rule: AnyRule) -> list[HistoryLine]:
    start = proposal.at - timedelta(days=period_days)
    return [
        h for h in proposal.history if start < h.at <= proposal.at and rule.drugs.matches(h.drug_code, h.generic_name)
    ]


def _evaluate_rule(rule: AnyRule, proposal: Proposal) -> Finding | None:
    lines = [ln for ln in proposal.lines if rule.drugs.matches(ln.drug_code, ln.generic_name)]
    if not lines or proposal.stage not in rule.stages:
        return None
    codes = tuple(sorted({ln.drug_code for ln in lines}))
    match rule:
        case MaxQuantityPerPurchase():
            total = sum(ln.quantity for ln in lines)
            if total > rule.max_quantity:
                return _hit(
                    rule,
                    codes,
                    f"单次购药数量超过上限 {rule.max_quantity}",
                    f"quantity in one purchase above the limit of {rule.max_quantity}",
                    rule.max_quantity,
                    total,
                )
        case MaxQuantityPerPeriod():
            total = sum(h.quantity for h in _in_window(proposal, rule.period_days, rule)) + sum(
                ln.quantity for ln in lines
            )
            if total > rule.max_quantity:
                return _hit(
                    rule,
                    codes,
                    f"{rule.period_days} 日内累计购药数量超过上限 {rule.max_quantity}",
                    f"quantity over {rule.period_days} days above the limit of {rule.max_quantity}",
                    rule.max_quantity,
                    total,
                )
        case MaxDaysSupplyPerPeriod():
            if any(ln.days_supply is None for ln in lines):
                return _unchecked(rule, codes, "用药天数", "days' supply")
            total = sum(h.days_supply or 0 for h in _in_window(proposal, rule.period_days, rule)) + sum(
                ln.days_supply or 0 for ln in lines
            )
            if total > rule.max_days:
                return _hit(
                    rule,
                    codes,
                    f"{rule.period_days} 日内累计用药天数超过上限 {rule.max_days} 天",
                    f"days' supply over {rule.period_days} days above the limit of {rule.max_days}",
                    rule.max_days,
                    total,
                )
        case MaxPurchasesPerPeriod():
            earlier = {h.purchase_ref for h in _in_window(proposal, rule.period_days, rule)}
            count = len(earlier) + 1
            if count > rule.max_purchases:
                return _hit(
                    rule,
                    codes,
                    f"{rule.period_days} 日内购药次数超过上限 {rule.max_purchases} 次",
                    f"purchases over {rule.period_days} days above the limit of {rule.max_purchases}",
                    rule.max_purchases,
                    count,
                )
        case MaxAmountPerPurchase():
            if any(ln.amount_fen is None for ln in lines):
                return _unchecked(rule, codes, "金额", "amount")
            total = sum(ln.amount_fen or 0 for ln in lines)
            if total > rule.max_amount_fen:
                return _hit(
                    rule,
                    codes,
                    f"单次购药金额超过上限 {rule.max_amount_fen / 100:.2f} 元",
                    f"amount in one purchase above the limit of {rule.max_amount_fen / 100:.2f} yuan",
                    rule.max_amount_fen,
                    total,
                )
        case AgeRange():
            age = proposal.person.age_years
            if age is None:
                return _unchecked(rule, codes, "年龄", "age")
            low, high = rule.min_age_years, rule.max_age_years
            if (low is not None and age < low) or (high is not None and age > high):
                span_zh = f"{low if low is not None else 0} 至 {high} 岁" if high is not None else f"{low} 岁及以上"
                span_en = f"aged {low if low is not None else 0} to {high}" if high is not None else f"aged {low}+"
                return _hit(rule, codes, f"仅限 {span_zh} 使用", f"only for people {span_en}", None, None)
        case SexRestriction():
            sex = proposal.person.sex
            if sex is None:
                return _unchecked(rule, codes, "性别", "sex")
            if sex is not rule.allowed_sex:
                only_zh = "男性" if rule.allowed_sex is Sex.MALE else "女性"
                only_en = "men" if rule.allowed_sex is Sex.MALE else "women"
                return _hit(rule, codes, f"仅限{only_zh}使用", f"only for {only_en}", None, None)
        case PrescriptionRequired():
            if not proposal.has_prescription:
                return _hit(rule, codes, "须凭处方购买", "needs a prescription", None, None)
        case CombinationLimit():
            distinct = len({ln.generic_name for ln in lines})
            if distinct > rule.max_distinct:
                return _hit(
                    rule,
                    codes,
                    f"同次购药中同类药品不得超过 {rule.max_distinct} 种",
                    f"more than {rule.max_distinct} drug(s) of this group in one purchase",
                    rule.max_distinct,
                    distinct,
                )
        case EarlyRefill():
            ends = [
                h.at + timedelta(days=h.days_supply)
                for h in proposal.history
                if h.days_supply is not None and h.at <= proposal.at and rule.drugs.matches(h.drug_code, h.generic_name)
            ]
            if ends:
                allowed_from = max(ends) - timedelta(days=rule.grace_days)
                if proposal.at < allowed_from:
                    early_days = -((proposal.at - allowed_from) // timedelta(days=1))
                    return _hit(
                        rule,
                        codes,
                        f"上次所购药品尚未用完（允许提前 {rule.grace_days} 天）",
                        f"earlier supply not yet used up ({rule.grace_days} days' grace)",
                        rule.grace_days,
                        early_days,
                    )
    return None


def evaluate(rules: Iterable[AnyRule], proposal: Proposal) -> Evaluation:
    """Every finding of `rules` on `proposal`: blocks first, then warnings, each in rule-id order."""
    findings = [f for f in (_evaluate_rule(rule, proposal) for rule in rules) if f is not None]
    findings.sort(key=lambda f: (f.action is not RuleAction.BLOCK, f.rule_id))
    return Evaluation(tuple(findings))
