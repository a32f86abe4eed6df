"""The identity result: success or failure in words (and colour), masked name and ID number, the next steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class ResultScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self.follow(app, app.models.identity)
