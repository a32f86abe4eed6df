"""A personal query's first step: the credential choice (医保码, ID card, social-security card; no face needed), then
the wait while it is read and the national platform asked, with the elapsed time against an estimate; a failure is
shown in words above the choice so the citizen can try again or pick another credential."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.widgets import KioskButton
from ui.viewmodels.national import NationalPhase, NationalState

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class NationalIdScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self._app = app
        self.follow(app, app.models.national)

    def render(self, state: NationalState) -> None:
        super().render(state)
        grid = self.ids.choices
        grid.clear_widgets()
        if state.phase is not NationalPhase.CHOOSE:
            return
        for choice in state.choices:
            button = KioskButton(text=choice.label, disabled=not choice.enabled)
            button.bind(on_release=lambda _b, m=choice.method: self._app.models.national.choose(m))
            grid.add_widget(button)
