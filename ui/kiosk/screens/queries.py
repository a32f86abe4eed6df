"""The menu of citizen queries as large buttons: the personal items on the national platform first (they ask for
the credential, `ui.viewmodels.national`), then the catalogues that work offline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class QueriesScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self.follow(app, app.models.queries)
