"""The attract (idle) screen: a calm welcome, the start button, the care-mode switch; no advertising."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class AttractScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self.follow(app, app.models.kiosk)
