"""The menu of citizen queries (catalogues that work offline), as large buttons."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class QueriesScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self.follow(app, app.models.queries)
