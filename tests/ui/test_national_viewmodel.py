"""The personal queries on the national platform without Kivy (`ui.viewmodels.national`, `ui.services.RuntimeNational`):
the credential first, then large paged lists (fewer rows in care mode), the wait against an estimate, every failure
in words, and the person forgotten on leaving the query screens or by the idle timeout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from types import SimpleNamespace
from typing import cast

import pytest

from protocol.national_query import (
    ContributionsAnswer,
    CreditsAnswer,
    InstitutionsAnswer,
    InstitutionView,
    InsuranceView,
    PersonInfoAnswer,
    PersonView,
    SettlementsAnswer,
    SettlementView,
)
from terminal.national_queries import (
    CredentialNotAcceptedError,
    NationalQueryError,
    PersonNotInsuredError,
    QueryUnavailableError,
)
from terminal.runtime import TerminalRuntime
from tests.terminal.conftest import FakeClock
from tests.ui.fakes import FakeIdentity, FakeMaintenance, FakeQueries
from ui.i18n import text
from ui.services import RuntimeNational, RuntimeQueries
from ui.viewmodels.base import inline_runner
from ui.viewmodels.kiosk import IDLE_TIMEOUT_S, ScreenName
from ui.viewmodels.models import KioskModels, build_models
from ui.viewmodels.national import NETWORK_EXPECTED_S, SESSION_LAPSED, NationalPhase
from ui.viewmodels.ports import (
    Method,
    NationalKind,
    NationalOutcome,
    NationalPerson,
    QueryAnswer,
    QueryKind,
    QueryRow,
)
from ui.viewmodels.queries import ROWS_PER_PAGE, ROWS_PER_PAGE_CARE

REF = "sealed-query-ref-0123456789abcdef"
PERSON = NationalPerson("王**", "320*************21", (QueryRow("姓名：王**"), QueryRow("年龄：70 岁 · 男")), REF)


@dataclass
class FakeNational:
    outcome: NationalOutcome = field(default_factory=lambda: NationalOutcome(PERSON))
    rows: int = 11
    reason: str = ""
    identified: list[Method] = field(default_factory=list)
    asked: list[tuple[NationalKind, str]] = field(default_factory=list)
    while_waiting: Callable[[], None] | None = None
    methods: frozenset[Method] = frozenset({Method.QR, Method.ID_CARD, Method.SS_CARD})

    def available(self) -> frozenset[Method]:
        return self.methods

    def identify(self, method: Method, timeout_s: float) -> NationalOutcome:
        self.identified.append(method)
        if self.while_waiting is not None:
            self.while_waiting()
        return self.outcome

    def records(self, kind: NationalKind, query_ref: str) -> QueryAnswer:
        self.asked.append((kind, query_ref))
        if self.reason:
            return QueryAnswer(reason=self.reason)
        return QueryAnswer(tuple(QueryRow(f"{kind.value} {i}", "detail") for i in range(self.rows)))


def models(clock: FakeClock, port: FakeNational) -> KioskModels:
    return build_models(
        clock,
        identity=FakeIdentity(),
        queries=FakeQueries(),
        maintenance=FakeMaintenance(),
        national=port,
        runner=inline_runner,
    )


def screen(m: KioskModels) -> ScreenName:
    return m.kiosk.state.screen


def test_the_credential_first_then_the_person_and_each_record_list_without_showing_it_again() -> None:
    port = FakeNational()
    m = models(FakeClock(), port)
    m.queries.open_menu()
    m.national.open(NationalKind.PERSON)
    state = m.national.state
    assert screen(m) is ScreenName.NATIONAL_ID
    assert state.phase is NationalPhase.CHOOSE
    assert [c.method for c in state.choices] == [Method.QR, Method.ID_CARD, Method.SS_CARD]  # never the face
    m.national.choose(Method.QR)
    state = m.national.state
    assert screen(m) is ScreenName.NATIONAL_LIST
    assert state.person_line == text("national.person_line", name="王**", id="320*************21")
    assert [r.title for r in state.rows] == ["姓名：王**", "年龄：70 岁 · 男"]
    assert port.asked == []  # person_info already answered 个人信息/参保/余额

    m.national.menu()
    assert screen(m) is ScreenName.QUERIES
    for kind in (NationalKind.SETTLEMENTS, NationalKind.CREDITS, NationalKind.CONTRIBUTIONS):
        m.national.open(kind)
        state = m.national.state
        assert screen(m) is ScreenName.NATIONAL_LIST
        assert (state.kind, state.loading, state.rows[0].title) == (kind, False, f"{kind.value} 0")
        assert state.title == text(f"national.{kind.value}")
    assert port.identified == [Method.QR]
    records = (NationalKind.SETTLEMENTS, NationalKind.CREDITS, NationalKind.CONTRIBUTIONS)
    assert port.asked == [(k, REF) for k in records]


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        ("national.unavailable", "暂时无法查询，请稍后再试"),
        ("national.code_expired", "医保码已过期，请重新出示"),
        ("national.not_insured", "未查询到参保信息"),
        ("reason.no_card", text("reason.no_card")),
    ],
)
def test_a_failed_identification_is_said_in_words_with_the_choice_again(reason: str, words: str) -> None:
    m = models(FakeClock(), FakeNational(outcome=NationalOutcome(reason=reason)))
    m.national.open(NationalKind.SETTLEMENTS)
    m.national.choose(Method.ID_CARD)
    state = m.national.state
    assert screen(m) is ScreenName.NATIONAL_ID
    assert (state.phase, state.message, state.person_line) == (NationalPhase.CHOOSE, words, "")
    assert all(c.enabled for c in state.choices)


def test_records_failures_in_words_and_a_lapsed_reference_asks_for_the_credential_again() -> None:
    port = FakeNational(reason="national.unavailable")
    m = models(FakeClock(), port)
    m.national.open(NationalKind.CREDITS)
    m.national.choose(Method.SS_CARD)
    assert (m.national.state.message, m.national.state.rows) == ("暂时无法查询，请稍后再试", ())
    port.reason, port.rows = "", 0
    m.national.open(NationalKind.CONTRIBUTIONS)
    assert m.national.state.message == text("national.empty")
    port.reason = SESSION_LAPSED
    m.national.open(NationalKind.SETTLEMENTS)
    assert m.national.state.message == text(SESSION_LAPSED)
    m.national.open(NationalKind.SETTLEMENTS)
    assert screen(m) is ScreenName.NATIONAL_ID  # the reference lapsed: show the credential again


def test_paging_with_fewer_rows_in_care_mode() -> None:
    m = models(FakeClock(), FakeNational(rows=11))
    m.national.open(NationalKind.SETTLEMENTS)
    m.national.choose(Method.QR)
    state = m.national.state
    assert (len(state.rows), state.pages, state.has_prev, state.has_next) == (ROWS_PER_PAGE, 3, False, True)
    assert state.page_label == text("common.page", page=1, pages=3)
    m.national.next_page()
    m.national.next_page()
    m.national.next_page()  # past the end stays on the last page
    state = m.national.state
    assert (state.page, len(state.rows), state.has_next, state.rows[0].title) == (2, 1, False, "settlements 10")
    m.kiosk.set_care_mode(True)  # the same rows, repaged
    state = m.national.state
    assert (state.page, len(state.rows), state.pages) == (0, ROWS_PER_PAGE_CARE, 4)
    assert screen(m) is ScreenName.NATIONAL_LIST


def test_the_wait_shows_elapsed_time_against_an_estimate() -> None:
    clock = FakeClock()
    port = FakeNational()
    m = models(clock, port)
    seen: list[str] = []

    def citizen_waits() -> None:
        clock.advance(4)
        m.tick()
        seen.append(m.national.state.progress)

    port.while_waiting = citizen_waits
    m.national.open(NationalKind.PERSON)
    m.national.choose(Method.QR)
    assert seen == [text("common.elapsed", elapsed=4, eta=10 + NETWORK_EXPECTED_S)]
    assert m.national.state.progress == ""


def test_the_idle_timeout_and_leaving_the_query_screens_forget_the_person() -> None:
    clock = FakeClock()
    port = FakeNational()
    m = models(clock, port)
    m.national.open(NationalKind.PERSON)
    m.national.choose(Method.QR)
    assert m.national.state.rows
    clock.advance(IDLE_TIMEOUT_S + 1)
    m.tick()
    assert screen(m) is ScreenName.ATTRACT
    assert (m.national.state.rows, m.national.state.person_line) == ((), "")
    m.national.open(NationalKind.SETTLEMENTS)
    assert screen(m) is ScreenName.NATIONAL_ID  # asked again: nothing was kept

    m.national.choose(Method.QR)
    m.identity.open()  # another flow: the query screens are left
    assert m.national.state.rows == ()
    m.national.open(NationalKind.PERSON)
    assert screen(m) is ScreenName.NATIONAL_ID
    assert port.identified == [Method.QR, Method.QR]


def test_an_answer_after_the_citizen_left_is_dropped() -> None:
    port = FakeNational()
    m = models(FakeClock(), port)
    port.while_waiting = m.kiosk.home
    m.national.open(NationalKind.PERSON)
    m.national.choose(Method.QR)
    assert screen(m) is ScreenName.ATTRACT
    assert m.national.state.rows == ()
    port.while_waiting = None
    m.national.open(NationalKind.SETTLEMENTS)
    assert screen(m) is ScreenName.NATIONAL_ID


# ------------------------------------------------------------------ the port over the relay client


@dataclass
class FakeRelay:
    """The relay client's methods; `error` is raised by every call when set."""

    error: NationalQueryError | None = None
    calls: list[tuple[str, ...]] = field(default_factory=list)

    def person_info(self, cert_type: str, cert_no: str, *, card_sn: str | None = None) -> PersonInfoAnswer:
        self.calls.append((cert_type, cert_no, card_sn or ""))
        if self.error is not None:
            raise self.error
        insurance = InsuranceView(
            insutype="310",
            psn_type="11",
            psn_insu_stas="1",
            psn_insu_date=date(2001, 7, 1),
            cvlserv_flag="0",
            insuplc_admdvs="320583",
            emp_name="昆山某公司",
            balance=Decimal("1234.50"),
        )
        return PersonInfoAnswer(
            query_ref=REF,
            query_ref_expires_in_s=600,
            person=PersonView(psn_name_masked="王**", certno_masked="320*************21", gend="1", naty="01", age=70),
            insurance=[insurance],
        )

    def settlements(
        self, query_ref: str, begndate: date | None = None, enddate: date | None = None
    ) -> SettlementsAnswer:
        if self.error is not None:
            raise self.error
        older = SettlementView(
            setl_id="S1",
            setl_time="2026-03-01 09:00:00",
            fixmedins_code="P32058300001",
            fixmedins_name="康民大药房",
            med_type="41",
            insutype="310",
            medfee_sumamt=Decimal("100.00"),
            fund_pay_sumamt=Decimal("0.00"),
            acct_pay=Decimal("100.00"),
            psn_cash_pay=Decimal("0.00"),
            balc=Decimal("900.00"),
        )
        newer = older.model_copy(update={"setl_id": "S2", "setl_time": "2026-05-02 10:00:00"})
        return SettlementsAnswer(begndate=date(2025, 6, 1), enddate=date(2026, 6, 1), records=[older, newer])

    def account_credits(
        self, query_ref: str, begndate: date | None = None, enddate: date | None = None
    ) -> CreditsAnswer:
        raise QueryUnavailableError("down")

    def contributions(
        self, query_ref: str, begndate: date | None = None, enddate: date | None = None
    ) -> ContributionsAnswer:
        raise CredentialNotAcceptedError("lapsed")

    def institutions(self, fixmedins_type: str | None = None, fixmedins_name: str = "") -> InstitutionsAnswer:
        self.calls.append(("institutions", fixmedins_name))
        if self.error is not None:
            raise self.error
        pharmacy = InstitutionView(
            fixmedins_code="P32058300001", fixmedins_name="康民大药房", fixmedins_type="2", addr="昆山市前进中路 1 号"
        )
        return InstitutionsAnswer(institutions=[pharmacy])


@dataclass
class IdCardReader:
    id_number: str = "320583195601010021"

    def read_card(self, timeout_s: float) -> SimpleNamespace:
        return SimpleNamespace(id_number=self.id_number)


def _runtime() -> TerminalRuntime:
    devices = SimpleNamespace(qr_scanner=None, id_card_reader=IdCardReader(), ss_card_reader=None)
    return cast(TerminalRuntime, SimpleNamespace(devices=devices, evoucher=None, face=None, server_api=None))


def test_the_port_reads_the_credential_and_turns_answers_into_masked_rows() -> None:
    relay = FakeRelay()
    port = RuntimeNational(_runtime(), relay)
    assert port.available() == frozenset({Method.ID_CARD})
    outcome = port.identify(Method.ID_CARD, 5)
    assert relay.calls == [("02", "320583195601010021", "")]
    assert outcome.person is not None
    person = outcome.person
    shown = " ".join(f"{r.title} {r.detail}" for r in person.rows)
    assert "320583195601010021" not in shown
    for words in ("个人账户余额：1234.50 元", "职工基本医疗保险", "正常参保"):
        assert words in shown
    settled = port.records(NationalKind.SETTLEMENTS, person.query_ref)
    assert [r.title for r in settled.rows] == ["2026-05-02  康民大药房", "2026-03-01  康民大药房"]  # newest first
    assert port.records(NationalKind.CREDITS, REF).reason == "national.unavailable"
    assert port.records(NationalKind.CONTRIBUTIONS, REF).reason == SESSION_LAPSED
    assert port.identify(Method.QR, 5).reason == "reason.unavailable"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (QueryUnavailableError("x"), "national.unavailable"),
        (CredentialNotAcceptedError("x"), "national.card_refused"),
        (PersonNotInsuredError("x"), "national.not_insured"),
    ],
)
def test_the_port_says_each_relay_failure_in_words(error: NationalQueryError, reason: str) -> None:
    assert RuntimeNational(_runtime(), FakeRelay(error=error)).identify(Method.ID_CARD, 5).reason == reason
    assert RuntimeNational(_runtime()).available() == frozenset()  # not enrolled: no relay, nothing offered


def test_designated_institutions_come_from_the_platform_and_from_the_catalogue_when_it_cannot_answer() -> None:
    relay = FakeRelay()
    runtime = cast(TerminalRuntime, SimpleNamespace(catalogue=None, server_api=None))
    answer = RuntimeQueries(runtime, relay).search(QueryKind.INSTITUTIONS, "康民")
    assert answer.rows == (QueryRow("康民大药房", "昆山市前进中路 1 号"),)
    assert relay.calls == [("institutions", "康民")]
    relay.error = QueryUnavailableError("down")
    assert RuntimeQueries(runtime, relay).search(QueryKind.INSTITUTIONS, "康民").reason == "queries.offline"
    assert RuntimeQueries(runtime, relay).search(QueryKind.DRUGS, "阿莫西林").reason == "queries.offline"
    assert len(relay.calls) == 2  # drugs never go to the platform


def test_a_kiosk_without_the_relay_says_the_query_is_not_possible_now() -> None:
    m = build_models(
        FakeClock(), identity=FakeIdentity(), queries=FakeQueries(), maintenance=FakeMaintenance(), runner=inline_runner
    )
    m.national.open(NationalKind.CONTRIBUTIONS)
    state = m.national.state
    assert screen(m) is ScreenName.NATIONAL_ID
    assert state.message == "暂时无法查询，请稍后再试"
    assert not any(c.enabled for c in state.choices)
    m.national.choose(Method.QR)  # a disabled choice does nothing
    assert m.national.state.phase is NationalPhase.CHOOSE
