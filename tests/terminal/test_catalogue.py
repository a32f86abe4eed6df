"""The terminal's catalogue store against real SQLite files: snapshot → delta → search, refusals that change nothing,
pinyin-initial search with 多音字, ranking, persistence, one owner, rules evaluated offline, and search speed."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardware_sim.catalogue_gen import generate_drugs, generate_institutions, generate_treatments
from protocol.catalogue import (
    CatalogueDelta,
    CatalogueKind,
    CatalogueSnapshot,
    ChargeCategory,
    DispensingClass,
    DrugEntry,
    build_delta,
)
from protocol.drug_rules import (
    DrugRuleSet,
    DrugSelector,
    MaxQuantityPerPeriod,
    PersonFacts,
    Proposal,
    RuleAction,
    RuleStage,
)
from terminal.catalogue import (
    CatalogueError,
    CatalogueGapError,
    CatalogueHashError,
    CatalogueStaleError,
    CatalogueStore,
    MatchKind,
    pinyin_initials,
)

AT = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
DRUGS = generate_drugs(600, seed=5)


def amox(code_tail: str, name: str = "阿莫西林胶囊", generic: str = "阿莫西林胶囊") -> DrugEntry:
    return DrugEntry(
        code=f"XJ01CAA040A001010100{code_tail}",
        name=name,
        generic_name=generic,
        dosage_form="胶囊剂",
        specification="0.25g",
        package="24粒/盒",
        unit="盒",
        manufacturer="测试制药有限公司",
        approval_number="国药准字H20003263",
        category=ChargeCategory.CLASS_A,
        dispensing=DispensingClass.RX,
        price_fen=1250,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CatalogueStore]:
    with CatalogueStore.open(tmp_path / "catalogue.db") as s:
        yield s


def snapshot(version: int, entries: list[DrugEntry]) -> CatalogueSnapshot:
    return CatalogueSnapshot.build(CatalogueKind.DRUG, version, entries, AT + timedelta(days=version))


def codes(store: CatalogueStore, query: str, **kw: object) -> list[str]:
    return [h.code for h in store.search(query, **kw).hits]  # type: ignore[arg-type]  # kw: the search options


def test_snapshot_then_delta_then_search(store: CatalogueStore) -> None:
    v1 = DRUGS[:500]
    held = store.apply_snapshot(snapshot(1, v1))
    assert (held.version, held.entries) == (1, 500)
    assert held.content_hash == snapshot(1, v1).content_hash

    a = amox("534")
    v2 = [*v1[:450], a]
    repriced = v2[0].model_copy(update={"price_fen": 1})
    v2[0] = repriced
    delta = build_delta(CatalogueKind.DRUG, 1, v1, 2, v2, AT)
    held = store.apply_delta(delta)
    assert (held.version, held.entries, held.content_hash) == (2, 451, delta.content_hash)
    assert store.get(CatalogueKind.DRUG, a.code) == a
    assert store.get(CatalogueKind.DRUG, v1[499].code) is None
    assert store.drug(repriced.code) == repriced
    assert a.code in codes(store, "amxl")
    assert codes(store, a.code)[0] == a.code
    assert v1[499].code not in codes(store, v1[499].code)


def test_a_gapped_delta_is_refused_and_nothing_changes(store: CatalogueStore) -> None:
    v1, v2, v3 = DRUGS[:300], DRUGS[:290], DRUGS[:280]
    store.apply_snapshot(snapshot(1, v1))
    before = store.holding(CatalogueKind.DRUG)
    gapped = build_delta(CatalogueKind.DRUG, 2, v2, 3, v3, AT)
    with pytest.raises(CatalogueGapError) as err:
        store.apply_delta(gapped)
    assert (err.value.held_version, err.value.from_version) == (1, 2)
    assert store.holding(CatalogueKind.DRUG) == before
    assert store.get(CatalogueKind.DRUG, v1[295].code) is not None


def test_a_delta_with_nothing_held_needs_a_snapshot(store: CatalogueStore) -> None:
    delta = build_delta(CatalogueKind.DRUG, 1, DRUGS[:10], 2, DRUGS[:12], AT)
    with pytest.raises(CatalogueGapError, match="snapshot is needed"):
        store.apply_delta(delta)
    assert store.holding(CatalogueKind.DRUG).version == 0


def test_a_hash_mismatched_delta_is_rolled_back(store: CatalogueStore) -> None:
    v1 = DRUGS[:300]
    store.apply_snapshot(snapshot(1, v1))
    before = store.holding(CatalogueKind.DRUG)
    # Built against a base the terminal does not hold (one entry differs): applying it cannot reach the new state.
    other_base = [v1[0].model_copy(update={"price_fen": 99_999}), *v1[1:]]
    wrong = build_delta(CatalogueKind.DRUG, 1, other_base, 2, [*other_base[:200], amox("777")], AT)
    with pytest.raises(CatalogueHashError, match="rolled back"):
        store.apply_delta(wrong)
    assert store.holding(CatalogueKind.DRUG) == before
    assert store.get(CatalogueKind.DRUG, amox("777").code) is None
    assert store.get(CatalogueKind.DRUG, v1[250].code) == v1[250]
    assert amox("777").code not in codes(store, "amxl", limit=1000)

    forged = CatalogueDelta.model_validate(
        build_delta(CatalogueKind.DRUG, 1, v1, 2, v1[:250], AT).model_dump() | {"content_hash": "ab" * 32}
    )
    with pytest.raises(CatalogueHashError):
        store.apply_delta(forged)
    assert store.holding(CatalogueKind.DRUG) == before


def test_bad_or_old_snapshots_are_refused_and_redelivery_is_a_no_op(store: CatalogueStore) -> None:
    good = snapshot(2, DRUGS[:100])
    forged = good.model_copy(update={"content_hash": "cd" * 32})
    with pytest.raises(CatalogueHashError):
        store.apply_snapshot(forged)
    assert store.holding(CatalogueKind.DRUG).version == 0
    store.apply_snapshot(good)
    assert store.apply_snapshot(good) == store.holding(CatalogueKind.DRUG)
    with pytest.raises(CatalogueStaleError):
        store.apply_snapshot(snapshot(1, DRUGS[:50]))
    delta = build_delta(CatalogueKind.DRUG, 2, DRUGS[:100], 3, DRUGS[:90], AT)
    store.apply_delta(delta)
    assert store.apply_delta(delta).version == 3  # redelivered: nothing to do, no gap error
    assert store.holding(CatalogueKind.DRUG).entries == 90
    with pytest.raises(CatalogueStaleError, match="already at v3"):
        store.apply_delta(build_delta(CatalogueKind.DRUG, 2, DRUGS[:100], 3, DRUGS[:80], AT))


def test_pinyin_initials_index_every_reading() -> None:
    assert "amxljn" in pinyin_initials("阿莫西林胶囊")
    assert {"ccxtp", "zcxtp"} <= set(pinyin_initials("长春西汀片"))
    assert {"czrydszsy", "zzrydszsy"} <= set(pinyin_initials("重组人胰岛素注射液"))
    assert pinyin_initials("维生素C泡腾片")[0] == "wsscptp"
    assert pinyin_initials("（）、") == []
    assert len(pinyin_initials("长长长长长长长长长长", limit=32)) == 32


def test_pinyin_search_finds_amoxicillin_and_polyphonic_names(store: CatalogueStore) -> None:
    cc = DRUGS[0].model_copy(
        update={"code": "XN06BXA001A0000000000001", "name": "长春西汀片", "generic_name": "长春西汀片"}
    )
    insulin = DRUGS[0].model_copy(
        update={"code": "XA10ABA001A0000000000001", "name": "重组人胰岛素注射液", "generic_name": "重组人胰岛素注射液"}
    )
    store.apply_snapshot(snapshot(1, [amox("534"), cc, insulin, *DRUGS[:300]]))
    assert codes(store, "amxl")[0] == amox("534").code or amox("534").code in codes(store, "amxl", limit=200)
    first = store.search("amxl").hits[0]
    assert first.match is MatchKind.INITIALS_PREFIX
    assert store.search("阿莫西林").hits[0].name.startswith("阿莫西林")
    assert cc.code in codes(store, "ccxt")
    assert cc.code in codes(store, "zcxt")
    assert cc.code in codes(store, "ZCXT")
    assert insulin.code in codes(store, "czry")
    assert insulin.code in codes(store, "zzry")
    assert codes(store, "xyz-no-such") == []
    assert codes(store, "  ") == []


def test_ranking_code_then_name_then_initials(store: CatalogueStore) -> None:
    exact = amox("534", name="阿莫西林")
    longer = amox("535", name="阿莫西林克拉维酸钾颗粒（儿童）", generic="阿莫西林克拉维酸钾颗粒")
    store.apply_snapshot(snapshot(1, [exact, longer, amox("536")]))
    hits = store.search("阿莫西林").hits
    assert [h.match for h in hits] == [MatchKind.NAME_EXACT, MatchKind.NAME_PREFIX, MatchKind.NAME_PREFIX]
    assert [h.code for h in hits] == [exact.code, amox("536").code, longer.code]  # shorter names first
    assert store.search(exact.code).hits[0].match is MatchKind.CODE_EXACT
    by_prefix = store.search(exact.code[:12])
    assert {h.match for h in by_prefix.hits} == {MatchKind.CODE_PREFIX}
    assert by_prefix.total == 3
    assert store.search("胶囊").hits[0].match is MatchKind.NAME_SUBSTRING
    assert [h.match for h in store.search("jn").hits] == [MatchKind.INITIALS_SUBSTRING] * 2


def test_other_catalogues_and_region_filter(store: CatalogueStore) -> None:
    institutions = generate_institutions(60, seed=2)
    treatments = generate_treatments(40, seed=2)
    store.apply_snapshot(CatalogueSnapshot.build(CatalogueKind.INSTITUTION, 1, institutions, AT))
    store.apply_snapshot(CatalogueSnapshot.build(CatalogueKind.TREATMENT, 1, treatments, AT))
    kunshan = store.search("药房", CatalogueKind.INSTITUTION, limit=100, region_code="320583")
    assert kunshan.hits
    assert all(h.code[1:7] == "320583" for h in kunshan.hits)
    assert store.search("dyf", CatalogueKind.INSTITUTION).hits  # 大药房 by initials
    assert store.search("血常规", CatalogueKind.TREATMENT).hits[0].name.startswith("血常规")
    assert store.search("阿莫西林", CatalogueKind.TREATMENT).hits == ()
    assert store.holding(CatalogueKind.DRUG).version == 0  # each kind its own version line


def test_the_store_persists_and_has_one_owner(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    rules = DrugRuleSet.build(1, [quantity_rule()], AT)
    with CatalogueStore.open(path) as store:
        store.apply_snapshot(snapshot(1, [amox("534"), *DRUGS[:50]]))
        store.apply_rule_set(rules)
        with pytest.raises(CatalogueError, match="already in use"):
            CatalogueStore.open(path)
    with CatalogueStore.open(path) as again:
        assert again.holding(CatalogueKind.DRUG).entries == 51
        assert amox("534").code in codes(again, "amxl", limit=100)
        assert again.rule_set == rules
    with pytest.raises(CatalogueError, match="closed"):
        again.holding(CatalogueKind.DRUG)


def quantity_rule() -> MaxQuantityPerPeriod:
    return MaxQuantityPerPeriod(
        rule_id="AMOX-30D",
        title="阿莫西林胶囊",
        title_en="amoxicillin capsules",
        drugs=DrugSelector(generic_names=["阿莫西林胶囊"]),
        action=RuleAction.WARN,
        period_days=30,
        max_quantity=4,
    )


def test_rules_are_stored_verified_and_evaluated_offline(store: CatalogueStore) -> None:
    store.apply_snapshot(snapshot(1, [amox("534")]))
    assert (
        store.evaluate(
            Proposal(RuleStage.PURCHASE, AT, PersonFacts(30, None), (store.proposed_line(amox("534").code, 9),), True)
        ).findings
        == ()
    )  # no rules held yet
    v2 = DrugRuleSet.build(2, [quantity_rule()], AT)
    store.apply_rule_set(v2)
    line = store.proposed_line(amox("534").code, 5)
    assert (line.generic_name, line.amount_fen) == ("阿莫西林胶囊", 5 * 1250)
    result = store.evaluate(Proposal(RuleStage.PURCHASE, AT, PersonFacts(30, None), (line,), True))
    assert [f.rule_id for f in result.warnings] == ["AMOX-30D"]
    with pytest.raises(CatalogueStaleError):
        store.apply_rule_set(DrugRuleSet.build(1, [], AT))
    with pytest.raises(CatalogueHashError):
        store.apply_rule_set(v2.model_copy(update={"content_hash": "ef" * 32}))
    assert store.rule_set == v2
    with pytest.raises(CatalogueError, match="not in the held"):
        store.proposed_line("XZ99ZZZ999Z9999999999999", 1)


def test_search_on_20000_drugs_stays_within_10_ms(tmp_path: Path) -> None:
    drugs = generate_drugs(20_000, seed=1)
    with CatalogueStore.open(tmp_path / "big.db") as store:
        store.apply_snapshot(snapshot(1, drugs))
        queries = ["amxl", "阿莫西林", "ccxt", "二甲双胍", drugs[123].code, drugs[77].code[:8], "blf", "缓释"]
        samples = []
        for _ in range(5):
            for q in queries:
                start = time.perf_counter()
                assert store.search(q).hits, q
                samples.append((time.perf_counter() - start) * 1000)
    assert statistics.median(samples) <= 10.0, samples


def test_full_width_queries_and_stale_initials(store: CatalogueStore) -> None:
    store.apply_snapshot(snapshot(1, [amox("534", name="阿莫西林胶囊（Ｂ型）")]))
    assert codes(store, "ＡＭＸＬ") == [amox("534").code]
    assert codes(store, "(b型)") == [amox("534").code]
    store.apply_snapshot(snapshot(2, [amox("535", name="阿莫西林胶囊")]))
    assert codes(store, "AMXL") == [amox("535").code]
    assert codes(store, "b型") == []


def test_very_short_queries_match_only_where_they_mean_something(store: CatalogueStore) -> None:
    store.apply_snapshot(snapshot(1, [amox("534"), amox("535", name="复方阿莫西林", generic="复方阿莫西林")]))
    # 'a' starts 阿莫西林胶囊's initials; inside 复方阿莫西林 ('ffamxl') it would match too, but one letter says nothing
    assert codes(store, "a") == [amox("534").code]
    assert {h.match for h in store.search("am").hits} == {MatchKind.INITIALS_PREFIX, MatchKind.INITIALS_SUBSTRING}
    assert codes(store, "XJ") == []  # two characters of a code select the whole catalogue
    assert len(codes(store, "XJ0")) == 2


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.sets(st.integers(0, 79), max_size=15), st.integers(0, 5)), min_size=1, max_size=4))
def test_any_chain_of_deltas_ends_where_a_snapshot_of_the_last_version_would(
    steps: list[tuple[set[int], int]],
) -> None:
    pool = DRUGS[:120]
    current = list(pool[:80])
    with tempfile.TemporaryDirectory() as tmp, CatalogueStore.open(Path(tmp) / "c.db") as chained:
        chained.apply_snapshot(snapshot(1, current))
        for version, (touched, added) in enumerate(steps, start=2):
            nxt = (
                [
                    d.model_copy(update={"price_fen": (d.price_fen or 0) + version}) if i in touched else d
                    for i, d in enumerate(current)
                    if i % 7 != version or i not in touched  # some touched entries are deleted instead
                ]
                + [d for d in pool[80 : 80 + added] if d.code not in {c.code for c in current}]
            )
            chained.apply_delta(build_delta(CatalogueKind.DRUG, version - 1, current, version, nxt, AT))
            current = nxt
        held = chained.holding(CatalogueKind.DRUG)
        final = snapshot(len(steps) + 1, current)
        assert (held.version, held.content_hash, held.entries) == (final.version, final.content_hash, len(current))
        for d in current:
            assert chained.get(CatalogueKind.DRUG, d.code) == d
