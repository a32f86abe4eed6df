"""The pharmacist's own attendance records as a large, paged list (fewer rows per page in care mode)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kivy.metrics import dp
from kivy.uix.widget import Widget

from ui.i18n import text
from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.widgets import HintLabel, KioskLabel, Panel
from ui.viewmodels.pharmacist import AttendanceState

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class AttendanceScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self._app = app
        staff = app.models.staff
        if staff is not None:
            self.follow(app, staff.pharmacist)

    def render(self, state: AttendanceState) -> None:
        super().render(state)
        rows = self.ids.rows
        rows.clear_widgets()
        theme = self._app.theme
        for row in state.rows:
            panel = Panel(orientation="vertical", size_hint_y=None, padding=(dp(16), dp(6)), bg_color=theme.surface)
            times = text("staff.attendance.row", signed_in=row.signed_in)
            if row.signed_out:
                times += "    " + text("staff.attendance.out", signed_out=row.signed_out)
            panel.add_widget(KioskLabel(text=times, bold=True))
            panel.add_widget(HintLabel(text=text(row.note), halign="left"))
            panel.bind(minimum_height=panel.setter("height"))
            rows.add_widget(panel)
        rows.add_widget(Widget())  # takes the space left, so the rows start at the top
