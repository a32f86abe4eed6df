"""Pharmacist face enrolment, step 1: the pharmacist picks themselves from the roster (医保药师代码 and masked name
only, whether a face is already enrolled), as a paged list with a large "是我" button on each row."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kivy.uix.widget import Widget

from ui.i18n import text
from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.widgets import list_row
from ui.viewmodels.enrolment import EnrolmentState

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class EnrolListScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self._app = app
        staff = app.models.staff
        if staff is not None:
            self.follow(app, staff.enrolment)

    def render(self, state: EnrolmentState) -> None:
        super().render(state)
        rows = self.ids.rows
        rows.clear_widgets()
        staff = self._app.models.staff
        theme = self._app.theme
        if staff is None:
            return
        for row in state.rows:
            pick = (text("staff.enrol.pick"), lambda code=row.code: staff.enrolment.choose(code))
            rows.add_widget(list_row(theme, row.label, row.status, pick, centred=True))
        rows.add_widget(Widget())  # takes the space left, so the rows start at the top
