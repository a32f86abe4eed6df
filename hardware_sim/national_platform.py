"""A clean-room simulator of the national medical-insurance platform's (国家医疗保障信息平台) PUBLICLY VISIBLE protocol,
with synthetic insured people: `NationalPlatformSimulator` (in process) and `create_app` (the same over HTTP).

What is simulated (docs/national-platform.md): one POST endpoint taking the common JSON envelope (infno, msgid,
mdtrtarea_admvs, …, sign_no, input) and answering (infcode, inf_refmsgid, refmsg_time, respond_time, err_msg,
output); the gateway's x-tif-paasid/timestamp/nonce/signature headers; 9001 签到 / 9002 签退 (a sign_no is required by
every other transaction); 1101 人员信息获取 by ecToken (01), ID number (02) or social-security card + card_sn (03);
1201 医药机构信息获取; 5203 结算信息查询; 5207 个人账户划入查询 and 5208 缴费信息查询 (OUR numbers). msgid format and
uniqueness (a replayed msgid is refused), the SM2 signature of each request (`cainfo`, checked against the
institution's registered key), the platform's own SM2 signature on each answer, and SM4-GCM-encrypted outputs for
institutions that have an agreed key and ask (`enctype` "SM4").

RECONSTRUCTED (plausible, ours, never to be presented as the real platform's format): the signed bytes
(`canonical_json` of the envelope without `cainfo`), the x-tif formula, `enctype` and the encrypted-output form,
the `[REASON]` prefix of err_msg, inf_refmsgid = admdvs(6) + yyyyMMddHHmmss(14) + 10-digit sequence, the
5207/5208 transactions and their record shapes, amounts as decimal strings, psn_no/card/sign_no formats.

This module is written independently of `sync_server.national` (it shares only `protocol.gm` and the synthetic
identity helpers), so a misspelled field on either side fails a test instead of agreeing with itself. Time comes
from an injected `protocol.Clock`. Never imported by production code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from hardware_sim.evoucher import id_check_digit, valid_id_number
from protocol import Clock
from protocol.gm import sm4
from protocol.gm.errors import CryptoError
from protocol.gm.records import canonical_json, sign_record, verify_record
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey

BEIJING: Final = timezone(timedelta(hours=8))
SERVICE_PATH: Final = "/fsi/api/rsfComIfsService/callService"
EC_TOKEN_TTL_S: Final = 300.0
TIMESTAMP_SKEW_S: Final = 300.0
"""x-tif-timestamp may be this far from the gateway's clock; nonces are remembered for twice that."""
MSGID_WINDOW_DAYS: Final = 1
"""A msgid stamped more than a day from the platform's clock is refused (and so the replay table stays bounded)."""

ENVELOPE_FIELDS: Final = (
    "infno",
    "msgid",
    "mdtrtarea_admvs",
    "insuplc_admdvs",
    "recer_sys_code",
    "dev_no",
    "dev_safe_info",
    "cainfo",
    "signtype",
    "infver",
    "opter_type",
    "opter",
    "opter_name",
    "inf_time",
    "fixmedins_code",
    "fixmedins_name",
    "sign_no",
    "input",
)
OPTIONAL_FIELDS: Final = ("enctype",)

INSUTYPE_EMPLOYEE: Final = "310"  # 职工基本医疗保险
INSUTYPE_RESIDENT: Final = "390"  # 城乡居民基本医疗保险
PSN_TYPE_WORKING: Final = "11"  # 在职 (reconstructed dictionary values)
PSN_TYPE_RETIRED: Final = "21"  # 退休
PSN_TYPE_RESIDENT: Final = "31"  # 城乡居民
REGIONS: Final = ("320583", "320505", "310104", "110105", "440305", "510107")
CENT: Final = Decimal("0.01")


def beijing(moment: datetime) -> datetime:
    return moment.astimezone(BEIJING)


def wire_time(moment: datetime) -> str:
    return beijing(moment).strftime("%Y-%m-%d %H:%M:%S")


def money(value: Decimal) -> str:
    return str(value.quantize(CENT))


# ---------------------------------------------------------------------------------------------------- people


@dataclass(frozen=True, slots=True)
class SettlementRecord:
    setl_id: str
    mdtrt_id: str
    fixmedins_code: str
    fixmedins_name: str
    setl_time: datetime
    med_type: str
    insutype: str
    medfee_sumamt: Decimal
    fund_pay_sumamt: Decimal
    acct_pay: Decimal
    psn_cash_pay: Decimal
    balc: Decimal


@dataclass(frozen=True, slots=True)
class CreditRecord:
    crdt_date: date
    crdt_amt: Decimal
    crdt_type: str
    insutype: str
    balc: Decimal


@dataclass(frozen=True, slots=True)
class ContributionRecord:
    clct_ym: str
    insutype: str
    clct_type: str
    clct_base: Decimal
    emp_clct_amt: Decimal
    psn_clct_amt: Decimal
    arrive_date: date
    emp_name: str


@dataclass(frozen=True, slots=True)
class Enrolment:
    insutype: str
    psn_type: str
    psn_insu_stas: str
    psn_insu_date: date
    insuplc_admdvs: str
    emp_name: str
    cvlserv_flag: str = "0"
    paus_insu_date: date | None = None


@dataclass(slots=True, repr=False)
class SyntheticPerson:
    """A synthetic insured person and the platform's records about them (personal data in shape: `repr` hides it).

    Invariant (tests check it): `balance == opening_balance + Σ credits − Σ acct_pay`, and every record's `balc`
    is the running balance after it, in time order."""

    psn_no: str
    psn_name: str
    certno: str
    gend: str
    naty: str
    brdy: date
    card_no: str
    card_sn: str
    enrolment: Enrolment
    opening_balance: Decimal
    balance: Decimal
    settlements: list[SettlementRecord] = field(default_factory=list)
    credits: list[CreditRecord] = field(default_factory=list)
    contributions: list[ContributionRecord] = field(default_factory=list)
    idetinfo: list[dict[str, Any]] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"SyntheticPerson({self.psn_no[-6:]}, insutype={self.enrolment.insutype})"

    def age_on(self, day: date) -> int:
        return day.year - self.brdy.year - ((day.month, day.day) < (self.brdy.month, self.brdy.day))


@dataclass(frozen=True, slots=True)
class DesignatedInstitution:
    fixmedins_code: str
    fixmedins_name: str
    fixmedins_type: str  # 1 定点医疗机构, 2 定点零售药店
    hosp_lv: str
    admdvs: str
    addr: str
    uscc: str


_SURNAMES: Final = ("王", "李", "张", "刘", "陈", "杨", "黄", "赵", "周", "吴", "徐", "孙", "欧阳")
_GIVEN: Final = ("伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明")
_EMPLOYERS: Final = ("昆山精密机械有限公司", "苏州工业园区物流有限公司", "上海徐汇教育服务中心", "成都软件科技有限公司")


def synthetic_institutions(count: int = 8, *, seed: int = 6) -> list[DesignatedInstitution]:
    """Designated hospitals (H + 11 digits) and pharmacies (P + 11 digits), alternating."""
    rng = random.Random(seed)  # noqa: S311 - synthetic data, not secrets
    out: list[DesignatedInstitution] = []
    for i in range(count):
        region = REGIONS[i % len(REGIONS)]
        hospital = i % 2 == 0
        code = f"{'H' if hospital else 'P'}{region}{i + 1:05d}"
        name = f"{'第' + '一二三四五六七八'[i % 8] + '人民医院' if hospital else '康民大药房第' + str(i + 1) + '分店'}"
        out.append(
            DesignatedInstitution(
                fixmedins_code=code,
                fixmedins_name=name,
                fixmedins_type="1" if hospital else "2",
                hosp_lv=rng.choice(("01", "02", "03")) if hospital else "",
                admdvs=region,
                addr=f"模拟路{rng.randint(1, 999)}号",
                uscc=f"91{region}{rng.randint(10**9, 10**10 - 1)}",
            )
        )
    return out


def synthetic_people(
    count: int, today: date, institutions: Sequence[DesignatedInstitution], *, seed: int = 5
) -> list[SyntheticPerson]:
    """`count` reproducible people: ID numbers with valid check digits whose birth date and sex digit agree with
    `brdy`/`gend`; 职工 (with a personal account, monthly contributions and credits) or 居民 (no personal account
    since the 2021 reform: balance 0, one yearly contribution); a few pharmacy/outpatient settlements."""
    rng = random.Random(seed)  # noqa: S311 - synthetic data, not secrets
    people: list[SyntheticPerson] = []
    for index in range(count):
        region = rng.choice(REGIONS)
        brdy = date(rng.randint(1940, 2008), rng.randint(1, 12), rng.randint(1, 28))
        gend = rng.choice(("1", "2"))
        seq = rng.randint(0, 99) * 10 + (rng.choice((1, 3, 5, 7, 9)) if gend == "1" else rng.choice((0, 2, 4, 6, 8)))
        first17 = f"{region}{brdy:%Y%m%d}{seq:03d}"
        person = SyntheticPerson(
            psn_no=f"{region}{index + 1:014d}",
            psn_name=rng.choice(_SURNAMES) + "".join(rng.choice(_GIVEN) for _ in range(rng.randint(1, 2))),
            certno=first17 + id_check_digit(first17),
            gend=gend,
            naty="01",
            brdy=brdy,
            card_no=f"{chr(65 + index % 26)}{rng.randint(10**7, 10**8 - 1)}",
            card_sn=f"{rng.getrandbits(128):032X}",
            enrolment=Enrolment("", "", "1", today, region, ""),
            opening_balance=Decimal(0),
            balance=Decimal(0),
        )
        _enrol(person, today, institutions, rng)
        people.append(person)
    return people


def _months_back(today: date, n: int) -> date:
    year, month = divmod(today.year * 12 + today.month - 1 - n, 12)
    return date(year, month + 1, 1)


def _enrol(
    person: SyntheticPerson, today: date, institutions: Sequence[DesignatedInstitution], rng: random.Random
) -> None:
    age = person.age_on(today)
    employee = age >= 18 and rng.random() < 0.6
    insured_since = _months_back(today, rng.randint(13, 240))
    if employee:
        retired = age >= 60
        emp_name = "" if retired else rng.choice(_EMPLOYERS)
        person.enrolment = Enrolment(
            INSUTYPE_EMPLOYEE,
            PSN_TYPE_RETIRED if retired else PSN_TYPE_WORKING,
            "1",
            insured_since,
            person.enrolment.insuplc_admdvs,
            emp_name,
            cvlserv_flag="1" if rng.random() < 0.1 else "0",
        )
        person.opening_balance = Decimal(rng.randint(0, 300000)) / 100
        base = Decimal(rng.randint(4000, 20000))
    else:
        person.enrolment = Enrolment(
            INSUTYPE_RESIDENT, PSN_TYPE_RESIDENT, "1", insured_since, person.enrolment.insuplc_admdvs, ""
        )
        base = Decimal(0)
    insutype = person.enrolment.insutype
    balance = person.opening_balance
    # Events in time order: twelve months of contributions/credits, a few settlements in between.
    events: list[tuple[datetime, str, Any]] = []
    for n in range(12, 0, -1):
        month = _months_back(today, n)
        if employee and person.enrolment.psn_type == PSN_TYPE_WORKING:
            events.append((datetime(month.year, month.month, 15, 10, tzinfo=BEIJING), "contribution", month))
        if employee:
            events.append((datetime(month.year, month.month, 20, 9, tzinfo=BEIJING), "credit", month))
    if not employee:
        year_start = date(today.year - 1, 12, 1)
        events.append((datetime(year_start.year, 12, 10, 10, tzinfo=BEIJING), "contribution", year_start))
    for _ in range(rng.randint(1, 6)):
        when = datetime.combine(today - timedelta(days=rng.randint(1, 360)), datetime.min.time(), BEIJING)
        # After 09:00, when credits land: a day's credit precedes that day's purchases.
        events.append((when + timedelta(hours=rng.randint(10, 20), minutes=rng.randint(0, 59)), "settlement", None))
    events.sort(key=lambda e: e[0])
    for when, kind, month in events:
        if kind == "contribution":
            if employee:
                emp, psn = (base * Decimal("0.08")).quantize(CENT), (base * Decimal("0.02")).quantize(CENT)
                clct_type, clct_base = "10", base
            else:
                emp, psn, clct_type, clct_base = Decimal(0), Decimal("380.00"), "10", Decimal(0)
            person.contributions.append(
                ContributionRecord(
                    f"{month:%Y%m}", insutype, clct_type, clct_base, emp, psn, when.date(), person.enrolment.emp_name
                )
            )
        elif kind == "credit":
            if person.enrolment.psn_type == PSN_TYPE_RETIRED:
                amount, crdt_type = Decimal("120.00"), "2"  # retirees: a fixed monthly amount from the pooled fund
            else:
                amount, crdt_type = (base * Decimal("0.02")).quantize(CENT), "1"  # the personal contribution
            balance += amount
            person.credits.append(CreditRecord(when.date(), amount, crdt_type, insutype, balance))
        else:
            institution = rng.choice(list(institutions))
            total = Decimal(rng.randint(1500, 60000)) / 100
            fund = (total * Decimal("0.5")).quantize(CENT) if institution.fixmedins_type == "1" else Decimal(0)
            acct = min(balance, total - fund)
            cash = total - fund - acct
            balance -= acct
            number = len(person.settlements) + 1
            person.settlements.append(
                SettlementRecord(
                    setl_id=f"S{person.psn_no[-12:]}{number:04d}",
                    mdtrt_id=f"M{person.psn_no[-12:]}{number:04d}",
                    fixmedins_code=institution.fixmedins_code,
                    fixmedins_name=institution.fixmedins_name,
                    setl_time=when,
                    med_type="11" if institution.fixmedins_type == "1" else "41",
                    insutype=insutype,
                    medfee_sumamt=total,
                    fund_pay_sumamt=fund,
                    acct_pay=acct,
                    psn_cash_pay=cash,
                    balc=balance,
                )
            )
    person.balance = balance


# ---------------------------------------------------------------------------------------------------- the platform


class _RefusalError(Exception):
    """A refused transaction: becomes infcode -1 with err_msg "[REASON] text"."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(f"[{reason}] {text}")
        self.reason = reason


class GatewayError(Exception):
    """The x-tif headers were refused (HTTP 401 before the envelope is looked at)."""


@dataclass(slots=True)
class CallerInstitution:
    """A designated institution allowed to call: its SM2 public key, gateway credentials, optional SM4 key."""

    fixmedins_code: str
    fixmedins_name: str
    public_key: SM2PublicKey
    paasid: str
    paas_secret: str
    sm4_key: bytes | None = None


@dataclass(slots=True)
class _SignIn:
    fixmedins_code: str
    opter: str
    day: str
    active: bool = True


@dataclass(slots=True)
class SimulatorStats:
    """What happened (tests and benches read it; no personal data)."""

    calls: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    gateway_refused: int = 0


class NationalPlatformSimulator:
    """The platform in process. `handle(headers, body)` → (HTTP status, answer dict). Thread-safe."""

    def __init__(
        self,
        clock: Clock,
        *,
        people: int = 20,
        seed: int = 5,
        admdvs: str = "320583",
        signing_key: SM2PrivateKey | None = None,
        ec_token_ttl_s: float = EC_TOKEN_TTL_S,
    ) -> None:
        self._clock = clock
        self.admdvs = admdvs
        self.signing_key = signing_key or SM2PrivateKey.generate()
        self._ec_token_ttl_s = ec_token_ttl_s
        self.institutions = synthetic_institutions()
        self.people = synthetic_people(people, beijing(clock.now()).date(), self.institutions, seed=seed)
        self._by_psn_no = {p.psn_no: p for p in self.people}
        self._by_certno = {p.certno: p for p in self.people}
        self._by_card = {p.card_no: p for p in self.people}
        self._callers: dict[str, CallerInstitution] = {}
        self._by_paasid: dict[str, CallerInstitution] = {}
        self._sign_ins: dict[str, _SignIn] = {}
        self._ec_tokens: dict[str, tuple[str, float]] = {}
        self._msgids: OrderedDict[str, datetime] = OrderedDict()
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._ref_seq = 0
        self._lock = threading.Lock()
        self.reachable = True
        self.stats = SimulatorStats()

    @property
    def public_key(self) -> SM2PublicKey:
        return self.signing_key.public_key

    # ------------------------------------------------------------ set-up (what registration with the 医保局 gives)

    def register_institution(
        self,
        fixmedins_code: str,
        fixmedins_name: str,
        public_key: SM2PublicKey,
        *,
        paasid: str,
        paas_secret: str,
        sm4_key: bytes | None = None,
    ) -> CallerInstitution:
        caller = CallerInstitution(fixmedins_code, fixmedins_name, public_key, paasid, paas_secret, sm4_key)
        with self._lock:
            self._callers[fixmedins_code] = caller
            self._by_paasid[paasid] = caller
        return caller

    def issue_ec_token(self, psn_no: str) -> str:
        """The ecToken the e-voucher platform hands out after decoding this person's 医保码 (valid `ec_token_ttl_s`)."""
        with self._lock:
            if psn_no not in self._by_psn_no:
                raise KeyError(psn_no)
            token = secrets.token_hex(20)
            self._ec_tokens[token] = (psn_no, self._clock.monotonic() + self._ec_token_ttl_s)
            return token

    def expire_sign_ins(self) -> None:
        """Forget every sign-in (what a platform restart or its daily reset does to callers)."""
        with self._lock:
            self._sign_ins.clear()

    def person(self, psn_no: str) -> SyntheticPerson:
        return self._by_psn_no[psn_no]

    # ------------------------------------------------------------------ the endpoint

    def gateway_headers(self, caller: CallerInstitution, *, nonce: str | None = None) -> dict[str, str]:
        """Valid x-tif headers for `caller` now (tests that post raw envelopes use this)."""
        ts = str(int(self._clock.now().timestamp()))
        nonce = nonce or secrets.token_hex(16)
        digest = hashlib.sha256(f"{ts}{caller.paas_secret}{nonce}{ts}".encode()).hexdigest()
        return {"x-tif-paasid": caller.paasid, "x-tif-timestamp": ts, "x-tif-nonce": nonce, "x-tif-signature": digest}

    def handle(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        received = self._clock.now()
        with self._lock:
            try:
                self._check_gateway({k.lower(): v for k, v in headers.items()})
            except GatewayError as exc:
                self.stats.gateway_refused += 1
                return 401, {"infcode": -1, "err_msg": f"[GATEWAY] {exc}"}
            self._ref_seq += 1
            refmsgid = f"{self.admdvs}{beijing(received):%Y%m%d%H%M%S}{self._ref_seq:010d}"
            envelope: dict[str, Any] = {}
            try:
                envelope = self._parse(body)
                self.stats.calls[envelope["infno"]] = self.stats.calls.get(envelope["infno"], 0) + 1
                caller = self._authenticate(envelope)
                output = self._dispatch(envelope, caller)
                output_value: Any = self._maybe_encrypt(envelope, caller, output, refmsgid)
                answer = self._answer(0, refmsgid, received, "", output_value, envelope)
            except _RefusalError as exc:
                self.stats.refused[exc.reason] = self.stats.refused.get(exc.reason, 0) + 1
                answer = self._answer(-1, refmsgid, received, str(exc), None, envelope)
        answer["cainfo"] = sign_record(self.signing_key, answer)
        return 200, answer

    # ------------------------------------------------------------------ checks

    def _check_gateway(self, headers: Mapping[str, str]) -> None:
        paasid = headers.get("x-tif-paasid", "")
        ts, nonce, signature = (headers.get(f"x-tif-{h}", "") for h in ("timestamp", "nonce", "signature"))
        caller = self._by_paasid.get(paasid)
        if caller is None:
            raise GatewayError("unknown paasid")
        if not ts.isdigit() or abs(int(ts) - self._clock.now().timestamp()) > TIMESTAMP_SKEW_S:
            raise GatewayError("timestamp missing or outside the allowed window")
        if not 8 <= len(nonce) <= 64:
            raise GatewayError("nonce missing")
        expected = hashlib.sha256(f"{ts}{caller.paas_secret}{nonce}{ts}".encode()).hexdigest()
        if not hmac.compare_digest(expected, signature.lower()):
            raise GatewayError("signature does not verify")
        now = self._clock.monotonic()
        while self._nonces and next(iter(self._nonces.values())) < now - 2 * TIMESTAMP_SKEW_S:
            self._nonces.popitem(last=False)
        if nonce in self._nonces:
            raise GatewayError("nonce reused")
        self._nonces[nonce] = now

    def _parse(self, body: bytes) -> dict[str, Any]:
        try:
            envelope = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _RefusalError("MSG_FORMAT", "报文不是合法的JSON") from exc
        if not isinstance(envelope, dict):
            raise _RefusalError("MSG_FORMAT", "报文不是JSON对象")
        missing = [f for f in ENVELOPE_FIELDS if f not in envelope]
        extra = [f for f in envelope if f not in ENVELOPE_FIELDS and f not in OPTIONAL_FIELDS]
        if missing or extra:
            raise _RefusalError("MSG_FORMAT", f"报文字段错误: 缺少 {missing} 多余 {extra}")
        if not all(isinstance(envelope[f], str) for f in ENVELOPE_FIELDS if f != "input"):
            raise _RefusalError("MSG_FORMAT", "报文公共字段须为字符串")
        if not isinstance(envelope["input"], dict):
            raise _RefusalError("MSG_FORMAT", "input 须为JSON对象")
        return envelope

    def _check_msgid(self, envelope: Mapping[str, Any]) -> None:
        msgid: str = envelope["msgid"]
        code = envelope["fixmedins_code"]
        if len(msgid) != 30 or not msgid.startswith(code) or not msgid[12:].isdigit():
            raise _RefusalError("MSG_FORMAT", "msgid 格式错误: 定点医药机构编号(12)+时间(14)+流水号(4)")
        try:
            stamp = datetime.strptime(msgid[12:26], "%Y%m%d%H%M%S").replace(tzinfo=BEIJING)
        except ValueError as exc:
            raise _RefusalError("MSG_FORMAT", "msgid 时间部分无效") from exc
        now = self._clock.now()
        if abs(stamp - now) > timedelta(days=MSGID_WINDOW_DAYS):
            raise _RefusalError("MSG_FORMAT", "msgid 时间与平台时间相差过大")
        while self._msgids and next(iter(self._msgids.values())) < now - timedelta(days=MSGID_WINDOW_DAYS + 1):
            self._msgids.popitem(last=False)
        if msgid in self._msgids:
            raise _RefusalError("MSGID_REPLAYED", "报文ID重复, 拒绝重放")
        self._msgids[msgid] = now

    def _authenticate(self, envelope: dict[str, Any]) -> CallerInstitution:
        caller = self._callers.get(envelope["fixmedins_code"])
        if caller is None:
            raise _RefusalError("UNKNOWN_INSTITUTION", "定点医药机构未登记")
        if envelope["signtype"] != "SM2":
            raise _RefusalError("SIGNATURE", "不支持的签名类型")
        try:
            verify_record(caller.public_key, {k: v for k, v in envelope.items() if k != "cainfo"}, envelope["cainfo"])
        except CryptoError as exc:
            raise _RefusalError("SIGNATURE", "报文签名验证失败") from exc
        # The msgid is recorded only once the signature holds, so nobody can burn another institution's msgids.
        self._check_msgid(envelope)
        return caller

    def _require_sign_in(self, envelope: Mapping[str, Any]) -> None:
        sign_in = self._sign_ins.get(envelope["sign_no"])
        today = f"{beijing(self._clock.now()):%Y%m%d}"
        if (
            sign_in is None
            or not sign_in.active
            or sign_in.fixmedins_code != envelope["fixmedins_code"]
            or sign_in.opter != envelope["opter"]
            or sign_in.day != today
        ):
            raise _RefusalError("SIGN_IN_REQUIRED", "未签到或签到已失效, 请先签到(9001)")

    # ------------------------------------------------------------------ transactions

    def _dispatch(self, envelope: dict[str, Any], caller: CallerInstitution) -> dict[str, Any]:
        infno = envelope["infno"]
        data = envelope["input"]
        if infno == "9001":
            return self._sign_in(envelope, data)
        self._require_sign_in(envelope)
        if infno == "9002":
            self._sign_ins[envelope["sign_no"]].active = False
            return {"signoutoutb": {"sign_time": wire_time(self._clock.now())}}
        if infno == "1101":
            return self._person_info(_section(data, "data"))
        if infno == "1201":
            return self._institutions(_section(data, "medinsinfo"))
        if infno in ("5203", "5207", "5208"):
            query = _section(data, "data")
            person = self._by_psn_no.get(str(query.get("psn_no", "")))
            if person is None:
                raise _RefusalError("PERSON_NOT_FOUND", "未查询到人员信息")
            begin, end = _date_range(query)
            if infno == "5203":
                rows = [_settlement(person, s) for s in person.settlements if begin <= s.setl_time.date() <= end]
                return {"setlinfo": rows}
            if infno == "5207":
                return {"crdtinfo": [_credit(c) for c in person.credits if begin <= c.crdt_date <= end]}
            return {"clctinfo": [_contribution(c) for c in person.contributions if begin <= c.arrive_date <= end]}
        raise _RefusalError("UNKNOWN_INFNO", f"不支持的交易编号 {infno}")

    def _sign_in(self, envelope: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
        sign_in = _section(data, "signIn")
        if sign_in.get("opter_no") != envelope["opter"]:
            raise _RefusalError("MSG_FORMAT", "签到操作员与报文经办人不一致")
        now = self._clock.now()
        sign_no = f"{self.admdvs}{beijing(now):%Y%m%d%H%M%S}{secrets.randbelow(10**10):010d}"
        self._sign_ins[sign_no] = _SignIn(envelope["fixmedins_code"], envelope["opter"], f"{beijing(now):%Y%m%d}")
        return {"signinoutb": {"sign_time": wire_time(now), "sign_no": sign_no}}

    def _person_info(self, data: Mapping[str, Any]) -> dict[str, Any]:
        cert_type = data.get("mdtrt_cert_type")
        cert_no = str(data.get("mdtrt_cert_no", ""))
        person: SyntheticPerson | None
        if cert_type == "01":
            entry = self._ec_tokens.get(cert_no)
            if entry is None or self._clock.monotonic() > entry[1]:
                raise _RefusalError("EC_TOKEN_INVALID", "电子凭证令牌无效或已过期, 请重新扫码")
            person = self._by_psn_no[entry[0]]
        elif cert_type == "02":
            if not valid_id_number(cert_no):
                raise _RefusalError("CERT_NO_INVALID", "身份证号码校验失败")
            person = self._by_certno.get(cert_no)
        elif cert_type == "03":
            person = self._by_card.get(cert_no)
            if person is not None and data.get("card_sn") != person.card_sn:
                raise _RefusalError("CARD_INVALID", "社保卡识别码不符")
        else:
            raise _RefusalError("MSG_FORMAT", "就诊凭证类型错误")
        if person is None:
            raise _RefusalError("PERSON_NOT_FOUND", "未查询到人员信息")
        today = beijing(self._clock.now()).date()
        e = person.enrolment
        return {
            "baseinfo": {
                "psn_no": person.psn_no,
                "psn_cert_type": "01",
                "certno": person.certno,
                "psn_name": person.psn_name,
                "gend": person.gend,
                "naty": person.naty,
                "brdy": person.brdy.isoformat(),
                "age": person.age_on(today),
            },
            "insuinfo": [
                {
                    "balc": money(person.balance),
                    "insutype": e.insutype,
                    "psn_type": e.psn_type,
                    "psn_insu_stas": e.psn_insu_stas,
                    "psn_insu_date": e.psn_insu_date.isoformat(),
                    "paus_insu_date": e.paus_insu_date.isoformat() if e.paus_insu_date else None,
                    "cvlserv_flag": e.cvlserv_flag,
                    "insuplc_admdvs": e.insuplc_admdvs,
                    "emp_name": e.emp_name,
                }
            ],
            "idetinfo": list(person.idetinfo),
        }

    def _institutions(self, query: Mapping[str, Any]) -> dict[str, Any]:
        kind, name, code = (str(query.get(k) or "") for k in ("fixmedins_type", "fixmedins_name", "fixmedins_code"))
        found = [
            i
            for i in self.institutions
            if (not kind or i.fixmedins_type == kind) and name in i.fixmedins_name and code in i.fixmedins_code
        ]
        return {
            "medinsinfo": [
                {
                    "fixmedins_code": i.fixmedins_code,
                    "fixmedins_name": i.fixmedins_name,
                    "uscc": i.uscc,
                    "fixmedins_type": i.fixmedins_type,
                    "hosp_lv": i.hosp_lv,
                    "admdvs": i.admdvs,
                    "addr": i.addr,
                }
                for i in found
            ]
        }

    # ------------------------------------------------------------------ answers

    def _maybe_encrypt(
        self, envelope: Mapping[str, Any], caller: CallerInstitution, output: dict[str, Any], refmsgid: str
    ) -> Any:
        if envelope.get("enctype", "") in ("", None):
            return output
        if envelope["enctype"] != "SM4" or caller.sm4_key is None:
            raise _RefusalError("ENCRYPTION_UNAVAILABLE", "未约定加密密钥或加密类型不支持")
        aad = f"{envelope['msgid']}|{refmsgid}".encode()
        return base64.b64encode(sm4.seal(caller.sm4_key, canonical_json(output), aad)).decode("ascii")

    def _answer(
        self,
        infcode: int,
        refmsgid: str,
        received: datetime,
        err_msg: str,
        output: Any,
        envelope: Mapping[str, Any],
    ) -> dict[str, Any]:
        encrypted = infcode == 0 and envelope.get("enctype") == "SM4"
        return {
            "infcode": infcode,
            "inf_refmsgid": refmsgid,
            "refmsg_time": f"{beijing(received):%Y%m%d%H%M%S}{received.microsecond // 1000:03d}",
            "respond_time": f"{beijing(self._clock.now()):%Y%m%d%H%M%S%f}"[:17],
            "err_msg": err_msg,
            "warn_msg": "",
            "signtype": "SM2",
            "enctype": "SM4" if encrypted else "",
            "output": output,
        }


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name)
    if not isinstance(value, dict):
        raise _RefusalError("MSG_FORMAT", f"input 缺少 {name}")
    return value


def _date_range(query: Mapping[str, Any]) -> tuple[date, date]:
    try:
        begin, end = date.fromisoformat(str(query["begndate"])), date.fromisoformat(str(query["enddate"]))
    except (KeyError, ValueError) as exc:
        raise _RefusalError("MSG_FORMAT", "begndate/enddate 须为 yyyy-MM-dd") from exc
    if end < begin or end - begin > timedelta(days=366):
        raise _RefusalError("MSG_FORMAT", "查询区间无效或超过一年")
    return begin, end


def _settlement(person: SyntheticPerson, s: SettlementRecord) -> dict[str, Any]:
    return {
        "setl_id": s.setl_id,
        "mdtrt_id": s.mdtrt_id,
        "psn_no": person.psn_no,
        "fixmedins_code": s.fixmedins_code,
        "fixmedins_name": s.fixmedins_name,
        "setl_time": wire_time(s.setl_time),
        "med_type": s.med_type,
        "insutype": s.insutype,
        "medfee_sumamt": money(s.medfee_sumamt),
        "fund_pay_sumamt": money(s.fund_pay_sumamt),
        "acct_pay": money(s.acct_pay),
        "psn_cash_pay": money(s.psn_cash_pay),
        "balc": money(s.balc),
    }


def _credit(c: CreditRecord) -> dict[str, Any]:
    return {
        "crdt_ym": f"{c.crdt_date:%Y%m}",
        "crdt_date": c.crdt_date.isoformat(),
        "crdt_amt": money(c.crdt_amt),
        "crdt_type": c.crdt_type,
        "insutype": c.insutype,
        "balc": money(c.balc),
    }


def _contribution(c: ContributionRecord) -> dict[str, Any]:
    return {
        "clct_ym": c.clct_ym,
        "insutype": c.insutype,
        "clct_type": c.clct_type,
        "clct_base": money(c.clct_base),
        "emp_clct_amt": money(c.emp_clct_amt),
        "psn_clct_amt": money(c.psn_clct_amt),
        "arrive_date": c.arrive_date.isoformat(),
        "emp_name": c.emp_name,
    }


# ---------------------------------------------------------------------------------------------------- over HTTP


def create_app(simulator: NationalPlatformSimulator, *, delay_s: float = 0.0) -> FastAPI:
    """The simulator as an HTTP service at `SERVICE_PATH`. `app.state.delay_s` delays every answer (timeout tests);
    `simulator.reachable = False` answers 503."""
    app = FastAPI(title="Simulated national medical-insurance platform (reconstruction)", docs_url=None, redoc_url=None)
    app.state.delay_s = delay_s

    @app.post(SERVICE_PATH)
    async def call_service(request: Request) -> Response:
        await asyncio.sleep(app.state.delay_s)
        if not simulator.reachable:
            return JSONResponse({"infcode": -1, "err_msg": "service unavailable"}, status_code=503)
        status, answer = simulator.handle(dict(request.headers), await request.body())
        return Response(canonical_json(answer), status_code=status, media_type="application/json")

    return app
