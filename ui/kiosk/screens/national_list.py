"""A personal query's answer as a large paged list (fewer rows per page in care mode) under the masked name and ID
number of the person found; the wait on the national platform shows the elapsed time against an estimate, and an
empty answer or a failure is said in words."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kivy.metrics import dp

from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.widgets import HintLabel, KioskLabel, Panel
from ui.viewmodels.national import NationalState

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class NationalListScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self._app = app
        self.follow(app, app.models.national)

    def render(self, state: NationalState) -> None:
        super().render(state)
        rows = self.ids.rows
        rows.clear_widgets()
        theme = self._app.theme
        for row in state.rows:
            panel = Panel(orientation="vertical", size_hint_y=None, padding=(dp(16), dp(8)), bg_color=theme.surface)
            panel.add_widget(KioskLabel(text=row.title, bold=True))
            if row.detail:
                panel.add_widget(HintLabel(text=row.detail, halign="left"))
            panel.bind(minimum_height=panel.setter("height"))
            rows.add_widget(panel)
