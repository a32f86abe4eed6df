"""The terminal's binding: the status in words (with the reason and whom to contact when unbound or rejected) and,
when not bound, the institution head's application (institution code, face + 医保码 or face + ID card)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.widgets import KioskButton
from ui.viewmodels.binding import BindingState

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class BindingScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self._app = app
        staff = app.models.staff
        if staff is not None:
            self.follow(app, staff.binding)

    def render(self, state: BindingState) -> None:
        super().render(state)
        staff = self._app.models.staff
        row = self.ids.methods
        for child in [c for c in row.children if isinstance(c, KioskButton)]:
            row.remove_widget(child)
        if staff is None or not state.can_apply:
            return
        for offer in state.methods:
            button = KioskButton(text=offer.label, disabled=not offer.enabled, size_hint_x=0.3)
            button.bind(on_release=lambda _b, m=offer.method: staff.binding.apply(m, self.ids.code.text))
            row.add_widget(button)
