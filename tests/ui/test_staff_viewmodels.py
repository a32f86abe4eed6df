"""The staff view-models (pharmacist sign-in/out and attendance, prescription review, binding, the shared task
screens) on plain fake ports and a fake clock: success, refusal, errors, late results and the idle timeout."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from tests.terminal.conftest import FakeClock
from ui.i18n import CATALOGUES, Locale, text
from ui.viewmodels.base import Observable, inline_runner
from ui.viewmodels.kiosk import IDLE_TIMEOUT_S, KioskModel, ScreenName
from ui.viewmodels.ports import Guidance
from ui.viewmodels.review import ReviewStep, RxTab
from ui.viewmodels.staff import StaffModels, build_staff_models
from ui.viewmodels.staff_ports import (
    AttendanceOutcome,
    AttendanceRecords,
    AttendanceRow,
    BindingApplied,
    BindingShown,
    BindingView,
    GuidanceSink,
    HeadMethod,
    PharmacistSeen,
    RxDecided,
    RxFinding,
    RxLine,
    RxOpened,
    RxSummary,
    StepSink,
    Unlocked,
    Verdict,
)
from ui.voice import RecordingSpeaker

WANG = PharmacistSeen("YS0001", "王**")
WARNING = RxFinding("QTY-1", blocks=False, message="【复方甘草片】单次超过 2 瓶（提醒）", detail="限量 2，本处方 3")
BLOCK = RxFinding("AGE-1", blocks=True, message="【某药】儿童禁用（禁止）", detail="")


def rx(pid: int, verdict: Verdict | None = None) -> RxSummary:
    return RxSummary(pid, f"RX{pid:06d}", "李* 67岁 女", "内科 陈**", "2026-06-01 09:00", 2, verdict)


@dataclass
class FakePharmacists:
    outcome: AttendanceOutcome = field(default_factory=lambda: AttendanceOutcome(True, WANG, at="2026-06-01 08:30"))
    rows: int = 9
    from_server: bool = True
    available_: bool = True
    guidance: list[str] = field(default_factory=list)
    raise_: bool = False

    def available(self) -> bool:
        return self.available_

    def on_duty(self) -> PharmacistSeen | None:
        return WANG

    def _face(self, guidance: GuidanceSink) -> AttendanceOutcome:
        guidance(Guidance("请缓慢向左转头", "turn left", is_challenge=True))
        if self.raise_:
            raise RuntimeError("a bug")
        return self.outcome

    def sign_in(self, guidance: GuidanceSink) -> AttendanceOutcome:
        return self._face(guidance)

    def sign_out(self, guidance: GuidanceSink) -> AttendanceOutcome:
        return self._face(guidance)

    def identify(self, guidance: GuidanceSink) -> AttendanceOutcome:
        return self._face(guidance)

    def records(self, code: str) -> AttendanceRecords:
        rows = [
            AttendanceRow(f"2026-05-{d:02d} 08:30", f"2026-05-{d:02d} 17:30", "staff.note.signed_out")
            for d in range(1, self.rows + 1)
        ]
        return AttendanceRecords(rows, from_server=self.from_server)


@dataclass
class FakeReview:
    findings: tuple[RxFinding, ...] = (WARNING,)
    opened: RxOpened | None = None
    decided: RxDecided = field(default_factory=lambda: RxDecided(True))
    calls: list[tuple[Verdict, tuple[str, ...], frozenset[str]]] = field(default_factory=list)
    closed: int = 0
    unlocked: Unlocked = field(default_factory=lambda: Unlocked(True))
    unlocks: int = 0

    def available(self) -> bool:
        return True

    def pending(self) -> Sequence[RxSummary]:
        return [rx(i) for i in range(1, 8)]

    def unlock(self, guidance: GuidanceSink) -> Unlocked:
        self.unlocks += 1
        return self.unlocked

    def reviewed(self) -> Sequence[RxSummary]:
        return [rx(99, Verdict.APPROVED)]

    def open(self, prescription_id: int) -> RxOpened:
        if self.opened is not None:
            return self.opened
        lines = [RxLine(f"{n}. 阿莫西林胶囊 0.25g", "数量 2 盒") for n in range(1, 6)]
        return RxOpened(True, rx(prescription_id), lines, self.findings)

    def decide(
        self, verdict: Verdict, reasons: Sequence[str], acknowledged: frozenset[str], guidance: GuidanceSink
    ) -> RxDecided:
        self.calls.append((verdict, tuple(reasons), acknowledged))
        return self.decided

    def close(self) -> None:
        self.closed += 1


@dataclass
class FakeBinding:
    view: BindingView = field(default_factory=lambda: BindingView(BindingShown.UNBOUND))
    applied: BindingApplied = field(default_factory=lambda: BindingApplied(True, "张**"))
    steps: list[str] = field(default_factory=list)
    applications: list[tuple[str, HeadMethod]] = field(default_factory=list)

    def status(self) -> BindingView:
        return self.view

    def methods(self) -> frozenset[HeadMethod]:
        return frozenset({HeadMethod.YIBAO_CODE})

    def apply(
        self, institution_code: str, method: HeadMethod, step: StepSink, guidance: GuidanceSink
    ) -> BindingApplied:
        step("staff.binding.step.face")
        self.steps.append("face")
        self.applications.append((institution_code, method))
        return self.applied


@dataclass
class Rig:
    clock: FakeClock
    kiosk: KioskModel
    staff: StaffModels
    pharmacists: FakePharmacists
    review: FakeReview
    binding: FakeBinding
    speaker: RecordingSpeaker


def make(runner: Callable[[Callable[[], None]], None] = inline_runner) -> Rig:
    clock, speaker = FakeClock(), RecordingSpeaker()
    kiosk = KioskModel(clock, speaker=speaker)
    pharmacists, review, binding = FakePharmacists(), FakeReview(), FakeBinding()
    staff = build_staff_models(kiosk, pharmacists=pharmacists, review=review, binding=binding, runner=runner)
    return Rig(clock, kiosk, staff, pharmacists, review, binding, speaker)


S = TypeVar("S")


def current(model: Observable[S]) -> S:
    """The state now (a call, so the type checker does not carry an earlier assertion's narrowing over)."""
    return model.state


def screen(rig: Rig) -> ScreenName:
    return rig.kiosk.state.screen


@pytest.fixture
def rig() -> Rig:
    return make()


def test_every_staff_phrase_exists_in_both_locales() -> None:
    zh = {k for k in CATALOGUES[Locale.ZH_CN] if k.startswith("staff.")}
    en = {k for k in CATALOGUES[Locale.EN] if k.startswith("staff.")}
    assert zh == en
    assert len(zh) > 100


def test_the_menu_says_who_is_on_duty_the_binding_and_the_pending_prescriptions(rig: Rig) -> None:
    rig.binding.view = BindingView(BindingShown.BOUND, "H32058300017 示例大药房")
    rig.staff.menu.open()
    state = rig.staff.menu.state
    assert screen(rig) is ScreenName.STAFF
    assert state.on_duty == "在岗药师：王**（YS0001）"
    assert "已绑定" in state.binding
    assert "示例大药房" in state.binding
    assert state.pending == "待审处方：7 张"
    assert state.pharmacists_ok
    assert state.review_ok


def test_sign_in_shows_the_masked_pharmacist_and_offers_their_records(rig: Rig) -> None:
    rig.kiosk.set_care_mode(True)
    rig.staff.pharmacist.sign_in()
    task = rig.staff.task.state
    assert screen(rig) is ScreenName.STAFF_RESULT
    assert task.ok is True
    assert task.title == "签到成功"
    assert task.lines == ("药师：王**（YS0001）", "签到时间：2026-06-01 08:30")
    assert [a.label for a in task.actions] == ["查看我的考勤记录", "回到工作人员菜单"]
    # the face pipeline's challenge was spoken in care mode, and the outcome
    assert "请缓慢向左转头" in rig.speaker.phrases
    assert text("voice.staff.ok") in rig.speaker.phrases
    task.actions[0].run()
    assert screen(rig) is ScreenName.ATTENDANCE
    assert rig.staff.pharmacist.state.who == "药师：王**（YS0001）"


def test_a_face_that_is_not_a_pharmacist_here_is_refused_in_words_with_a_retry(rig: Rig) -> None:
    rig.pharmacists.outcome = AttendanceOutcome(False, reason="staff.reason.face_no_match")
    rig.staff.pharmacist.sign_in()
    task = rig.staff.task.state
    assert task.ok is False
    assert task.title == "签到未成功"
    assert task.lines == (text("staff.reason.face_no_match"),)
    assert task.actions[0].label == "再试一次"


def test_signing_in_twice_and_signing_out_without_a_session_say_so(rig: Rig) -> None:
    rig.pharmacists.outcome = AttendanceOutcome(
        False, WANG, since="2026-06-01 08:30", reason="staff.reason.already_signed_in"
    )
    rig.staff.pharmacist.sign_in()
    assert rig.staff.task.state.title == "您已签到"
    assert "2026-06-01 08:30" in rig.staff.task.state.lines[1]
    rig.pharmacists.outcome = AttendanceOutcome(False, WANG, reason="staff.reason.not_signed_in")
    rig.staff.pharmacist.sign_out()
    assert rig.staff.task.state.ok is False
    assert rig.staff.task.state.lines[1] == text("staff.reason.not_signed_in")


def test_my_records_identify_first_and_page_with_fewer_rows_in_care_mode(rig: Rig) -> None:
    rig.pharmacists.from_server = False
    rig.staff.pharmacist.my_records()
    state = rig.staff.pharmacist.state
    assert screen(rig) is ScreenName.ATTENDANCE
    assert (len(state.rows), state.pages, state.page_label) == (4, 3, "第 1 / 3 页")
    assert state.source == text("staff.records.local")
    rig.staff.pharmacist.next_page()
    rig.staff.pharmacist.next_page()
    rig.staff.pharmacist.next_page()  # past the end: stays on the last page
    assert (rig.staff.pharmacist.state.page, len(rig.staff.pharmacist.state.rows)) == (2, 1)
    rig.kiosk.set_care_mode(True)  # the lists page again by themselves
    assert (rig.staff.pharmacist.state.pages, len(rig.staff.pharmacist.state.rows)) == (5, 2)


def test_records_of_an_unrecognised_face_are_not_shown(rig: Rig) -> None:
    rig.pharmacists.outcome = AttendanceOutcome(False, reason="staff.reason.face_liveness")
    rig.staff.pharmacist.my_records()
    assert screen(rig) is ScreenName.STAFF_RESULT
    assert rig.staff.pharmacist.state.rows == ()
    assert rig.staff.task.state.lines == (text("staff.reason.face_liveness"),)


def test_a_port_that_raises_shows_the_calm_error_screen_and_clears_everything(rig: Rig) -> None:
    rig.staff.pharmacist.show_records("YS0001", "药师：王**（YS0001）")
    rig.pharmacists.raise_ = True
    rig.staff.pharmacist.sign_in()
    assert screen(rig) is ScreenName.ERROR
    assert rig.staff.pharmacist.state.rows == ()
    assert rig.staff.task.state.lines == ()


def test_a_late_face_result_after_the_pharmacist_left_is_dropped() -> None:
    jobs: list[Callable[[], None]] = []
    rig = make(runner=jobs.append)
    rig.staff.pharmacist.sign_in()
    assert screen(rig) is ScreenName.STAFF_WAIT
    assert rig.staff.task.state.busy
    rig.clock.advance(3)
    rig.staff.tick()
    assert rig.staff.task.state.progress == "已等待 3 秒，预计约 8 秒"
    rig.kiosk.home()
    for job in jobs:
        job()
    assert screen(rig) is ScreenName.ATTRACT
    assert rig.staff.task.state.ok is None
    assert rig.staff.task.state.lines == ()


def test_the_review_needs_every_warning_acknowledged_before_approval_confirmed_by_face(rig: Rig) -> None:
    review = rig.staff.review
    review.open_list(RxTab.PENDING)
    assert (len(review.state.rows), review.state.pages) == (3, 3)
    review.open_rx(1)
    state = review.state
    assert screen(rig) is ScreenName.RX_REVIEW
    assert state.step is ReviewStep.FINDINGS  # the warnings first when there are any
    assert state.notice == "还有 1 条警告需要确认后才能通过。"
    [view] = state.findings
    assert view.label.startswith("警告：")
    assert view.status == text("staff.rx.finding.open")
    review.choose(Verdict.APPROVED)
    assert not review.state.can_approve
    assert not review.state.can_confirm
    review.confirm()  # refused before any face attempt
    assert rig.review.calls == []
    review.acknowledge("QTY-1")
    acknowledged = review.state
    assert acknowledged.findings[0].status == "已确认知晓"
    assert acknowledged.can_approve
    review.go_step(ReviewStep.LINES)
    assert (len(review.state.lines), review.state.pages) == (3, 2)
    review.go_step(ReviewStep.DECIDE)
    review.choose(Verdict.APPROVED)
    assert current(review).can_confirm
    review.confirm()
    assert rig.review.calls == [(Verdict.APPROVED, (), frozenset({"QTY-1"}))]
    task = rig.staff.task.state
    assert task.ok is True
    assert task.title == "审核结果已记录"
    assert "审核结果：通过" in task.lines
    task.actions[0].run()
    assert screen(rig) is ScreenName.RX_LIST


def test_a_blocking_rule_cannot_be_approved_and_a_return_needs_a_reason(rig: Rig) -> None:
    rig.review.findings = (BLOCK, WARNING)
    review = rig.staff.review
    review.open_rx(2)
    assert review.state.notice == text("staff.rx.notice.blocked")
    review.acknowledge("AGE-1")  # a block cannot be acknowledged away
    review.acknowledge("QTY-1")
    assert not review.state.can_approve
    assert review.state.findings[0].status == text("staff.rx.finding.blocks")
    review.choose(Verdict.RETURNED)
    assert review.state.reason_choices
    assert not review.state.can_confirm
    review.choose_reason("not a preset")  # only the presets
    assert not review.state.can_confirm
    review.choose_reason(review.state.reason_choices[0])
    chosen = review.state
    assert chosen.can_confirm
    review.confirm()
    assert rig.review.calls == [(Verdict.RETURNED, ("请医师修改用量",), frozenset({"QTY-1"}))]


def test_the_review_says_when_the_patients_earlier_purchases_were_not_looked_up(rig: Rig) -> None:
    rig.review.findings = ()
    lines = [RxLine("1. 阿莫西林胶囊 0.25g", "数量 2 盒")]
    rig.review.opened = RxOpened(True, rx(4), lines, (), history_checked=False)
    review = rig.staff.review
    review.open_rx(4)
    assert review.state.notice == "未发现用药警告。"
    assert review.state.history_note == ""  # said beside the warnings
    review.go_step(ReviewStep.FINDINGS)
    assert review.state.history_note == "未查询既往购药记录：期间限量只计本处方"
    rig.review.opened = RxOpened(True, rx(5), lines, ())
    review.open_rx(5)
    assert review.state.history_note == ""


def test_a_face_that_does_not_confirm_the_review_records_nothing_and_keeps_the_review_open(rig: Rig) -> None:
    rig.review.findings = ()
    rig.review.decided = RxDecided(False, "staff.reason.face_no_match")
    review = rig.staff.review
    review.open_rx(3)
    assert review.state.step is ReviewStep.LINES
    assert review.state.notice == "未发现用药警告。"
    review.choose(Verdict.APPROVED)
    review.confirm()
    task = rig.staff.task.state
    assert task.ok is False
    assert task.title == "审核结果未记录"
    assert [a.label for a in task.actions] == ["再试一次", "回到审核"]
    task.actions[1].run()
    assert screen(rig) is ScreenName.RX_REVIEW
    assert review.state.summary is not None
    assert review.state.verdict is Verdict.APPROVED


def test_the_prescriptions_are_listed_only_after_the_pharmacist_on_duty_shows_their_face(rig: Rig) -> None:
    rig.review.unlocked = Unlocked(False, "staff.reason.no_pharmacist")
    rig.staff.review.open_list(RxTab.PENDING)
    assert screen(rig) is ScreenName.STAFF_RESULT
    assert rig.staff.task.state.lines == (text("staff.reason.no_pharmacist"),)
    assert rig.staff.review.state.rows == ()
    rig.review.unlocked = Unlocked(True)
    rig.staff.task.state.actions[0].run()  # try again
    assert screen(rig) is ScreenName.RX_LIST
    assert len(current(rig.staff.review).rows) == 3
    rig.staff.review.open_list(RxTab.REVIEWED)  # once per visit: no second face check
    assert rig.review.unlocks == 2
    rig.kiosk.home()
    rig.staff.review.open_list(RxTab.PENDING)
    assert rig.review.unlocks == 3


def test_a_review_that_cannot_open_says_why_on_the_list(rig: Rig) -> None:
    rig.review.opened = RxOpened(False, reason="staff.reason.no_pharmacist")
    rig.staff.review.open_list(RxTab.PENDING)
    rig.staff.review.open_rx(1)
    assert screen(rig) is ScreenName.RX_LIST
    assert rig.staff.review.state.message == text("staff.reason.no_pharmacist")


def test_the_reviewed_list_states_each_result_in_words(rig: Rig) -> None:
    rig.staff.review.open_list(RxTab.REVIEWED)
    [row] = rig.staff.review.state.rows
    assert row.verdict is Verdict.APPROVED
    assert rig.staff.review.state.title == "已审核处方"


@pytest.mark.parametrize(
    ("view", "headline", "expected"),
    [
        (BindingView(BindingShown.UNBOUND), "未绑定", ["请联系：当地医保经办机构"]),
        (
            BindingView(BindingShown.REJECTED, reason="资料不全", contact="12393"),
            "申请被驳回",
            ["原因：资料不全", "请联系：12393"],
        ),
        (BindingView(BindingShown.PENDING, "H32058300017"), "审核中", ["药店：H32058300017"]),
        (BindingView(BindingShown.BOUND, "H32058300017 示例大药房"), "已绑定", ["药店：H32058300017 示例大药房"]),
    ],
)
def test_the_binding_status_is_stated_in_words(rig: Rig, view: BindingView, headline: str, expected: list[str]) -> None:
    rig.binding.view = view
    rig.staff.binding.open()
    state = rig.staff.binding.state
    assert state.headline == headline
    assert list(state.lines) == expected
    assert state.can_apply is (view.state is not BindingShown.BOUND)
    offers = {o.method: o for o in state.methods}
    assert offers[HeadMethod.YIBAO_CODE].enabled is state.can_apply
    assert not offers[HeadMethod.ID_CARD].enabled  # no reader: shown disabled, in words
    assert offers[HeadMethod.ID_CARD].label.endswith("（暂不可用）")


def test_the_head_applies_with_a_valid_code_and_sees_the_masked_name(rig: Rig) -> None:
    binding = rig.staff.binding
    binding.open()
    binding.apply(HeadMethod.YIBAO_CODE, "12")
    assert binding.state.message == text("staff.binding.code_invalid")
    binding.apply(HeadMethod.ID_CARD, "H32058300017")  # its device is missing: nothing happens
    assert rig.binding.applications == []
    binding.apply(HeadMethod.YIBAO_CODE, " H32058300017 ")
    assert rig.binding.applications == [("H32058300017", HeadMethod.YIBAO_CODE)]
    task = rig.staff.task.state
    assert task.ok is True
    assert task.title == "绑定申请已提交"
    assert task.lines[:2] == ("申请人：张**", "机构编码：H32058300017")
    rig.binding.applied = BindingApplied(False, reason="staff.reason.platform_unreachable")
    binding.open()
    binding.apply(HeadMethod.YIBAO_CODE, "H32058300017")
    assert rig.staff.task.state.ok is False
    assert rig.staff.task.state.lines == (text("staff.reason.platform_unreachable"),)


def test_a_bound_terminal_offers_no_application(rig: Rig) -> None:
    rig.binding.view = BindingView(BindingShown.BOUND, "H32058300017")
    rig.staff.binding.open()
    rig.staff.binding.apply(HeadMethod.YIBAO_CODE, "H32058300017")
    assert rig.binding.applications == []
    assert rig.staff.binding.state.message == text("staff.binding.bound_note")


def test_the_idle_timeout_clears_every_staff_view_model(rig: Rig) -> None:
    staff = rig.staff
    staff.menu.open()
    staff.binding.open()
    staff.pharmacist.show_records("YS0001", "药师：王**（YS0001）")
    staff.review.open_rx(1)
    staff.pharmacist.sign_in()
    assert staff.review.state.summary is not None
    assert staff.task.state.lines != ()
    rig.clock.advance(IDLE_TIMEOUT_S + 1)
    rig.kiosk.tick()
    assert screen(rig) is ScreenName.ATTRACT
    assert staff.menu.state.on_duty == ""
    assert staff.binding.state.lines == ()
    assert staff.binding.state.shown is None
    assert staff.pharmacist.state.rows == ()
    assert staff.pharmacist.state.who == ""
    assert current(staff.review).summary is None
    assert current(staff.review).rows == ()
    assert rig.review.closed == 1  # the open review was dropped on the terminal side too
    assert staff.task.state.lines == ()
    assert staff.task.state.actions == ()
