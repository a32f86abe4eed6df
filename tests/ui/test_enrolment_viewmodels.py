"""The pharmacist face-enrolment and re-verification view-models on plain fake ports and a fake clock: the roster
paged, consent declined records nothing, every outcome in words, late results dropped, the re-verification prompt
on a timer only over the attract screen and the staff menu."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from terminal.pharmacists import EnrolmentOutcome
from tests.terminal.conftest import FakeClock
from tests.ui.test_staff_viewmodels import WANG, FakeBinding, FakePharmacists, FakeReview
from ui.i18n import text
from ui.viewmodels.base import inline_runner
from ui.viewmodels.enrolment import OUTCOME_WORDS
from ui.viewmodels.kiosk import KioskModel, ScreenName
from ui.viewmodels.ports import Guidance
from ui.viewmodels.reverify import CHECK_EVERY_S, REPROMPT_S
from ui.viewmodels.staff import StaffModels, build_staff_models
from ui.viewmodels.staff_ports import (
    AttendanceOutcome,
    ConsentGiven,
    Enrolled,
    EnrolmentShown,
    GuidanceSink,
    ReverifyDue,
    RosterEntry,
    StepSink,
)
from ui.voice import RecordingSpeaker

ROSTER = tuple(RosterEntry(f"YS000{n}", f"{'王李张赵刘'[n - 1]}**", enrolled=n == 1) for n in range(1, 6))


@dataclass
class FakeEnrolment:
    result: Enrolled = field(default_factory=lambda: Enrolled(EnrolmentShown.ENROLLED, uploaded=True))
    reason: str = ""
    calls: list[tuple[str, ConsentGiven]] = field(default_factory=list)

    def available(self) -> str:
        return self.reason

    def roster(self) -> Sequence[RosterEntry]:
        return ROSTER

    def consent_version(self) -> str:
        return "2026-01"

    def enrol(self, code: str, consent: ConsentGiven, step: StepSink, guidance: GuidanceSink) -> Enrolled:
        self.calls.append((code, consent))
        step("staff.enrol.step.face")
        guidance(Guidance("请缓慢向左转头", "turn left", is_challenge=True))
        return self.result


@dataclass
class FakeReverify:
    is_due: bool = False
    outcome: AttendanceOutcome = field(default_factory=lambda: AttendanceOutcome(True, WANG, at="2026-06-01 10:30"))
    asked: int = 0
    checked: list[str] = field(default_factory=list)

    def due(self) -> ReverifyDue | None:
        self.asked += 1
        return ReverifyDue(WANG) if self.is_due else None

    def reverify(self, code: str, guidance: GuidanceSink) -> AttendanceOutcome:
        self.checked.append(code)
        self.is_due = False
        return self.outcome


@dataclass
class Rig:
    clock: FakeClock
    kiosk: KioskModel
    staff: StaffModels
    enrolment: FakeEnrolment
    reverify: FakeReverify


def make(runner: Callable[[Callable[[], None]], None] = inline_runner) -> Rig:
    clock = FakeClock()
    kiosk = KioskModel(clock, speaker=RecordingSpeaker())
    enrolment, reverify = FakeEnrolment(), FakeReverify()
    staff = build_staff_models(
        kiosk,
        pharmacists=FakePharmacists(),
        review=FakeReview(),
        binding=FakeBinding(),
        runner=runner,
        enrolment=enrolment,
        reverify=reverify,
    )
    return Rig(clock, kiosk, staff, enrolment, reverify)


@pytest.fixture
def rig() -> Rig:
    return make()


def screen(rig: Rig) -> ScreenName:
    return rig.kiosk.state.screen


# ---------------------------------------------------------------- enrolment


def test_the_roster_shows_codes_and_masked_names_paged_fewer_in_care_mode(rig: Rig) -> None:
    rig.staff.enrolment.open()
    state = rig.staff.enrolment.state
    assert screen(rig) is ScreenName.ENROL_LIST
    assert [r.label for r in state.rows] == ["王**（YS0001）", "李**（YS0002）", "张**（YS0003）", "赵**（YS0004）"]
    assert [r.status for r in state.rows[:2]] == ["已采集人脸（可重新采集）", "尚未采集人脸"]
    assert (state.page_label, state.has_next) == ("第 1 / 2 页", True)
    rig.kiosk.set_care_mode(True)
    rig.staff.repage()
    assert len(rig.staff.enrolment.state.rows) == 2
    assert rig.staff.enrolment.state.page_label == "第 1 / 3 页"
    rig.staff.enrolment.next_page()
    assert [r.code for r in rig.staff.enrolment.state.rows] == ["YS0003", "YS0004"]


def test_declining_the_consent_returns_to_the_menu_and_records_nothing(rig: Rig) -> None:
    rig.staff.enrolment.open()
    rig.staff.enrolment.choose("YS0002")
    state = rig.staff.enrolment.state
    assert screen(rig) is ScreenName.ENROL_CONSENT
    assert state.consent_title == "人脸采集告知（版本 2026-01）"
    assert state.who == "药师：李**（YS0002）"
    words = "".join(state.consent_lines)
    for what in ("采集：", "用途：", "保存：", "删除："):  # what, why, how long, purged when they leave
        assert what in words
    assert "离职" in words
    rig.staff.enrolment.decline()
    assert screen(rig) is ScreenName.STAFF
    assert rig.enrolment.calls == []
    assert rig.staff.enrolment.state.chosen == ""
    assert rig.staff.task.state.lines == ()
    rig.staff.enrolment.accept()  # a stale tap after declining starts nothing
    assert rig.enrolment.calls == []


def test_accepting_records_the_consent_version_and_time_then_card_and_face(rig: Rig) -> None:
    rig.staff.enrolment.open()
    rig.staff.enrolment.choose("YS0002")
    rig.clock.advance(42)
    rig.staff.enrolment.accept()
    assert rig.enrolment.calls == [("YS0002", ConsentGiven("2026-01", rig.clock.now()))]
    task = rig.staff.task.state
    assert screen(rig) is ScreenName.STAFF_RESULT
    assert task.ok is True
    assert task.title == "人脸采集完成"
    uploaded = text("staff.enrol.done.uploaded")
    assert task.lines == ("药师：李**（YS0002）", "人脸与身份证照片比对一致，已保存。", uploaded)
    assert [a.label for a in task.actions] == ["药师签到", "回到工作人员菜单"]


def test_a_choice_not_on_the_roster_is_ignored(rig: Rig) -> None:
    rig.staff.enrolment.open()
    rig.staff.enrolment.choose("YS9999")
    assert screen(rig) is ScreenName.ENROL_LIST
    assert rig.staff.enrolment.state.chosen == ""


@pytest.mark.parametrize(
    ("result", "ok", "expected"),
    [
        (Enrolled(EnrolmentShown.ENROLLED, uploaded=False), True, "暂未上传：将在下次联网同步时自动上传。"),
        (Enrolled(EnrolmentShown.CARD_UNREADABLE), False, "没有读到身份证，请放好药师本人的身份证后重试。"),
        (Enrolled(EnrolmentShown.CARD_NOT_THE_PHARMACISTS), False, "这张身份证不是所选药师本人的，请使用本人身份证。"),
        (Enrolled(EnrolmentShown.ID_PHOTO_UNUSABLE), False, "身份证照片无法用于比对，请联系药店负责人。"),
        (
            Enrolled(EnrolmentShown.FACE_NOT_ACCEPTED, reason="staff.reason.face_liveness"),
            False,
            "未能采集到人脸，未保存。未通过活体检测，请本人正对屏幕重试。",
        ),
        (Enrolled(EnrolmentShown.FACE_NOT_ACCEPTED), False, "未能采集到人脸，未保存。"),
        (
            Enrolled(EnrolmentShown.ID_PHOTO_MISMATCH),
            False,
            "刷脸结果与身份证照片不一致，未保存人脸。请药师本人办理。",
        ),
        (Enrolled(None, reason="staff.reason.not_bound"), False, "本终端尚未绑定药店，请先完成终端绑定。"),
        (Enrolled(None, reason="staff.reason.not_on_roster"), False, "您不在本药店的药师名单中，请联系药店负责人。"),
    ],
)
def test_every_outcome_is_said_in_words(rig: Rig, result: Enrolled, ok: bool, expected: str) -> None:
    rig.enrolment.result = result
    rig.staff.enrolment.open()
    rig.staff.enrolment.choose("YS0002")
    rig.staff.enrolment.accept()
    task = rig.staff.task.state
    assert task.ok is ok
    assert task.title == ("人脸采集完成" if ok else "人脸采集未完成")
    assert task.lines[0] == "药师：李**（YS0002）"
    assert expected in task.lines
    if not ok and result.outcome is not None:  # a retry runs again with the consent already given
        retry = task.actions[0]
        assert retry.label == "再试一次"
        retry.run()
        assert len(rig.enrolment.calls) == 2
        assert rig.enrolment.calls[0][1] == rig.enrolment.calls[1][1]


def test_a_kiosk_that_cannot_enrol_says_why_on_the_list(rig: Rig) -> None:
    rig.enrolment.reason = "staff.reason.no_photo_decoder"
    rig.staff.enrolment.open()
    state = rig.staff.enrolment.state
    assert state.rows == ()
    assert state.message == "本终端无法读取身份证照片，无法人证比对，请联系维护人员。"


def test_a_late_enrolment_result_after_the_pharmacist_left_is_dropped() -> None:
    jobs: list[Callable[[], None]] = []
    rig = make(runner=jobs.append)
    rig.staff.enrolment.open()
    jobs.pop(0)()  # the roster arrives
    rig.staff.enrolment.choose("YS0002")
    rig.staff.enrolment.accept()
    assert screen(rig) is ScreenName.STAFF_WAIT
    assert rig.staff.task.state.hint == "请将药师本人的身份证放在读卡区"
    rig.kiosk.home()  # the idle timeout, or the pharmacist walked away
    for job in jobs:
        job()
    assert screen(rig) is ScreenName.ATTRACT
    assert rig.staff.task.state.ok is None
    assert rig.staff.task.state.lines == ()
    assert rig.staff.enrolment.state.who == ""


# ---------------------------------------------------------------- re-verification


def test_a_due_check_prompts_over_the_attract_screen_once_and_stays_on_the_menu(rig: Rig) -> None:
    rig.staff.tick()
    assert rig.reverify.asked == 1
    assert screen(rig) is ScreenName.ATTRACT
    rig.reverify.is_due = True
    rig.clock.advance(CHECK_EVERY_S - 1)
    rig.staff.tick()
    assert rig.reverify.asked == 1  # asked on the timer, not every second
    rig.clock.advance(1)
    rig.staff.tick()
    assert screen(rig) is ScreenName.REVERIFY
    assert rig.staff.reverify.state.who == "药师：王**（YS0001）"
    rig.staff.reverify.later()
    assert screen(rig) is ScreenName.ATTRACT
    rig.clock.advance(CHECK_EVERY_S)
    rig.staff.tick()
    assert screen(rig) is ScreenName.ATTRACT  # ignored: not asked again at once
    rig.staff.menu.open()
    assert rig.staff.menu.state.reverify == "需要刷脸确认在岗：王**（YS0001）"
    rig.clock.advance(REPROMPT_S)
    rig.staff.tick()
    assert screen(rig) is ScreenName.REVERIFY  # over the staff menu, after a while
    rig.staff.reverify.later()
    assert screen(rig) is ScreenName.STAFF


def test_the_prompt_never_interrupts_a_citizen_mid_flow(rig: Rig) -> None:
    rig.reverify.is_due = True
    rig.kiosk.go(ScreenName.IDENTITY)
    rig.staff.tick()
    assert rig.reverify.asked == 1
    assert screen(rig) is ScreenName.IDENTITY
    for busy in (ScreenName.FACE, ScreenName.STAFF_WAIT, ScreenName.RX_REVIEW):
        rig.kiosk.go(busy)
        rig.clock.advance(CHECK_EVERY_S)
        rig.staff.tick()
        assert screen(rig) is busy
    rig.kiosk.go(ScreenName.ATTRACT)  # the citizen is done
    rig.clock.advance(CHECK_EVERY_S)
    rig.staff.tick()
    assert screen(rig) is ScreenName.REVERIFY


def test_the_face_check_outcome_is_said_in_words(rig: Rig) -> None:
    rig.reverify.is_due = True
    rig.staff.tick()
    rig.staff.reverify.verify()
    task = rig.staff.task.state
    assert rig.reverify.checked == ["YS0001"]
    assert (task.ok, task.title) == (True, "已确认在岗")
    assert task.lines == ("药师：王**（YS0001）", "确认时间：2026-06-01 10:30")
    assert not rig.staff.reverify.state.due
    rig.staff.menu.open()
    assert rig.staff.menu.state.reverify == ""

    rig.reverify.is_due = True
    rig.reverify.outcome = AttendanceOutcome(False, WANG, reason="staff.reason.face_no_match")
    rig.staff.tick()  # asked again at once after a check
    assert screen(rig) is ScreenName.REVERIFY
    rig.staff.reverify.verify()
    task = rig.staff.task.state
    assert (task.ok, task.title) == (False, "未能确认在岗")
    assert "已自动签退" in task.lines[-1]
    assert text("staff.reason.face_no_match") in task.lines


def test_nothing_is_prompted_when_the_check_is_not_due(rig: Rig) -> None:
    for _ in range(3):
        rig.staff.tick()
        rig.clock.advance(CHECK_EVERY_S)
    assert rig.reverify.asked == 3
    assert screen(rig) is ScreenName.ATTRACT
    rig.staff.reverify.open()  # the menu's button does nothing when nothing is due
    assert screen(rig) is ScreenName.ATTRACT


def test_every_outcome_of_the_terminal_has_a_shown_value_and_words() -> None:
    # `ui.staff_services.RuntimeEnrolment` maps the desk's outcome by value: a new outcome must get words here
    assert {o.value for o in EnrolmentOutcome} == {s.value for s in EnrolmentShown}
    assert set(OUTCOME_WORDS) == set(EnrolmentShown)
