"""`yibao bench catalogue`: the terminal catalogue store on a synthetic 20,000-drug catalogue.

Owns the benchmark only. It generates the catalogue (`hardware_sim.catalogue_gen`), times what a terminal does with it
(decode the snapshot document, apply it to a fresh store, apply a delta, reopen the file) and then times searches
drawn at random (seeded) from the catalogue itself, as a pharmacist would type them: 2–4 characters of a name
(substring), a whole code or its first 8–12 characters (code), the pinyin initials of the first 2–5 characters of a
name (pinyin). One-character queries, which match a large share of the catalogue, are timed apart as `broad`. Also
times the rules engine on a purchase against a few hundred rules. Prints one JSON line.
"""

from __future__ import annotations

import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hardware_sim.catalogue_gen import generate_drugs
from protocol.catalogue import CatalogueKind, CatalogueSnapshot, build_delta, decode_catalogue_document
from protocol.drug_rules import (
    AnyRule,
    DrugSelector,
    HistoryLine,
    MaxPurchasesPerPeriod,
    MaxQuantityPerPeriod,
    MaxQuantityPerPurchase,
    PersonFacts,
    Proposal,
    ProposedLine,
    RuleAction,
    RuleStage,
    evaluate,
)
from terminal.catalogue import CatalogueStore, pinyin_initials
from yibao.bench_vision import peak_rss_mb, time_calls

PUBLISHED = datetime(2026, 3, 1, tzinfo=UTC)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 1)


def _queries(rng: random.Random, names: list[str], codes: list[str], count: int) -> dict[str, list[str]]:
    substring, code, initials = [], [], []
    for _ in range(count):
        name = rng.choice(names)
        length = rng.randint(2, min(4, len(name)))
        start = rng.randrange(0, len(name) - length + 1)
        substring.append(name[start : start + length])
        c = rng.choice(codes)
        code.append(c if rng.random() < 0.5 else c[: rng.randint(8, 12)])
        variants = pinyin_initials(rng.choice(names)[: rng.randint(2, 5)])
        initials.append(variants[0] if variants else "amxl")
    broad = [rng.choice(names)[0] for _ in range(count // 4)] + [
        rng.choice("abcdefghjklmnpqrstwxyz") for _ in range(count // 4)
    ]
    return {"substring": substring, "code": code, "pinyin": initials, "broad": broad}


def run_catalogue_bench(drugs: int = 20_000, queries: int = 400, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311 - reproducible query draw, not security
    started = time.perf_counter()
    entries = generate_drugs(drugs, seed=seed)
    generate_ms = _ms(started)

    start = time.perf_counter()
    document = CatalogueSnapshot.build(CatalogueKind.DRUG, 1, entries, PUBLISHED).to_bytes()
    build_ms = _ms(start)

    start = time.perf_counter()
    snapshot = decode_catalogue_document(document)
    decode_ms = _ms(start)
    if not isinstance(snapshot, CatalogueSnapshot):
        raise TypeError("the catalogue snapshot decoded as another document kind")

    changed = [e.model_copy(update={"price_fen": (e.price_fen or 0) + 1}) for e in entries[:200]]
    new_entries = changed + entries[250:]
    delta = build_delta(CatalogueKind.DRUG, 1, entries, 2, new_entries, PUBLISHED + timedelta(days=1))

    with tempfile.TemporaryDirectory(prefix="yibao-bench-catalogue-") as tmp:
        path = Path(tmp) / "catalogue.db"
        with CatalogueStore.open(path) as store:
            start = time.perf_counter()
            store.apply_snapshot(snapshot)
            apply_ms = _ms(start)
            start = time.perf_counter()
            held = store.apply_delta(delta)
            delta_ms = _ms(start)
        file_mb = round(path.stat().st_size / 1e6, 1)
        start = time.perf_counter()
        store = CatalogueStore.open(path)
        reopen_ms = _ms(start)
        try:
            names = sorted({e.name for e in new_entries})
            drawn = _queries(rng, names, [e.code for e in new_entries], queries)
            search: dict[str, Any] = {}
            for kind, qs in drawn.items():
                found = 0

                def one(i: int, qs: list[str] = qs) -> None:
                    nonlocal found
                    found += bool(store.search(qs[i % len(qs)]).hits)

                timing = time_calls(one, len(qs), warmup=0)
                search[kind] = {**timing.as_dict(), "found_share": round(found / len(qs), 3)}
        finally:
            store.close()

    rules = _rules(rng, new_entries)
    proposal = _proposal(rng, new_entries)
    rules_timing = time_calls(lambda _i: evaluate(rules, proposal), 200)
    return {
        "bench": "catalogue",
        "drugs": drugs,
        "distinct_names": len({e.name for e in entries}),
        "generate_ms": generate_ms,
        "snapshot_build_ms": build_ms,
        "snapshot_bytes": len(document),
        "snapshot_decode_ms": decode_ms,
        "snapshot_apply_ms": apply_ms,
        "snapshot_decode_and_apply_ms": round(decode_ms + apply_ms, 1),
        "delta": {"upserts": len(delta.upserts), "deletions": len(delta.deletions), "apply_ms": delta_ms},
        "held_after_delta": {"version": held.version, "entries": held.entries},
        "reopen_ms": reopen_ms,
        "file_mb": file_mb,
        "search_ms": search,
        "rules_evaluate_ms": {**rules_timing.as_dict(), "rules": len(rules), "lines": 5, "history_lines": 60},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _rules(rng: random.Random, entries: list[Any]) -> list[AnyRule]:
    generics = sorted({e.generic_name for e in entries})
    rules: list[AnyRule] = []
    for i in range(300):
        selector = DrugSelector(generic_names=[rng.choice(generics)])
        base = {"title": "重点药品", "title_en": "key drug", "drugs": selector, "action": RuleAction.WARN}
        match i % 3:
            case 0:
                rules.append(MaxQuantityPerPurchase.model_validate(base | {"rule_id": f"Q{i}", "max_quantity": 5}))
            case 1:
                rules.append(
                    MaxQuantityPerPeriod.model_validate(
                        base | {"rule_id": f"P{i}", "period_days": 30, "max_quantity": 10}
                    )
                )
            case _:
                rules.append(
                    MaxPurchasesPerPeriod.model_validate(
                        base | {"rule_id": f"N{i}", "period_days": 30, "max_purchases": 3}
                    )
                )
    return rules


def _proposal(rng: random.Random, entries: list[Any]) -> Proposal:
    now = PUBLISHED + timedelta(days=40)
    picks = rng.sample(entries, 5)
    lines = tuple(ProposedLine(e.code, e.generic_name, rng.randint(1, 6)) for e in picks)
    history = tuple(
        HistoryLine(f"p{i // 3}", now - timedelta(days=rng.uniform(0, 60)), e.code, e.generic_name, rng.randint(1, 4))
        for i, e in enumerate(rng.sample(entries, 60))
    )
    return Proposal(RuleStage.PURCHASE, now, PersonFacts(60, None), lines, True, history)
