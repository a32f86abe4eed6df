"""The POS verification as evidence and the proxy relationships from the server (docs/purchases.md).

* An enrolled runtime's POS API signs one `pos_verification` record per outcome with the device's real SM2 identity
  key, in one outbox transaction with its audit event; the record verifies against the key the server enrolled,
  carries the transaction code the POS got, person references and masked numbers only.
* The drug lines of a request are evaluated against the rules of a real `CatalogueStore` for the person bought for
  (age and sex from the ID number, in memory): the answer carries the findings, `blocked`, the rules' version and the
  codes the catalogue does not list.
* `ProxyRelationshipSync` fills the registry from the device API page by page, replaces the whole set (an ended
  relationship disappears), keeps the stored set when the server cannot be reached, and fetches again when the
  `proxy_relationships` notice wakes it; the runtime owns the registry and answers the notice.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from drivers.idcard import IdCardData
from hardware_sim import simulated_peripherals
from hardware_sim.evoucher import EVoucherSimulator, synthetic_insured
from hardware_sim.idcard_sim import synthetic_card
from protocol import CommandKind, CommandOutcome, DeviceCommand, SignedRecord, SignedRecordKind, SystemClock, Topics
from protocol.catalogue import CatalogueKind, CatalogueSnapshot, ChargeCategory, DispensingClass, DrugEntry
from protocol.drug_rules import (
    AgeRange,
    AnyRule,
    DrugRuleSet,
    DrugSelector,
    MaxQuantityPerPeriod,
    MaxQuantityPerPurchase,
    RuleAction,
)
from protocol.envelope import decode_envelope
from protocol.evidence import verify_device_record
from protocol.purchase import AgentKind, VerificationOutcome, parse_pos_verification, person_ref
from protocol.request_signing import sign_request
from terminal.catalogue import CatalogueStore
from terminal.evoucher import EVoucherService, TerminalContext
from terminal.identity import IdentityStore, SecurityLog
from terminal.pos_api import (
    AgentCheck,
    BuyerCheck,
    BuyerIdentity,
    BuyerMethod,
    build_pos_server,
    person_facts,
    runtime_evidence,
)
from terminal.proxy import (
    ProxyRelationship,
    ProxyRelationshipsHandler,
    ProxyRelationshipSync,
    ProxySyncError,
    SqliteProxyRegistry,
)
from terminal.purchase_history import ServerPurchaseHistory
from terminal.runtime import TerminalRuntime, build_runtime
from terminal.session import ServerUnreachableError, TerminalSecurity
from tests.terminal.conftest import FakeClock, terminal_config, wait_until
from tests.terminal.fakes import ScriptedLink
from tests.terminal.identity_server import PlayedServer
from tests.terminal.test_pos_api import CLIENT, SimVerifier, _config
from tests.terminal.test_session import clock, manager, server, store

__all__ = ["clock", "server", "store"]  # fixtures shared with test_session

AT = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
FFGC = "ZA01AAA0001010100001"


def _drug(code: str, generic: str) -> DrugEntry:
    return DrugEntry(
        code=code,
        name=generic,
        generic_name=generic,
        dosage_form="片剂",
        specification="100片",
        package="1瓶",
        unit="瓶",
        manufacturer="测试制药有限公司",
        approval_number="国药准字H00000000",
        category=ChargeCategory.CLASS_A,
        dispensing=DispensingClass.RX,
        price_fen=1500,
    )


@pytest.fixture
def catalogue(tmp_path: Path) -> Iterator[CatalogueStore]:
    with CatalogueStore.open(tmp_path / "catalogue.db") as held:
        held.apply_snapshot(CatalogueSnapshot.build(CatalogueKind.DRUG, 1, [_drug(FFGC, "复方甘草片")], AT))
        rules: list[AnyRule] = [
            MaxQuantityPerPurchase(
                rule_id="FFGC-1",
                title="复方甘草片",
                title_en="compound liquorice tablets",
                drugs=DrugSelector(generic_names=["复方甘草片"]),
                action=RuleAction.BLOCK,
                max_quantity=2,
            ),
            AgeRange(
                rule_id="FFGC-AGE",
                title="复方甘草片",
                title_en="compound liquorice tablets",
                drugs=DrugSelector(generic_names=["复方甘草片"]),
                action=RuleAction.WARN,
                min_age_years=18,
                max_age_years=60,
            ),
        ]
        held.apply_rule_set(DrugRuleSet.build(7, rules, AT))
        yield held


def _enrolled_runtime(tmp_path: Path, store: IdentityStore, server: PlayedServer, clock: FakeClock) -> TerminalRuntime:
    log = SecurityLog.open(store.directory, clock)
    sessions = manager(store, server, clock, log)
    sessions.maintain()
    security = TerminalSecurity(sessions.identity, sessions, log)
    return build_runtime(
        terminal_config(tmp_path), simulated_peripherals(), clock, link=ScriptedLink(clock), security=security
    )


def _call(http: httpx.Client, secret: bytes, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    raw = b"" if body is None else json.dumps(body).encode()
    ts, nonce = str(int(time.time())), uuid.uuid4().hex
    headers = {
        "X-POS-Client": CLIENT,
        "X-POS-Timestamp": ts,
        "X-POS-Nonce": nonce,
        "X-POS-Signature": sign_request(secret, method, path, ts, nonce, raw),
        "Content-Type": "application/json",
    }
    return http.request(method, path, content=raw, headers=headers)


def _verify(http: httpx.Client, secret: bytes, body: dict[str, Any]) -> dict[str, Any]:
    started = _call(http, secret, "POST", "/pos/v1/verifications", body)
    assert started.status_code == 202, started.text
    vid = started.json()["verification_id"]
    answer: dict[str, Any] = {}
    assert wait_until(
        lambda: (
            (answer.update(_call(http, secret, "GET", f"/pos/v1/verifications/{vid}").json()) or True)
            and answer["status"] != "pending"
        )
    )
    return answer


def test_an_enrolled_kiosk_signs_each_outcome_and_warns_about_the_drug_lines(
    tmp_path: Path, store: IdentityStore, server: PlayedServer, clock: FakeClock, catalogue: CatalogueStore
) -> None:
    runtime = _enrolled_runtime(tmp_path, store, server, clock)
    platform = EVoucherSimulator(SystemClock())
    insured = synthetic_insured(1, seed=3)[0]
    card = synthetic_card(4)
    verifier = SimVerifier(
        EVoucherService(platform, TerminalContext("H1", "SIM-0001"), runtime.outbox.enqueue),
        platform,
        platform.enrol(insured),
        card,
    )
    agent_ref = person_ref("01", "110105198001010016")
    registry = SqliteProxyRegistry()
    registry.register(ProxyRelationship(person_ref("01", insured.id_number), agent_ref, relationship_id="17"))
    verifier.agent_in_front = agent_ref
    secret = secrets.token_hex(32).encode()
    evidence = runtime_evidence(runtime)
    assert evidence is not None
    pos = build_pos_server(
        _config(tmp_path, secret),
        device_id="SIM-0001",
        verifier=verifier,
        registry=registry,
        record=lambda e: runtime.record_audits([e]),
        clock=SystemClock(),
        evidence=evidence,
        rules=catalogue,
        port=0,
    )
    pos.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{pos.bound_port}", timeout=5.0) as http:
            lines = [{"med_list_codg": FFGC, "cnt": 3}, {"med_list_codg": "XX-NOT-LISTED", "cnt": 1}]
            bought = _verify(http, secret, {"method": "id_card_face", "drug_lines": lines})
            proxied = _verify(http, secret, {"method": "evoucher", "proxy": {"agent": {"method": "face_live"}}})
            verifier.agent_in_front = None
            refused = _verify(http, secret, {"method": "evoucher", "proxy": {"agent": {"method": "face_live"}}})
    finally:
        pos.stop()
    try:
        assert bought["status"] == "verified"
        facts = person_facts(BuyerIdentity(card.name, "01", card.id_number), datetime.now(UTC))
        assert facts.age_years is not None
        assert facts.sex is not None
        outside = not 18 <= facts.age_years <= 60
        assert [w["rule_id"] for w in bought["warnings"]] == ["FFGC-1"] + (["FFGC-AGE"] if outside else [])
        assert bought["blocked"] is True
        assert bought["rules_version"] == 7
        assert bought["unknown_drug_codes"] == ["XX-NOT-LISTED"]
        assert bought["warnings"][0]["observed"] == 3
        assert proxied["status"] == "verified"
        assert refused["status"] == "refused"

        claimed = runtime.outbox.claim(1000)
        envelopes = [decode_envelope(c.wire) for c in claimed]
        wire = b"".join(c.wire for c in claimed)
        for secret_value in (card.id_number, card.name, insured.id_number, insured.name):
            assert secret_value.encode() not in wire
        signed = [
            e
            for e in envelopes
            if isinstance(e.payload, SignedRecord) and e.payload.record_type is SignedRecordKind.POS_VERIFICATION
        ]
        assert len(signed) == 3
        device_key = server.keys["SIM-0001"][1]
        records = []
        for env in signed:
            assert isinstance(env.payload, SignedRecord)
            verify_device_record(env.payload, device_id="SIM-0001", device_key=device_key)
            records.append(parse_pos_verification(dict(env.payload.record)))
            # the audit event of the same outcome is the next record of the same transaction
            follower = next(e for e in envelopes if e.seq == env.seq + 1)
            assert follower.payload.type == "audit_event"
        first, second, third = records
        assert first.transaction_code == bought["transaction_code"]
        assert first.buyer_ref == person_ref("01", card.id_number)
        assert first.buyer_masked_id == card.id_number[:4] + "*" * 10 + card.id_number[-4:]
        assert first.findings[0].rule_id == "FFGC-1"
        assert first.findings[0].action == "block"
        assert first.rules_version == 7
        assert second.proxy is not None
        assert (second.proxy.agent_kind, second.proxy.agent_ref, second.proxy.relationship_id) == (
            AgentKind.FACE,
            agent_ref,
            "17",
        )
        assert second.transaction_code == proxied["transaction_code"]
        assert (third.outcome, third.transaction_code, third.reason) == (
            VerificationOutcome.REFUSED,
            None,
            "agent_not_registered",
        )
    finally:
        registry.close()
        runtime.stop()


def test_a_kiosk_without_an_identity_records_the_audit_event_only(tmp_path: Path) -> None:
    clock = FakeClock()
    runtime = build_runtime(terminal_config(tmp_path), simulated_peripherals(), clock, link=ScriptedLink(clock))
    try:
        assert runtime_evidence(runtime) is None
    finally:
        runtime.stop()


# ---------------------------------------------------------------------------------------------------- relationship sync


class PagedApi:
    """The device API as the sync sees it: pages of the current set, or an error while 'offline'."""

    def __init__(self, relationships: list[dict[str, Any]]) -> None:
        self.relationships = relationships
        self.offline = False
        self.calls: list[Mapping[str, str | int] | None] = []

    def get_json(self, path: str, params: Mapping[str, str | int] | None = None) -> Any:
        assert path == "/device/v1/proxy-relationships"
        self.calls.append(params)
        if self.offline:
            raise ConnectionError("server unreachable")
        offset = int((params or {}).get("offset", 0))
        limit = int((params or {}).get("limit", 500))
        return {"items": self.relationships[offset : offset + limit], "total": len(self.relationships)}


def _rel(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "relationship_id": str(n),
        "beneficiary_ref": person_ref("01", f"B{n}"),
        "agent_ref": person_ref("01", f"A{n}"),
        "valid_from": None,
        "valid_until": (AT + timedelta(days=30)).isoformat(),
        **extra,
    }


def test_the_sync_replaces_the_whole_set_page_by_page_and_keeps_it_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("terminal.proxy.PAGE_SIZE", 2)
    api = PagedApi([_rel(n) for n in range(1, 6)])
    registry = SqliteProxyRegistry()
    sync = ProxyRelationshipSync(registry, api)
    assert sync.sync() == 5
    assert [c["offset"] for c in api.calls if c] == [0, 2, 4]
    assert [r.relationship_id for r in registry.agents_of(person_ref("01", "B3"), AT)] == ["3"]
    assert registry.agents_of(person_ref("01", "B3"), AT + timedelta(days=31)) == []  # expired by then

    api.relationships = [_rel(1), _rel(5)]  # 2, 3, 4 ended on the server
    sync.sync()
    assert registry.count() == 2
    assert registry.agents_of(person_ref("01", "B3"), AT) == []

    api.offline = True
    with pytest.raises(ProxySyncError):
        sync.sync()
    assert registry.count() == 2  # kept

    api.offline = False
    api.relationships = [{**_rel(9), "beneficiary_ref": "not-a-ref"}]
    with pytest.raises(ProxySyncError, match="contract"):
        sync.sync()
    assert registry.count() == 2
    registry.close()


def test_the_notice_wakes_the_sync_thread_and_failures_are_retried() -> None:
    api = PagedApi([_rel(1)])
    api.offline = True
    registry = SqliteProxyRegistry()
    synced = threading.Event()
    sync = ProxyRelationshipSync(registry, api, retry_s=0.05, on_synced=lambda _n: synced.set())
    sync.start()
    try:
        assert wait_until(lambda: len(api.calls) >= 2)  # the fetch at start failed and was retried
        api.offline = False
        assert synced.wait(5)
        assert registry.count() == 1
        api.relationships = [_rel(1), _rel(2)]
        command = DeviceCommand(
            command_id=uuid.uuid4(),
            device_id="SIM-0001",
            kind=CommandKind.PROXY_RELATIONSHIPS,
            issued_at=AT,
            expires_at=AT + timedelta(days=1),
        )
        answer = ProxyRelationshipsHandler(sync)(command)
        assert answer.outcome is CommandOutcome.APPLIED
        assert wait_until(lambda: registry.count() == 2)
    finally:
        sync.stop()
        registry.close()
    without_api = ProxyRelationshipSync(SqliteProxyRegistry(), None)
    assert ProxyRelationshipsHandler(without_api)(command).outcome is CommandOutcome.REJECTED
    without_api.registry.close()


def test_the_runtime_keeps_the_registry_beside_the_outbox_and_answers_the_notice(tmp_path: Path) -> None:
    clock = FakeClock()
    runtime = build_runtime(terminal_config(tmp_path), simulated_peripherals(), clock, link=ScriptedLink(clock))
    try:
        assert runtime.proxy_registry is not None
        assert runtime.proxy_sync is not None
        assert (tmp_path / "proxy_relationships.sqlite3").exists()
        runtime.proxy_registry.register(ProxyRelationship(person_ref("01", "B1"), person_ref("01", "A1")))
        command = DeviceCommand(
            command_id=uuid.uuid4(),
            device_id=runtime.config.device_id,
            kind=CommandKind.PROXY_RELATIONSHIPS,
            issued_at=clock.now(),
            expires_at=clock.now() + timedelta(days=1),
        )
        downlink = runtime.sync.downlink
        assert downlink is not None
        downlink.process([(Topics().downlink(runtime.config.device_id), command.to_bytes())])
        assert downlink.stats().commands_answered == 1
    finally:
        runtime.stop()
    reopened = SqliteProxyRegistry(tmp_path / "proxy_relationships.sqlite3")
    assert reopened.count() == 1  # survives a restart
    reopened.close()


class HistoryApi:
    """The device API's purchase-history endpoint as a plain object (a `JsonSource`): answers `answer` or raises it."""

    def __init__(self, answer: dict[str, Any] | Exception) -> None:
        self.answer = answer
        self.asked: list[tuple[str, dict[str, str]]] = []

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        self.asked.append((path, dict(params or {})))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class CardOnly:
    """A `BuyerVerifier` for the card path: the ID card read and the face matched (the verification itself is
    tested elsewhere; here only what the rules make of the buyer matters)."""

    def __init__(self, card: IdCardData) -> None:
        self.card = card

    def verify_buyer(self, method: BuyerMethod, cancel: threading.Event, *, with_face: bool = True) -> BuyerCheck:
        return BuyerCheck(BuyerIdentity(self.card.name, "01", self.card.id_number), "id_card+face_1to1")

    def verify_agent_face(self, candidate_refs: Sequence[str], cancel: threading.Event) -> AgentCheck:
        return AgentCheck(None, "face_1toN", "agent_not_registered")


def _history(ref: str, *lines: tuple[int, datetime, str, float]) -> dict[str, Any]:
    return {
        "type": "purchase_history",
        "person_ref": ref,
        "since": (datetime.now(UTC) - timedelta(days=183)).isoformat(),
        "lines": [
            {"purchase_id": pid, "settled_at": at.isoformat(), "med_list_codg": code, "quantity": qty}
            for pid, at, code, qty in lines
        ],
        "complete": True,
    }


def test_period_rules_count_the_buyers_purchases_the_platform_registered(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    card = synthetic_card(5)
    buyer = person_ref("01", card.id_number)
    with CatalogueStore.open(tmp_path / "catalogue.db") as held:
        held.apply_snapshot(CatalogueSnapshot.build(CatalogueKind.DRUG, 1, [_drug(FFGC, "复方甘草片")], now))
        period: list[AnyRule] = [
            MaxQuantityPerPeriod(
                rule_id="FFGC-30D",
                title="复方甘草片",
                title_en="compound liquorice tablets",
                drugs=DrugSelector(generic_names=["复方甘草片"]),
                action=RuleAction.WARN,
                max_quantity=4,
                period_days=30,
            )
        ]
        held.apply_rule_set(DrugRuleSet.build(8, period, now))
        answers: list[dict[str, Any] | Exception] = [
            # 3 bottles 10 days ago count; 5 bottles 40 days ago are outside the 30 days
            _history(buyer, (41, now - timedelta(days=10), FFGC, 3), (12, now - timedelta(days=40), FFGC, 5)),
            ServerUnreachableError("server away"),
            _history(person_ref("01", "110105198001010016")),  # an answer about someone else is not used
        ]
        results: list[tuple[dict[str, Any], list[tuple[str, dict[str, str]]]]] = []
        for answer in answers:
            api = HistoryApi(answer)
            secret = secrets.token_hex(32).encode()
            folder = tmp_path / f"pos-{len(results)}"
            folder.mkdir()
            pos = build_pos_server(
                _config(folder, secret),
                device_id="SIM-0001",
                verifier=CardOnly(card),
                registry=SqliteProxyRegistry(),
                record=lambda _e: None,
                clock=SystemClock(),
                rules=held,
                history=ServerPurchaseHistory(api, held.drug),
                port=0,
            )
            pos.start()
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{pos.bound_port}", timeout=5.0) as http:
                    body = {"method": "id_card_face", "drug_lines": [{"med_list_codg": FFGC, "cnt": 2}]}
                    results.append((_verify(http, secret, body), api.asked))
            finally:
                pos.stop()
    (counted, asked), (away, _), (other, _) = results
    assert asked == [("/device/v1/purchase-history", {"person_ref": buyer, "days": "183"})]
    assert counted["purchase_history"] == "server"
    [finding] = counted["warnings"]
    assert (finding["rule_id"], finding["observed"], finding["limit"]) == ("FFGC-30D", 5, 4)
    # without the lookback the rule sees this purchase only, and the answer says so
    assert (away["status"], away["purchase_history"], away["warnings"]) == ("verified", "unavailable", [])
    assert (other["purchase_history"], other["warnings"]) == ("unavailable", [])
