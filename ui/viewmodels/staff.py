"""The staff side of the kiosk: its menu (who is on duty, the binding in a word, what to do) and the staff
view-models built together.

Owns `StaffMenuViewModel` and `StaffModels` (pharmacist, review, binding and the shared task screens, wired to the
`KioskModel` so the idle timeout clears them). It must never import Kivy or hold more than masked display strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from ui.i18n import text
from ui.viewmodels.base import Observable, Runner, thread_runner
from ui.viewmodels.binding import BindingViewModel
from ui.viewmodels.kiosk import KioskModel, KioskState, ScreenName
from ui.viewmodels.pharmacist import PharmacistViewModel
from ui.viewmodels.review import ReviewViewModel
from ui.viewmodels.staff_ports import BindingPort, BindingShown, PharmacistPort, ReviewPort
from ui.viewmodels.staff_task import StaffTask


@dataclass(frozen=True)
class StaffMenuState:
    on_duty: str = ""
    binding: str = ""
    pending: str = ""
    pharmacists_ok: bool = False
    review_ok: bool = False
    loading: bool = False


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
            )
        )


@dataclass
class StaffModels:
    menu: StaffMenuViewModel
    task: StaffTask
    pharmacist: PharmacistViewModel
    review: ReviewViewModel
    binding: BindingViewModel

    def tick(self) -> None:
        self.task.tick()

    def repage(self) -> None:
        """The care mode changed: the lists page again with their care-mode page sizes."""
        self.pharmacist.repage()
        self.review.repage()


def build_staff_models(
    kiosk: KioskModel,
    *,
    pharmacists: PharmacistPort,
    review: ReviewPort,
    binding: BindingPort,
    runner: Runner = thread_runner,
) -> StaffModels:
    task = StaffTask(kiosk, runner)
    models = StaffModels(
        menu=StaffMenuViewModel(kiosk, pharmacists, review, binding, runner),
        task=task,
        pharmacist=PharmacistViewModel(kiosk, pharmacists, task, runner),
        review=ReviewViewModel(kiosk, review, task, runner),
        binding=BindingViewModel(kiosk, binding, task, runner),
    )
    care = [kiosk.care_mode]

    def on_kiosk(state: KioskState) -> None:
        if state.care_mode != care[0]:  # the page sizes differ in care mode
            care[0] = state.care_mode
            models.repage()

    kiosk.subscribe(on_kiosk)
    return models
