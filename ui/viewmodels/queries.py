"""Citizen queries (K-11…K-19) as large readable lists with paging: the menu of queries and one paged list.

Owns which query runs, its rows and the page shown; fewer rows per page in care mode so each line stays large. The
search runs through the injected `Runner`; a late answer for a query the citizen left is dropped. It must never
import Kivy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from ui.i18n import text
from ui.viewmodels.base import Observable, Runner, paged
from ui.viewmodels.kiosk import KioskModel, ScreenName
from ui.viewmodels.ports import QueryKind, QueryPort, QueryRow

ROWS_PER_PAGE: Final = 5
ROWS_PER_PAGE_CARE: Final = 3


@dataclass(frozen=True)
class QueryListState:
    kind: QueryKind | None = None
    title: str = text("queries.title")
    needle: str = ""
    rows: tuple[QueryRow, ...] = ()
    page: int = 0
    pages: int = 1
    page_label: str = ""
    message: str = ""
    loading: bool = False
    has_prev: bool = False
    has_next: bool = False


class QueriesViewModel(Observable[QueryListState]):
    def __init__(self, kiosk: KioskModel, port: QueryPort, runner: Runner) -> None:
        super().__init__(QueryListState())
        self.kiosk = kiosk
        self.port = port
        self.runner = runner
        self._all: Sequence[QueryRow] = ()
        self._query = 0
        kiosk.holds_personal_data(self)

    def open_menu(self) -> None:
        self.kiosk.go(ScreenName.QUERIES)

    def open(self, kind: QueryKind | str, needle: str = "") -> None:
        kind = QueryKind(kind)
        self._query += 1
        query = self._query
        self._all = ()
        title = text(f"queries.{kind.value}")
        if not needle:
            # Nothing asked yet: say what to type rather than "no records"
            self._set(QueryListState(kind=kind, title=title, message=text("queries.needle_hint"), page_label=""))
            self.kiosk.go(ScreenName.QUERY_LIST)
            return
        self._set(QueryListState(kind=kind, title=title, needle=needle, loading=True, message=text("queries.loading")))
        self.kiosk.go(ScreenName.QUERY_LIST)
        self.runner(lambda: self._run(query, kind, needle))

    def next_page(self) -> None:
        self.kiosk.touch()
        self._show(self.state.page + 1)

    def prev_page(self) -> None:
        self.kiosk.touch()
        self._show(self.state.page - 1)

    def repage(self) -> None:
        """The care mode changed: same rows, another page size."""
        self._show(0)

    def clear_personal(self) -> None:
        self._query += 1
        self._all = ()
        self._set(QueryListState())

    def _run(self, query: int, kind: QueryKind, needle: str) -> None:
        answer = self.port.search(kind, needle)
        if query != self._query:
            return
        self._all = tuple(answer.rows)
        message = text(answer.reason) if answer.reason else ("" if self._all else text("queries.empty"))
        self._set(replace(self.state, loading=False, message=message))
        self._show(0)

    def _per_page(self) -> int:
        return ROWS_PER_PAGE_CARE if self.kiosk.care_mode else ROWS_PER_PAGE

    def _show(self, page: int) -> None:
        shown = paged(self._all, page, self._per_page())
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
