"""The drug-usage rule model and its engine: each rule kind at its boundary, missing facts, stages, ordering, the
rule-set hash, and messages that never depend on (so never carry) the person."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from protocol import ContractError
from protocol.catalogue import CatalogueKind, CatalogueVersionNotice
from protocol.drug_rules import (
    AgeRange,
    AnyRule,
    CombinationLimit,
    DrugRuleSet,
    DrugRulesNotice,
    DrugSelector,
    EarlyRefill,
    Evaluation,
    HistoryLine,
    MaxAmountPerPurchase,
    MaxDaysSupplyPerPeriod,
    MaxPurchasesPerPeriod,
    MaxQuantityPerPeriod,
    MaxQuantityPerPurchase,
    PersonFacts,
    PrescriptionRequired,
    Proposal,
    ProposedLine,
    RuleAction,
    RuleKind,
    RuleStage,
    Sex,
    SexRestriction,
    decode_rule_set,
    evaluate,
)

NOW = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)
AMOX = "XJ01CAA000A0000000000001"
AMOX_GENERIC = "阿莫西林胶囊"
OTHER = "XM01AEA002A0000000000002"
SEL = DrugSelector(drug_codes=[AMOX])
ADULT = PersonFacts(age_years=40, sex=Sex.MALE)


R = TypeVar("R", bound=BaseModel)


def mk(model: type[R], rule_id: str = "R1", action: RuleAction = RuleAction.BLOCK, **params: object) -> R:
    """A rule of `model` about amoxicillin (by code) with `params`."""
    base = {"rule_id": rule_id, "title": "阿莫西林", "title_en": "amoxicillin", "drugs": SEL, "action": action}
    return model.model_validate(base | params)


def line(
    quantity: int = 1,
    *,
    code: str = AMOX,
    generic: str = AMOX_GENERIC,
    days_supply: int | None = None,
    amount_fen: int | None = None,
) -> ProposedLine:
    return ProposedLine(code, generic, quantity, days_supply=days_supply, amount_fen=amount_fen)


def proposal(
    *lines: ProposedLine,
    person: PersonFacts = ADULT,
    history: tuple[HistoryLine, ...] = (),
    rx: bool = True,
    stage: RuleStage = RuleStage.PURCHASE,
) -> Proposal:
    return Proposal(stage=stage, at=NOW, person=person, lines=lines, has_prescription=rx, history=history)


def past(days: float, quantity: int = 1, *, ref: str = "p0", supply: int | None = None) -> HistoryLine:
    return HistoryLine(ref, NOW - timedelta(days=days), AMOX, AMOX_GENERIC, quantity, supply)


def run(rule: AnyRule, p: Proposal) -> Evaluation:
    return evaluate([rule], p)


# ------------------------------------------------------------------------------------------------ boundaries


@settings(max_examples=60, deadline=None)
@given(limit=st.integers(1, 50), delta=st.integers(-3, 3))
def test_max_quantity_per_purchase_at_its_boundary(limit: int, delta: int) -> None:
    quantity = max(1, limit + delta)
    rule = mk(MaxQuantityPerPurchase, max_quantity=limit)
    result = run(rule, proposal(line(quantity)))
    assert result.blocked == (quantity > limit)
    if result.findings:
        assert result.findings[0].observed == quantity
        assert result.findings[0].limit == limit


def test_per_purchase_quantity_adds_up_lines_of_the_same_selection() -> None:
    rule = mk(MaxQuantityPerPurchase, max_quantity=5)
    assert run(rule, proposal(line(3), line(2))).findings == ()
    assert run(rule, proposal(line(3), line(3))).blocked
    assert run(rule, proposal(line(9, code=OTHER, generic="布洛芬片"))).findings == ()


@settings(max_examples=60, deadline=None)
@given(limit=st.integers(2, 60), before=st.integers(0, 60), now_qty=st.integers(1, 10))
def test_max_quantity_per_period_counts_history_inside_the_window(limit: int, before: int, now_qty: int) -> None:
    rule = mk(MaxQuantityPerPeriod, period_days=30, max_quantity=limit)
    history = (past(29.9, before, ref="in"), past(30, 1000, ref="edge"), past(45, 1000, ref="old"))
    result = run(rule, proposal(line(now_qty), history=history))
    assert result.blocked == (before + now_qty > limit)


def test_the_period_is_half_open_exactly_p_days_back_is_outside() -> None:
    rule = mk(MaxQuantityPerPeriod, period_days=7, max_quantity=2)
    assert not run(rule, proposal(line(1), history=(past(7, 5),))).findings
    assert run(rule, proposal(line(1), history=(past(6.99, 5),))).blocked
    future = HistoryLine("f", NOW + timedelta(hours=1), AMOX, AMOX_GENERIC, 5)
    assert not run(rule, proposal(line(1), history=(future,))).findings


@settings(max_examples=50, deadline=None)
@given(limit=st.integers(1, 90), before=st.integers(0, 90), supply=st.integers(1, 30))
def test_max_days_supply_per_period(limit: int, before: int, supply: int) -> None:
    rule = mk(MaxDaysSupplyPerPeriod, period_days=30, max_days=limit)
    result = run(rule, proposal(line(1, days_supply=supply), history=(past(10, supply=before),)))
    assert result.blocked == (before + supply > limit)


@settings(max_examples=40, deadline=None)
@given(limit=st.integers(1, 6), earlier=st.integers(0, 8))
def test_max_purchases_per_period_counts_distinct_purchases(limit: int, earlier: int) -> None:
    rule = mk(MaxPurchasesPerPeriod, period_days=30, max_purchases=limit)
    # two lines of one earlier purchase are one purchase
    history = tuple(past(1 + i, ref=f"p{i}") for i in range(earlier)) + tuple(
        past(1 + i, ref=f"p{i}") for i in range(earlier)
    )
    result = run(rule, proposal(line(1), history=history))
    assert result.blocked == (earlier + 1 > limit)
    if result.findings:
        assert result.findings[0].observed == earlier + 1


@settings(max_examples=50, deadline=None)
@given(limit=st.integers(100, 10_000), delta=st.integers(-2, 2))
def test_max_amount_per_purchase(limit: int, delta: int) -> None:
    rule = mk(MaxAmountPerPurchase, max_amount_fen=limit)
    assert run(rule, proposal(line(1, amount_fen=limit + delta))).blocked == (delta > 0)


@settings(max_examples=80, deadline=None)
@given(age=st.integers(0, 120), low=st.integers(0, 60), span=st.integers(0, 60))
def test_age_range_bounds_are_inclusive(age: int, low: int, span: int) -> None:
    rule = mk(AgeRange, min_age_years=low, max_age_years=low + span)
    result = run(rule, proposal(line(), person=PersonFacts(age, Sex.FEMALE)))
    assert result.blocked == (not low <= age <= low + span)


def test_age_range_with_one_bound_and_an_invalid_range() -> None:
    adults = mk(AgeRange, min_age_years=18)
    assert run(adults, proposal(line(), person=PersonFacts(17, None))).blocked
    assert not run(adults, proposal(line(), person=PersonFacts(18, None))).findings
    with pytest.raises(ValidationError, match="lower or an upper"):
        mk(AgeRange)
    with pytest.raises(ValidationError, match="above"):
        mk(AgeRange, min_age_years=30, max_age_years=20)


def test_sex_restriction() -> None:
    rule = mk(SexRestriction, allowed_sex=Sex.FEMALE)
    assert run(rule, proposal(line(), person=PersonFacts(30, Sex.MALE))).blocked
    assert not run(rule, proposal(line(), person=PersonFacts(30, Sex.FEMALE))).findings


def test_prescription_required() -> None:
    rule = mk(PrescriptionRequired)
    assert run(rule, proposal(line(), rx=False)).blocked
    assert not run(rule, proposal(line(), rx=True)).findings


def test_combination_limit_counts_distinct_generic_names() -> None:
    nsaids = DrugSelector(generic_names=["布洛芬片", "双氯芬酸钠缓释片", "塞来昔布胶囊"])
    rule = CombinationLimit(
        rule_id="NSAID", title="非甾体抗炎药", title_en="NSAIDs", drugs=nsaids, action=RuleAction.WARN, max_distinct=1
    )
    a = line(1, code="XM01AEA000A0000000000001", generic="布洛芬片")
    a2 = line(2, code="XM01AEA000A0000000000009", generic="布洛芬片")
    b = line(1, code="XM01ABA000A0000000000002", generic="双氯芬酸钠缓释片")
    assert not run(rule, proposal(a, a2)).findings
    result = run(rule, proposal(a, b))
    assert result.warnings
    assert not result.blocked
    assert result.findings[0].drug_codes == tuple(sorted([a.drug_code, b.drug_code]))


@settings(max_examples=60, deadline=None)
@given(supply=st.integers(1, 60), days_ago=st.integers(0, 70), grace=st.integers(0, 5))
def test_early_refill_flags_a_purchase_before_the_last_supply_runs_out(supply: int, days_ago: int, grace: int) -> None:
    rule = mk(EarlyRefill, action=RuleAction.WARN, grace_days=grace)
    result = run(rule, proposal(line(), history=(past(days_ago, supply=supply),)))
    assert bool(result.warnings) == (days_ago < supply - grace)


# ------------------------------------------------------------------------------------------- missing facts


@pytest.mark.parametrize(
    ("rule", "person", "the_line"),
    [
        (mk(AgeRange, min_age_years=18), PersonFacts(None, Sex.MALE), line()),
        (mk(SexRestriction, allowed_sex=Sex.MALE), PersonFacts(30, None), line()),
        (
            mk(MaxDaysSupplyPerPeriod, period_days=30, max_days=30),
            ADULT,
            line(1, days_supply=None),
        ),
        (mk(MaxAmountPerPurchase, max_amount_fen=100), ADULT, line(1, amount_fen=None)),
    ],
)
def test_a_missing_fact_warns_that_the_rule_could_not_be_checked(
    rule: AnyRule, person: PersonFacts, the_line: ProposedLine
) -> None:
    result = run(rule, proposal(the_line, person=person))
    assert len(result.findings) == 1
    finding = result.findings[0]
    assert finding.action is RuleAction.WARN
    assert not finding.checkable
    assert "无法核对" in finding.message_zh


# ------------------------------------------------------------------------------------------- the engine at large


def test_stage_filter_and_unselected_drugs() -> None:
    rule = mk(PrescriptionRequired, stages=[RuleStage.REVIEW])
    assert not run(rule, proposal(line(), rx=False, stage=RuleStage.PURCHASE)).findings
    assert run(rule, proposal(line(), rx=False, stage=RuleStage.REVIEW)).blocked


def test_findings_are_ordered_blocks_first_then_rule_id() -> None:
    rules: list[AnyRule] = [
        mk(PrescriptionRequired, "Z-warn", RuleAction.WARN),
        mk(MaxQuantityPerPurchase, "B-block", max_quantity=1),
        mk(SexRestriction, "A-warn", RuleAction.WARN, allowed_sex=Sex.FEMALE),
    ]
    p = proposal(line(2), rx=False)
    first = evaluate(rules, p)
    assert [f.rule_id for f in first.findings] == ["B-block", "A-warn", "Z-warn"]
    assert evaluate(list(reversed(rules)), p) == first
    assert first.findings[0].rule_kind is RuleKind.MAX_QUANTITY_PER_PURCHASE


@settings(max_examples=60, deadline=None)
@given(
    ages=st.tuples(st.integers(0, 17), st.integers(0, 17)),
    histories=st.tuples(st.integers(0, 30), st.integers(0, 30)),
    sexes=st.tuples(st.sampled_from(Sex), st.sampled_from(Sex)),
)
def test_messages_depend_on_the_rule_only_never_on_the_person(
    ages: tuple[int, int], histories: tuple[int, int], sexes: tuple[Sex, Sex]
) -> None:
    rules: list[AnyRule] = [
        mk(AgeRange, "age", min_age_years=18),
        mk(MaxQuantityPerPeriod, "period", period_days=30, max_quantity=1),
        mk(MaxPurchasesPerPeriod, "count", period_days=30, max_purchases=1),
    ]
    messages = []
    for age, n, sex in zip(ages, histories, sexes, strict=True):
        history = tuple(past(1 + i % 25, 1, ref=f"h{i}") for i in range(n + 1))
        result = evaluate(rules, proposal(line(1), person=PersonFacts(age, sex), history=history))
        assert {f.rule_id for f in result.findings} == {"age", "period", "count"}
        messages.append([(f.rule_id, f.message_zh, f.message_en) for f in result.findings])
    assert messages[0] == messages[1]


# ------------------------------------------------------------------------------------------- the rule set


def sample_rules() -> list[AnyRule]:
    return [
        mk(MaxQuantityPerPurchase, "Q1", max_quantity=5),
        mk(EarlyRefill, "F09", RuleAction.WARN),
    ]


def test_rule_set_round_trip_and_hash() -> None:
    rule_set = DrugRuleSet.build(3, sample_rules(), NOW)
    assert decode_rule_set(rule_set.to_bytes()) == rule_set
    assert DrugRuleSet.build(3, list(reversed(sample_rules())), NOW).content_hash == rule_set.content_hash
    assert DrugRuleSet.build(4, sample_rules(), NOW).content_hash != rule_set.content_hash
    tampered = rule_set.to_bytes().replace(b'"max_quantity":5', b'"max_quantity":500')
    with pytest.raises(ContractError, match="content hash"):
        decode_rule_set(tampered)
    with pytest.raises(ContractError, match="invalid drug rule set"):
        decode_rule_set(b'{"type": "drug_rule_set", "rules": [{"kind": "teleport"}]}')


def test_rule_ids_are_unique_and_selectors_not_empty() -> None:
    with pytest.raises(ValidationError, match="not unique"):
        DrugRuleSet.build(1, sample_rules() + sample_rules()[:1], NOW)
    with pytest.raises(ValidationError, match="at least one"):
        DrugSelector()


def test_notices_are_flat_enough_for_command_arguments() -> None:
    rule_set = DrugRuleSet.build(3, sample_rules(), NOW)
    notice = DrugRulesNotice(version=rule_set.version, content_hash=rule_set.content_hash)
    args = notice.model_dump(mode="json")
    assert all(isinstance(v, str | int) for v in args.values())
    assert DrugRulesNotice.model_validate(args) == notice
    catalogue = CatalogueVersionNotice(kind=CatalogueKind.DRUG, version=9, content_hash="a" * 64)
    assert CatalogueVersionNotice.model_validate(catalogue.model_dump(mode="json")) == catalogue
    assert all(isinstance(v, str | int) for v in catalogue.model_dump(mode="json").values())
