"""The calm error screen: no technical detail, personal data already cleared, back to the start by itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class ErrorScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self.follow(app, app.models.kiosk)
