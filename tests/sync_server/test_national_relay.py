"""The citizen-query relay against the national-platform simulator over real HTTP (uvicorn on a loopback socket): masked
answers by each 就诊凭证, records through the sealed query_ref (bound to its terminal, short-lived), every failure as
the error the kiosk needs, and an audit chain that names the query and the outcome but never the person."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import Engine

from hardware_sim.evoucher import id_check_digit
from hardware_sim.national_platform import INSUTYPE_EMPLOYEE, NationalPlatformSimulator, SyntheticPerson, create_app
from protocol.gm.keystore import save_private_key
from protocol.national_query import InstitutionsRequest, PersonInfoRequest, RecordsRequest
from protocol.secure import SessionKey
from sync_server.app import create_app as create_server_app
from sync_server.audit import ServerAudit
from sync_server.errors import ConfigurationError
from sync_server.national import (
    CHINA_TZ,
    CertType,
    CredentialRejectedError,
    HttpNationalPlatform,
    PersonNotFoundError,
    UnreachableError,
)
from sync_server.national_relay import NationalRelay, NotConfiguredError, QueryRangeError, QueryRefRejectedError
from sync_server.runtime import ServerRuntime
from sync_server.settings import ServerSettings
from terminal.national_queries import (
    CredentialNotAcceptedError,
    NationalQueries,
    PersonNotInsuredError,
    QueryFailedError,
    QueryUnavailableError,
)
from terminal.server_api import ServerApi
from terminal.session import ServerRefusedError
from tests.hardware_sim.test_evoucher import StepClock
from tests.http_serving import serving_url
from tests.sync_server.conftest import ADMIN_HEADERS
from tests.sync_server.signed_requests import enrol_with_session
from tests.sync_server.test_accounts import audit_events
from tests.sync_server.test_national_client import Rig

SECRET = b"relay-test-secret-key-0123456789abcdef"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, NationalPlatformSimulator, FastAPI, StepClock]]:
    clock = StepClock()
    sim = NationalPlatformSimulator(clock, people=30, seed=8)
    app = create_app(sim)
    with serving_url(app) as url:
        yield url, sim, app, clock


@pytest.fixture
def rig(served: tuple[str, NationalPlatformSimulator, FastAPI, StepClock]) -> Rig:
    url, sim, app, clock = served
    sim.reachable = True
    clock.advance(3600)
    return Rig(url, sim, app, clock)


class Relay:
    def __init__(self, rig: Rig, audit_dir: Path) -> None:
        self.rig = rig
        self.platform = rig.client()
        self.audit = ServerAudit(audit_dir, rig.clock)
        self.relay = NationalRelay(self.platform, secret=SECRET, clock=rig.clock, audit=self.audit, ref_ttl_s=600)

    def audit_records(self) -> list[dict[str, object]]:
        self.audit.close()
        path = self.audit.directory / "server-audit.jsonl"
        return [json.loads(line)["event"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def relay(rig: Rig, tmp_path: Path) -> Iterator[Relay]:
    r = Relay(rig, tmp_path)
    try:
        yield r
    finally:
        r.platform.close()
        r.audit.close()


def _employee(rig: Rig) -> SyntheticPerson:
    return next(p for p in rig.sim.people if p.enrolment.insutype == INSUTYPE_EMPLOYEE and p.settlements and p.credits)


def test_person_info_by_each_credential_is_masked_for_the_kiosk(relay: Relay) -> None:
    person = _employee(relay.rig)
    token = relay.rig.sim.issue_ec_token(person.psn_no)
    answers = [
        relay.relay.person_info("kiosk-001", PersonInfoRequest(mdtrt_cert_type="01", mdtrt_cert_no=token)),
        relay.relay.person_info("kiosk-001", PersonInfoRequest(mdtrt_cert_type="02", mdtrt_cert_no=person.certno)),
        relay.relay.person_info(
            "kiosk-001",
            PersonInfoRequest(mdtrt_cert_type="03", mdtrt_cert_no=person.card_no, card_sn=person.card_sn),
        ),
    ]
    for answer in answers:
        view = answer.person
        assert view.psn_name_masked == person.psn_name[0] + "*" * (len(person.psn_name) - 1)
        assert view.certno_masked == person.certno[:3] + "*" * 13 + person.certno[-2:]
        assert view.age == person.age_on(relay.rig.clock.now().astimezone(CHINA_TZ).date())
        assert answer.insurance[0].balance == person.balance
        assert answer.insurance[0].insutype == INSUTYPE_EMPLOYEE
        wire = answer.model_dump_json()
        for secret in (person.psn_no, person.certno, person.psn_name, person.card_no, person.brdy.isoformat()):
            assert secret not in wire


def test_records_through_the_query_ref(relay: Relay) -> None:
    person = _employee(relay.rig)
    info = relay.relay.person_info("kiosk-001", PersonInfoRequest(mdtrt_cert_type="02", mdtrt_cert_no=person.certno))
    ref = info.query_ref
    assert person.psn_no not in ref
    today = relay.rig.clock.now().astimezone(CHINA_TZ).date()
    settlements = relay.relay.settlements("kiosk-001", RecordsRequest(query_ref=ref))
    assert (settlements.enddate, settlements.begndate) == (today, today - timedelta(days=365))
    in_range = [s for s in person.settlements if settlements.begndate <= s.setl_time.date() <= today]
    assert [s.setl_id for s in settlements.records] == [s.setl_id for s in in_range]
    assert all(s.medfee_sumamt == s.fund_pay_sumamt + s.acct_pay + s.psn_cash_pay for s in settlements.records)
    credits = relay.relay.account_credits("kiosk-001", RecordsRequest(query_ref=ref))
    assert sum((c.crdt_amt for c in credits.records), Decimal(0)) == sum(
        (c.crdt_amt for c in person.credits if credits.begndate <= c.crdt_date <= today), Decimal(0)
    )
    contributions = relay.relay.contributions("kiosk-001", RecordsRequest(query_ref=ref))
    assert len(contributions.records) == len(
        [c for c in person.contributions if contributions.begndate <= c.arrive_date <= today]
    )
    narrow = relay.relay.settlements(
        "kiosk-001", RecordsRequest(query_ref=ref, begndate=today - timedelta(days=30), enddate=today)
    )
    assert len(narrow.records) <= len(settlements.records)
    pharmacies = relay.relay.institutions("kiosk-001", InstitutionsRequest(fixmedins_type="2"))
    assert pharmacies.institutions
    assert {i.fixmedins_type for i in pharmacies.institutions} == {"2"}


def test_query_ref_is_bound_to_its_terminal_and_expires(relay: Relay) -> None:
    person = _employee(relay.rig)
    ref = relay.relay.person_info(
        "kiosk-001", PersonInfoRequest(mdtrt_cert_type="02", mdtrt_cert_no=person.certno)
    ).query_ref
    with pytest.raises(QueryRefRejectedError, match="another terminal"):
        relay.relay.settlements("kiosk-002", RecordsRequest(query_ref=ref))
    tampered = ref[:-6] + ("AAAAAA" if not ref.endswith("AAAAAA") else "BBBBBB")
    with pytest.raises(QueryRefRejectedError, match="not valid"):
        relay.relay.settlements("kiosk-001", RecordsRequest(query_ref=tampered))
    other_server = NationalRelay(
        relay.platform, secret=b"another-server-secret-key-012345678", clock=relay.rig.clock, audit=relay.audit,
        ref_ttl_s=600,
    )  # fmt: skip
    with pytest.raises(QueryRefRejectedError):
        other_server.settlements("kiosk-001", RecordsRequest(query_ref=ref))
    relay.rig.clock.advance(601)
    with pytest.raises(QueryRefRejectedError, match="expired"):
        relay.relay.settlements("kiosk-001", RecordsRequest(query_ref=ref))


def test_failures_are_typed_for_the_kiosk(relay: Relay) -> None:
    person = _employee(relay.rig)
    bad_digit = person.certno[:-1] + ("0" if person.certno[-1] != "0" else "1")
    with pytest.raises(CredentialRejectedError):
        relay.relay.person_info("kiosk-001", PersonInfoRequest(mdtrt_cert_type="02", mdtrt_cert_no=bad_digit))
    with pytest.raises(CredentialRejectedError):
        relay.relay.person_info("kiosk-001", PersonInfoRequest(mdtrt_cert_type="01", mdtrt_cert_no="no-such-token"))
    with pytest.raises(PersonNotFoundError):
        relay.relay.person_info(
            "kiosk-001",
            PersonInfoRequest(mdtrt_cert_type="03", mdtrt_cert_no="A00000000", card_sn="000000"),
        )
    ref = relay.relay.person_info(
        "kiosk-001", PersonInfoRequest(mdtrt_cert_type="02", mdtrt_cert_no=person.certno)
    ).query_ref
    today = relay.rig.clock.now().astimezone(CHINA_TZ).date()
    with pytest.raises(QueryRangeError):
        relay.relay.settlements("kiosk-001", RecordsRequest(query_ref=ref, begndate=today - timedelta(days=400)))
    relay.rig.sim.reachable = False
    with pytest.raises(UnreachableError):
        relay.relay.settlements("kiosk-001", RecordsRequest(query_ref=ref))
    relay.rig.sim.reachable = True
    unconfigured = NationalRelay(None, secret=SECRET, clock=relay.rig.clock, audit=relay.audit, ref_ttl_s=600)
    with pytest.raises(NotConfiguredError, match="not configured"):
        unconfigured.person_info("kiosk-001", PersonInfoRequest(mdtrt_cert_type="02", mdtrt_cert_no=person.certno))


def test_every_relay_is_audited_without_personal_data(relay: Relay) -> None:
    person = _employee(relay.rig)
    info = relay.relay.person_info("kiosk-001", PersonInfoRequest(mdtrt_cert_type="02", mdtrt_cert_no=person.certno))
    relay.relay.settlements("kiosk-001", RecordsRequest(query_ref=info.query_ref))
    with pytest.raises(QueryRefRejectedError):
        relay.relay.contributions("kiosk-002", RecordsRequest(query_ref=info.query_ref))
    with pytest.raises(CredentialRejectedError):
        relay.relay.person_info("kiosk-001", PersonInfoRequest(mdtrt_cert_type="01", mdtrt_cert_no="stale-token"))
    records = [r for r in relay.audit_records() if r.get("type") == "national.query"]
    summary = [(r["device_id"], r["query"], r["infno"], r["outcome"]) for r in records]
    assert summary == [
        ("kiosk-001", "person_info", "1101", "ok"),
        ("kiosk-001", "settlements", "5203", "ok"),
        ("kiosk-002", "contributions", "5208", "ref_rejected"),
        ("kiosk-001", "person_info", "1101", "credential_rejected"),
    ]
    # The same person is linkable across queries by a pseudonym, which is not their number.
    assert records[0]["subject_ref"] == records[1]["subject_ref"] == records[2]["subject_ref"]
    assert records[3]["reason"] == "EC_TOKEN_INVALID"
    text = (relay.audit.directory / "server-audit.jsonl").read_text()
    for secret in (person.psn_no, person.certno, person.psn_name, "stale-token", str(person.balance)):
        assert secret not in text


# ---------------------------------------------------------------- composition from the server settings


KEY_PASSPHRASE = "national-key-passphrase"


def platform_settings(rig: Rig, tmp_path: Path, *, passphrase: str = KEY_PASSPHRASE) -> dict[str, Any]:
    """ServerSettings keys that make the runtime build a real client of the simulator (key file written here)."""
    key_file = tmp_path / "national_key.json"
    if not key_file.exists():
        save_private_key(key_file, rig.key, KEY_PASSPHRASE, iterations=1000)
    return {
        "national_platform": rig.settings(),
        "national_platform_key_file": key_file,
        "national_platform_key_passphrase": passphrase,
    }


def test_the_runtime_builds_the_platform_client_from_settings(rig: Rig, tmp_path: Path, sqlite_engine: Engine) -> None:
    settings = ServerSettings(database_url="sqlite://", data_dir=tmp_path / "data", **platform_settings(rig, tmp_path))
    runtime = ServerRuntime.build(settings, engine=sqlite_engine, clock=rig.clock, start_ingest=False)
    try:
        assert isinstance(runtime.national, HttpNationalPlatform)
        assert len(runtime.national.sign_in().sign_no) == 30  # the real client, over HTTP, with the file's key
    finally:
        runtime.stop()
    wrong = ServerSettings(
        database_url="sqlite://", data_dir=tmp_path / "data", **platform_settings(rig, tmp_path, passphrase="wrong-one")
    )
    with pytest.raises(ConfigurationError, match="cannot open the national-platform key"):
        ServerRuntime.build(wrong, engine=sqlite_engine, clock=rig.clock, start_ingest=False)
    with pytest.raises(ValidationError, match="national_platform_key_file"):
        ServerSettings(database_url="sqlite://", national_platform=rig.settings())
    unconfigured = ServerRuntime.build(
        ServerSettings(database_url="sqlite://", data_dir=tmp_path / "data"), engine=sqlite_engine, start_ingest=False
    )
    assert unconfigured.national is None
    unconfigured.stop()


# ---------------------------------------------------------------- the route, a real terminal client, real HTTP


@dataclass
class Served:
    url: str
    client: httpx.Client
    data_dir: Path
    apis: list[ServerApi] = field(default_factory=list)

    def api(self, rig: Rig, device_id: str, key: Callable[[], SessionKey | None]) -> ServerApi:
        api = ServerApi(self.url, device_id, key, rig.clock)
        self.apis.append(api)
        return api

    def terminal(self, rig: Rig, device_id: str) -> tuple[NationalQueries, ServerApi]:
        enrolled = enrol_with_session(self.client, rig.clock, device_id)
        api = self.api(rig, device_id, lambda: enrolled.session)
        return NationalQueries(api), api


@contextmanager
def serving_relay(
    rig: Rig, tmp_path: Path, engine: Engine, db_url: str, *, configured: bool = True
) -> Iterator[Served]:
    data_dir = tmp_path / "server-data"
    extra = platform_settings(rig, tmp_path) if configured else {}
    settings = ServerSettings(database_url=db_url, data_dir=data_dir, **extra)
    app = create_server_app(settings, engine=engine, start_ingest=False, clock=rig.clock)
    with serving_url(app, lifespan="on") as url, httpx.Client(base_url=url, headers=ADMIN_HEADERS) as client:
        served = Served(url, client, data_dir)
        try:
            yield served
        finally:
            for api in served.apis:
                api.close()


def test_terminals_ask_through_the_route(rig: Rig, tmp_path: Path, sqlite_engine: Engine, sqlite_url: str) -> None:
    person = _employee(rig)
    with serving_relay(rig, tmp_path, sqlite_engine, sqlite_url) as served:
        kiosk, raw = served.terminal(rig, "kiosk-nat-1")
        info = kiosk.person_info("02", person.certno)
        assert info.person.psn_name_masked.startswith(person.psn_name[0])
        assert info.insurance[0].balance == person.balance
        settlements = kiosk.settlements(info.query_ref)
        assert {s.setl_id for s in settlements.records} <= {s.setl_id for s in person.settlements}
        assert settlements.records
        assert kiosk.account_credits(info.query_ref).records
        assert kiosk.contributions(info.query_ref).records
        assert kiosk.institutions("1").institutions
        token_info = kiosk.person_info("01", rig.sim.issue_ec_token(person.psn_no))
        assert token_info.person == info.person

        other, _ = served.terminal(rig, "kiosk-nat-2")
        with pytest.raises(CredentialNotAcceptedError):
            other.settlements(info.query_ref)  # another terminal's ref
        with pytest.raises(CredentialNotAcceptedError):
            kiosk.person_info("03", person.card_no, card_sn="999999")
        stranger = "11010519491231002"
        with pytest.raises(PersonNotInsuredError):
            kiosk.person_info("02", stranger + id_check_digit(stranger))
        with pytest.raises(QueryFailedError):  # refused by the client: longer than 366 days
            kiosk.settlements(info.query_ref, begndate=date(2019, 1, 1), enddate=date(2020, 12, 31))
        with pytest.raises(QueryFailedError):  # refused by the server (422): the end defaults to today
            kiosk.settlements(info.query_ref, begndate=date(2020, 1, 1))
        rig.sim.reachable = False
        with pytest.raises(QueryUnavailableError):
            kiosk.settlements(info.query_ref)
        rig.sim.reachable = True

        # Unsigned, unknown and oversized requests never reach the platform.
        calls = dict(rig.sim.stats.calls)
        assert served.client.post("/device/v1/national/person_info", json={}).status_code == 401
        keyless = served.api(rig, "kiosk-nat-1", lambda: None)
        with pytest.raises(QueryUnavailableError):
            NationalQueries(keyless).person_info("02", person.certno)
        # `raw` is the same signed client, for bodies the typed client never sends
        with pytest.raises(ServerRefusedError) as invalid:
            raw.post_json("/device/v1/national/person_info", {"mdtrt_cert_type": "09", "mdtrt_cert_no": "x"})
        assert invalid.value.status == 422
        assert "person_info" in str(invalid.value)
        assert person.certno not in str(invalid.value)
        with pytest.raises(ServerRefusedError) as unknown:
            raw.post_json("/device/v1/national/everything", {})
        assert unknown.value.status == 422
        with pytest.raises(ServerRefusedError) as huge:
            raw.post_json("/device/v1/national/person_info", {"mdtrt_cert_type": "02", "mdtrt_cert_no": "1" * 20000})
        assert huge.value.status == 413
        assert rig.sim.stats.calls == calls

    events = [e for e in audit_events(served.data_dir) if e["type"] == "national.query"]
    assert {e["device_id"] for e in events} == {"kiosk-nat-1", "kiosk-nat-2"}
    assert all(person.certno not in json.dumps(e) and person.psn_no not in json.dumps(e) for e in events)


def test_without_a_platform_the_route_says_so(rig: Rig, tmp_path: Path, sqlite_engine: Engine, sqlite_url: str) -> None:
    with serving_relay(rig, tmp_path, sqlite_engine, sqlite_url, configured=False) as served:
        kiosk, raw = served.terminal(rig, "kiosk-nat-3")
        with pytest.raises(QueryUnavailableError):
            kiosk.person_info("02", rig.sim.people[0].certno)
        with pytest.raises(ServerRefusedError) as refused:
            raw.post_json("/device/v1/national/institutions", {})
        assert refused.value.status == 503
        assert "not_configured" in str(refused.value)


def test_each_http_process_sends_its_own_msgids(rig: Rig, tmp_path: Path, sqlite_engine: Engine) -> None:
    """The main process and an HTTP worker call for the same institution in the same second: distinct msgid ranges
    (from `http_process_index`) keep the platform from refusing the second as a replay."""
    base = ServerSettings(
        database_url="sqlite://", data_dir=tmp_path / "data", http_workers=1, **platform_settings(rig, tmp_path)
    )
    runtimes = [
        ServerRuntime.build(
            base.model_copy(update={"http_process_index": index}),
            engine=sqlite_engine,
            clock=rig.clock,
            start_ingest=False,
        )
        for index in (0, 1)
    ]
    try:
        for runtime in runtimes:
            assert runtime.national is not None
            runtime.national.sign_in()  # the test clock stands still: both in the same second
        replayed_before = rig.sim.stats.refused.get("MSGID_REPLAYED", 0)
        person = _employee(rig)
        for runtime in runtimes:
            assert runtime.national is not None
            assert runtime.national.person_info(CertType.ID_CARD, person.certno).baseinfo.psn_no == person.psn_no
        assert rig.sim.stats.refused.get("MSGID_REPLAYED", 0) == replayed_before
    finally:
        for runtime in runtimes:
            runtime.stop()
