"""The pharmacy's prescriptions: pending (each with a Review button) or reviewed here (with the result in words),
as a paged list."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kivy.metrics import dp
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.widget import Widget

from ui.i18n import text
from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.widgets import HintLabel, KioskButton, KioskLabel, Panel
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
            panel = Panel(
                orientation="horizontal",
                size_hint_y=None,
                padding=(dp(16), dp(6)),
                spacing=theme.spacing,
                bg_color=theme.surface,
            )
            words = BoxLayout(orientation="vertical", size_hint_y=None)
            words.add_widget(KioskLabel(text=summary_text(rx), bold=True))
            words.add_widget(HintLabel(text=summary_detail(rx), halign="left"))
            words.bind(minimum_height=words.setter("height"))
            panel.add_widget(words)
            if state.tab is RxTab.PENDING:
                button = KioskButton(text=text("staff.rx.open"), size_hint_x=0.25, pos_hint={"center_y": 0.5})
                button.bind(on_release=lambda _b, pid=rx.prescription_id: staff.review.open_rx(pid))
                panel.add_widget(button)
            panel.bind(minimum_height=panel.setter("height"))
            rows.add_widget(panel)
        rows.add_widget(Widget())  # takes the space left, so the rows start at the top
