"""The terminal's catalogue sync against a real sync server over real HTTP (uvicorn, SQLite and PostgreSQL), signed
with a real session key: the first pass fills the store, a `catalogue_update` notice (the command the server queued)
brings a delta, a damaged store recovers through a snapshot, the background thread wakes on a notice, and an
unreachable server leaves the held versions searchable."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, select

from hardware_sim.catalogue_gen import generate_drugs, generate_institutions
from protocol import CommandOutcome, DeviceCommand
from protocol.catalogue import CatalogueKind, CatalogueSnapshot, DrugEntry
from protocol.drug_rules import (
    DrugSelector,
    MaxQuantityPerPurchase,
    PersonFacts,
    Proposal,
    ProposedLine,
    RuleAction,
    RuleStage,
    Sex,
)
from protocol.secure import SessionKey
from sync_server import catalogues
from sync_server.app import create_app
from sync_server.commands import wire_command
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.migrate import upgrade
from sync_server.db.models import IssuedCommand
from sync_server.settings import ServerSettings
from terminal.catalogue import CatalogueStore
from terminal.catalogue_sync import CatalogueSync
from terminal.server_api import ServerApi
from terminal.session import ServerUnreachableError
from tests.http_serving import serving_url
from tests.sync_server.conftest import ADMIN_HEADERS, T0, TEST_ADMIN_TOKEN, FakeClock, pg_schema
from tests.sync_server.signed_requests import enrol_with_session

DEVICE = "kiosk-cat-1"
DRUGS = generate_drugs(400, seed=21)


class RecordingSource:
    """The real `ServerApi`, with a record of what was asked (to tell a delta fetch from a snapshot fetch)."""

    def __init__(self, api: ServerApi) -> None:
        self.api = api
        self.asked: list[tuple[str, dict[str, Any]]] = []

    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        self.asked.append((path, dict(params or {})))
        return self.api.get_json(path, params)


@dataclass
class Rig:
    engine: Engine
    url: str
    admin: httpx.Client
    clock: FakeClock
    store: CatalogueStore
    source: RecordingSource
    sync: CatalogueSync
    session_key: SessionKey
    stack: ExitStack = field(repr=False)

    def publish(self, kind: str, entries: list[Any]) -> dict[str, Any]:
        resp = self.admin.post(
            f"/api/v1/catalogues/{kind}/versions", json={"entries": [e.model_dump(mode="json") for e in entries]}
        )
        assert resp.status_code in (200, 201), resp.text
        out: dict[str, Any] = resp.json()
        return out

    def publish_rules(self, max_quantity: int) -> str:
        rule = MaxQuantityPerPurchase(
            rule_id="FFGC-1",
            title="复方甘草片",
            title_en="compound liquorice tablets",
            drugs=DrugSelector(generic_names=["复方甘草片"]),
            action=RuleAction.BLOCK,
            max_quantity=max_quantity,
        )
        with session_factory(self.engine, write_intent=True).begin() as session:
            published, _ = catalogues.publish_rules(session, [rule], actor="account:reg", now=self.clock.now())
        return published.content_hash

    def newest_notice(self, kind: str) -> DeviceCommand:
        """The `catalogue_update` command the server queued for this terminal (as the downlink would carry it)."""
        with session_factory(self.engine)() as session:
            rows = session.scalars(
                select(IssuedCommand).where(IssuedCommand.device_id == DEVICE).order_by(IssuedCommand.id.desc())
            ).all()
            row = next(r for r in rows if r.args["kind"] == kind)
            return wire_command(row)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    with ExitStack() as stack:
        if request.param == "sqlite":
            db_url = f"sqlite:///{tmp_path / 'server.sqlite3'}"
        else:
            db_url = stack.enter_context(pg_schema(request.getfixturevalue("pg_database")))
        upgrade(db_url)
        engine = create_db_engine(db_url)
        stack.callback(engine.dispose)
        clock = FakeClock(T0)
        settings = ServerSettings(
            database_url=db_url,
            data_dir=tmp_path / "server-data",
            bootstrap_admin_token=SecretStr(TEST_ADMIN_TOKEN),
        )
        app = create_app(settings, engine=engine, start_ingest=False, clock=clock)
        url = stack.enter_context(serving_url(app, lifespan="on"))
        admin = stack.enter_context(httpx.Client(base_url=url, headers=ADMIN_HEADERS, timeout=30))
        enrolled = enrol_with_session(admin, clock, DEVICE)
        api = ServerApi(url, DEVICE, lambda: enrolled.session, clock)
        stack.callback(api.close)
        store = CatalogueStore.open(tmp_path / "catalogue.sqlite3")
        stack.callback(store.close)
        source = RecordingSource(api)
        sync = CatalogueSync(store, source)
        stack.callback(sync.stop)
        yield Rig(engine, url, admin, clock, store, source, sync, enrolled.session, stack)


def _reprice(entries: list[DrugEntry], every: int) -> list[DrugEntry]:
    return [
        e.model_copy(update={"price_fen": (e.price_fen or 0) + 1}) if i % every == 0 else e
        for i, e in enumerate(entries)
    ]


def test_first_pass_fills_the_store_and_a_notice_brings_a_delta(rig: Rig) -> None:
    v1 = rig.publish("drug", DRUGS)
    institutions = rig.publish("institution", generate_institutions(30, seed=4))
    rules_hash = rig.publish_rules(2)

    first = rig.sync.sync_once()
    assert first.applied == {"drug": 1, "institution": 1, "drug_rules": 1}
    assert (rig.store.holding(CatalogueKind.DRUG).content_hash, rig.store.holding(CatalogueKind.DRUG).entries) == (
        v1["content_hash"],
        400,
    )
    assert rig.store.holding(CatalogueKind.INSTITUTION).content_hash == institutions["content_hash"]
    assert rig.store.rule_set is not None
    assert rig.store.rule_set.content_hash == rules_hash
    assert ("/device/v1/catalogues/drug", {"from_version": 0}) in rig.source.asked
    assert rig.store.search(DRUGS[0].name).hits  # searchable offline from now on

    # A new version: the server queued a notice; the handler schedules, the next pass fetches the DELTA.
    v2 = rig.publish("drug", _reprice(DRUGS[:390], 7))
    notice = rig.newest_notice("drug")
    handled = rig.sync.handle_notice(notice)
    assert (handled.outcome, handled.detail) == (CommandOutcome.APPLIED, "drug v2: fetch scheduled")
    rig.source.asked.clear()
    second = rig.sync.sync_once()
    assert second.applied == {"drug": 2}
    assert sorted(second.unchanged) == ["drug_rules", "institution"]
    assert rig.source.asked[1:] == [("/device/v1/catalogues/drug", {"from_version": 1})]
    held = rig.store.holding(CatalogueKind.DRUG)
    assert (held.version, held.content_hash, held.entries) == (2, v2["content_hash"], 390)
    # the same notice again (redelivery) is harmless
    assert rig.sync.handle_notice(notice).detail == "drug v2 already held"

    # P-05/P-06: the regulator's quantity rule, synced, decides offline at purchase and at review.
    three_boxes = Proposal(
        RuleStage.PURCHASE,
        rig.clock.now(),
        PersonFacts(67, Sex.FEMALE),
        (ProposedLine(DRUGS[0].code, "复方甘草片", 3),),
        has_prescription=True,
    )
    assert rig.store.evaluate(three_boxes).blocked
    assert rig.store.evaluate(three_boxes).findings[0].message_zh == "【复方甘草片】单次购药数量超过上限 2（禁止）"

    rules_v2 = rig.publish_rules(3)  # the regulator raises the limit
    assert rig.sync.handle_notice(rig.newest_notice("drug_rules")).detail == "drug_rules v2: fetch scheduled"
    assert rig.sync.sync_once().applied == {"drug_rules": 2}
    assert rig.store.rule_set is not None
    assert rig.store.rule_set.content_hash == rules_v2
    assert not rig.store.evaluate(three_boxes).blocked


def test_a_damaged_store_recovers_through_a_snapshot(rig: Rig) -> None:
    rig.publish("drug", DRUGS)
    v2 = rig.publish("drug", _reprice(DRUGS, 5))
    # The terminal holds "v1" with other content (a store damaged or filled elsewhere): the delta cannot prove v2.
    forged = CatalogueSnapshot.build(CatalogueKind.DRUG, 1, DRUGS[:10], T0)
    rig.store.apply_snapshot(forged)
    report = rig.sync.sync_once()
    assert report.applied == {"drug": 2}
    asked = [p for p in rig.source.asked if p[0] == "/device/v1/catalogues/drug"]
    assert asked == [
        ("/device/v1/catalogues/drug", {"from_version": 1}),
        ("/device/v1/catalogues/drug", {"from_version": 0}),
    ]
    held = rig.store.holding(CatalogueKind.DRUG)
    assert (held.version, held.content_hash, held.entries) == (2, v2["content_hash"], 400)


def test_the_thread_wakes_on_a_notice(rig: Rig) -> None:
    rig.publish("drug", DRUGS[:100])
    rig.sync.start()
    _wait(lambda: rig.store.holding(CatalogueKind.DRUG).version == 1)
    v2 = rig.publish("drug", DRUGS[:120])
    rig.sync.handle_notice(rig.newest_notice("drug"))
    _wait(lambda: rig.store.holding(CatalogueKind.DRUG).content_hash == v2["content_hash"])


def test_offline_the_held_version_stays_searchable(rig: Rig) -> None:
    rig.publish("drug", DRUGS)
    rig.sync.sync_once()
    rig.publish("drug", DRUGS[:350])  # a newer version exists, but the terminal cannot reach the server
    down = ServerApi("http://127.0.0.1:9", DEVICE, lambda: rig.session_key, rig.clock)
    rig.stack.callback(down.close)
    with pytest.raises(ServerUnreachableError):
        CatalogueSync(rig.store, down).sync_once()
    held = rig.store.holding(CatalogueKind.DRUG)
    assert (held.version, held.entries) == (1, 400)
    assert rig.store.search(DRUGS[3].name).hits


def _wait(predicate: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")
