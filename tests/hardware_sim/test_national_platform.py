"""The national-platform simulator in process, spoken to with hand-built envelopes (not the server's client, so the
two ends are checked against the spec's field names independently): sign-in order, msgid rules, signatures, the
three 就诊凭证 kinds, encrypted outputs, and the synthetic people's consistency."""

from __future__ import annotations

import base64
import json
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import pytest

from hardware_sim.evoucher import valid_id_number
from hardware_sim.national_platform import (
    BEIJING,
    INSUTYPE_EMPLOYEE,
    INSUTYPE_RESIDENT,
    CallerInstitution,
    NationalPlatformSimulator,
    SyntheticPerson,
)
from protocol.gm import sm4
from protocol.gm.errors import InvalidSignatureError
from protocol.gm.records import canonical_json, sign_record, verify_record
from protocol.gm.sm2 import SM2PrivateKey
from tests.hardware_sim.test_evoucher import StepClock

CODE = "P32058300001"


class Caller:
    """A designated pharmacy that builds envelopes by hand."""

    def __init__(self, sim: NationalPlatformSimulator, clock: StepClock, *, sm4_key: bytes | None = None) -> None:
        self.sim = sim
        self.clock = clock
        self.key = SM2PrivateKey.generate()
        self.registration: CallerInstitution = sim.register_institution(
            CODE, "康民大药房", self.key.public_key, paasid="paas-1", paas_secret="s3cret-token-xyz", sm4_key=sm4_key
        )
        self.seq = 0
        self.sign_no = ""

    def msgid(self) -> str:
        self.seq += 1
        return f"{CODE}{self.clock.now().astimezone(BEIJING):%Y%m%d%H%M%S}{self.seq:04d}"

    def envelope(
        self, infno: str, body: dict[str, Any], *, msgid: str | None = None, enctype: str = ""
    ) -> dict[str, Any]:
        env: dict[str, Any] = {
            "infno": infno,
            "msgid": msgid or self.msgid(),
            "mdtrtarea_admvs": "320583",
            "insuplc_admdvs": "",
            "recer_sys_code": "YIBAO",
            "dev_no": "term-0001",
            "dev_safe_info": "",
            "signtype": "SM2",
            "infver": "V1.0",
            "opter_type": "2",
            "opter": "op01",
            "opter_name": "自助终端",
            "inf_time": self.clock.now().astimezone(BEIJING).strftime("%Y-%m-%d %H:%M:%S"),
            "fixmedins_code": CODE,
            "fixmedins_name": "康民大药房",
            "sign_no": self.sign_no,
            "input": body,
        }
        if enctype:
            env["enctype"] = enctype
        env["cainfo"] = sign_record(self.key, env)
        return env

    def post(self, env: dict[str, Any], *, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        status, answer = self.sim.handle(headers or self.sim.gateway_headers(self.registration), canonical_json(env))
        if status == 200:  # every answer the platform gives is signed by it
            verify_record(self.sim.public_key, {k: v for k, v in answer.items() if k != "cainfo"}, answer["cainfo"])
        return status, answer

    def call(self, infno: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        status, answer = self.post(self.envelope(infno, body, **kw))
        assert status == 200
        return answer

    def sign_in(self) -> str:
        answer = self.call("9001", {"signIn": {"opter_no": "op01", "mac": "00:11:22:33:44:55", "ip": "10.0.0.8"}})
        assert answer["infcode"] == 0, answer["err_msg"]
        self.sign_no = answer["output"]["signinoutb"]["sign_no"]
        return self.sign_no


def person_query(cert_type: str, cert_no: str, card_sn: str = "") -> dict[str, Any]:
    return {"data": {"mdtrt_cert_type": cert_type, "mdtrt_cert_no": cert_no, "card_sn": card_sn, "begntime": ""}}


def reason(answer: dict[str, Any]) -> str:
    assert answer["infcode"] == -1
    return str(answer["err_msg"]).split("]")[0].lstrip("[")


@pytest.fixture
def clock() -> StepClock:
    return StepClock()


@pytest.fixture
def sim(clock: StepClock) -> NationalPlatformSimulator:
    return NationalPlatformSimulator(clock, people=30)


@pytest.fixture
def caller(sim: NationalPlatformSimulator, clock: StepClock) -> Caller:
    return Caller(sim, clock, sm4_key=sm4.generate_key())


def test_sign_in_then_person_info_by_each_certificate(sim: NationalPlatformSimulator, caller: Caller) -> None:
    person = sim.people[0]
    sign_no = caller.sign_in()
    assert len(sign_no) == 30
    by_token = caller.call("1101", person_query("01", sim.issue_ec_token(person.psn_no)))
    by_id = caller.call("1101", person_query("02", person.certno))
    by_card = caller.call("1101", person_query("03", person.card_no, person.card_sn))
    for answer in (by_token, by_id, by_card):
        assert answer["infcode"] == 0, answer["err_msg"]
        assert len(answer["inf_refmsgid"]) == 30
        assert answer["inf_refmsgid"].startswith(sim.admdvs)
        base = answer["output"]["baseinfo"]
        assert (base["psn_no"], base["certno"], base["psn_name"]) == (person.psn_no, person.certno, person.psn_name)
        assert Decimal(answer["output"]["insuinfo"][0]["balc"]) == person.balance
    assert by_token["output"] == by_id["output"] == by_card["output"]


def test_nothing_but_9001_before_sign_in(sim: NationalPlatformSimulator, caller: Caller, clock: StepClock) -> None:
    person = sim.people[0]
    assert reason(caller.call("1101", person_query("02", person.certno))) == "SIGN_IN_REQUIRED"
    caller.sign_no = "320583" + "0" * 24  # a made-up sign_no is no sign-in either
    assert reason(caller.call("1101", person_query("02", person.certno))) == "SIGN_IN_REQUIRED"
    caller.sign_in()
    assert caller.call("1101", person_query("02", person.certno))["infcode"] == 0
    # A sign-in lasts the Beijing day; signing out ends it.
    clock.advance(24 * 3600)
    assert reason(caller.call("1101", person_query("02", person.certno))) == "SIGN_IN_REQUIRED"
    caller.sign_in()
    assert caller.call("9002", {"signOut": {"sign_no": caller.sign_no, "opter_no": "op01"}})["infcode"] == 0
    assert reason(caller.call("1101", person_query("02", person.certno))) == "SIGN_IN_REQUIRED"


def test_msgid_is_checked_and_a_replay_refused(sim: NationalPlatformSimulator, caller: Caller) -> None:
    caller.sign_in()
    env = caller.envelope("1201", {"medinsinfo": {"fixmedins_type": "2"}})
    assert caller.post(env)[1]["infcode"] == 0
    _, replay = caller.post(env)  # the very same signed envelope, fresh gateway headers
    assert reason(replay) == "MSGID_REPLAYED"
    for bad in (CODE + "2026120199" + "0" * 8, "H32058300009" + "20261201170000" + "0001", CODE + "2026120117000001"):
        assert reason(caller.call("1201", {"medinsinfo": {}}, msgid=bad)) == "MSG_FORMAT", bad
    stale = f"{CODE}{sim_now_minus_days(caller, 3)}0001"
    assert reason(caller.call("1201", {"medinsinfo": {}}, msgid=stale)) == "MSG_FORMAT"


def sim_now_minus_days(caller: Caller, days: int) -> str:
    return f"{(caller.clock.now() - timedelta(days=days)).astimezone(BEIJING):%Y%m%d%H%M%S}"


def test_forged_or_altered_signature_refused(sim: NationalPlatformSimulator, caller: Caller) -> None:
    caller.sign_in()
    person = sim.people[1]
    env = caller.envelope("1101", person_query("02", person.certno))
    altered = dict(env, input=person_query("02", sim.people[2].certno))  # someone else's data under my signature
    assert reason(caller.post(altered)[1]) == "SIGNATURE"
    forged = dict(env, cainfo=sign_record(SM2PrivateKey.generate(), {k: v for k, v in env.items() if k != "cainfo"}))
    assert reason(caller.post(forged)[1]) == "SIGNATURE"
    # A refused forgery does not burn the msgid: the genuine envelope still goes through.
    assert caller.post(env)[1]["infcode"] == 0
    assert sim.stats.refused["SIGNATURE"] == 2


def test_gateway_headers(sim: NationalPlatformSimulator, caller: Caller) -> None:
    env = caller.envelope("9001", {"signIn": {"opter_no": "op01", "mac": "", "ip": ""}})
    good = sim.gateway_headers(caller.registration)
    assert caller.post(env, headers=dict(good, **{"x-tif-signature": "0" * 64}))[0] == 401
    assert caller.post(env, headers=dict(good, **{"x-tif-paasid": "nobody"}))[0] == 401
    old = sim.gateway_headers(caller.registration)
    caller.clock.advance(301)
    assert caller.post(env, headers=old)[0] == 401
    fresh = sim.gateway_headers(caller.registration)
    assert caller.post(env, headers=fresh)[0] == 200
    assert caller.post(caller.envelope("9001", env["input"]), headers=fresh)[0] == 401  # nonce reused
    assert sim.stats.gateway_refused == 4


def test_ec_token_and_card_refusals(sim: NationalPlatformSimulator, caller: Caller, clock: StepClock) -> None:
    caller.sign_in()
    person = sim.people[3]
    token = sim.issue_ec_token(person.psn_no)
    assert reason(caller.call("1101", person_query("01", "f" * 40))) == "EC_TOKEN_INVALID"
    clock.advance(301)
    assert reason(caller.call("1101", person_query("01", token))) == "EC_TOKEN_INVALID"
    assert reason(caller.call("1101", person_query("03", person.card_no, "0" * 32))) == "CARD_INVALID"
    wrong_check = person.certno[:17] + ("0" if person.certno[17] != "0" else "1")
    assert reason(caller.call("1101", person_query("02", wrong_check))) == "CERT_NO_INVALID"
    assert reason(caller.call("1101", person_query("02", "11010519491231002X"))) == "PERSON_NOT_FOUND"
    assert reason(caller.call("1101", person_query("09", person.certno))) == "MSG_FORMAT"


def test_encrypted_output_opens_only_with_the_agreed_key(sim: NationalPlatformSimulator, caller: Caller) -> None:
    assert caller.registration.sm4_key is not None
    caller.sign_in()
    person = sim.people[0]
    env = caller.envelope("1101", person_query("02", person.certno), enctype="SM4")
    answer = caller.post(env)[1]
    assert answer["infcode"] == 0
    assert answer["enctype"] == "SM4"
    assert isinstance(answer["output"], str)
    aad = f"{env['msgid']}|{answer['inf_refmsgid']}".encode()
    output = json.loads(sm4.open(caller.registration.sm4_key, base64.b64decode(answer["output"]), aad))
    assert output["baseinfo"]["certno"] == person.certno
    assert person.certno not in json.dumps(answer, ensure_ascii=False)
    # An institution without an agreed key cannot ask for encryption.
    caller.registration.sm4_key = None
    assert reason(caller.call("1201", {"medinsinfo": {}}, enctype="SM4")) == "ENCRYPTION_UNAVAILABLE"


def test_platform_signature_covers_the_answer(sim: NationalPlatformSimulator, caller: Caller) -> None:
    _, answer = caller.post(caller.envelope("9001", {"signIn": {"opter_no": "op01", "mac": "", "ip": ""}}))
    answer["output"]["signinoutb"]["sign_no"] = "9" * 30
    with pytest.raises(InvalidSignatureError):
        verify_record(sim.public_key, {k: v for k, v in answer.items() if k != "cainfo"}, answer["cainfo"])


def test_queries_settlements_credits_contributions_institutions(sim: NationalPlatformSimulator, caller: Caller) -> None:
    caller.sign_in()
    employee = next(p for p in sim.people if p.enrolment.insutype == INSUTYPE_EMPLOYEE)
    today = caller.clock.now().astimezone(BEIJING).date()
    span = {"psn_no": employee.psn_no, "begndate": (today - timedelta(days=366)).isoformat(), "enddate": str(today)}
    setl = caller.call("5203", {"data": span})["output"]["setlinfo"]
    credits = caller.call("5207", {"data": span})["output"]["crdtinfo"]
    clct = caller.call("5208", {"data": span})["output"]["clctinfo"]
    assert len(setl) == len(employee.settlements)
    assert len(credits) == len(employee.credits) == 12
    assert len(clct) == len(employee.contributions)
    assert {s["setl_id"] for s in setl} == {s.setl_id for s in employee.settlements}
    narrow = dict(span, begndate=str(today - timedelta(days=40)))
    assert len(caller.call("5207", {"data": narrow})["output"]["crdtinfo"]) < 12
    too_long = dict(span, begndate=str(today - timedelta(days=800)))
    assert reason(caller.call("5203", {"data": too_long})) == "MSG_FORMAT"
    assert reason(caller.call("5203", {"data": dict(span, psn_no="nobody")})) == "PERSON_NOT_FOUND"
    pharmacies = caller.call("1201", {"medinsinfo": {"fixmedins_type": "2"}})["output"]["medinsinfo"]
    hospitals = caller.call("1201", {"medinsinfo": {"fixmedins_type": "1"}})["output"]["medinsinfo"]
    assert pharmacies
    assert hospitals
    assert all(i["fixmedins_code"].startswith("P") for i in pharmacies)
    assert all(i["fixmedins_code"].startswith("H") and i["hosp_lv"] for i in hospitals)
    assert reason(caller.call("5999", {"data": span})) == "UNKNOWN_INFNO"


def check_person(p: SyntheticPerson, today: date) -> None:
    assert valid_id_number(p.certno)
    assert p.certno[6:14] == f"{p.brdy:%Y%m%d}"
    assert int(p.certno[16]) % 2 == (1 if p.gend == "1" else 0)  # GB 11643: odd sequence digit = male
    assert p.psn_no[:6] == p.certno[:6] == p.enrolment.insuplc_admdvs
    assert 0 <= p.age_on(today) <= 120
    # The personal account adds up, record by record and in total.
    running = p.opening_balance
    events = [(c.crdt_date, 0, c.crdt_amt, c.balc) for c in p.credits]
    events += [(s.setl_time.date(), 1, -s.acct_pay, s.balc) for s in p.settlements]
    for _, _, delta, balc in sorted(events, key=lambda e: (e[0], e[1])):
        running += delta
        assert running == balc
    assert running == p.balance >= 0
    for s in p.settlements:
        assert s.medfee_sumamt == s.fund_pay_sumamt + s.acct_pay + s.psn_cash_pay
        assert min(s.fund_pay_sumamt, s.acct_pay, s.psn_cash_pay) >= 0
    if p.enrolment.insutype == INSUTYPE_RESIDENT:
        assert p.balance == 0
        assert not p.credits
    else:
        assert p.age_on(today) >= 18


def test_synthetic_people_are_consistent(sim: NationalPlatformSimulator) -> None:
    today = date(2026, 12, 1)
    people = NationalPlatformSimulator(StepClock(), people=200, seed=11).people
    for p in people + sim.people:
        check_person(p, today)
    assert len({p.certno for p in people}) == len(people)
    kinds = {p.enrolment.insutype for p in people}
    assert kinds == {INSUTYPE_EMPLOYEE, INSUTYPE_RESIDENT}
    assert {p.gend for p in people} == {"1", "2"}
    # Reproducible from the seed.
    again = NationalPlatformSimulator(StepClock(), people=200, seed=11).people
    assert [(p.certno, p.balance) for p in again] == [(p.certno, p.balance) for p in people]
