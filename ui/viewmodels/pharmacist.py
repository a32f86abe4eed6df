"""Pharmacist sign-in / sign-out by face (P-01) and the pharmacist's own attendance records (P-02), paged.

Owns what the attendance screen shows (whose records, from where, one page of rows) and starts the face tasks on
the shared `StaffTask` screens. Sign-in and sign-out identify the pharmacist 1:N among the pharmacy's own; "my
records" identifies first, so a pharmacist sees only their own. It must never import Kivy and holds only the
医保药师代码, the masked name and times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from ui.i18n import text
from ui.viewmodels.base import Observable, Runner, paged
from ui.viewmodels.kiosk import KioskModel, ScreenName
from ui.viewmodels.staff_ports import AttendanceOutcome, AttendanceRecords, AttendanceRow, PharmacistPort
from ui.viewmodels.staff_task import Action, StaffTask

ROWS_PER_PAGE: Final = 4
ROWS_PER_PAGE_CARE: Final = 2
FACE_ETA_S: Final = 8


@dataclass(frozen=True)
class AttendanceState:
    title: str = text("staff.attendance.title")
    who: str = ""
    source: str = ""
    rows: tuple[AttendanceRow, ...] = ()
    page: int = 0
    pages: int = 1
    page_label: str = ""
    message: str = ""
    loading: bool = False
    has_prev: bool = False
    has_next: bool = False


def _who(outcome: AttendanceOutcome) -> str:
    who = outcome.who
    return "" if who is None else text("staff.pharmacist.who", name=who.masked_name, code=who.code)


class PharmacistViewModel(Observable[AttendanceState]):
    def __init__(self, kiosk: KioskModel, port: PharmacistPort, task: StaffTask, runner: Runner) -> None:
        super().__init__(AttendanceState())
        self.kiosk = kiosk
        self.port = port
        self.task = task
        self.runner = runner
        self._all: Sequence[AttendanceRow] = ()
        self._query = 0
        kiosk.holds_personal_data(self)

    # ------------------------------------------------------------------ intents

    def sign_in(self) -> None:
        self.task.run(
            text("staff.sign_in.title"),
            text("staff.face.hint"),
            FACE_ETA_S,
            lambda guide, _step: self.port.sign_in(guide),
            self._signed_in,
        )
        self.kiosk.speak("voice.face")

    def sign_out(self) -> None:
        self.task.run(
            text("staff.sign_out.title"),
            text("staff.face.hint"),
            FACE_ETA_S,
            lambda guide, _step: self.port.sign_out(guide),
            self._signed_out,
        )
        self.kiosk.speak("voice.face")

    def my_records(self) -> None:
        """Recognise the pharmacist first: the records shown are only ever their own."""
        self.task.run(
            text("staff.records.identify"),
            text("staff.face.hint"),
            FACE_ETA_S,
            lambda guide, _step: self.port.identify(guide),
            self._identified,
        )
        self.kiosk.speak("voice.face")

    def show_records(self, code: str, who: str) -> None:
        self._query += 1
        query = self._query
        self._all = ()
        self._set(AttendanceState(who=who, loading=True, message=text("staff.loading")))
        self.kiosk.go(ScreenName.ATTENDANCE)
        self.runner(lambda: self._load(query, code))

    def next_page(self) -> None:
        self.kiosk.touch()
        self._show(self.state.page + 1)

    def prev_page(self) -> None:
        self.kiosk.touch()
        self._show(self.state.page - 1)

    def repage(self) -> None:
        self._show(0)

    def clear_personal(self) -> None:
        self._query += 1
        self._all = ()
        self._set(AttendanceState())

    # ------------------------------------------------------------------ results

    def _menu_action(self) -> Action:
        return Action(text("staff.menu.back"), self._back_to_menu, primary=False)

    def _back_to_menu(self) -> None:
        self.kiosk.go(ScreenName.STAFF)

    def _records_action(self, outcome: AttendanceOutcome) -> tuple[Action, ...]:
        who = outcome.who
        if who is None:
            return ()
        label = _who(outcome)
        return (Action(text("staff.records.open"), lambda: self.show_records(who.code, label)),)

    def _signed_in(self, outcome: AttendanceOutcome) -> None:
        if outcome.ok:
            lines = (_who(outcome), text("staff.sign_in.at", at=outcome.at))
            self.task.finish(
                True, text("staff.sign_in.ok"), lines, (*self._records_action(outcome), self._menu_action())
            )
        elif outcome.who is not None:  # recognised, but nothing to do (already signed in)
            lines = (_who(outcome), text(outcome.reason, since=outcome.since))
            self.task.finish(
                True, text("staff.sign_in.already"), lines, (*self._records_action(outcome), self._menu_action())
            )
        else:
            retry = Action(text("common.retry"), self.sign_in)
            self.task.finish(False, text("staff.sign_in.fail"), (text(outcome.reason),), (retry, self._menu_action()))

    def _signed_out(self, outcome: AttendanceOutcome) -> None:
        if outcome.ok:
            lines = (_who(outcome), text("staff.sign_out.at", at=outcome.at, since=outcome.since))
            self.task.finish(
                True, text("staff.sign_out.ok"), lines, (*self._records_action(outcome), self._menu_action())
            )
        elif outcome.who is not None:
            lines = (_who(outcome), text(outcome.reason))
            self.task.finish(False, text("staff.sign_out.fail"), lines, (self._menu_action(),))
        else:
            retry = Action(text("common.retry"), self.sign_out)
            self.task.finish(False, text("staff.sign_out.fail"), (text(outcome.reason),), (retry, self._menu_action()))

    def _identified(self, outcome: AttendanceOutcome) -> None:
        who = outcome.who
        if outcome.ok and who is not None:
            self.show_records(who.code, _who(outcome))
            return
        retry = Action(text("common.retry"), self.my_records)
        self.task.finish(False, text("staff.records.fail"), (text(outcome.reason),), (retry, self._menu_action()))

    # ------------------------------------------------------------------ worker side

    def _load(self, query: int, code: str) -> None:
        answer: AttendanceRecords = self.port.records(code)
        if query != self._query:
            return
        self._all = tuple(answer.rows)
        if answer.reason:
            message = text(answer.reason)
        elif not self._all:
            message = text("staff.records.empty")
        else:
            message = ""
        source = text("staff.records.server" if answer.from_server else "staff.records.local")
        self._set(replace(self.state, loading=False, message=message, source=source))
        self._show(0)

    def _show(self, page: int) -> None:
        per = ROWS_PER_PAGE_CARE if self.kiosk.care_mode else ROWS_PER_PAGE
        shown = paged(self._all, page, per)
        self._set(
            replace(
                self.state,
                rows=shown.rows,
                page=shown.page,
                pages=shown.pages,
                page_label=shown.page_label,
                has_prev=shown.has_prev,
                has_next=shown.has_next,
            )
        )
