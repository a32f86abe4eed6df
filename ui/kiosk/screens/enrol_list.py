"""Pharmacist face enrolment, step 1: the pharmacist picks themselves from the roster (医保药师代码 and masked name
only, whether a face is already enrolled), as a paged list with a large "是我" button on each row."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kivy.metrics import dp
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.widget import Widget

from ui.i18n import text
from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.widgets import HintLabel, KioskButton, KioskLabel, Panel
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
            panel = Panel(
                orientation="horizontal",
                size_hint_y=None,
                padding=(dp(16), dp(6)),
                spacing=theme.spacing,
                bg_color=theme.surface,
            )
            words = BoxLayout(orientation="vertical", size_hint_y=None, pos_hint={"center_y": 0.5})
            words.add_widget(KioskLabel(text=row.label, bold=True))
            words.add_widget(HintLabel(text=row.status, halign="left"))
            words.bind(minimum_height=words.setter("height"))
            panel.add_widget(words)
            button = KioskButton(text=text("staff.enrol.pick"), size_hint_x=0.25, pos_hint={"center_y": 0.5})
            button.bind(on_release=lambda _b, code=row.code: staff.enrolment.choose(code))
            panel.add_widget(button)
            panel.bind(minimum_height=panel.setter("height"))
            rows.add_widget(panel)
        rows.add_widget(Widget())  # takes the space left, so the rows start at the top
