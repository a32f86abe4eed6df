"""The maintenance screen (English): peripherals, outbox depth and age, network, versions, last sync."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class MaintenanceScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self.follow(app, app.models.maintenance)
