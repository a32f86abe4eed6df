"""The server's seam to the national medical-insurance platform (国家医疗保障信息平台): `NationalPlatform`, its typed
results and errors, and `HttpNationalPlatform`, the client over the platform's JSON envelope.

Owns: the `NationalPlatform` Protocol the citizen-query relay calls (K-11…K-16, K-19); the result models, whose field
names are those of the public 定点医药机构接口规范 (baseinfo/insuinfo/idetinfo, setlinfo, …); the error tree
(`NationalPlatformError` ← `UnreachableError`, `RefusedError(infcode, err_msg)` and its kinds, `BadSignatureError`,
`ProtocolViolationError`); the envelope a request travels in (infno, msgid, sign_no, input, …); msgid generation
(fixmedins_code + yyyyMMddHHmmss + 4-digit sequence, 30 characters); the gateway headers (x-tif-*); the SM2
signature of each request (`cainfo`), the check of the platform's signature on each answer, and SM4-GCM decryption
of outputs.

What is RECONSTRUCTED (the public documents do not fix it; see docs/national-platform.md): the exact bytes signed
(here `canonical_json` of the envelope without `cainfo`), the x-tif signature formula, the output encryption
(`enctype`, SM4-GCM, base64), the `[REASON]` prefix of `err_msg`, and the query transactions 5207/5208. Never
present these as the real platform's format.

It must never import `hardware_sim` (the simulator is chosen by the composition root or a test), never log a name,
ID number, card number, ecToken or amount (only infno, msgid, infcode and timings), and never retry a call on its
own except the one re-sign-in after the platform says the sign-in has lapsed (every transaction here is a
read-only query, so a retry with a new msgid is safe).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import secrets
import threading
import time
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final, Literal, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from protocol import Clock, SystemClock
from protocol.gm import sm4
from protocol.gm.errors import CryptoError
from protocol.gm.records import canonical_json, sign_record, verify_record
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey
from sync_server.errors import ServerError

logger = logging.getLogger(__name__)

CHINA_TZ: Final = timezone(timedelta(hours=8), "CST")
"""Every time on the wire is Beijing time (the platform's convention); a fixed offset, no tzdata needed."""
SERVICE_PATH: Final = "/fsi/api/rsfComIfsService/callService"
"""The single endpoint every transaction is POSTed to (the path public integration guides show)."""
MSGID_LENGTH: Final = 30
SIGNTYPE_SM2: Final = "SM2"
ENCTYPE_SM4: Final = "SM4"


class Infno(StrEnum):
    """Transaction numbers. 9001/9002/1101/1201/5203 are public; 5207/5208 are OUR numbers (docs)."""

    SIGN_IN = "9001"
    SIGN_OUT = "9002"
    PERSON_INFO = "1101"
    INSTITUTIONS = "1201"
    SETTLEMENTS = "5203"
    ACCOUNT_CREDITS = "5207"
    CONTRIBUTIONS = "5208"


class CertType(StrEnum):
    """就诊凭证类型 (mdtrt_cert_type)."""

    EC_TOKEN = "01"  # noqa: S105 - a dictionary code, not a secret; 电子凭证: mdtrt_cert_no is the ecToken from decoding the 医保码
    ID_CARD = "02"  # 居民身份证: mdtrt_cert_no is the ID number
    SS_CARD = "03"  # 社会保障卡: mdtrt_cert_no is the card number, card_sn the card's identification code


# ---------------------------------------------------------------------------------------------------- errors


class NationalPlatformError(ServerError):
    """Base of every error of the national-platform seam."""


class UnreachableError(NationalPlatformError):
    """No usable answer: connection refused, timeout, TLS failure, HTTP 5xx. The call may or may not have run."""


class RefusedError(NationalPlatformError):
    """The platform answered infcode ≠ 0 (or its gateway refused the call). `reason` is the parsed `[REASON]`."""

    def __init__(self, infcode: int, err_msg: str, *, reason: str = "") -> None:
        super().__init__(f"infcode {infcode}: {err_msg}")
        self.infcode = infcode
        self.err_msg = err_msg
        self.reason = reason


class GatewayRejectedError(RefusedError):
    """The gateway refused the x-tif headers (unknown paasid, bad signature, stale timestamp, reused nonce)."""


class SignInRequiredError(RefusedError):
    """No live sign-in (9001) for this operator, or the sign_no is unknown/signed out/from another day."""


class MessageRejectedError(RefusedError):
    """The envelope itself was refused: malformed, bad msgid, replayed msgid, unknown infno or institution."""


class SignatureRejectedError(RefusedError):
    """The platform could not verify OUR signature (cainfo): wrong key, altered body, not registered."""


class CredentialRejectedError(RefusedError):
    """The 就诊凭证 is not usable: ecToken unknown or expired, card number/card_sn mismatch, bad ID number."""


class PersonNotFoundError(RefusedError):
    """No insured person (or no such psn_no) behind the credential."""


class BadSignatureError(NationalPlatformError):
    """The ANSWER is not authentic: the platform's signature does not verify, or the encrypted output fails SM4-GCM."""


class ProtocolViolationError(NationalPlatformError):
    """The answer is not the envelope we expect (not JSON, missing fields, wrong refmsgid, unexpected output shape)."""


REASON_ERRORS: Final[dict[str, type[RefusedError]]] = {
    "GATEWAY": GatewayRejectedError,
    "SIGN_IN_REQUIRED": SignInRequiredError,
    "MSG_FORMAT": MessageRejectedError,
    "MSGID_REPLAYED": MessageRejectedError,
    "UNKNOWN_INFNO": MessageRejectedError,
    "UNKNOWN_INSTITUTION": MessageRejectedError,
    "ENCRYPTION_UNAVAILABLE": MessageRejectedError,
    "SIGNATURE": SignatureRejectedError,
    "EC_TOKEN_INVALID": CredentialRejectedError,
    "CARD_INVALID": CredentialRejectedError,
    "CERT_NO_INVALID": CredentialRejectedError,
    "PERSON_NOT_FOUND": PersonNotFoundError,
}
"""`[REASON]` prefix of err_msg → error type. The prefix is our reconstruction; a real platform's err_msg texts vary
by province, and this table is the one place to map them. An unknown or missing reason gives a plain
`RefusedError`."""


def refusal(infcode: int, err_msg: str) -> RefusedError:
    """The typed error for an answer with infcode ≠ 0."""
    reason = ""
    if err_msg.startswith("[") and "]" in err_msg:
        reason = err_msg[1 : err_msg.index("]")]
    return REASON_ERRORS.get(reason, RefusedError)(infcode, err_msg, reason=reason)


# ---------------------------------------------------------------------------------------------------- results


class _Result(BaseModel):
    # Unknown fields are ignored on purpose: the platform adds fields between interface versions (infver), and a
    # new field must not break the kiosk's queries. Missing REQUIRED fields still fail (ProtocolViolationError).
    model_config = ConfigDict(extra="ignore", frozen=True)


class SignInResult(_Result):
    sign_no: str = Field(max_length=30, description="签到编号: carried in every later envelope until sign-out.")
    sign_time: str = Field(max_length=19, description="签到时间, 'yyyy-MM-dd HH:mm:ss' Beijing time.")


class BaseInfo(_Result):
    """基本信息 (K-11)."""

    psn_no: str = Field(max_length=30, description="人员编号")
    psn_cert_type: str = Field(max_length=6, description="人员证件类型 (01 居民身份证)")
    certno: str = Field(max_length=50, description="证件号码")
    psn_name: str = Field(max_length=50, description="人员姓名")
    gend: str = Field(max_length=6, description="性别 (1 男, 2 女)")
    naty: str = Field(max_length=3, description="民族 (01 汉族, …)")
    brdy: date = Field(description="出生日期")
    age: int = Field(ge=0, le=150, description="年龄 on the query day")


class InsuInfo(_Result):
    """参保信息 (K-12), with the personal-account balance (K-13)."""

    balc: Decimal = Field(description="余额 (personal account, yuan)")
    insutype: str = Field(max_length=6, description="险种类型 (310 职工基本医疗保险, 390 城乡居民基本医疗保险)")
    psn_type: str = Field(max_length=6, description="人员类别")
    psn_insu_stas: str = Field(max_length=6, description="人员参保状态 (1 正常参保, 2 暂停参保, 4 终止参保)")
    psn_insu_date: date = Field(description="个人参保日期")
    paus_insu_date: date | None = Field(default=None, description="暂停参保日期")
    cvlserv_flag: str = Field(max_length=3, description="公务员标志 (0/1)")
    insuplc_admdvs: str = Field(max_length=6, description="参保地医保区划")
    emp_name: str = Field(default="", max_length=200, description="单位名称")


class IdetInfo(_Result):
    """身份信息 (special identities: 低保, 优抚, …)."""

    psn_idet_type: str = Field(max_length=6, description="人员身份类别")
    psn_type_lv: str = Field(default="", max_length=6, description="人员类别等级")
    memo: str = Field(default="", max_length=500, description="备注")
    begntime: str = Field(description="开始时间")
    endtime: str | None = Field(default=None, description="结束时间")


class PersonInfo(_Result):
    """Output of 1101 人员信息获取."""

    baseinfo: BaseInfo
    insuinfo: list[InsuInfo]
    idetinfo: list[IdetInfo] = Field(default_factory=list)


class Settlement(_Result):
    """结算信息 (K-14, 医保支付明细). Amounts in yuan."""

    setl_id: str = Field(max_length=30, description="结算ID")
    mdtrt_id: str = Field(max_length=30, description="就诊ID")
    psn_no: str = Field(max_length=30)
    fixmedins_code: str = Field(max_length=30, description="定点医药机构编号")
    fixmedins_name: str = Field(max_length=200, description="定点医药机构名称")
    setl_time: str = Field(description="结算时间, 'yyyy-MM-dd HH:mm:ss'")
    med_type: str = Field(max_length=6, description="医疗类别 (41 定点药店购药, 11 普通门诊)")
    insutype: str = Field(max_length=6)
    medfee_sumamt: Decimal = Field(description="医疗费总额")
    fund_pay_sumamt: Decimal = Field(description="基金支付总额")
    acct_pay: Decimal = Field(description="个人账户支出")
    psn_cash_pay: Decimal = Field(description="个人现金支出")
    balc: Decimal = Field(description="本次结算后个人账户余额")


class AccountCredit(_Result):
    """个人账户划入 (K-15). Reconstructed record shape."""

    crdt_ym: str = Field(pattern=r"^\d{6}$", description="划入年月 yyyyMM")
    crdt_date: date = Field(description="划入日期")
    crdt_amt: Decimal = Field(description="划入金额")
    crdt_type: str = Field(max_length=6, description="划入类型 (1 个人缴费划入, 2 统筹基金划入/退休定额)")
    insutype: str = Field(max_length=6)
    balc: Decimal = Field(description="划入后余额")


class Contribution(_Result):
    """缴费信息 (K-16). Reconstructed record shape."""

    clct_ym: str = Field(pattern=r"^\d{6}$", description="费款所属期 yyyyMM")
    insutype: str = Field(max_length=6)
    clct_type: str = Field(max_length=6, description="缴费类型 (10 正常应缴, 31 补缴)")
    clct_base: Decimal = Field(description="缴费基数")
    emp_clct_amt: Decimal = Field(description="单位缴费金额")
    psn_clct_amt: Decimal = Field(description="个人缴费金额")
    arrive_date: date = Field(description="到账日期")
    emp_name: str = Field(default="", max_length=200)


class Institution(_Result):
    """医药机构信息 (K-19: 定点医院 / 定点药店)."""

    fixmedins_code: str = Field(max_length=30)
    fixmedins_name: str = Field(max_length=200)
    uscc: str = Field(default="", max_length=50, description="统一社会信用代码")
    fixmedins_type: str = Field(max_length=6, description="定点医疗服务机构类型 (1 定点医疗机构, 2 定点零售药店)")
    hosp_lv: str = Field(default="", max_length=6, description="医院等级")
    admdvs: str = Field(default="", max_length=6, description="医保区划 (reconstructed addition)")
    addr: str = Field(default="", max_length=200, description="地址 (reconstructed addition)")


class _SettlementsOut(_Result):
    setlinfo: list[Settlement]


class _CreditsOut(_Result):
    crdtinfo: list[AccountCredit]


class _ContributionsOut(_Result):
    clctinfo: list[Contribution]


class _InstitutionsOut(_Result):
    medinsinfo: list[Institution]


class _SignInOut(_Result):
    signinoutb: SignInResult


# ---------------------------------------------------------------------------------------------------- the seam


class NationalPlatform(Protocol):
    """What the citizen-query relay needs from the national platform. Every method raises `NationalPlatformError`
    subtypes only. Implementations sign in on their own before the first query (and again once when the platform
    says the sign-in lapsed); `sign_in` is public for start-up checks and the daily rollover."""

    def sign_in(self) -> SignInResult: ...

    def person_info(self, cert_type: CertType, cert_no: str, card_sn: str | None = None) -> PersonInfo: ...

    def settlements(self, psn_no: str, begndate: date, enddate: date) -> list[Settlement]: ...

    def account_credits(self, psn_no: str, begndate: date, enddate: date) -> list[AccountCredit]: ...

    def contributions(self, psn_no: str, begndate: date, enddate: date) -> list[Contribution]: ...

    def institutions(
        self, fixmedins_type: Literal["1", "2"] | None = None, fixmedins_name: str = ""
    ) -> list[Institution]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------- settings


class NationalPlatformSettings(BaseModel):
    """How this server reaches the national platform (one designated institution's credentials per client)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(min_length=1, description="Gateway base URL; the service path is appended.")
    paasid: str = Field(min_length=1, max_length=64, description="x-tif-paasid: the gateway's id for this caller.")
    paas_secret: SecretStr = Field(description="The gateway token used in x-tif-signature (never logged).")
    fixmedins_code: str = Field(pattern=r"^[A-Z0-9]{12}$", description="定点医药机构编号 (12), the msgid prefix.")
    fixmedins_name: str = Field(min_length=1, max_length=200, description="定点医药机构名称.")
    mdtrtarea_admvs: str = Field(pattern=r"^\d{6}$", description="就医地医保区划 (this institution's region).")
    insuplc_admdvs: str = Field(
        default="", pattern=r"^(\d{6})?$", description="参保地医保区划; empty lets the platform resolve it."
    )
    recer_sys_code: str = Field(default="YIBAO", max_length=10, description="接收方系统代码.")
    dev_no: str = Field(default="", max_length=100, description="设备编号.")
    dev_safe_info: str = Field(default="", max_length=2000, description="设备安全信息.")
    infver: str = Field(default="V1.0", max_length=6, description="接口版本号.")
    opter_type: Literal["1", "2", "3"] = Field(default="3", description="经办人类别: 1 经办人, 2 自助终端, 3 移动终端.")
    opter: str = Field(min_length=1, max_length=30, description="经办人 (operator id used for 9001).")
    opter_name: str = Field(min_length=1, max_length=50, description="经办人姓名.")
    mac: str = Field(default="00:00:00:00:00:00", max_length=20, description="MAC address reported at 9001.")
    ip: str = Field(default="127.0.0.1", max_length=64, description="IP address reported at 9001.")
    msgid_worker: int = Field(default=0, ge=0, description="This process's index among those sharing the institution.")
    msgid_workers: int = Field(default=1, ge=1, le=9999, description="Processes calling for this institution.")
    timeout_s: float = Field(default=5.0, gt=0, le=120, description="One timeout for each HTTP call.")
    encrypt_output: bool = Field(default=False, description="Ask for SM4-encrypted outputs (needs sm4_key_hex).")
    sm4_key_hex: SecretStr | None = Field(default=None, description="The SM4 key agreed with the platform (32 hex).")
    platform_public_key_hex: str | None = Field(
        default=None,
        description="The platform's SM2 public key (130 hex). When set, every answer must carry a valid signature.",
    )

    @field_validator("sm4_key_hex")
    @classmethod
    def _sm4_key_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raw = value.get_secret_value()
            if len(raw) != 2 * sm4.KEY_SIZE or any(c not in "0123456789abcdefABCDEF" for c in raw):
                raise ValueError("sm4_key_hex must be 32 hex digits")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> NationalPlatformSettings:
        if self.msgid_worker >= self.msgid_workers:
            raise ValueError("msgid_worker must be below msgid_workers")
        if self.encrypt_output and self.sm4_key_hex is None:
            raise ValueError("encrypt_output needs sm4_key_hex")
        return self

    @field_validator("platform_public_key_hex")
    @classmethod
    def _public_key_shape(cls, value: str | None) -> str | None:
        if value is not None:
            SM2PublicKey.from_hex(value)  # KeyFormatError is a ValueError: pydantic reports it
        return value


# ---------------------------------------------------------------------------------------------------- wire helpers


def wire_time(moment: datetime) -> str:
    """'yyyy-MM-dd HH:mm:ss' in Beijing time (inf_time, sign_time, setl_time)."""
    return moment.astimezone(CHINA_TZ).strftime("%Y-%m-%d %H:%M:%S")


def tif_signature(timestamp: str, secret: str, nonce: str) -> str:
    """x-tif-signature: hex SHA-256 of timestamp + secret + nonce + timestamp (our reconstruction of the gateway's
    formula; the real gateway's SDK is the authority)."""
    return hashlib.sha256(f"{timestamp}{secret}{nonce}{timestamp}".encode()).hexdigest()


def output_aad(msgid: str, inf_refmsgid: str) -> bytes:
    """Associated data of an encrypted output: binds it to this request and this answer (no cut-and-paste)."""
    return f"{msgid}|{inf_refmsgid}".encode()


def unsigned(envelope: dict[str, Any]) -> dict[str, Any]:
    """The envelope as signed: everything but `cainfo` (the signature never signs itself)."""
    return {k: v for k, v in envelope.items() if k != "cainfo"}


class MsgidSequence:
    """msgid = fixmedins_code (12) + yyyyMMddHHmmss (14, Beijing time) + 4-digit sequence = 30 characters.

    The sequence restarts each (Beijing) day and wraps before 10000; with the timestamp in front a msgid repeats
    only if one institution sends 10,000 messages within one second. Several processes that call for the SAME
    institution must not share sequence numbers: give each its `worker` index out of `workers` (process k uses
    k+1, k+1+workers, …). Thread-safe within a process."""

    def __init__(self, fixmedins_code: str, clock: Clock, *, worker: int = 0, workers: int = 1) -> None:
        if len(fixmedins_code) != 12:
            raise ValueError("fixmedins_code must have 12 characters")
        if not 0 <= worker < workers <= 9999:
            raise ValueError("need 0 <= worker < workers <= 9999")
        self._prefix = fixmedins_code
        self._clock = clock
        self._worker = worker
        self._workers = workers
        self._slots = 9999 // workers  # sequence numbers per worker per wrap
        self._lock = threading.Lock()
        self._day = ""
        self._count = 0

    def next(self) -> str:
        with self._lock:
            now = self._clock.now().astimezone(CHINA_TZ)
            stamp = now.strftime("%Y%m%d%H%M%S")
            if stamp[:8] != self._day:
                self._day, self._count = stamp[:8], 0
            seq = self._worker + 1 + (self._count % self._slots) * self._workers
            self._count += 1
            return f"{self._prefix}{stamp}{seq:04d}"


_R = TypeVar("_R", bound=_Result)


# ---------------------------------------------------------------------------------------------------- the client


class HttpNationalPlatform:
    """`NationalPlatform` over HTTPS (httpx). One client (connection reuse), one timeout per call.

    Each call: build the envelope, sign it with the institution's SM2 key (`cainfo`, `signtype` SM2), add the x-tif
    headers, POST, then check the answer: JSON envelope, `inf_refmsgid` present, the platform's SM2 signature when
    its public key is configured (`BadSignatureError` otherwise), infcode (typed `RefusedError`), SM4-GCM output
    when asked (`BadSignatureError` if it does not open), and the output's shape (`ProtocolViolationError`).
    """

    def __init__(
        self,
        settings: NationalPlatformSettings,
        signing_key: SM2PrivateKey,
        *,
        clock: Clock | None = None,
        client: httpx.Client | None = None,
        auto_sign_in: bool = True,
    ) -> None:
        if settings.encrypt_output and settings.sm4_key_hex is None:
            raise ValueError("encrypt_output needs sm4_key_hex")
        self._settings = settings
        self._key = signing_key
        self._clock = clock or SystemClock()
        self._client = client or httpx.Client(base_url=settings.base_url, timeout=settings.timeout_s)
        self._auto_sign_in = auto_sign_in
        self._msgids = MsgidSequence(
            settings.fixmedins_code, self._clock, worker=settings.msgid_worker, workers=settings.msgid_workers
        )
        self._platform_key = (
            SM2PublicKey.from_hex(settings.platform_public_key_hex) if settings.platform_public_key_hex else None
        )
        self._sm4_key = bytes.fromhex(settings.sm4_key_hex.get_secret_value()) if settings.sm4_key_hex else None
        self._sign_lock = threading.Lock()
        self._sign_no = ""
        self._sign_day = ""

    def __enter__(self) -> HttpNationalPlatform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    @property
    def sign_no(self) -> str:
        """The current sign_no ('' before the first sign-in)."""
        return self._sign_no

    # ------------------------------------------------------------------ transactions

    def sign_in(self) -> SignInResult:
        """9001 签到. Stores the sign_no for later calls (a sign-in is valid for the Beijing day)."""
        s = self._settings
        output = self._call(Infno.SIGN_IN, {"signIn": {"opter_no": s.opter, "mac": s.mac, "ip": s.ip}}, sign_no="")
        result = _parse(_SignInOut, output).signinoutb
        with self._sign_lock:
            self._sign_no = result.sign_no
            self._sign_day = self._today()
        logger.info("national platform: signed in (operator %s)", s.opter)
        return result

    def sign_out(self) -> None:
        """9002 签退."""
        sign_no = self._sign_no
        if not sign_no:
            return
        self._call(Infno.SIGN_OUT, {"signOut": {"sign_no": sign_no, "opter_no": self._settings.opter}}, sign_no)
        with self._sign_lock:
            self._sign_no = ""

    def person_info(self, cert_type: CertType, cert_no: str, card_sn: str | None = None) -> PersonInfo:
        """1101 人员信息获取 by 就诊凭证: ecToken (01), ID number (02) or social-security card number + card_sn (03)."""
        data = {
            "mdtrt_cert_type": CertType(cert_type).value,
            "mdtrt_cert_no": cert_no,
            "card_sn": card_sn or "",
            "begntime": wire_time(self._clock.now()),
            "psn_cert_type": "",
            "certno": "",
            "psn_name": "",
        }
        return _parse(PersonInfo, self._business(Infno.PERSON_INFO, {"data": data}))

    def settlements(self, psn_no: str, begndate: date, enddate: date) -> list[Settlement]:
        """5203 结算信息查询 (our variant: a date range instead of one setl_id)."""
        output = self._business(Infno.SETTLEMENTS, {"data": _range(psn_no, begndate, enddate)})
        return _parse(_SettlementsOut, output).setlinfo

    def account_credits(self, psn_no: str, begndate: date, enddate: date) -> list[AccountCredit]:
        """5207 个人账户划入查询 (our transaction number)."""
        output = self._business(Infno.ACCOUNT_CREDITS, {"data": _range(psn_no, begndate, enddate)})
        return _parse(_CreditsOut, output).crdtinfo

    def contributions(self, psn_no: str, begndate: date, enddate: date) -> list[Contribution]:
        """5208 缴费信息查询 (our transaction number)."""
        output = self._business(Infno.CONTRIBUTIONS, {"data": _range(psn_no, begndate, enddate)})
        return _parse(_ContributionsOut, output).clctinfo

    def institutions(
        self, fixmedins_type: Literal["1", "2"] | None = None, fixmedins_name: str = ""
    ) -> list[Institution]:
        """1201 医药机构信息获取: designated hospitals ("1") and pharmacies ("2")."""
        query = {"fixmedins_type": fixmedins_type or "", "fixmedins_name": fixmedins_name, "fixmedins_code": ""}
        return _parse(_InstitutionsOut, self._business(Infno.INSTITUTIONS, {"medinsinfo": query})).medinsinfo

    # ------------------------------------------------------------------ internals

    def _today(self) -> str:
        return self._clock.now().astimezone(CHINA_TZ).strftime("%Y%m%d")

    def _business(self, infno: Infno, body: dict[str, Any]) -> Any:
        """A transaction that needs a sign-in: sign in first if needed, and once more if the platform says the
        sign-in lapsed (every business transaction here is a read-only query, so the retry is safe)."""
        if self._auto_sign_in and (not self._sign_no or self._sign_day != self._today()):
            self.sign_in()
        try:
            return self._call(infno, body, self._sign_no)
        except SignInRequiredError:
            if not self._auto_sign_in:
                raise
            logger.info("national platform: sign-in lapsed, signing in again for %s", infno.value)
            self.sign_in()
            return self._call(infno, body, self._sign_no)

    def _envelope(self, infno: Infno, msgid: str, sign_no: str, body: dict[str, Any]) -> dict[str, Any]:
        s = self._settings
        envelope: dict[str, Any] = {
            "infno": infno.value,
            "msgid": msgid,
            "mdtrtarea_admvs": s.mdtrtarea_admvs,
            "insuplc_admdvs": s.insuplc_admdvs,
            "recer_sys_code": s.recer_sys_code,
            "dev_no": s.dev_no,
            "dev_safe_info": s.dev_safe_info,
            "signtype": SIGNTYPE_SM2,
            "infver": s.infver,
            "opter_type": s.opter_type,
            "opter": s.opter,
            "opter_name": s.opter_name,
            "inf_time": wire_time(self._clock.now()),
            "fixmedins_code": s.fixmedins_code,
            "fixmedins_name": s.fixmedins_name,
            "sign_no": sign_no,
            "enctype": ENCTYPE_SM4 if s.encrypt_output else "",
            "input": body,
        }
        envelope["cainfo"] = sign_record(self._key, unsigned(envelope))
        return envelope

    def _headers(self) -> dict[str, str]:
        timestamp = str(int(self._clock.now().timestamp()))
        nonce = secrets.token_hex(16)
        secret = self._settings.paas_secret.get_secret_value()
        return {
            "x-tif-paasid": self._settings.paasid,
            "x-tif-timestamp": timestamp,
            "x-tif-nonce": nonce,
            "x-tif-signature": tif_signature(timestamp, secret, nonce),
            "content-type": "application/json; charset=utf-8",
        }

    def _call(self, infno: Infno, body: dict[str, Any], sign_no: str) -> Any:
        msgid = self._msgids.next()
        envelope = self._envelope(infno, msgid, sign_no, body)
        started = time.monotonic()
        try:
            response = self._client.post(SERVICE_PATH, content=canonical_json(envelope), headers=self._headers())
        except httpx.TransportError as exc:  # timeouts, refused connections, TLS and protocol failures
            logger.warning("national platform: %s %s unreachable: %s", infno.value, msgid, type(exc).__name__)
            raise UnreachableError(f"{infno.value}: {type(exc).__name__}") from exc
        elapsed_ms = (time.monotonic() - started) * 1000
        if response.status_code >= 500:
            raise UnreachableError(f"{infno.value}: HTTP {response.status_code}")
        if response.status_code in (401, 403):
            # Gateways answer these in their own formats (JSON or an HTML page): keep the text, never fail on it.
            raise GatewayRejectedError(-1, response.text[:200] or f"HTTP {response.status_code}", reason="GATEWAY")
        if response.status_code != 200:
            raise ProtocolViolationError(f"{infno.value}: HTTP {response.status_code}")
        answer = _json_object(response.content)
        self._check_signature(answer)
        infcode = answer.get("infcode")
        if not isinstance(infcode, int) or isinstance(infcode, bool) or not answer.get("inf_refmsgid"):
            raise ProtocolViolationError(f"{infno.value}: answer without infcode or inf_refmsgid")
        logger.info(
            "national platform: %s %s -> infcode %s ref %s in %.0f ms",
            infno.value,
            msgid,
            infcode,
            answer["inf_refmsgid"],
            elapsed_ms,
        )
        if infcode != 0:
            raise refusal(infcode, str(answer.get("err_msg") or ""))
        return self._open_output(answer, msgid)

    def _check_signature(self, answer: dict[str, Any]) -> None:
        if self._platform_key is None:
            return
        cainfo = answer.get("cainfo")
        if not isinstance(cainfo, str) or answer.get("signtype") != SIGNTYPE_SM2:
            raise BadSignatureError("answer is not signed (cainfo/signtype missing)")
        try:
            verify_record(self._platform_key, unsigned(answer), cainfo)
        except CryptoError as exc:
            raise BadSignatureError("the platform's signature on the answer does not verify") from exc

    def _open_output(self, answer: dict[str, Any], msgid: str) -> Any:
        output = answer.get("output")
        if not self._settings.encrypt_output:
            return output
        if answer.get("enctype") != ENCTYPE_SM4 or not isinstance(output, str):
            raise ProtocolViolationError("encrypted output was asked for but the answer is not encrypted")
        if self._sm4_key is None:  # guarded in __init__; kept so mypy and a broken invariant both stop here
            raise ProtocolViolationError("no SM4 key")
        try:
            sealed = base64.b64decode(output, validate=True)
            plaintext = sm4.open(self._sm4_key, sealed, output_aad(msgid, str(answer["inf_refmsgid"])))
        except (binascii.Error, CryptoError) as exc:
            raise BadSignatureError("the encrypted output does not open under the agreed SM4 key") from exc
        return _json_value(plaintext)


def _range(psn_no: str, begndate: date, enddate: date) -> dict[str, str]:
    if enddate < begndate:
        raise ValueError("enddate before begndate")
    return {"psn_no": psn_no, "begndate": begndate.isoformat(), "enddate": enddate.isoformat()}


def _json_value(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolViolationError("answer is not JSON") from exc


def _json_object(raw: bytes) -> dict[str, Any]:
    value = _json_value(raw)
    if not isinstance(value, dict):
        raise ProtocolViolationError("answer is not a JSON object")
    return value


def _parse(model: type[_R], output: Any) -> _R:
    try:
        return model.model_validate(output)
    except ValidationError as exc:
        raise ProtocolViolationError(f"output does not match {model.__name__}") from exc


__all__ = [
    "CHINA_TZ",
    "SERVICE_PATH",
    "AccountCredit",
    "BadSignatureError",
    "BaseInfo",
    "CertType",
    "Contribution",
    "CredentialRejectedError",
    "GatewayRejectedError",
    "HttpNationalPlatform",
    "IdetInfo",
    "Infno",
    "Institution",
    "InsuInfo",
    "MessageRejectedError",
    "MsgidSequence",
    "NationalPlatform",
    "NationalPlatformError",
    "NationalPlatformSettings",
    "PersonInfo",
    "PersonNotFoundError",
    "ProtocolViolationError",
    "RefusedError",
    "Settlement",
    "SignInRequiredError",
    "SignInResult",
    "SignatureRejectedError",
    "UnreachableError",
    "refusal",
    "tif_signature",
    "wire_time",
]
