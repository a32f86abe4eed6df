"""The staff side of the kiosk: its menu (who is on duty, the binding in a word, what to do) and the staff
view-models built together.

Owns `StaffMenuViewModel` and `StaffModels` (pharmacist, review, binding and the shared task screens, wired to the
`KioskModel` so the idle timeout clears them). It must never import Kivy or hold more than masked display strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ui.i18n import text
from ui.viewmodels.base import Observable, Runner, thread_runner
from ui.viewmodels.binding import BindingViewModel

# pharmacist face enrolment and re-verification
from ui.viewmodels.enrolment import EnrolmentViewModel
from ui.viewmodels.kiosk import KioskModel, KioskState, ScreenName
from ui.viewmodels.pharmacist import PharmacistViewModel
from ui.viewmodels.reverify import ReverifyViewModel
from ui.viewmodels.review import ReviewViewModel
from ui.viewmodels.staff_ports import (
    AttendanceOutcome,
    BindingPort,
    BindingShown,
    ConsentGiven,
    Enrolled,
    EnrolmentPort,
    GuidanceSink,
    PharmacistPort,
    ReverifyDue,
    ReverifyPort,
    ReviewPort,
    RosterEntry,
    StepSink,
)
from ui.viewmodels.staff_task import StaffTask


@dataclass(frozen=True)
class StaffMenuState:
    on_duty: str = ""
    binding: str = ""
    pending: str = ""
    pharmacists_ok: bool = False
    review_ok: bool = False
    loading: bool = False
    # pharmacist face enrolment and re-verification
    reverify: str = ""
    """'需要刷脸确认在岗：…' while the on-duty pharmacist's periodic face check is due; '' otherwise."""


class StaffMenuViewModel(Observable[StaffMenuState]):
    def __init__(
        self, kiosk: KioskModel, pharmacists: PharmacistPort, review: ReviewPort, binding: BindingPort, runner: Runner
    ) -> None:
        super().__init__(StaffMenuState())
        self.kiosk = kiosk
        self.pharmacists = pharmacists
        self.review = review
        self.binding = binding
        self.runner = runner
        self._query = 0
        # pharmacist face enrolment and re-verification
        self.reverify: ReverifyViewModel | None = None
        kiosk.holds_personal_data(self)

    def open(self) -> None:
        self._query += 1
        query = self._query
        self._set(StaffMenuState(loading=True, on_duty=text("staff.loading")))
        self.kiosk.go(ScreenName.STAFF)
        self.runner(lambda: self._load(query))

    def clear_personal(self) -> None:
        self._query += 1
        self._set(StaffMenuState())

    def _load(self, query: int) -> None:
        pharmacists_ok = self.pharmacists.available()
        review_ok = self.review.available()
        who = self.pharmacists.on_duty() if pharmacists_ok else None
        status = self.binding.status()
        pending = len(self.review.pending()) if review_ok else 0
        if self.reverify is not None:  # pharmacist face enrolment and re-verification
            self.reverify.check_now()
        if query != self._query:
            return
        if not pharmacists_ok:
            on_duty = text("staff.menu.no_pharmacists")
        elif who is None:
            on_duty = text("staff.menu.nobody_on_duty")
        else:
            on_duty = text("staff.menu.on_duty", name=who.masked_name, code=who.code)
        binding = text("staff.menu.binding_state", state=text(f"staff.binding.state.{status.state.value}"))
        if status.state is BindingShown.BOUND and status.institution:
            binding += text("staff.menu.binding_to", institution=status.institution)
        self._set(
            StaffMenuState(
                on_duty=on_duty,
                binding=binding,
                pending=text("staff.menu.pending", count=pending) if review_ok else text("staff.menu.no_review"),
                pharmacists_ok=pharmacists_ok,
                review_ok=review_ok,
                reverify=self.reverify.state.menu_line if self.reverify is not None else "",
            )
        )

    # pharmacist face enrolment and re-verification
    def reverify_changed(self, line: str) -> None:
        """The periodic face check became due (or was done) while the menu shows."""
        state = self.state
        if state.reverify != line and not state.loading and (state.on_duty or state.binding):
            self._set(replace(state, reverify=line))


# pharmacist face enrolment and re-verification
class NoEnrolment:
    """`EnrolmentPort` of a kiosk without one: the screen says so."""

    def available(self) -> str:
        return "staff.reason.unavailable"

    def roster(self) -> Sequence[RosterEntry]:
        return ()

    def consent_version(self) -> str:
        return ""

    def enrol(self, code: str, consent: ConsentGiven, step: StepSink, guidance: GuidanceSink) -> Enrolled:
        return Enrolled(None, reason="staff.reason.unavailable")


class NoReverify:
    """`ReverifyPort` of a kiosk without periodic re-verification: never due."""

    def due(self) -> ReverifyDue | None:
        return None

    def reverify(self, code: str, guidance: GuidanceSink) -> AttendanceOutcome:
        return AttendanceOutcome(False, reason="staff.reason.unavailable")


@dataclass
class StaffModels:
    menu: StaffMenuViewModel
    task: StaffTask
    pharmacist: PharmacistViewModel
    review: ReviewViewModel
    binding: BindingViewModel
    # pharmacist face enrolment and re-verification
    enrolment: EnrolmentViewModel = field(kw_only=True)
    reverify: ReverifyViewModel = field(kw_only=True)

    def tick(self) -> None:
        self.task.tick()
        self.reverify.tick()  # pharmacist face enrolment and re-verification

    def repage(self) -> None:
        """The care mode changed: the lists page again with their care-mode page sizes."""
        self.pharmacist.repage()
        self.review.repage()
        self.enrolment.repage()  # pharmacist face enrolment and re-verification


def build_staff_models(
    kiosk: KioskModel,
    *,
    pharmacists: PharmacistPort,
    review: ReviewPort,
    binding: BindingPort,
    runner: Runner = thread_runner,
    # pharmacist face enrolment and re-verification
    enrolment: EnrolmentPort | None = None,
    reverify: ReverifyPort | None = None,
) -> StaffModels:
    task = StaffTask(kiosk, runner)
    menu = StaffMenuViewModel(kiosk, pharmacists, review, binding, runner)
    pharmacist = PharmacistViewModel(kiosk, pharmacists, task, runner)
    models = StaffModels(
        menu=menu,
        task=task,
        pharmacist=pharmacist,
        review=ReviewViewModel(kiosk, review, task, runner),
        binding=BindingViewModel(kiosk, binding, task, runner),
        # pharmacist face enrolment and re-verification
        enrolment=EnrolmentViewModel(
            kiosk,
            enrolment if enrolment is not None else NoEnrolment(),
            task,
            runner,
            back=menu.open,
            sign_in=pharmacist.sign_in,
        ),
        reverify=ReverifyViewModel(
            kiosk, reverify if reverify is not None else NoReverify(), task, runner, back=menu.open
        ),
    )
    menu.reverify = models.reverify
    models.reverify.subscribe(lambda state: menu.reverify_changed(state.menu_line))
    care = [kiosk.care_mode]

    def on_kiosk(state: KioskState) -> None:
        if state.care_mode != care[0]:  # the page sizes differ in care mode
            care[0] = state.care_mode
            models.repage()

    kiosk.subscribe(on_kiosk)
    return models
