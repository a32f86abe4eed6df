"""The pharmacy's prescriptions: pending (each with a Review button) or reviewed here (with the result in words),
as a paged list."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kivy.uix.widget import Widget

from ui.i18n import text
from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.widgets import list_row
from ui.viewmodels.review import ReviewState, RxTab, summary_detail, summary_text

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class RxListScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self._app = app
        staff = app.models.staff
        if staff is not None:
            self.follow(app, staff.review)

    def render(self, state: ReviewState) -> None:
        super().render(state)
        rows = self.ids.rows
        rows.clear_widgets()
        staff = self._app.models.staff
        theme = self._app.theme
        if staff is None:
            return
        for rx in state.rows:
            action = None
            if state.tab is RxTab.PENDING:
                action = (text("staff.rx.open"), lambda pid=rx.prescription_id: staff.review.open_rx(pid))
            rows.add_widget(list_row(theme, summary_text(rx), summary_detail(rx), action))
        rows.add_widget(Widget())  # takes the space left, so the rows start at the top
