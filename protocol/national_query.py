"""The citizen queries a terminal relays through the sync server to the national platform (K-11…K-16, K-19).

The terminal never talks to the national platform itself (docs/national-platform.md): it POSTs one of these requests
to `/device/v1/national/{query}` and gets the answer back **masked as the kiosk may show it to the citizen** standing
at it: the name with the surname only, the ID number with its first 3 and last 2 characters, no 人员编号 (psn_no)
and no birth date (the age is enough). Amounts travel as decimal strings in yuan (`"123.45"`), never floats.

`person_info` (1101, by 就诊凭证 01 ecToken / 02 ID number / 03 social-security card + card_sn) answers the person,
their insurance enrolments and personal-account balances (K-11, K-12, K-13) and a `query_ref`: an opaque, sealed,
short-lived reference the server made of the person's psn_no for THIS terminal. The later queries — settlements
(K-14), personal-account credits (K-15), contributions (K-16) — carry that `query_ref` instead of any identifier, so
the kiosk never holds the person's platform number. `institutions` (1201, K-19) needs no person.

This module owns those shapes. It must never grow behaviour of either side, and its answers must never carry an
identifier in clear.
"""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_RANGE_DAYS: Final = 366
"""The longest date range one query may ask for (the platform's limit)."""
DEFAULT_RANGE_DAYS: Final = 365
"""The range asked for when the terminal gives none: the year up to today."""

_Amount = Annotated[Decimal, Field(max_digits=14, decimal_places=2, description="Yuan, two decimal places.")]


class NationalQuery(StrEnum):
    """The `{query}` of `POST /device/v1/national/{query}`."""

    PERSON_INFO = "person_info"
    """1101 人员信息获取: K-11 基本信息, K-12 参保信息, K-13 账户余额."""
    SETTLEMENTS = "settlements"
    """5203 结算信息查询: K-14 医保支付明细."""
    ACCOUNT_CREDITS = "account_credits"
    """5207 个人账户划入查询: K-15 个账划入."""
    CONTRIBUTIONS = "contributions"
    """5208 缴费信息查询: K-16 缴费信息."""
    INSTITUTIONS = "institutions"
    """1201 医药机构信息获取: K-19 定点医院 / 定点药店."""


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------------------------------ requests


class PersonInfoRequest(_Closed):
    """Who is asking, by 就诊凭证. The credential is used for this one call and never stored or logged."""

    mdtrt_cert_type: Literal["01", "02", "03"] = Field(
        description="01 电子凭证 (ecToken from the decoded 医保码), 02 居民身份证 (ID number), 03 社会保障卡."
    )
    mdtrt_cert_no: str = Field(min_length=1, max_length=128, description="The ecToken, ID number or card number.")
    card_sn: str | None = Field(default=None, max_length=64, description="卡识别码; required for 03.")

    @model_validator(mode="after")
    def _card_sn_for_cards(self) -> Self:
        if self.mdtrt_cert_type == "03" and not self.card_sn:
            raise ValueError("card_sn is required for a social-security card (mdtrt_cert_type 03)")
        return self


class RecordsRequest(_Closed):
    """A person's records in a date range (Beijing dates, both inclusive); defaults: the year up to today."""

    query_ref: str = Field(min_length=16, max_length=512, description="From the person_info answer.")
    begndate: date | None = None
    enddate: date | None = None

    @model_validator(mode="after")
    def _range(self) -> Self:
        if self.begndate is not None and self.enddate is not None:
            if self.enddate < self.begndate:
                raise ValueError("enddate is before begndate")
            if (self.enddate - self.begndate) > timedelta(days=MAX_RANGE_DAYS):
                raise ValueError(f"the range is longer than {MAX_RANGE_DAYS} days")
        return self


class InstitutionsRequest(_Closed):
    fixmedins_type: Literal["1", "2"] | None = Field(default=None, description="1 定点医疗机构, 2 定点零售药店.")
    fixmedins_name: str = Field(default="", max_length=100, description="Part of the name; '' for all.")


# ------------------------------------------------------------------------------------------------------ answers


class PersonView(_Closed):
    psn_name_masked: str = Field(description="姓名 with the surname only: '张**'.")
    certno_masked: str = Field(description="证件号码 with its first 3 and last 2 characters.")
    gend: str = Field(description="1 男, 2 女.")
    naty: str = Field(description="民族 code.")
    age: int


class InsuranceView(_Closed):
    insutype: str = Field(description="险种类型 (310 职工基本医疗保险, 390 城乡居民基本医疗保险).")
    psn_type: str
    psn_insu_stas: str = Field(description="参保状态 (1 正常参保, 2 暂停参保, 4 终止参保).")
    psn_insu_date: date
    paus_insu_date: date | None = None
    cvlserv_flag: str
    insuplc_admdvs: str
    emp_name: str = ""
    balance: _Amount = Field(description="个人账户余额 (K-13).")


class IdentityView(_Closed):
    psn_idet_type: str
    psn_type_lv: str = ""
    begntime: str
    endtime: str | None = None


class PersonInfoAnswer(_Closed):
    query_ref: str = Field(description="Opaque; send it with the records queries of this person, from this terminal.")
    query_ref_expires_in_s: int
    person: PersonView
    insurance: list[InsuranceView]
    identities: list[IdentityView] = Field(default_factory=list)


class SettlementView(_Closed):
    setl_id: str
    setl_time: str = Field(description="'yyyy-MM-dd HH:mm:ss', Beijing time.")
    fixmedins_code: str
    fixmedins_name: str
    med_type: str = Field(description="医疗类别 (41 定点药店购药, 11 普通门诊).")
    insutype: str
    medfee_sumamt: _Amount
    fund_pay_sumamt: _Amount
    acct_pay: _Amount
    psn_cash_pay: _Amount
    balc: _Amount


class CreditView(_Closed):
    crdt_ym: str
    crdt_date: date
    crdt_amt: _Amount
    crdt_type: str = Field(description="1 个人缴费划入, 2 统筹基金划入/退休定额.")
    insutype: str
    balc: _Amount


class ContributionView(_Closed):
    clct_ym: str
    insutype: str
    clct_type: str = Field(description="10 正常应缴, 31 补缴.")
    clct_base: _Amount
    emp_clct_amt: _Amount
    psn_clct_amt: _Amount
    arrive_date: date
    emp_name: str = ""


class InstitutionView(_Closed):
    fixmedins_code: str
    fixmedins_name: str
    fixmedins_type: str
    hosp_lv: str = ""
    admdvs: str = ""
    addr: str = ""


class SettlementsAnswer(_Closed):
    begndate: date
    enddate: date
    records: list[SettlementView]


class CreditsAnswer(_Closed):
    begndate: date
    enddate: date
    records: list[CreditView]


class ContributionsAnswer(_Closed):
    begndate: date
    enddate: date
    records: list[ContributionView]


class InstitutionsAnswer(_Closed):
    institutions: list[InstitutionView]
