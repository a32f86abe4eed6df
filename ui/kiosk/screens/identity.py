"""Identity choice: four large buttons (医保码, face, ID card, social-security card); a non-face path always shown."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.widgets import KioskButton
from ui.viewmodels.identity import IdentityState

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class IdentityScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self._app = app
        self.follow(app, app.models.identity)

    def render(self, state: IdentityState) -> None:
        super().render(state)
        grid = self.ids.choices
        grid.clear_widgets()
        for choice in state.choices:
            button = KioskButton(text=choice.label, disabled=not choice.enabled)
            button.bind(on_release=lambda _b, m=choice.method: self._app.models.identity.choose(m))
            grid.add_widget(button)
