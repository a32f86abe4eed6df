"""The citizen's personal queries on the national platform (K-11…K-16): 个人信息/参保信息/账户余额, 结算明细,
个人账户划入 and 缴费记录, asked through the sync server's relay.

Owns one query session: the credential choice (医保码, ID card or social-security card — no face is needed for a
query), the wait on the slow network step (elapsed time against an estimate), the masked person found and their
records as a large paged list (fewer rows per page in care mode), and every failure in words. The person found is
kept while the citizen stays on the query screens (the menu and these two), so they can ask one item after another
without showing the credential again; it is forgotten when the kiosk leaves those screens (home, idle timeout, the
error screen) and whenever `clear_personal` is called. Blocking work runs through the injected `Runner`; a late
answer for an attempt the citizen left is dropped. It must never import Kivy and never hold more than the port's
masked display values and the platform's opaque `query_ref`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final, TypeVar

from ui.i18n import text
from ui.viewmodels.base import Observable, Runner, paged
from ui.viewmodels.identity import CARD_TIMEOUT_S, EXPECTED_S, SCAN_TIMEOUT_S, VOICE, MethodChoice
from ui.viewmodels.kiosk import KioskModel, KioskState, ScreenName
from ui.viewmodels.ports import (
    NATIONAL_METHODS,
    Method,
    NationalKind,
    NationalOutcome,
    NationalPerson,
    NationalPort,
    QueryAnswer,
    QueryRow,
)
from ui.viewmodels.queries import ROWS_PER_PAGE, ROWS_PER_PAGE_CARE

logger = logging.getLogger(__name__)

T = TypeVar("T")

NETWORK_EXPECTED_S: Final = 5
"""What the progress line promises for one round trip to the national platform through the server (generous: the
platform is slow at busy hours)."""
SESSION_LAPSED: Final = "national.session_lapsed"
"""The reason a records query gives when the platform's query_ref lapsed: the citizen shows the credential again."""
QUERY_SCREENS: Final = frozenset({ScreenName.QUERIES, ScreenName.NATIONAL_ID, ScreenName.NATIONAL_LIST})
"""While the kiosk shows one of these the person found stays; any other screen forgets them."""


class NationalPhase(StrEnum):
    CHOOSE = "choose"
    """Which credential (and, after a failure, why it did not work)."""
    WAITING = "waiting"
    """Reading the credential and asking the platform who it is."""
    LIST = "list"
    """The records (or, while `loading`, waiting for them)."""


@dataclass(frozen=True)
class NationalState:
    phase: NationalPhase = NationalPhase.CHOOSE
    kind: NationalKind | None = None
    method: Method | None = None
    title: str = text("national.title")
    choices: tuple[MethodChoice, ...] = ()
    hint: str = ""
    progress: str = ""
    """"已等待 N 秒，预计约 M 秒" while reading or asking; empty otherwise."""
    message: str = ""
    """A failure or an empty answer, in words."""
    person_line: str = ""
    """The masked name and ID number of the person shown ("张**  110*************34")."""
    loading: bool = False
    rows: tuple[QueryRow, ...] = ()
    page: int = 0
    pages: int = 1
    page_label: str = ""
    has_prev: bool = False
    has_next: bool = False


class NationalViewModel(Observable[NationalState]):
    def __init__(self, kiosk: KioskModel, port: NationalPort, runner: Runner) -> None:
        super().__init__(NationalState())
        self.kiosk = kiosk
        self.port = port
        self.runner = runner
        self._attempt = 0
        self._started = 0.0
        self._expected = 0
        self._person: NationalPerson | None = None
        self._all: Sequence[QueryRow] = ()
        self._care = kiosk.care_mode
        kiosk.holds_personal_data(self)
        kiosk.subscribe(self._follow_kiosk)

    # ------------------------------------------------------------------ intents

    def open(self, kind: NationalKind | str) -> None:
        """Ask for one personal item: straight to the records when the person is known, else the credential first."""
        kind = NationalKind(kind)
        self._attempt += 1
        if self._person is not None:
            self._show_records(self._attempt, kind, self._person)
            return
        self._set(self._choosing(kind))
        self.kiosk.go(ScreenName.NATIONAL_ID)
        self.kiosk.speak("voice.national")

    def choose(self, method: Method) -> None:
        state = self.state
        if state.kind is None or method not in NATIONAL_METHODS or method not in self.port.available():
            return
        self._attempt += 1
        attempt, kind = self._attempt, state.kind
        self._start_wait(EXPECTED_S[method] + NETWORK_EXPECTED_S)
        self._set(
            replace(
                state,
                phase=NationalPhase.WAITING,
                method=method,
                hint=text(f"scan.{method.value}.hint"),
                message="",
                progress=self._progress(),
            )
        )
        self.kiosk.go(ScreenName.NATIONAL_ID)
        self.kiosk.speak(VOICE[method])
        self.runner(lambda: self._identify(attempt, kind, method))

    def cancel(self) -> None:
        """Back to the credential choice (a running read's late answer is dropped)."""
        kind = self.state.kind
        if kind is not None:
            self._forget()
            self.open(kind)

    def menu(self) -> None:
        """Back to the queries menu; the person stays for the next personal item."""
        self._attempt += 1
        self.kiosk.go(ScreenName.QUERIES)

    def finish(self) -> None:
        """The citizen is done: forget them and go back to the start."""
        self.kiosk.home()

    def next_page(self) -> None:
        self.kiosk.touch()
        self._page(self.state.page + 1)

    def prev_page(self) -> None:
        self.kiosk.touch()
        self._page(self.state.page - 1)

    def tick(self) -> None:
        """Refresh the elapsed/estimate line while waiting (called once a second by the UI)."""
        state = self.state
        if state.phase is NationalPhase.WAITING or state.loading:
            progress = self._progress()
            if progress != state.progress:
                self._set(replace(state, progress=progress))

    def clear_personal(self) -> None:
        self._forget()
        self._set(NationalState())

    # ------------------------------------------------------------------ worker side

    def _identify(self, attempt: int, kind: NationalKind, method: Method) -> None:
        timeout = SCAN_TIMEOUT_S if method is Method.QR else CARD_TIMEOUT_S
        outcome = self._guarded(attempt, lambda: self.port.identify(method, timeout))
        if outcome is None or attempt != self._attempt:
            return
        if outcome.person is None:
            self._set(self._choosing(kind, text(outcome.reason or "national.unavailable")))
            self.kiosk.speak("voice.national_fail")
            return
        self._person = outcome.person
        self._show_records(attempt, kind, outcome.person)

    def _show_records(self, attempt: int, kind: NationalKind, person: NationalPerson) -> None:
        base = NationalState(
            phase=NationalPhase.LIST,
            kind=kind,
            title=text(f"national.{kind.value}"),
            person_line=text("national.person_line", name=person.masked_name, id=person.masked_id),
        )
        if kind is NationalKind.PERSON:
            # person_info already answered this one: no second trip to the platform
            self._all = tuple(person.rows)
            self._set(base)
            self._page(0)
            self.kiosk.go(ScreenName.NATIONAL_LIST)
            return
        self._all = ()
        self._start_wait(NETWORK_EXPECTED_S)
        self._set(replace(base, loading=True, message=text("national.loading"), progress=self._progress()))
        self.kiosk.go(ScreenName.NATIONAL_LIST)
        self.runner(lambda: self._fetch(attempt, kind, person.query_ref))

    def _fetch(self, attempt: int, kind: NationalKind, query_ref: str) -> None:
        answer = self._guarded(attempt, lambda: self.port.records(kind, query_ref))
        if answer is None or attempt != self._attempt:
            return
        if answer.reason == SESSION_LAPSED:
            self._person = None  # the platform's reference lapsed: the next item asks for the credential again
        self._all = tuple(answer.rows)
        message = text(answer.reason) if answer.reason else ("" if self._all else text("national.empty"))
        self._set(replace(self.state, loading=False, progress="", message=message))
        self._page(0)

    def _guarded(self, attempt: int, call: Callable[[], T]) -> T | None:
        try:
            return call()
        except Exception:
            # The port turns every expected failure into a reason; anything else is a bug shown calmly
            logger.exception("national query failed unexpectedly")
            if attempt == self._attempt:
                self.kiosk.fail("national query raised")
            return None

    # ------------------------------------------------------------------ helpers

    def _choosing(self, kind: NationalKind, message: str = "") -> NationalState:
        available = self.port.available()
        choices = tuple(
            MethodChoice(
                m,
                text(f"identity.{m.value}") + ("" if m in available else text("identity.unavailable")),
                m in available,
            )
            for m in NATIONAL_METHODS
        )
        if not available and not message:
            message = text("national.unavailable")  # not enrolled, or no reader: say so rather than grey buttons only
        return NationalState(
            kind=kind,
            title=text(f"national.{kind.value}"),
            choices=choices,
            hint=text("national.choose_hint"),
            message=message,
        )

    def _forget(self) -> None:
        self._attempt += 1
        self._person = None
        self._all = ()

    def _start_wait(self, expected_s: int) -> None:
        self._started = self.kiosk.clock.monotonic()
        self._expected = expected_s

    def _progress(self) -> str:
        elapsed = int(self.kiosk.clock.monotonic() - self._started)
        return text("common.elapsed", elapsed=elapsed, eta=self._expected)

    def _per_page(self) -> int:
        return ROWS_PER_PAGE_CARE if self.kiosk.care_mode else ROWS_PER_PAGE

    def _page(self, page: int) -> None:
        shown = paged(self._all, page, self._per_page(), label_when_empty=False)
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

    def _follow_kiosk(self, state: KioskState) -> None:
        if state.care_mode != self._care:
            self._care = state.care_mode
            if self.state.phase is NationalPhase.LIST:
                self._page(0)  # same rows, another page size
        if state.screen not in QUERY_SCREENS and (self._person is not None or self.state.kind is not None):
            # Left the query screens (home, the idle timeout, the error screen, another flow): forget the person
            self.clear_personal()


class NoNationalQueries:
    """`NationalPort` of a kiosk without the server's relay (not enrolled): the items say "try later" in words."""

    def available(self) -> frozenset[Method]:
        return frozenset()

    def identify(self, method: Method, timeout_s: float) -> NationalOutcome:
        return NationalOutcome(reason="national.unavailable")

    def records(self, kind: NationalKind, query_ref: str) -> QueryAnswer:
        return QueryAnswer(reason="national.unavailable")
