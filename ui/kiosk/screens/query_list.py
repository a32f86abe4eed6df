"""One query's answer as a large, paged list (fewer rows per page in care mode), with a search box."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kivy.metrics import dp

from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.widgets import HintLabel, KioskLabel, Panel
from ui.viewmodels.queries import QueryListState

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class QueryListScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self._app = app
        self.follow(app, app.models.queries)

    def search(self, needle: str) -> None:
        kind = self.state.kind if self.state is not None else None
        if kind is not None:
            self._app.models.queries.open(kind, needle.strip())

    def render(self, state: QueryListState) -> None:
        super().render(state)
        rows = self.ids.rows
        rows.clear_widgets()
        theme = self._app.theme
        for row in state.rows:
            panel = Panel(orientation="vertical", size_hint_y=None, padding=(dp(16), dp(8)), bg_color=theme.surface)
            title = KioskLabel(text=row.title, bold=True)
            panel.add_widget(title)
            if row.detail:
                panel.add_widget(HintLabel(text=row.detail, halign="left"))
            panel.bind(minimum_height=panel.setter("height"))
            rows.add_widget(panel)
