"""Prescription review on the kiosk (P-03…P-06, H-07): the pharmacy's pending and reviewed prescriptions as paged
lists, and one review in three steps — the lines, the drug-rule findings (each warning acknowledged in words; a
blocking rule refuses approval), the decision (approve, or reject / return with a reason) — confirmed by the
on-duty pharmacist's face on the shared `StaffTask` screens.

Owns the list and the open review's display state: which step, which page, which warnings were acknowledged,
which decision and reason are chosen, and whether confirming is allowed yet (the terminal's `ReviewDesk` checks
the same again). It must never import Kivy and holds only what the inbox serves: masked names, codes, quantities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from ui.i18n import text
from ui.viewmodels.base import Observable, Runner, paged
from ui.viewmodels.kiosk import KioskModel, ScreenName
from ui.viewmodels.staff_ports import (
    ReviewPort,
    RxDecided,
    RxFinding,
    RxLine,
    RxOpened,
    RxSummary,
    Unlocked,
    Verdict,
)
from ui.viewmodels.staff_task import Action, StaffTask

LIST_PER_PAGE: Final = 3
LIST_PER_PAGE_CARE: Final = 2
LINES_PER_PAGE: Final = 3
LINES_PER_PAGE_CARE: Final = 2
FINDINGS_PER_PAGE: Final = 2
FINDINGS_PER_PAGE_CARE: Final = 1
FACE_ETA_S: Final = 8
REASONS: Final[dict[Verdict, tuple[str, ...]]] = {
    Verdict.REJECTED: ("staff.rx.reason.over_limit", "staff.rx.reason.unsuitable", "staff.rx.reason.incomplete"),
    Verdict.RETURNED: ("staff.rx.reason.fix_quantity", "staff.rx.reason.add_diagnosis", "staff.rx.reason.check_drug"),
}
"""Preset reasons (typing on a kiosk is slow); the text recorded is the Chinese phrase."""


class RxTab(StrEnum):
    PENDING = "pending"
    REVIEWED = "reviewed"


class ReviewStep(StrEnum):
    LINES = "lines"
    FINDINGS = "findings"
    DECIDE = "decide"


@dataclass(frozen=True)
class FindingView:
    finding: RxFinding
    acknowledged: bool
    label: str
    """The finding in words: '警告' / '禁止', the rule's message and what tripped it."""
    status: str
    """'已确认知晓' / '需确认' / '不能通过' in words (never colour alone)."""


@dataclass(frozen=True)
class ReviewState:
    tab: RxTab = RxTab.PENDING
    title: str = text("staff.rx.pending")
    rows: tuple[RxSummary, ...] = ()
    page: int = 0
    pages: int = 1
    page_label: str = ""
    has_prev: bool = False
    has_next: bool = False
    message: str = ""
    loading: bool = False
    # the open review
    summary: RxSummary | None = None
    header: str = ""
    step: ReviewStep = ReviewStep.LINES
    lines: tuple[RxLine, ...] = ()
    findings: tuple[FindingView, ...] = ()
    findings_label: str = ""
    verdict: Verdict | None = None
    reason_choices: tuple[str, ...] = ()
    reason: str = ""
    notice: str = ""
    history_note: str = ""
    """Said when the period rules counted this prescription only (no lookback of the patient's purchases)."""
    can_approve: bool = False
    can_confirm: bool = False


def summary_text(rx: RxSummary) -> str:
    return text("staff.rx.row", rx_no=rx.rx_no, patient=rx.patient, lines=rx.lines)


def summary_detail(rx: RxSummary) -> str:
    if rx.verdict is None:
        return text("staff.rx.row_detail", prescriber=rx.prescriber, at=rx.prescribed_at)
    return text("staff.rx.row_decided", verdict=text(f"staff.verdict.{rx.verdict.value}"), at=rx.decided_at)


class ReviewViewModel(Observable[ReviewState]):
    def __init__(self, kiosk: KioskModel, port: ReviewPort, task: StaffTask, runner: Runner) -> None:
        super().__init__(ReviewState())
        self.kiosk = kiosk
        self.port = port
        self.task = task
        self.runner = runner
        self._all: Sequence[RxSummary] = ()
        self._opened: RxOpened | None = None
        self._acknowledged: set[str] = set()
        self._detail_page = 0
        self._query = 0
        self._unlocked = False
        kiosk.holds_personal_data(self)

    # ------------------------------------------------------------------ the list

    def open_list(self, tab: RxTab | str = RxTab.PENDING) -> None:
        """The list, once the pharmacist on duty has shown their face (the prescriptions are health data, masked or
        not: a passer-by at an unattended kiosk must not browse them). Valid until home or the idle timeout."""
        tab = RxTab(tab)
        if not self._unlocked:
            self.task.run(
                text("staff.rx.unlock.title"),
                text("staff.face.hint"),
                FACE_ETA_S,
                lambda guide, _step: self.port.unlock(guide),
                lambda unlocked: self._after_unlock(unlocked, tab),
            )
            self.kiosk.speak("voice.face")
            return
        self._forget_review()
        self._query += 1
        query = self._query
        self._all = ()
        self._set(
            ReviewState(tab=tab, title=text(f"staff.rx.{tab.value}"), loading=True, message=text("staff.loading"))
        )
        self.kiosk.go(ScreenName.RX_LIST)
        self.runner(lambda: self._load(query, tab))

    def next_page(self) -> None:
        self.kiosk.touch()
        if self.state.summary is None:
            self._show_list(self.state.page + 1)
        else:
            self._detail_page += 1
            self._show_review()

    def prev_page(self) -> None:
        self.kiosk.touch()
        if self.state.summary is None:
            self._show_list(self.state.page - 1)
        else:
            self._detail_page -= 1
            self._show_review()

    def repage(self) -> None:
        if self.state.summary is None:
            self._show_list(0)
        else:
            self._detail_page = 0
            self._show_review()

    # ------------------------------------------------------------------ one review

    def open_rx(self, prescription_id: int) -> None:
        """Open a pending prescription: the rules are evaluated by the terminal for the pharmacist on duty."""
        self._query += 1
        query = self._query
        self._set(replace(self.state, loading=True, message=text("staff.loading")))
        self.runner(lambda: self._opened_rx(query, self.port.open(prescription_id)))

    def go_step(self, step: ReviewStep | str) -> None:
        self.kiosk.touch()
        if self._opened is None:
            return
        self._set(replace(self.state, step=ReviewStep(step)))
        self._detail_page = 0
        self._show_review()

    def acknowledge(self, rule_id: str) -> None:
        """The pharmacist has read this warning (a blocking finding cannot be acknowledged away)."""
        self.kiosk.touch()
        opened = self._opened
        if opened is None:
            return
        if any(f.rule_id == rule_id and not f.blocks for f in opened.findings):
            self._acknowledged.add(rule_id)
            self._show_review()

    def choose(self, verdict: Verdict | str) -> None:
        self.kiosk.touch()
        verdict = Verdict(verdict)
        self._set(replace(self.state, verdict=verdict, reason="", reason_choices=REASONS.get(verdict, ())))
        self._show_review()

    def choose_reason(self, key: str) -> None:
        self.kiosk.touch()
        if key in self.state.reason_choices:
            self._set(replace(self.state, reason=key))
            self._show_review()

    def confirm(self) -> None:
        """Confirm the decision by the on-duty pharmacist's face (nothing is recorded unless the face matches)."""
        state = self.state
        if not state.can_confirm or state.verdict is None:
            return
        verdict = state.verdict
        reasons = [text(state.reason)] if state.reason else []
        acknowledged = frozenset(self._acknowledged)
        self.task.run(
            text("staff.rx.confirm.title"),
            text("staff.rx.confirm.hint", verdict=text(f"staff.verdict.{verdict.value}")),
            FACE_ETA_S,
            lambda guide, _step: self.port.decide(verdict, reasons, acknowledged, guide),
            lambda decided: self._decided(verdict, decided),
        )
        self.kiosk.speak("voice.face")

    def back_to_list(self) -> None:
        self.open_list(self.state.tab)

    def clear_personal(self) -> None:
        self._query += 1
        self._all = ()
        self._unlocked = False
        self._forget_review()
        self._set(ReviewState())

    # ------------------------------------------------------------------ worker side and rendering

    def _forget_review(self) -> None:
        if self._opened is not None:
            self.port.close()
        self._opened = None
        self._acknowledged = set()
        self._detail_page = 0

    def _load(self, query: int, tab: RxTab) -> None:
        rows = self.port.pending() if tab is RxTab.PENDING else self.port.reviewed()
        if query != self._query:
            return
        self._all = tuple(rows)
        message = "" if self._all else text(f"staff.rx.empty.{tab.value}")
        self._set(replace(self.state, loading=False, message=message))
        self._show_list(0)

    def _show_list(self, page: int) -> None:
        per = LIST_PER_PAGE_CARE if self.kiosk.care_mode else LIST_PER_PAGE
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

    def _opened_rx(self, query: int, opened: RxOpened) -> None:
        if query != self._query:
            if opened.ok:
                self.port.close()
            return
        if not opened.ok or opened.summary is None:
            self._set(replace(self.state, loading=False, message=text(opened.reason or "staff.reason.unavailable")))
            return
        self._opened = opened
        self._acknowledged = set()
        self._detail_page = 0
        rx = opened.summary
        step = ReviewStep.FINDINGS if opened.findings else ReviewStep.LINES
        self._set(
            replace(
                self.state,
                loading=False,
                message="",
                summary=rx,
                header=text("staff.rx.header", rx_no=rx.rx_no, patient=rx.patient),
                step=step,
                verdict=None,
                reason="",
                reason_choices=(),
            )
        )
        self._show_review()
        self.kiosk.go(ScreenName.RX_REVIEW)

    def _show_review(self) -> None:
        opened = self._opened
        if opened is None:
            return
        state = self.state
        views = tuple(self._finding_view(f) for f in opened.findings)
        blocked = any(f.blocks for f in opened.findings)
        open_warnings = sum(1 for v in views if not v.finding.blocks and not v.acknowledged)
        can_approve = not blocked and open_warnings == 0
        if state.step is ReviewStep.LINES:
            items: Sequence[object] = opened.lines
            per = LINES_PER_PAGE_CARE if self.kiosk.care_mode else LINES_PER_PAGE
        elif state.step is ReviewStep.FINDINGS:
            items = views
            per = FINDINGS_PER_PAGE_CARE if self.kiosk.care_mode else FINDINGS_PER_PAGE
        else:
            items, per = (), 1
        pages = max(1, math.ceil(len(items) / per))
        page = min(max(self._detail_page, 0), pages - 1)
        self._detail_page = page
        if blocked:
            notice = text("staff.rx.notice.blocked")
        elif open_warnings:
            notice = text("staff.rx.notice.warnings", count=open_warnings)
        elif opened.findings:
            notice = text("staff.rx.notice.acknowledged")
        else:
            notice = text("staff.rx.notice.clear")
        if opened.unknown_drugs:
            notice += text("staff.rx.notice.unknown", count=opened.unknown_drugs)
        verdict = state.verdict
        # An approval needs every warning read and no block; a rejection or return needs its reason.
        can_confirm = can_approve if verdict is Verdict.APPROVED else verdict is not None and bool(state.reason)
        self._set(
            replace(
                state,
                lines=tuple(opened.lines[page * per : (page + 1) * per]) if state.step is ReviewStep.LINES else (),
                findings=views[page * per : (page + 1) * per] if state.step is ReviewStep.FINDINGS else (),
                findings_label=text("staff.rx.step.findings", count=len(opened.findings)),
                page=page,
                pages=pages,
                page_label=text("common.page", page=page + 1, pages=pages),
                has_prev=page > 0,
                has_next=page < pages - 1,
                notice=notice,
                # beside the warnings it concerns (the other steps have no room for it in care mode)
                history_note=""
                if opened.history_checked or state.step is not ReviewStep.FINDINGS
                else text("staff.rx.notice.no_history"),
                can_approve=can_approve,
                can_confirm=can_confirm,
            )
        )

    def _finding_view(self, finding: RxFinding) -> FindingView:
        acknowledged = finding.rule_id in self._acknowledged
        kind = text("staff.rx.finding.block" if finding.blocks else "staff.rx.finding.warn")
        label = text("staff.rx.finding", kind=kind, message=finding.message, detail=finding.detail)
        if finding.blocks:
            status = text("staff.rx.finding.blocks")
        elif acknowledged:
            status = text("staff.rx.finding.acknowledged")
        else:
            status = text("staff.rx.finding.open")
        return FindingView(finding, acknowledged, label, status)

    def _after_unlock(self, unlocked: Unlocked, tab: RxTab) -> None:
        if unlocked.ok:
            self._unlocked = True
            self.open_list(tab)
            return
        retry = Action(text("common.retry"), lambda: self.open_list(tab))
        back = Action(text("staff.menu.back"), lambda: self.kiosk.go(ScreenName.STAFF), primary=False)
        reason = text(unlocked.reason or "staff.reason.unavailable")
        self.task.finish(False, text("staff.rx.unlock.fail"), (reason,), (retry, back))

    def _decided(self, verdict: Verdict, decided: RxDecided) -> None:
        to_list = Action(text("staff.rx.back_to_list"), lambda: self.open_list(RxTab.PENDING))
        if decided.recorded:
            rx = self.state.summary
            lines = (
                text("staff.rx.done.line", rx_no="" if rx is None else rx.rx_no),
                text("staff.rx.done.verdict", verdict=text(f"staff.verdict.{verdict.value}")),
                text("staff.rx.done.queued"),
            )
            self._forget_review()
            self.task.finish(True, text("staff.rx.done.title"), lines, (to_list,))
            return
        retry = Action(text("common.retry"), self.confirm)
        back = Action(text("staff.rx.back_to_review"), lambda: self.kiosk.go(ScreenName.RX_REVIEW), primary=False)
        self.task.finish(
            False, text("staff.rx.fail.title"), (text(decided.reason or "staff.reason.unavailable"),), (retry, back)
        )
