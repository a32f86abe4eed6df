"""Pharmacist face enrolment at the terminal (人证比对 with consent; `terminal.pharmacists.PharmacistDesk.enrol`).

Owns the three steps the pharmacist sees: choose themselves from the roster (a paged list of 医保药师代码 and masked
names), read and accept the consent text (what is collected, why, how long it is kept, that it is purged when they
leave) — declining returns to the staff menu and records nothing — then the ID card and the live face on the shared
`StaffTask` waiting screen, and the outcome in words. The consent (its version and the moment it was accepted) goes
to the port with the enrolment; the terminal stores it only with an enrolment that succeeded. It must never import
Kivy and holds only the 医保药师代码 and the masked name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Final

from ui.i18n import text
from ui.viewmodels.base import Observable, Runner, paged
from ui.viewmodels.kiosk import KioskModel, ScreenName
from ui.viewmodels.staff_ports import ConsentGiven, Enrolled, EnrolmentPort, EnrolmentShown, RosterEntry
from ui.viewmodels.staff_task import Action, StaffTask

ROWS_PER_PAGE: Final = 4
ROWS_PER_PAGE_CARE: Final = 2
ENROL_ETA_S: Final = 20
CONSENT_LINES: Final = (
    "staff.enrol.consent.collect",
    "staff.enrol.consent.purpose",
    "staff.enrol.consent.keep",
    "staff.enrol.consent.purge",
    "staff.enrol.consent.refuse",
)
"""The consent text, one key a line: what, why, how long, deleted when they leave, and that no is a free answer."""
OUTCOME_WORDS: Final[dict[EnrolmentShown, str]] = {
    EnrolmentShown.ENROLLED: "staff.enrol.done.matched",
    EnrolmentShown.CARD_UNREADABLE: "staff.enrol.reason.card_unreadable",
    EnrolmentShown.CARD_NOT_THE_PHARMACISTS: "staff.enrol.reason.card_not_theirs",
    EnrolmentShown.ID_PHOTO_UNUSABLE: "staff.enrol.reason.id_photo_unusable",
    EnrolmentShown.FACE_NOT_ACCEPTED: "staff.enrol.reason.face_not_accepted",
    EnrolmentShown.ID_PHOTO_MISMATCH: "staff.enrol.reason.id_photo_mismatch",
}


@dataclass(frozen=True)
class RosterRow:
    code: str
    label: str
    """'王**（YS…）'"""
    status: str
    """'已采集人脸' / '尚未采集人脸'"""


@dataclass(frozen=True)
class EnrolmentState:
    rows: tuple[RosterRow, ...] = ()
    page: int = 0
    pages: int = 1
    page_label: str = ""
    has_prev: bool = False
    has_next: bool = False
    message: str = ""
    loading: bool = False
    chosen: str = ""
    """The 医保药师代码 chosen; '' until one is."""
    who: str = ""
    consent_title: str = ""
    consent_lines: tuple[str, ...] = ()


class EnrolmentViewModel(Observable[EnrolmentState]):
    def __init__(
        self,
        kiosk: KioskModel,
        port: EnrolmentPort,
        task: StaffTask,
        runner: Runner,
        *,
        back: Callable[[], None],
        sign_in: Callable[[], None],
    ) -> None:
        super().__init__(EnrolmentState())
        self.kiosk = kiosk
        self.port = port
        self.task = task
        self.runner = runner
        self.back = back
        """Back to the staff menu."""
        self.sign_in = sign_in
        """The next step after an enrolment: sign in by face."""
        self._all: Sequence[RosterEntry] = ()
        self._query = 0
        kiosk.holds_personal_data(self)

    # ------------------------------------------------------------------ intents

    def open(self) -> None:
        """The roster: the pharmacist picks themselves."""
        self._query += 1
        query = self._query
        self._all = ()
        self._set(EnrolmentState(loading=True, message=text("staff.loading")))
        self.kiosk.go(ScreenName.ENROL_LIST)
        self.runner(lambda: self._load(query))

    def next_page(self) -> None:
        self.kiosk.touch()
        self._show(self.state.page + 1)

    def prev_page(self) -> None:
        self.kiosk.touch()
        self._show(self.state.page - 1)

    def repage(self) -> None:
        self._show(0)

    def choose(self, code: str) -> None:
        """The pharmacist chose themselves: the consent text comes next."""
        entry = next((e for e in self._all if e.code == code), None)
        if entry is None:
            return
        self._set(
            replace(
                self.state,
                chosen=entry.code,
                who=text("staff.pharmacist.who", name=entry.masked_name, code=entry.code),
                consent_title=text("staff.enrol.consent.title", version=self.port.consent_version()),
                consent_lines=tuple(text(key) for key in CONSENT_LINES),
            )
        )
        self.kiosk.go(ScreenName.ENROL_CONSENT)
        self.kiosk.speak("voice.enrol.consent")

    def decline(self) -> None:
        """No consent: nothing is read, captured or recorded; back to the staff menu."""
        self.clear_personal()
        self.back()

    def accept(self) -> None:
        """Consent given now (its version and time go with the enrolment): the ID card, then the face."""
        code = self.state.chosen
        if not code:
            return
        consent = ConsentGiven(self.port.consent_version(), self.kiosk.clock.now())
        self._start(code, self.state.who, consent)

    def clear_personal(self) -> None:
        self._query += 1
        self._all = ()
        self._set(EnrolmentState())

    # ------------------------------------------------------------------ the enrolment

    def _start(self, code: str, who: str, consent: ConsentGiven) -> None:
        self.task.run(
            text("staff.enrol.title"),
            text("staff.enrol.step.card"),
            ENROL_ETA_S,
            lambda guide, step: self.port.enrol(code, consent, step, guide),
            lambda result: self._enrolled(code, who, consent, result),
        )
        self.kiosk.speak("voice.id_card")

    def _enrolled(self, code: str, who: str, consent: ConsentGiven, result: Enrolled) -> None:
        menu = Action(text("staff.menu.back"), self.back, primary=False)
        if result.outcome is EnrolmentShown.ENROLLED:
            upload = "staff.enrol.done.uploaded" if result.uploaded else "staff.enrol.done.later"
            lines = (who, text(OUTCOME_WORDS[result.outcome]), text(upload))
            sign_in = Action(text("staff.menu.sign_in"), self.sign_in)
            self.task.finish(True, text("staff.enrol.ok"), lines, (sign_in, menu))
            return
        if result.outcome is None:
            why = text(result.reason or "staff.reason.unavailable")
        elif result.outcome is EnrolmentShown.FACE_NOT_ACCEPTED and result.reason:
            why = text(OUTCOME_WORDS[result.outcome]) + text(result.reason)
        else:
            why = text(OUTCOME_WORDS[result.outcome])
        retry = Action(text("common.retry"), lambda: self._start(code, who, consent))
        actions = (retry, menu) if result.outcome is not None else (menu,)
        self.task.finish(False, text("staff.enrol.fail"), (who, why), actions)

    # ------------------------------------------------------------------ worker side

    def _load(self, query: int) -> None:
        reason = self.port.available()
        roster = () if reason else tuple(self.port.roster())
        if query != self._query:
            return
        self._all = roster
        if reason:
            message = text(reason)
        elif not roster:
            message = text("staff.enrol.empty")
        else:
            message = text("staff.enrol.choose")
        self._set(replace(self.state, loading=False, message=message))
        self._show(0)

    def _show(self, page: int) -> None:
        per = ROWS_PER_PAGE_CARE if self.kiosk.care_mode else ROWS_PER_PAGE
        shown = paged(self._all, page, per)
        rows = tuple(
            RosterRow(
                e.code,
                text("staff.enrol.row", name=e.masked_name, code=e.code),
                text("staff.enrol.has_face" if e.enrolled else "staff.enrol.no_face"),
            )
            for e in shown.rows
        )
        self._set(
            replace(
                self.state,
                rows=rows,
                page=shown.page,
                pages=shown.pages,
                page_label=shown.page_label,
                has_prev=shown.has_prev,
                has_next=shown.has_next,
            )
        )
