"""Catalogue and drug-rule publishing on the server, against real SQLite and PostgreSQL: versions, computed and
composed deltas that a real terminal `CatalogueStore` accepts (hash-proven), unchanged publishes, optimistic
concurrency, refusals that publish nothing, `catalogue_update` notices to enrolled terminals only; and the operator
routes over real HTTP (publish, list, the regulator's rule editing with validation and audit)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select

from hardware_sim.catalogue_gen import generate_drugs, generate_institutions
from protocol import CommandKind
from protocol.catalogue import CatalogueDelta, CatalogueKind, CatalogueSnapshot, DrugEntry
from protocol.downlink import CatalogueUpdateArgs
from protocol.drug_rules import (
    DrugRuleSet,
    DrugSelector,
    MaxQuantityPerPeriod,
    MaxQuantityPerPurchase,
    RuleAction,
)
from sync_server import catalogues
from sync_server.accounts import Role
from sync_server.app import create_app
from sync_server.db.engine import session_factory
from sync_server.db.models import (
    CatalogueVersion,
    CommandState,
    Device,
    IssuedCommand,
    RegistrationState,
)
from sync_server.settings import ServerSettings
from sync_server.store import register_devices
from terminal.catalogue import CatalogueStore
from terminal.server_api import ServerApi
from terminal.session import ServerRefusedError
from tests.sync_server.conftest import T0, FakeClock, serving
from tests.sync_server.signed_requests import enrol_with_session
from tests.sync_server.test_accounts import audit_events, login, make_account

DRUGS = generate_drugs(300, seed=11)


def _enrol(engine: Engine, *device_ids: str, unenrolled: tuple[str, ...] = ()) -> None:
    with session_factory(engine, write_intent=True).begin() as session:
        register_devices(session, [*device_ids, *unenrolled], now=T0)
        for device_id in device_ids:
            device = session.get(Device, device_id)
            assert device is not None
            device.registration = RegistrationState.ENROLLED


def _publish(
    engine: Engine, kind: CatalogueKind, entries: Sequence[catalogues.AnyEntry], *, base_version: int | None = None
) -> catalogues.Published:
    with session_factory(engine, write_intent=True).begin() as session:
        return catalogues.publish_catalogue(session, kind, entries, actor="test", now=T0, base_version=base_version)


def _document(engine: Engine, kind: CatalogueKind, from_version: int) -> CatalogueSnapshot | CatalogueDelta | None:
    with session_factory(engine)() as session:
        return catalogues.catalogue_document(session, kind, from_version)


def _edit(entries: list[DrugEntry], step: int) -> list[DrugEntry]:
    """Change every 10th price, drop every 25th entry, add five new ones."""
    out = []
    for i, e in enumerate(entries):
        if i % 25 == step % 25:
            continue
        out.append(e.model_copy(update={"price_fen": (e.price_fen or 0) + step}) if i % 10 == 0 else e)
    extra = generate_drugs(320 + 5 * step, seed=11)[-5:]
    known = {e.code for e in out}
    return out + [e for e in extra if e.code not in known]


@pytest.fixture
def terminal_store(tmp_path: Path) -> Iterator[CatalogueStore]:
    store = CatalogueStore.open(tmp_path / "catalogue.sqlite3")
    try:
        yield store
    finally:
        store.close()


def test_versions_and_deltas_take_a_real_terminal_store_to_the_published_hash(
    engine: Engine, terminal_store: CatalogueStore
) -> None:
    v1 = _publish(engine, CatalogueKind.DRUG, DRUGS)
    assert (v1.version, v1.created, v1.count) == (1, True, 300)
    snapshot = _document(engine, CatalogueKind.DRUG, 0)
    assert isinstance(snapshot, CatalogueSnapshot)
    snapshot.verify_hash()
    assert terminal_store.apply(snapshot).content_hash == v1.content_hash

    second = _edit(DRUGS, 1)
    v2 = _publish(engine, CatalogueKind.DRUG, second)
    assert v2.version == 2
    assert v2.deletions == 12
    assert v2.upserts > 0
    delta = _document(engine, CatalogueKind.DRUG, 1)
    assert isinstance(delta, CatalogueDelta)
    assert (delta.from_version, delta.to_version, len(delta.deletions)) == (1, 2, 12)
    holding = terminal_store.apply(delta)
    assert (holding.version, holding.content_hash, holding.entries) == (2, v2.content_hash, len(second))

    # Two more versions; a terminal still at v2 gets ONE composed delta 2→4 and lands on v4's hash.
    v3 = _publish(engine, CatalogueKind.DRUG, _edit(second, 2))
    fourth = _edit(_edit(second, 2), 3)
    v4 = _publish(engine, CatalogueKind.DRUG, fourth)
    assert (v3.version, v4.version) == (3, 4)
    composed = _document(engine, CatalogueKind.DRUG, 2)
    assert isinstance(composed, CatalogueDelta)
    assert (composed.from_version, composed.to_version) == (2, 4)
    assert terminal_store.apply(composed).content_hash == v4.content_hash
    assert _document(engine, CatalogueKind.DRUG, 4) is None  # already current

    with session_factory(engine)() as session:
        rows = session.scalars(select(CatalogueVersion).order_by(CatalogueVersion.version)).all()
        assert [r.version for r in rows] == [1, 2, 3, 4]
        assert [r.snapshot is not None for r in rows] == [False, False, False, True]  # only the latest keeps a body
        assert rows[0].delta is None
        assert all(r.delta is not None for r in rows[1:])


def test_each_kind_has_its_own_version_line(engine: Engine) -> None:
    _publish(engine, CatalogueKind.DRUG, DRUGS)
    _publish(engine, CatalogueKind.DRUG, _edit(DRUGS, 1))
    inst = _publish(engine, CatalogueKind.INSTITUTION, generate_institutions(40, seed=3))
    assert inst.version == 1
    with session_factory(engine)() as session:
        latest = catalogues.latest_versions(session)
    assert {k: v for k, (v, _) in latest.items()} == {CatalogueKind.DRUG: 2, CatalogueKind.INSTITUTION: 1}
    assert latest[CatalogueKind.INSTITUTION][1] == inst.content_hash


def test_a_large_change_is_served_as_a_snapshot(engine: Engine) -> None:
    _publish(engine, CatalogueKind.DRUG, DRUGS[:100])
    _publish(engine, CatalogueKind.DRUG, DRUGS[100:200])  # every entry replaced
    document = _document(engine, CatalogueKind.DRUG, 1)
    assert isinstance(document, CatalogueSnapshot)
    assert document.version == 2


def test_an_unchanged_list_publishes_nothing_and_notifies_nobody(engine: Engine) -> None:
    _enrol(engine, "kiosk-a")
    first = _publish(engine, CatalogueKind.DRUG, DRUGS)
    again = _publish(engine, CatalogueKind.DRUG, list(reversed(DRUGS)))  # order does not matter
    assert (again.version, again.created, again.content_hash) == (1, False, first.content_hash)
    with session_factory(engine)() as session:
        assert session.scalar(select(func.count()).select_from(CatalogueVersion)) == 1
        assert session.scalar(select(func.count()).select_from(IssuedCommand)) == 1


def test_refusals_publish_nothing(engine: Engine) -> None:
    _publish(engine, CatalogueKind.DRUG, DRUGS[:50])
    with pytest.raises(catalogues.CatalogueConflictError, match="at v1, not v0"):
        _publish(engine, CatalogueKind.DRUG, DRUGS[:60], base_version=0)
    with pytest.raises(catalogues.CatalogueInputError, match="appears more than once"):
        _publish(engine, CatalogueKind.DRUG, [*DRUGS[:50], DRUGS[0]])
    with pytest.raises(catalogues.CatalogueInputError, match="not a drug entry"):
        _publish(engine, CatalogueKind.DRUG, generate_institutions(3))
    assert _publish(engine, CatalogueKind.DRUG, DRUGS[:60], base_version=1).version == 2
    with pytest.raises(catalogues.CatalogueNotFoundError, match="never published"):
        _document(engine, CatalogueKind.DRUG, 7)
    with pytest.raises(catalogues.CatalogueNotFoundError, match="no treatment catalogue"):
        _document(engine, CatalogueKind.TREATMENT, 0)


def test_notices_go_to_enrolled_terminals_and_supersede_unanswered_ones(engine: Engine) -> None:
    _enrol(engine, "kiosk-a", "kiosk-b", unenrolled=("kiosk-new",))
    v1 = _publish(engine, CatalogueKind.DRUG, DRUGS)
    assert v1.notified == 2
    v2 = _publish(engine, CatalogueKind.DRUG, _edit(DRUGS, 1))
    _publish(engine, CatalogueKind.INSTITUTION, generate_institutions(10))
    with session_factory(engine)() as session:
        rows = session.scalars(select(IssuedCommand).order_by(IssuedCommand.id)).all()
    assert {r.device_id for r in rows} == {"kiosk-a", "kiosk-b"}
    assert all(r.kind == CommandKind.CATALOGUE_UPDATE.value for r in rows)
    drug = [r for r in rows if r.args["kind"] == "drug"]
    assert [(r.args["version"], r.state) for r in drug] == [
        (1, CommandState.EXPIRED),
        (1, CommandState.EXPIRED),
        (2, CommandState.QUEUED),
        (2, CommandState.QUEUED),
    ]
    newest = CatalogueUpdateArgs.model_validate(drug[-1].args)
    assert (newest.version, newest.content_hash) == (2, v2.content_hash)
    assert all(r.expires_at - r.issued_at == timedelta(seconds=catalogues.NOTICE_TTL_S) for r in rows)
    institution = [r for r in rows if r.args["kind"] == "institution"]
    assert [r.state for r in institution] == [CommandState.QUEUED] * 2  # another kind is not superseded


def _rules(max_box: int = 2) -> list[MaxQuantityPerPurchase | MaxQuantityPerPeriod]:
    drugs = DrugSelector(generic_names=["复方甘草片"])
    return [
        MaxQuantityPerPurchase(
            rule_id="FFGC-1",
            title="复方甘草片",
            title_en="compound liquorice tablets",
            drugs=drugs,
            action=RuleAction.BLOCK,
            max_quantity=max_box,
        ),
        MaxQuantityPerPeriod(
            rule_id="FFGC-30",
            title="复方甘草片",
            title_en="compound liquorice tablets",
            drugs=drugs,
            action=RuleAction.WARN,
            period_days=30,
            max_quantity=6,
        ),
    ]


def test_rule_versions_are_whole_hash_checked_and_noticed(engine: Engine, terminal_store: CatalogueStore) -> None:
    _enrol(engine, "kiosk-a")
    sessions = session_factory(engine, write_intent=True)
    with sessions.begin() as session:
        first, changes = catalogues.publish_rules(session, _rules(), actor="account:reg", now=T0)
    assert (first.version, first.created, changes.added) == (1, True, ["FFGC-1", "FFGC-30"])
    with sessions.begin() as session:
        same, _ = catalogues.publish_rules(session, list(reversed(_rules())), actor="account:reg", now=T0)
    assert (same.version, same.created) == (1, False)
    with sessions.begin() as session, pytest.raises(catalogues.CatalogueConflictError):
        catalogues.publish_rules(session, _rules(3), actor="account:reg", now=T0, base_version=0)
    with sessions.begin() as session:
        second, changes = catalogues.publish_rules(session, _rules(3)[:1], actor="account:reg", now=T0, base_version=1)
    assert (second.version, changes.changed, changes.removed) == (2, ["FFGC-1"], ["FFGC-30"])
    with session_factory(engine)() as session:
        current = catalogues.current_rules(session)
        notices = session.scalars(select(IssuedCommand).order_by(IssuedCommand.id)).all()
    assert current is not None
    # the document the terminal receives is the protocol's own, and the terminal store accepts it
    wire = DrugRuleSet.model_validate_json(current.to_bytes())
    wire.verify_hash()
    terminal_store.apply_rule_set(wire)
    assert terminal_store.rule_set is not None
    assert terminal_store.rule_set.version == 2
    assert [(n.args["kind"], n.args["version"], n.state) for n in notices] == [
        ("drug_rules", 1, CommandState.EXPIRED),
        ("drug_rules", 2, CommandState.QUEUED),
    ]
    assert json.dumps(notices[-1].args, sort_keys=True) == json.dumps(
        {"kind": "drug_rules", "version": 2, "content_hash": second.content_hash}, sort_keys=True
    )


# ---------------------------------------------------------------- the operator routes over real HTTP


@pytest.fixture
def client(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[httpx.Client]:
    make_account(engine, "reg-js", Role.REGULATOR, region_prefix="32")
    settings = ServerSettings(database_url=db_url, data_dir=tmp_path / "server-data")
    app = create_app(settings, engine=engine, start_ingest=False, clock=FakeClock(T0))
    with serving(app) as c:
        yield c


def _wire(entries: list[DrugEntry]) -> list[dict[str, object]]:
    return [e.model_dump(mode="json") for e in entries]


def test_publishing_over_http(client: httpx.Client, engine: Engine, tmp_path: Path) -> None:
    _enrol(engine, "kiosk-a")
    url = "/api/v1/catalogues/drug/versions"
    first = client.post(url, json={"entries": _wire(DRUGS[:80])})
    assert first.status_code == 201, first.text
    assert first.json() | {"content_hash": "-"} == {
        "kind": "drug",
        "version": 1,
        "content_hash": "-",
        "count": 80,
        "created": True,
        "upserts": 80,
        "deletions": 0,
        "notified": 1,
    }
    again = client.post(url, json={"entries": _wire(DRUGS[:80]), "base_version": 1})
    assert (again.status_code, again.json()["created"], again.json()["version"]) == (200, False, 1)
    regulator = login(client, "reg-js")
    second = client.post(url, json={"entries": _wire(DRUGS[:90]), "base_version": 1}, headers=regulator)
    assert (second.status_code, second.json()["version"], second.json()["upserts"]) == (201, 2, 10)
    stale = client.post(url, json={"entries": _wire(DRUGS[:95]), "base_version": 1})
    assert stale.status_code == 409
    assert "at v2, not v1" in stale.json()["detail"]

    wrong_kind = client.post(url, json={"entries": [generate_institutions(1)[0].model_dump(mode="json")]})
    assert wrong_kind.status_code == 422
    assert "not a drug entry" in wrong_kind.text
    broken = _wire(DRUGS[:2])
    broken[1]["price_fen"] = -5
    assert client.post(url, json={"entries": broken}).status_code == 422
    assert client.post("/api/v1/catalogues/herbs/versions", json={"entries": []}).status_code == 422
    duplicate = client.post(url, json={"entries": [*_wire(DRUGS[:3]), _wire(DRUGS[:1])[0]]})
    assert duplicate.status_code == 422

    listed = client.get("/api/v1/catalogues", params={"kind": "drug"}).json()
    assert listed["total"] == 2
    assert [(i["version"], i["entries"], i["published_by"]) for i in listed["items"]] == [
        (2, 90, "account:reg-js"),
        (1, 80, "bootstrap"),
    ]
    events = [e for e in audit_events(tmp_path / "server-data") if e["type"] == "catalogue.published"]
    assert [(e["kind"], e["version"], e["admin"]) for e in events] == [
        ("drug", 1, "bootstrap"),
        ("drug", 2, "account:reg-js"),
    ]


def test_the_regulator_edits_the_drug_rules(client: httpx.Client, tmp_path: Path) -> None:
    regulator = login(client, "reg-js")
    empty = client.get("/api/v1/drug-rules", headers=regulator).json()
    assert (empty["version"], empty["rules"]) == (0, [])
    rules = [r.model_dump(mode="json") for r in _rules()]
    created = client.put("/api/v1/drug-rules", json={"rules": rules, "base_version": 0}, headers=regulator)
    assert (created.status_code, created.json()["version"], created.json()["count"]) == (201, 1, 2)
    same = client.put("/api/v1/drug-rules", json={"rules": rules}, headers=regulator)
    assert (same.status_code, same.json()["created"]) == (200, False)
    invalid = [*rules[:1], {**rules[1], "max_quantity": 0}]
    refused = client.put("/api/v1/drug-rules", json={"rules": invalid}, headers=regulator)
    assert refused.status_code == 422
    assert "max_quantity" in refused.text
    unknown = client.put(
        "/api/v1/drug-rules", json={"rules": [{**rules[0], "kind": "max_everything"}]}, headers=regulator
    )
    assert unknown.status_code == 422
    # the device admin may read the rules but not edit them
    assert client.get("/api/v1/drug-rules").json()["version"] == 1
    assert client.put("/api/v1/drug-rules", json={"rules": rules}).status_code == 403
    changed = [{**rules[0], "max_quantity": 3}]
    second = client.put("/api/v1/drug-rules", json={"rules": changed, "base_version": 1}, headers=regulator)
    assert (second.status_code, second.json()["version"]) == (201, 2)
    assert (
        client.put("/api/v1/drug-rules", json={"rules": rules, "base_version": 1}, headers=regulator).status_code == 409
    )
    current = client.get("/api/v1/drug-rules", headers=regulator).json()
    assert [r["max_quantity"] for r in current["rules"]] == [3]
    rule_set = DrugRuleSet.model_validate(
        {
            "version": 2,
            "published_at": current["published_at"],
            "content_hash": current["content_hash"],
            "rules": current["rules"],
        }
    )
    rule_set.verify_hash()
    events = [e for e in audit_events(tmp_path / "server-data") if e["type"] == "drug_rules.published"]
    assert [(e["version"], e["added"], e["changed"], e["removed"]) for e in events] == [
        (1, ["FFGC-1", "FFGC-30"], [], []),
        (2, [], ["FFGC-1"], ["FFGC-30"]),
    ]
    assert {e["admin"] for e in events} == {"account:reg-js"}


def test_two_editors_at_once_never_share_a_version_number(engine: Engine) -> None:
    """PostgreSQL: the second insert of (kind, v2) waits for the first and is refused as a conflict. SQLite: writer
    sessions take the write lock when they begin, so the second editor simply publishes v3."""
    _publish(engine, CatalogueKind.DRUG, DRUGS[:50])
    sessions = session_factory(engine, write_intent=True)
    first_flushed = threading.Event()
    outcome: dict[str, object] = {}

    def second_editor() -> None:
        first_flushed.wait(10)
        try:
            with sessions.begin() as session:
                result = catalogues.publish_catalogue(session, CatalogueKind.DRUG, DRUGS[:70], actor="b", now=T0)
            outcome["published"] = result.version
        except catalogues.CatalogueConflictError as exc:
            outcome["conflict"] = str(exc)

    worker = threading.Thread(target=second_editor)
    worker.start()
    with sessions.begin() as session:
        mine = catalogues.publish_catalogue(session, CatalogueKind.DRUG, DRUGS[:60], actor="a", now=T0)
        first_flushed.set()
        time.sleep(2.0)  # the other editor is now waiting on our row (PostgreSQL) or on the write lock (SQLite)
    worker.join(15)
    assert mine.version == 2
    if engine.dialect.name == "postgresql":
        assert "published by another editor" in str(outcome["conflict"])
    else:
        assert outcome == {"published": 3}
    with session_factory(engine)() as session:
        versions = session.scalars(select(CatalogueVersion.version).order_by(CatalogueVersion.version)).all()
    assert versions == ([1, 2] if engine.dialect.name == "postgresql" else [1, 2, 3])


def test_the_terminals_routes(client: httpx.Client, engine: Engine) -> None:
    clock = FakeClock(T0)
    enrolled = enrol_with_session(client, clock, "kiosk-docs")
    api = ServerApi(str(client.base_url), "kiosk-docs", lambda: enrolled.session, clock)
    try:
        assert api.get_json("/device/v1/catalogues") == {"catalogues": [], "drug_rules": None}
        for path in ("/device/v1/catalogues/drug", "/device/v1/drug-rules"):
            with pytest.raises(ServerRefusedError) as nothing:
                api.get_json(path)
            assert nothing.value.status == 404
        published = client.post("/api/v1/catalogues/drug/versions", json={"entries": _wire(DRUGS[:30])}).json()
        with session_factory(engine, write_intent=True).begin() as session:
            rules, _ = catalogues.publish_rules(session, _rules(), actor="account:reg", now=T0)
        index = api.get_json("/device/v1/catalogues")
        assert index["catalogues"] == [
            {
                "schema_version": 1,
                "type": "catalogue_version",
                "kind": "drug",
                "version": 1,
                "content_hash": published["content_hash"],
            }
        ]
        assert (index["drug_rules"]["version"], index["drug_rules"]["content_hash"]) == (1, rules.content_hash)
        snapshot = CatalogueSnapshot.model_validate(api.get_json("/device/v1/catalogues/drug"))
        snapshot.verify_hash()
        assert len(snapshot.entries) == 30
        assert api.get_json("/device/v1/catalogues/drug", {"from_version": 1}) is None  # 204: already current
        for params, status in (({"from_version": 5}, 404), ({"from_version": -1}, 422)):
            with pytest.raises(ServerRefusedError) as refused:
                api.get_json("/device/v1/catalogues/drug", params)
            assert refused.value.status == status
        with pytest.raises(ServerRefusedError) as unknown:
            api.get_json("/device/v1/catalogues/herbs")
        assert unknown.value.status == 422
        DrugRuleSet.model_validate(api.get_json("/device/v1/drug-rules")).verify_hash()
        # the operator routes are not the device's, and the device routes are not the operator's
        assert client.get("/device/v1/catalogues").status_code == 401
    finally:
        api.close()


def test_served_documents_are_built_once_per_version(engine: Engine) -> None:
    cache = catalogues.DocumentCache(max_bytes=400_000)
    _publish(engine, CatalogueKind.DRUG, DRUGS)
    sessions = session_factory(engine)
    with sessions() as session:
        first = catalogues.document_bytes(session, CatalogueKind.DRUG, 0, cache)
        again = catalogues.document_bytes(session, CatalogueKind.DRUG, 0, cache)
        assert catalogues.document_bytes(session, CatalogueKind.DRUG, 1, cache) is None  # current: nothing to send
    assert first is not None
    assert again is first
    assert (cache.hits, cache.misses) == (1, 1)
    assert CatalogueSnapshot.model_validate_json(first).version == 1
    _publish(engine, CatalogueKind.DRUG, _edit(DRUGS, 1))
    with sessions() as session:
        delta = catalogues.document_bytes(session, CatalogueKind.DRUG, 1, cache)
        snapshot = catalogues.document_bytes(session, CatalogueKind.DRUG, 0, cache)  # a new version: a new key
    assert delta is not None
    assert snapshot is not None
    assert CatalogueDelta.model_validate_json(delta).to_version == 2
    assert CatalogueSnapshot.model_validate_json(snapshot).version == 2
    assert cache.misses == 3  # the budget (400 kB) keeps the newest documents only
    with sessions() as session:
        assert catalogues.document_bytes(session, CatalogueKind.DRUG, 0, cache) is snapshot
        catalogues.document_bytes(session, CatalogueKind.DRUG, 1, cache)
    assert cache.misses == 3
