"""The staff part of the screen tour: binding (unbound with whom to contact, the head's application by face + ID
card and by face + 医保码, pending, rejected with the reason, bound), pharmacist sign-in / sign-out by face and the
paged attendance records, the prescription list, a review with a quantity warning acknowledged in words and the
decision confirmed by face, a return with a reason, the periodic re-verification prompt (left for later, then done
from the staff menu), a pharmacist's face enrolment (consent declined, then accepted: ID card and face) — each
screen shot in the tour's current mode and measured
against the care-mode rules by `ui.kiosk.tour.Tour.shot`.

Owns the staff script and `StaffTourRig`, the simulated pharmacy's handles (the binding decisions the platform
sends, a fresh morning). It never imports `hardware_sim`: the rig comes in as `tour.rig.staff`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ui.viewmodels.kiosk import ScreenName
from ui.viewmodels.models import KioskModels
from ui.viewmodels.review import ReviewStep, RxTab
from ui.viewmodels.staff import StaffModels
from ui.viewmodels.staff_ports import HeadMethod, Verdict

if TYPE_CHECKING:  # `ui.kiosk.tour` calls `visit_staff`, so this module imports it only where it runs a tour
    from ui.kiosk.tour import Tour, TourReport, TourRig

logger = logging.getLogger(__name__)

FACE_WAIT_S = 90.0


@runtime_checkable
class StaffTourRig(Protocol):
    @property
    def institution_code(self) -> str: ...

    @property
    def pharmacist_code(self) -> str: ...

    def reset(self) -> None:
        """A fresh morning: unbound (with whom to contact), nobody signed in, new pending prescriptions."""

    def decide_binding(self, *, approved: bool, reason: str) -> None:
        """The platform's decision on the last application reaches the terminal."""

    def on_duty(self) -> str | None: ...

    def face_forward(self) -> None:
        """The next person steps up facing the camera."""

    # pharmacist face enrolment and re-verification
    @property
    def enrol_code(self) -> str:
        """A pharmacist on the roster without a face template whose ID card `place_id_card` puts in the reader."""

    def enrolled(self, code: str) -> tuple[bool, str]:
        """Whether `code` has a face template, and when their last recorded consent was given ('' if never)."""

    def make_reverification_due(self) -> None:
        """Time passes: the face check of the pharmacist on duty is due."""


class _Staff:
    def __init__(self, tour: Tour, staff: StaffModels, rig: StaffTourRig) -> None:
        self.tour = tour
        self.m = staff
        self.rig = rig

    def face_task(self, start: Callable[[], None]) -> None:
        """Start a task that checks a face, with the person facing the camera."""
        self.rig.face_forward()
        self.tour._main(start)

    def result(self, name: str) -> bool:
        """Wait for the task started last to show its result; record it as a flow."""
        task = self.m.task
        self.tour._wait(f"{name} result", lambda: not task.state.busy and task.state.ok is not None, FACE_WAIT_S)
        ok = bool(task.state.ok)
        self.tour._flow(name, "ok" if ok else "refused")
        return ok

    def binding(self, name: str) -> None:
        self.tour._main(self.m.binding.open)
        self.tour._wait("binding status", lambda: not self.m.binding.state.loading)
        self.tour.shot(name, ScreenName.BINDING)

    def visit(self) -> None:
        tour, m, rig = self.tour, self.m, self.rig
        rig.reset()
        tour._main(m.menu.open)
        tour._wait("staff menu", lambda: not m.menu.state.loading)
        tour.shot("staff_menu", ScreenName.STAFF)

        # Not bound yet: sign-in is refused in words before the camera
        tour._main(m.pharmacist.sign_in)
        self.result("sign_in_unbound")
        tour.shot("staff_sign_in_unbound", ScreenName.STAFF_RESULT)

        # Binding: unbound with whom to contact; the head applies with face + ID card (face held for the shot)
        self.binding("staff_binding_unbound")
        tour.rig.remove_cards()
        tour.rig.place_id_card()
        tour.rig.hold_face_at_challenge()
        tour._main(partial(m.binding.apply, HeadMethod.ID_CARD, rig.institution_code))
        try:
            tour._wait("a face challenge", lambda: "头" in m.task.state.guidance, FACE_WAIT_S)
            tour.shot("staff_wait", ScreenName.STAFF_WAIT)
        finally:
            tour.rig.release_face()
        self.result("binding_apply_id_card")
        tour.shot("staff_binding_applied", ScreenName.STAFF_RESULT)
        self.binding("staff_binding_pending")
        rig.decide_binding(approved=False, reason="申请人与机构登记的负责人不一致，请负责人本人申请")
        self.binding("staff_binding_rejected")
        # Again with face + 医保码; approved
        tour.rig.offer_qr(valid=True, delay_s=1.0)
        self.face_task(partial(m.binding.apply, HeadMethod.YIBAO_CODE, rig.institution_code))
        self.result("binding_apply_qr")
        rig.decide_binding(approved=True, reason="核验通过")
        self.binding("staff_binding_bound")
        tour._flow("binding", str(m.binding.state.shown))

        # Nobody on duty: the prescriptions stay closed, said in words
        tour._main(partial(m.review.open_list, RxTab.PENDING))
        self.result("rx_nobody_on_duty")

        # Pharmacist sign-in by face, then the pharmacist's own records (the result screen's first button)
        self.face_task(m.pharmacist.sign_in)
        self.result("sign_in")
        tour.shot("staff_sign_in", ScreenName.STAFF_RESULT)
        tour._main(m.task.state.actions[0].run)
        tour._wait("attendance rows", lambda: not m.pharmacist.state.loading and bool(m.pharmacist.state.rows))
        tour.shot("staff_attendance", ScreenName.ATTENDANCE)
        tour._main(m.pharmacist.next_page)
        tour._wait("attendance page 2", lambda: m.pharmacist.state.page == 1)
        tour._flow("attendance_paging", f"{m.pharmacist.state.page + 1}/{m.pharmacist.state.pages}")
        tour._main(m.menu.open)
        tour._wait("staff menu", lambda: not m.menu.state.loading)
        tour.shot("staff_menu_on_duty", ScreenName.STAFF)
        self.reverify()  # pharmacist face enrolment and re-verification

        # Review: the list, the warning acknowledged in words, approval confirmed by face
        self.face_task(partial(m.review.open_list, RxTab.PENDING))  # the pharmacist on duty shows their face first
        self.tour._wait("the list", lambda: tour.models.kiosk.state.screen is ScreenName.RX_LIST, FACE_WAIT_S)
        tour._wait("pending prescriptions", lambda: not m.review.state.loading and bool(m.review.state.rows))
        tour.shot("staff_rx_list", ScreenName.RX_LIST)
        first = m.review.state.rows[0].prescription_id
        tour._main(partial(m.review.open_rx, first))
        tour._wait("the review", lambda: m.review.state.summary is not None and not m.review.state.loading)
        tour.shot("staff_rx_findings", ScreenName.RX_REVIEW)
        tour._main(partial(m.review.go_step, ReviewStep.LINES))
        tour.shot("staff_rx_lines", ScreenName.RX_REVIEW)
        tour._main(partial(m.review.go_step, ReviewStep.DECIDE))
        tour._main(partial(m.review.choose, Verdict.APPROVED))
        tour._flow("approve_before_acknowledging", "allowed" if m.review.state.can_confirm else "refused")
        tour._main(partial(m.review.go_step, ReviewStep.FINDINGS))
        for view in m.review.state.findings:
            tour._main(partial(m.review.acknowledge, view.finding.rule_id))
        tour._main(partial(m.review.go_step, ReviewStep.DECIDE))
        tour._main(partial(m.review.choose, Verdict.APPROVED))
        tour.shot("staff_rx_decide", ScreenName.RX_REVIEW)
        self.face_task(m.review.confirm)
        self.result("review_approve")
        tour.shot("staff_rx_done", ScreenName.STAFF_RESULT)

        # A return with a reason
        tour._main(partial(m.review.open_list, RxTab.PENDING))
        tour._wait("pending prescriptions", lambda: not m.review.state.loading and bool(m.review.state.rows))
        second = m.review.state.rows[0].prescription_id
        tour._main(partial(m.review.open_rx, second))
        tour._wait("the review", lambda: m.review.state.summary is not None and not m.review.state.loading)
        tour._main(partial(m.review.go_step, ReviewStep.DECIDE))
        tour._main(partial(m.review.choose, Verdict.RETURNED))
        tour._main(partial(m.review.choose_reason, m.review.state.reason_choices[0]))
        tour.shot("staff_rx_return", ScreenName.RX_REVIEW)
        self.face_task(m.review.confirm)
        self.result("review_return")
        tour._main(partial(m.review.open_list, RxTab.REVIEWED))
        tour._wait("reviewed prescriptions", lambda: not m.review.state.loading and bool(m.review.state.rows))
        tour.shot("staff_rx_reviewed", ScreenName.RX_LIST)

        # Sign-out, then a second sign-out: refused in words
        self.face_task(m.pharmacist.sign_out)
        self.result("sign_out")
        tour.shot("staff_sign_out", ScreenName.STAFF_RESULT)
        self.face_task(m.pharmacist.sign_out)
        self.result("sign_out_again")
        tour.shot("staff_sign_out_refused", ScreenName.STAFF_RESULT)

        # pharmacist face enrolment and re-verification (after the sign-out: the enrolled face is the same
        # simulated person as the first pharmacist's, and `reset` takes it away again for the next mode)
        self.enrol()

        # Home (as the idle timeout does): every staff view-model forgets what it showed
        tour._main(tour.models.kiosk.home)
        tour._on(ScreenName.ATTRACT)
        cleared = (
            m.review.state.summary is None
            and not m.review.state.rows
            and not m.pharmacist.state.rows
            and not m.task.state.lines
            and not m.binding.state.lines
        )
        tour._flow("staff_cleared", "cleared" if cleared else "kept")

    # pharmacist face enrolment and re-verification

    def reverify(self) -> None:
        """The on-duty pharmacist's face check falls due: the prompt over the attract screen, left for later, still
        on the staff menu, done from there."""
        tour, m, rig = self.tour, self.m, self.rig
        rig.make_reverification_due()
        tour._main(tour.models.kiosk.home)
        tour._on(ScreenName.ATTRACT)
        tour._main(m.reverify.check_soon)  # the timer asks at the next tick
        tour.shot("staff_reverify_prompt", ScreenName.REVERIFY)
        tour._main(m.reverify.later)
        tour._on(ScreenName.ATTRACT)
        tour._main(m.menu.open)
        tour._wait("staff menu", lambda: not m.menu.state.loading)
        tour._flow("reverify_on_menu", "shown" if m.menu.state.reverify else "missing")
        tour.shot("staff_menu_reverify", ScreenName.STAFF)
        tour._main(m.reverify.open)
        tour._on(ScreenName.REVERIFY)
        self.face_task(m.reverify.verify)
        self.result("reverify")
        tour.shot("staff_reverify_done", ScreenName.STAFF_RESULT)

    def enrol(self) -> None:
        """The roster, the consent declined (nothing recorded), then accepted: the ID card, the face, the result."""
        tour, m, rig = self.tour, self.m, self.rig
        code = rig.enrol_code
        tour._main(m.menu.open)
        tour._wait("staff menu", lambda: not m.menu.state.loading)
        tour._main(m.enrolment.open)
        tour._wait("the roster", lambda: not m.enrolment.state.loading and bool(m.enrolment.state.rows))
        tour.shot("staff_enrol_list", ScreenName.ENROL_LIST)
        before = rig.enrolled(code)
        tour._main(partial(m.enrolment.choose, code))
        tour.shot("staff_enrol_consent", ScreenName.ENROL_CONSENT)
        tour._main(m.enrolment.decline)
        tour._on(ScreenName.STAFF)
        after = rig.enrolled(code)
        tour._flow("enrol_declined", "nothing recorded" if after == before and not after[0] else "recorded")
        tour._main(m.enrolment.open)
        tour._wait("the roster", lambda: not m.enrolment.state.loading and bool(m.enrolment.state.rows))
        tour._main(partial(m.enrolment.choose, code))
        tour._on(ScreenName.ENROL_CONSENT)
        tour.rig.remove_cards()
        tour.rig.place_id_card()
        tour.rig.hold_face_at_challenge()
        self.face_task(m.enrolment.accept)
        try:
            tour._wait("the enrolment's face challenge", lambda: "头" in m.task.state.guidance, FACE_WAIT_S)
            tour.shot("staff_enrol_wait", ScreenName.STAFF_WAIT)
        finally:
            tour.rig.release_face()
        self.result("enrol")
        tour.shot("staff_enrol_done", ScreenName.STAFF_RESULT)
        enrolled, consent = rig.enrolled(code)
        tour._flow("enrol_recorded", "template and consent" if enrolled and consent != before[1] else "missing")


def visit_staff(tour: Tour) -> None:
    """The staff screens, when the kiosk has them and the rig simulates a pharmacy (`tour.rig.staff`)."""
    staff = tour.models.staff
    rig = getattr(tour.rig, "staff", None)
    if staff is None or not isinstance(rig, StaffTourRig):
        logger.info("staff tour skipped: no staff view-models or no simulated pharmacy")
        return
    _Staff(tour, staff, rig).visit()


def run_staff_tour(models: KioskModels, rig: TourRig, out_dir: Path) -> TourReport:
    """Open the kiosk (windowed), run only the staff screens in both modes, close; returns the report (the Xvfb
    tests' tour). Needs a display."""
    from ui.kiosk.app import KioskApp
    from ui.kiosk.tour import Tour, TourReport

    class StaffTour(Tour):
        def _visit_all(self) -> None:
            self.shot("attract", ScreenName.ATTRACT)
            visit_staff(self)

    report_box: list[TourReport] = []

    def started(app: KioskApp) -> None:
        def direct() -> None:
            tour = StaffTour(app, models, rig, out_dir)
            try:
                report_box.append(tour.run())
            finally:
                main = app.main
                if main is not None:
                    main.post(app.stop)

        threading.Thread(target=direct, name="kiosk-staff-tour", daemon=True).start()

    KioskApp(models, on_started=started).run()
    return report_box[0] if report_box else TourReport(error="the kiosk closed before the staff tour finished")
