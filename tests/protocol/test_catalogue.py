"""Catalogue wire contracts: closed entry models, snapshots and deltas, and the content hash that proves a version."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hardware_sim.catalogue_gen import generate_catalogue, generate_drugs, generate_institutions
from protocol import ContractError
from protocol.catalogue import (
    CatalogueDelta,
    CatalogueKind,
    CatalogueSnapshot,
    CatalogueVersionNotice,
    DesignatedInstitution,
    DrugEntry,
    TreatmentItem,
    build_delta,
    content_hash,
    decode_catalogue_document,
)

AT = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
DRUGS = generate_drugs(300, seed=3)


def test_snapshot_round_trips_through_bytes_and_its_hash_checks() -> None:
    snapshot = CatalogueSnapshot.build(CatalogueKind.DRUG, 1, DRUGS, AT)
    decoded = decode_catalogue_document(snapshot.to_bytes())
    assert decoded == snapshot
    assert isinstance(decoded, CatalogueSnapshot)
    decoded.verify_hash()


def test_a_tampered_entry_fails_the_hash() -> None:
    snapshot = CatalogueSnapshot.build(CatalogueKind.DRUG, 1, DRUGS, AT)
    entries = list(snapshot.entries)
    first = entries[0]
    assert isinstance(first, DrugEntry)
    entries[0] = first.model_copy(update={"price_fen": (first.price_fen or 0) + 1})
    forged = snapshot.model_copy(update={"entries": entries})
    with pytest.raises(ContractError, match="content hash"):
        forged.verify_hash()


def test_the_hash_binds_kind_and_version_but_not_order() -> None:
    base = content_hash(CatalogueKind.DRUG, 4, DRUGS)
    assert content_hash(CatalogueKind.DRUG, 4, list(reversed(DRUGS))) == base
    assert content_hash(CatalogueKind.DRUG, 5, DRUGS) != base
    assert content_hash(CatalogueKind.DRUG, 4, DRUGS[1:]) != base


@settings(max_examples=30, deadline=None)
@given(
    removed=st.sets(st.integers(0, 99), max_size=20),
    repriced=st.sets(st.integers(0, 99), max_size=20),
    added=st.integers(0, 10),
)
def test_build_delta_turns_the_old_version_into_the_new_one(removed: set[int], repriced: set[int], added: int) -> None:
    old = DRUGS[:100]
    new = [
        d.model_copy(update={"price_fen": (d.price_fen or 0) + 7}) if i in repriced else d
        for i, d in enumerate(old)
        if i not in removed
    ] + DRUGS[100 : 100 + added]
    delta = build_delta(CatalogueKind.DRUG, 1, old, 2, new, AT)
    state: dict[str, DrugEntry | TreatmentItem | DesignatedInstitution] = {d.code: d for d in old}
    for code in delta.deletions:
        del state[code]
    state.update({e.code: e for e in delta.upserts})
    assert sorted(state) == sorted(d.code for d in new)
    assert content_hash(CatalogueKind.DRUG, 2, state.values()) == delta.content_hash
    assert len(delta.deletions) == len(removed)
    assert len(delta.upserts) == len(repriced - removed) + added
    assert decode_catalogue_document(delta.to_bytes()) == delta


def test_delta_must_move_forward_and_not_contradict_itself() -> None:
    h = "0" * 64
    with pytest.raises(ValidationError, match="to_version"):
        CatalogueDelta(kind=CatalogueKind.DRUG, from_version=3, to_version=3, published_at=AT, content_hash=h)
    with pytest.raises(ValidationError, match="both upserted and deleted"):
        CatalogueDelta(
            kind=CatalogueKind.DRUG,
            from_version=1,
            to_version=2,
            published_at=AT,
            content_hash=h,
            upserts=[DRUGS[0]],
            deletions=[DRUGS[0].code],
        )


def test_a_document_holds_one_kind_and_unique_codes() -> None:
    institutions = generate_institutions(3)
    with pytest.raises(ValidationError, match="entry of kind institution"):
        CatalogueSnapshot.build(CatalogueKind.DRUG, 1, institutions, AT)
    with pytest.raises(ValidationError, match="appears twice"):
        CatalogueSnapshot.build(CatalogueKind.DRUG, 1, [DRUGS[0], DRUGS[0]], AT)


def test_unknown_fields_and_bad_codes_are_refused() -> None:
    raw = DRUGS[0].model_dump(mode="json")
    with pytest.raises(ValidationError, match="Extra inputs"):
        DrugEntry.model_validate({**raw, "patient_name": "x"})
    with pytest.raises(ValidationError, match="code"):
        DrugEntry.model_validate({**raw, "code": "x'; DROP TABLE"})
    with pytest.raises(ContractError, match="invalid catalogue document"):
        decode_catalogue_document(b'{"type": "catalogue_snapshot"}')
    with pytest.raises(ContractError, match="invalid catalogue document"):
        decode_catalogue_document(b"not json")


def test_version_notice_is_small_enough_for_the_downlink() -> None:
    notice = CatalogueVersionNotice(kind=CatalogueKind.DRUG, version=12, content_hash="a" * 64)
    assert len(notice.model_dump_json()) < 300


def test_the_generator_is_deterministic_and_realistic() -> None:
    a = generate_catalogue(seed=9, drugs=2000, treatments=50, institutions=40)
    b = generate_catalogue(seed=9, drugs=2000, treatments=50, institutions=40)
    assert a == b
    assert len({d.code for d in a.drugs}) == 2000
    names = {d.generic_name for d in a.drugs}
    assert {"阿莫西林胶囊", "布洛芬缓释胶囊", "盐酸二甲双胍片"} <= names
    assert any(d.homologous_herb for d in a.drugs)
    assert {i.region_code for i in a.institutions} >= {"320583"}
    assert len({t.code for t in a.treatments}) == 50
