"""The kiosk's staff and citizen flows against a RUNNING server (issue 6: which flows are complete end to end).

One stack for the module (`yibao.kiosk_live`): a private Mosquitto, `yibao server run` as a child process on SQLite
over HTTP, with its national-platform relay configured against the national-platform simulator served on loopback;
one kiosk's terminal core enrolled with the server (real ONNX face models, serial peripherals on ptys, a camera that
plays real photos), the pharmacy's HIS as a signed HTTP client and the device admin on the admin API. The kiosk's
view-models are built exactly as `yibao terminal run --ui kiosk` builds them (`ui.kiosk.run.kiosk_models` over the
runtime: `ui.services` and `ui.staff_services`, threads as runners), without Kivy's window: the screens themselves are
covered by the tour (tests/ui/test_kiosk_screens.py, test_staff_kiosk.py).

The steps run in order, as a pharmacy's day would: (a) the head's binding application by 医保码 + face → the admin
rejects it on the server → the kiosk says 申请被驳回 with the reason and whom to contact; applied again by ID card +
face → approved → the decision comes back as a command → the kiosk says 已绑定 with the institution (and the unbound
kiosk's inbox never warned); (c) a pharmacist signs in on the kiosk and sees the server's attendance records; (b) HIS
registers two prescriptions → the kiosk lists them → the pharmacist on duty approves one and rejects the other with a
reason, each confirmed by face → HIS reads "approved" and "rejected" with the reason; (d) a citizen's national
queries (K-11…K-16 by ID card and social-security card, K-19) go kiosk → server → national platform over HTTP, and
the drug catalogue the regulator published is searched on the kiosk (K-17); (e) the pharmacist signs out and the
server's records say so. Each step asserts what the person at the kiosk sees (view-model strings) and what the server
recorded. A later step needs the earlier ones and says so when one of them failed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from hardware_sim.evoucher import Insured
from hardware_sim.national_platform import SyntheticPerson
from protocol.purchase import person_ref
from tests.face_data import faces_dir
from ui.i18n import text
from ui.kiosk.run import kiosk_models
from ui.viewmodels.kiosk import ScreenName
from ui.viewmodels.models import KioskModels
from ui.viewmodels.national import NationalPhase
from ui.viewmodels.ports import Method, NationalKind, QueryKind
from ui.viewmodels.queries import ROWS_PER_PAGE
from ui.viewmodels.review import ReviewStep, RxTab, summary_detail
from ui.viewmodels.staff_ports import BindingShown, HeadMethod, Verdict
from ui.voice import RecordingSpeaker
from yibao.kiosk_live import LiveStack, live_stack
from yibao.sim_day import REGION
from yibao.sim_town import Person

pytestmark = pytest.mark.e2e

WAIT_S = 30.0
PHARMACIST_CODE = "Y300000001"
RX_NO = "RXLIVE0000001"
RX_REJECTED = "RXLIVE0000002"
SHANGHAI = ZoneInfo("Asia/Shanghai")


class _Records(logging.Handler):
    """Every WARNING or worse the terminal's prescription inbox logs while the stack runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Live:
    stack: LiveStack
    models: KioskModels
    inbox_warnings: _Records
    done: set[str] = field(default_factory=set)
    pharmacist: Person | None = None

    def needs(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.done]
        if missing:
            pytest.fail(f"this step needs the earlier step(s) {missing}, which failed", pytrace=False)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    records = _Records()
    inbox_log = logging.getLogger("terminal.review")
    inbox_log.addHandler(records)
    try:
        with live_stack(tmp_path_factory.mktemp("kiosk-live"), faces_dir=faces_dir()) as stack:
            models = kiosk_models(stack.runtime, speaker=RecordingSpeaker())
            yield Live(stack, models, records)
    finally:
        inbox_log.removeHandler(records)


def wait(what: str, predicate: Callable[[], bool], timeout_s: float = WAIT_S, every_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}", pytrace=False)
        time.sleep(every_s)


def finished_task(live: Live, what: str) -> tuple[bool, str, tuple[str, ...]]:
    """Wait for the shared staff task to show its result screen: (ok, title, lines)."""
    task = live.models.staff.task if live.models.staff is not None else None
    assert task is not None
    wait(what, lambda: task.state.ok is not None and live.models.kiosk.state.screen is ScreenName.STAFF_RESULT)
    state = task.state
    assert state.ok is not None
    return state.ok, state.title, state.lines


def masked_name(name: str) -> str:
    return name[0] + "*" * (len(name) - 1)


def shown_time(moment: datetime) -> str:
    return moment.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M")


# ---------------------------------------------------------------------------------------------- (a) binding


def test_a_the_heads_binding_applications_are_decided_on_the_server_and_the_kiosk_says_so(live: Live) -> None:
    stack, m = live.stack, live.models
    staff = m.staff
    assert staff is not None
    kiosk = stack.kiosk
    # The staff menu and the binding screen say where the terminal stands, in words
    staff.menu.open()
    wait("the staff menu", lambda: not staff.menu.state.loading)
    assert staff.menu.state.binding == text("staff.menu.binding_state", state="未绑定")
    binding = staff.binding
    binding.open()
    wait("the binding status", lambda: not binding.state.loading)
    assert (binding.state.shown, binding.state.headline, binding.state.can_apply) == (
        BindingShown.UNBOUND,
        "未绑定",
        True,
    )
    assert {o.method for o in binding.state.methods if o.enabled} == {HeadMethod.YIBAO_CODE, HeadMethod.ID_CARD}

    admin = stack.admin

    def pending() -> list[dict[str, Any]]:
        items = admin.get("/api/v1/binding-applications", params={"status": "pending"}).json()["items"]
        return [a for a in items if a["device_id"] == kiosk.device_id]

    def apply_at_the_kiosk(method: HeadMethod) -> dict[str, Any]:
        """The head types the institution code, shows their 医保码 or places their ID card, and faces the camera; the
        signed application reaches the server over MQTT and the device admin sees it pending."""
        head, rig = kiosk.head, kiosk.rig
        kiosk.show(head)
        binding.set_code(kiosk.institution_code)
        if method is HeadMethod.ID_CARD:
            rig.id_card.place(head.card)
            binding.apply(method)
        else:  # the phone's dynamic code, shown to the scanner while the kiosk waits for it
            account = rig.evoucher.enrol(Insured(head.card.name, head.card.id_number, REGION))
            binding.apply(method)
            wait("the kiosk to ask for the code", lambda: m.kiosk.state.screen is ScreenName.STAFF_WAIT)
            rig.qr_scanner.scan(rig.evoucher.issue_code(account))
        ok, title, lines = finished_task(live, "the binding application")
        assert (ok, title) == (True, text("staff.binding.applied")), lines
        assert lines[0] == text("staff.binding.applicant", name=masked_name(kiosk.head.card.name))
        assert kiosk.head.card.id_number not in " ".join(lines)
        wait("the application at the server", lambda: bool(pending()))
        (application,) = pending()
        assert application["institution_code"] == kiosk.institution_code
        assert application["verification"] == method.value
        assert application["applicant_masked"] == masked_name(kiosk.head.card.name)
        binding.open()
        wait("the status while the platform decides", lambda: not binding.state.loading)
        assert (binding.state.headline, binding.state.message) == ("审核中", text("staff.binding.pending_note"))
        return application

    def shown_after_decision(shown: BindingShown) -> Callable[[], bool]:
        def check() -> bool:
            binding.refresh()
            wait("the binding status", lambda: not binding.state.loading)
            return binding.state.shown is shown

        return check

    # A first application is rejected: the kiosk says why and whom to contact, in words, and offers to apply again
    first = apply_at_the_kiosk(HeadMethod.YIBAO_CODE)
    admin.post(
        f"/api/v1/binding-applications/{first['id']}/reject",
        json={"reason": "机构编码与申请人不符", "contact": "昆山市医保局 0512-5555-1234"},
    ).raise_for_status()
    wait("the kiosk to say 申请被驳回", shown_after_decision(BindingShown.REJECTED), every_s=0.3)
    state = binding.state
    assert (state.headline, state.can_apply) == ("申请被驳回", True)
    assert text("staff.binding.reason", reason="机构编码与申请人不符") in state.lines
    assert text("staff.binding.contact", contact="昆山市医保局 0512-5555-1234") in state.lines

    # The second one is approved through the real admin API; the decision comes back as a command
    application = apply_at_the_kiosk(HeadMethod.ID_CARD)
    assert application["id"] != first["id"]
    admin.post(
        f"/api/v1/binding-applications/{application['id']}/approve", json={"reason": "核验通过 / checked"}
    ).raise_for_status()

    wait("the kiosk to say 已绑定", shown_after_decision(BindingShown.BOUND), every_s=0.3)
    state = binding.state
    assert state.headline == "已绑定"
    institution = f"{kiosk.institution_code} {stack.institution_name}"
    assert text("staff.binding.institution", institution=institution) in state.lines
    assert not state.can_apply
    staff.menu.open()
    wait("the staff menu", lambda: not staff.menu.state.loading)
    assert staff.menu.state.binding == text("staff.menu.binding_state", state="已绑定") + text(
        "staff.menu.binding_to", institution=institution
    )
    device = admin.get(f"/api/v1/devices/{kiosk.device_id}").json()
    assert device["institution"]["code"] == kiosk.institution_code
    approved = admin.get("/api/v1/binding-applications", params={"status": "approved"}).json()["items"]
    assert [a["id"] for a in approved if a["device_id"] == kiosk.device_id] == [application["id"]]
    # Unbound until now, the kiosk's prescription inbox did not ask the server (409) nor warn about it
    assert live.inbox_warnings.messages == []
    live.done.add("bound")


# ---------------------------------------------------------------------------------- (c) sign-in, attendance


def test_c_a_pharmacist_signs_in_on_the_kiosk_and_sees_the_servers_attendance(live: Live) -> None:
    live.needs("bound")
    stack, m = live.stack, live.models
    staff = m.staff
    assert staff is not None
    # The kiosk's enrolment screen: `kiosk_models` passes no WLT photo decoder (no adapter exists for a real reader),
    # so the live kiosk says it cannot compare the face with the ID card (docs/kiosk-staff.md, open points) ...
    staff.enrolment.open()
    wait("the enrolment roster", lambda: not staff.enrolment.state.loading)
    assert (staff.enrolment.state.message, staff.enrolment.state.rows) == (text("staff.reason.no_photo_decoder"), ())
    # ... and the pharmacist enrols at the desk with the stack's decoder, as `yibao sim day` does
    pharmacist = stack.person(1)
    stack.enrol_pharmacist(pharmacist, PHARMACIST_CODE)
    live.pharmacist = pharmacist
    stack.kiosk.show(pharmacist)
    staff.pharmacist.sign_in()
    ok, title, lines = finished_task(live, "the sign-in")
    assert (ok, title) == (True, "签到成功"), lines
    member = stack.runtime.pharmacists.store.member(PHARMACIST_CODE) if stack.runtime.pharmacists else None
    assert member is not None
    who = text("staff.pharmacist.who", name=member.name_masked, code=PHARMACIST_CODE)
    assert lines[0] == who
    assert pharmacist.card.name not in " ".join(lines)

    # The sign-in reached the server (a signed record over MQTT): the server stored the open session
    def sessions() -> list[dict[str, Any]]:
        return stack.sessions_at_server(PHARMACIST_CODE)

    wait("the session at the server", lambda: bool(sessions()))
    (session,) = sessions()
    assert (session["device_id"], session["institution_code"], session["signed_out_at"]) == (
        stack.kiosk.device_id,
        stack.kiosk.institution_code,
        None,
    )
    assert lines[1] == text("staff.sign_in.at", at=shown_time(session["signed_in_at"]))

    # "查看我的考勤记录" on the result screen: the SERVER's records of the pharmacy, not this terminal's fallback
    task = staff.task
    (records,) = [a for a in task.state.actions if a.label == text("staff.records.open")]
    records.run()
    attendance = staff.pharmacist
    wait("the attendance list", lambda: not attendance.state.loading and m.kiosk.state.screen is ScreenName.ATTENDANCE)
    state = attendance.state
    assert state.source == text("staff.records.server")
    assert (state.who, state.message) == (who, "")
    assert [(r.signed_in, r.signed_out, r.note) for r in state.rows] == [
        (shown_time(session["signed_in_at"]), "", "staff.note.open")
    ]
    live.done.add("signed_in")


# ------------------------------------------------------------------------------------------- (b) the review


def test_b_his_prescriptions_are_reviewed_on_the_kiosk_and_his_reads_the_results(live: Live) -> None:
    live.needs("bound", "signed_in")
    stack, m = live.stack, live.models
    staff = m.staff
    assert staff is not None
    pharmacist = live.pharmacist
    assert pharmacist is not None
    stack.register_prescription(RX_NO, patient_person_ref=person_ref("01", "11010119530715002X"))
    stack.register_prescription(RX_REJECTED, drug=2)
    assert stack.his.call("GET", f"/his/v1/prescriptions/{RX_NO}").json()["status"] == "pending"

    # The list opens after the pharmacist on duty shows their face
    review = staff.review
    stack.kiosk.show(pharmacist)
    review.open_list(RxTab.PENDING)
    wait("the unlocked pending list", lambda: m.kiosk.state.screen is ScreenName.RX_LIST)

    def listed() -> bool:
        # The server's prescriptions_pending notice wakes the kiosk's inbox; the pharmacist reopens the list
        review.open_list(RxTab.PENDING)
        wait("the pending list", lambda: not review.state.loading)
        return {RX_NO, RX_REJECTED} <= {r.rx_no for r in review.state.rows}

    wait("both prescriptions on the kiosk's pending list", listed, every_s=0.5)
    state = review.state
    assert state.title == text("staff.rx.pending")
    (row,) = [r for r in state.rows if r.rx_no == RX_NO]
    # HIS sent the prescriber as 周医生: the server serves terminals the masked name only
    assert (row.patient, row.prescriber, row.lines, row.verdict) == ("李* 67岁 女", "内科 周**", 1, None)

    # Open it: the lines, no rule finding (no quantity rule is published), approve, confirm by face
    review.open_rx(row.prescription_id)
    wait("the review", lambda: not review.state.loading and m.kiosk.state.screen is ScreenName.RX_REVIEW)
    state = review.state
    assert state.header == text("staff.rx.header", rx_no=RX_NO, patient="李* 67岁 女")
    assert (state.step, state.notice, state.can_approve) == (ReviewStep.LINES, text("staff.rx.notice.clear"), True)
    assert [line.title for line in state.lines] == [
        text("staff.line.title", no=1, name="阿莫西林胶囊", spec="0.25g"),
    ]
    # HIS named the patient: the kiosk asked the platform for their earlier purchases (over HTTP), so the warnings
    # step has no "not looked up" line
    review.go_step(ReviewStep.FINDINGS)
    assert review.state.history_note == ""
    review.go_step(ReviewStep.DECIDE)
    review.choose(Verdict.APPROVED)
    assert review.state.can_confirm
    stack.kiosk.show(pharmacist)
    review.confirm()
    ok, title, lines = finished_task(live, "the face confirmation")
    assert (ok, title) == (True, text("staff.rx.done.title")), lines
    assert lines[:2] == (text("staff.rx.done.line", rx_no=RX_NO), text("staff.rx.done.verdict", verdict="通过"))

    # The second one is rejected with a preset reason (back to the list from the result screen)
    (to_list,) = staff.task.state.actions
    to_list.run()
    wait("the pending list again", lambda: not review.state.loading and m.kiosk.state.screen is ScreenName.RX_LIST)
    assert [r.rx_no for r in review.state.rows] == [RX_REJECTED]
    review.open_rx(review.state.rows[0].prescription_id)
    wait("the second review", lambda: not review.state.loading and m.kiosk.state.screen is ScreenName.RX_REVIEW)
    review.go_step(ReviewStep.FINDINGS)  # no patient_person_ref from HIS: the pharmacist is told
    assert review.state.history_note == text("staff.rx.notice.no_history")
    review.go_step(ReviewStep.DECIDE)
    review.choose(Verdict.REJECTED)
    without_reason = review.state.can_confirm
    review.choose_reason("staff.rx.reason.unsuitable")
    assert (without_reason, review.state.can_confirm) == (False, True)  # a rejection needs its reason
    stack.kiosk.show(pharmacist)
    review.confirm()
    ok, title, lines = finished_task(live, "the second face confirmation")
    assert (ok, title) == (True, text("staff.rx.done.title")), lines
    assert lines[1] == text("staff.rx.done.verdict", verdict=text("staff.verdict.rejected"))

    # HIS reads each review result over HTTP (the signed decisions went kiosk → MQTT → server)
    def result(rx_no: str) -> dict[str, Any]:
        answer: dict[str, Any] = stack.his.call("GET", f"/his/v1/prescriptions/{rx_no}").json()
        return answer

    def decided() -> bool:
        return all(result(rx_no)["status"] != "pending" for rx_no in (RX_NO, RX_REJECTED))

    wait("both decisions at the server", decided)
    approved, rejected = result(RX_NO), result(RX_REJECTED)
    assert (approved["status"], approved["may_settle"], approved["review"]["reasons"]) == ("approved", True, [])
    assert (rejected["status"], rejected["may_settle"]) == ("rejected", False)
    assert rejected["review"]["reasons"] == [text("staff.rx.reason.unsuitable")]
    # the signed decisions say what the period rules counted: the named patient's purchases, or this prescription
    assert (approved["review"]["purchase_history"], rejected["review"]["purchase_history"]) == (
        "server",
        "not_identified",
    )
    for answer in (approved, rejected):
        review_out = answer["review"]
        assert (review_out["pharmacist_code"], review_out["device_id"], review_out["face_decision"]) == (
            PHARMACIST_CODE,
            stack.kiosk.device_id,
            "accepted",
        )

    # The kiosk's reviewed list shows both with their verdicts in words
    review.open_list(RxTab.REVIEWED)
    wait("the reviewed list", lambda: not review.state.loading and review.state.title == text("staff.rx.reviewed"))
    verdicts = {r.rx_no: (r.verdict, summary_detail(r)) for r in review.state.rows}
    assert set(verdicts) == {RX_NO, RX_REJECTED}
    for rx_no, verdict, word in ((RX_NO, Verdict.APPROVED, "通过"), (RX_REJECTED, Verdict.REJECTED, "不通过")):
        (done,) = [r for r in review.state.rows if r.rx_no == rx_no]
        assert done.verdict is verdict
        assert done.decided_at
        assert summary_detail(done) == text("staff.rx.row_decided", verdict=word, at=done.decided_at)
    assert live.inbox_warnings.messages == []
    live.done.add("reviewed")


# ----------------------------------------------------------------------------------- (d) national queries


def test_d_a_citizens_national_queries_go_over_http_through_the_servers_relay(live: Live) -> None:
    stack, m = live.stack, live.models
    vm = m.national
    person: SyntheticPerson = stack.insured()
    calls_before = dict(stack.national.stats.calls)
    pages: dict[NationalKind, int] = {}
    name, certno = masked_name(person.psn_name), person.certno[:3] + "*" * 13 + person.certno[-2:]
    shown: list[str] = []  # every state the citizen's screens were given, for the privacy check at the end
    unsubscribe = [vm.subscribe(lambda s: shown.append(repr(s))), m.queries.subscribe(lambda s: shown.append(repr(s)))]

    # 个人信息 by ID card: the card on the kiosk's reader, the answer from the platform through the server
    stack.kiosk.rig.id_card.place(stack.id_card_of(person))
    m.queries.open_menu()
    vm.open(NationalKind.PERSON)
    assert {c.method for c in vm.state.choices if c.enabled} >= {Method.ID_CARD, Method.SS_CARD}
    vm.choose(Method.ID_CARD)

    def listed(kind: NationalKind) -> Callable[[], bool]:
        return lambda: vm.state.phase is NationalPhase.LIST and not vm.state.loading and vm.state.kind is kind

    wait("the person", listed(NationalKind.PERSON))
    state = vm.state
    assert state.message == "", state.message
    assert state.person_line == text("national.person_line", name=name, id=certno)
    assert state.rows[0].title == text("national.row.name", name=name)
    assert text("national.row.balance", balance=person.balance) in [r.title for r in state.rows]

    # 结算明细 / 个人账户划入 / 缴费记录 without showing the card again (the server's sealed query_ref)
    for kind in (NationalKind.SETTLEMENTS, NationalKind.CREDITS, NationalKind.CONTRIBUTIONS):
        vm.menu()
        vm.open(kind)
        wait(f"the {kind.value}", listed(kind))
        assert vm.state.message == "", (kind, vm.state.message)
        assert vm.state.person_line == text("national.person_line", name=name, id=certno)
        assert vm.state.rows, kind
        pages[kind] = vm.state.pages

    # The social-security card (card number + 卡识别码) finds the same person
    vm.finish()
    stack.kiosk.rig.ss_card.place(stack.ss_card_of(person))
    m.queries.open_menu()
    vm.open(NationalKind.PERSON)
    vm.choose(Method.SS_CARD)
    wait("the person by social-security card", listed(NationalKind.PERSON))
    assert vm.state.person_line == text("national.person_line", name=name, id=certno)
    vm.finish()

    # K-17: the drug catalogue the regulator published on the server, synced down, searched on the kiosk (offline)
    def found_drug() -> bool:
        m.queries.open(QueryKind.DRUGS, "阿莫西林")
        wait("the drug search", lambda: not m.queries.state.loading)
        return bool(m.queries.state.rows)

    wait("the synced drug catalogue", found_drug, every_s=0.5)
    assert [(r.title, r.detail) for r in m.queries.state.rows] == [("阿莫西林胶囊", "0.25g · 24粒/盒 · 甲类")]

    # K-19: designated institutions asked of the platform (no institution catalogue was ever published)
    wanted = stack.national.institutions[0]
    m.queries.open(QueryKind.INSTITUTIONS, wanted.fixmedins_name)
    wait("the institutions", lambda: not m.queries.state.loading)
    assert wanted.fixmedins_name in [r.title for r in m.queries.state.rows]

    # Everything went over HTTP to the platform: the simulator counted the calls
    calls = stack.national.stats.calls
    for infno, asked in (("1101", 2), ("5203", 1), ("5207", 1), ("5208", 1), ("1201", 1)):
        assert calls.get(infno, 0) - calls_before.get(infno, 0) == asked, (infno, calls)

    # And the server recorded each relayed query in its audit chain, for this kiosk, without the person
    intact, events = stack.audit()
    assert intact
    relayed = [e for e in events if e.get("type") == "national.query"]
    assert [(e["query"], e["outcome"], e.get("cert_type")) for e in relayed] == [
        ("person_info", "ok", "02"),
        ("settlements", "ok", None),
        ("account_credits", "ok", None),
        ("contributions", "ok", None),
        ("person_info", "ok", "03"),
        ("institutions", "ok", None),
    ]
    assert {e["device_id"] for e in relayed} == {stack.kiosk.device_id}
    counted = {e["query"]: e["records"] for e in relayed[1:4]}
    for kind, query in (
        (NationalKind.SETTLEMENTS, "settlements"),
        (NationalKind.CREDITS, "account_credits"),
        (NationalKind.CONTRIBUTIONS, "contributions"),
    ):  # what the kiosk paged through is what the platform answered
        assert math.ceil(counted[query] / ROWS_PER_PAGE) == pages[kind], (kind, counted[query], pages[kind])
    for stop in unsubscribe:
        stop()
    assert len(shown) > 10
    for secret in (person.certno, person.psn_name, person.card_no, person.card_sn):
        assert secret not in str(relayed)
        assert not [s for s in shown if secret in s]
    live.done.add("national")


# ------------------------------------------------------------------------------------------- (e) sign-out


def test_e_the_pharmacist_signs_out_on_the_kiosk_and_the_server_closes_the_session(live: Live) -> None:
    live.needs("signed_in")
    stack, m = live.stack, live.models
    staff = m.staff
    assert staff is not None
    pharmacist = live.pharmacist
    assert pharmacist is not None
    m.kiosk.home()
    stack.kiosk.show(pharmacist)
    staff.pharmacist.sign_out()
    ok, title, lines = finished_task(live, "the sign-out")
    assert (ok, title) == (True, "签退成功"), lines

    def closed() -> list[dict[str, Any]]:
        return [s for s in stack.sessions_at_server(PHARMACIST_CODE) if s["signed_out_at"] is not None]

    wait("the closed session at the server", lambda: bool(closed()))
    (session,) = closed()
    signed_in, signed_out = shown_time(session["signed_in_at"]), shown_time(session["signed_out_at"])
    assert lines[1] == text("staff.sign_out.at", at=signed_out, since=signed_in)
    (records,) = [a for a in staff.task.state.actions if a.label == text("staff.records.open")]
    records.run()
    attendance = staff.pharmacist
    wait("the attendance list", lambda: not attendance.state.loading and m.kiosk.state.screen is ScreenName.ATTENDANCE)
    assert attendance.state.source == text("staff.records.server")
    assert [(r.signed_in, r.signed_out, r.note) for r in attendance.state.rows] == [
        (signed_in, signed_out, "staff.note.signed_out")
    ]


def test_the_real_kiosk_wiring_asks_the_server_over_http(live: Live) -> None:
    """`kiosk_models(runtime)` (what `yibao terminal run --ui kiosk` calls) reaches the relay through the runtime's
    signed device API, not an in-process relay: the clients are the runtime's `ServerApi` to the server's URL."""
    from terminal.national_queries import NationalQueries
    from ui.services import RuntimeNational, RuntimeQueries

    port = live.models.national.port
    assert isinstance(port, RuntimeNational)
    assert isinstance(port.client, NationalQueries)
    assert port.client._api is live.stack.runtime.server_api
    queries = live.models.queries.port
    assert isinstance(queries, RuntimeQueries)
    assert isinstance(queries.national, NationalQueries)
    api = live.stack.runtime.server_api
    assert api is not None
    assert str(api._http.base_url) == live.stack.server.base_url
