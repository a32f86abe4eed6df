"""The POS-initiated verification: what the cash register asked for, the live instruction, then the outcome."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class PosScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self.follow(app, app.models.pos)
