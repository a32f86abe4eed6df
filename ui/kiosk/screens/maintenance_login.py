"""The maintenance sign-in (English): the admin credential, checked by the port, never kept."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class MaintenanceLoginScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self._app = app
        self.follow(app, app.models.maintenance)

    def submit(self) -> None:
        field = self.ids.credential
        credential, field.text = field.text, ""
        self._app.models.maintenance.sign_in(credential)
