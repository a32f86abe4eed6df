"""A staff task's result: ok or not in words (and colour), the lines, and the next actions as large buttons."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.widgets import KioskButton, SecondaryButton
from ui.viewmodels.staff_task import StaffTaskState

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class StaffResultScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        staff = app.models.staff
        if staff is not None:
            self.follow(app, staff.task)

    def render(self, state: StaffTaskState) -> None:
        super().render(state)
        row = self.ids.actions
        row.clear_widgets()
        for action in state.actions:
            button = KioskButton(text=action.label) if action.primary else SecondaryButton(text=action.label)
            button.bind(on_release=lambda _b, run=action.run: run())
            row.add_widget(button)
