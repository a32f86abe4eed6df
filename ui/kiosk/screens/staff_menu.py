"""The staff menu: who is on duty, the binding and the pending prescriptions in words; what staff can do here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class StaffMenuScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        staff = app.models.staff
        if staff is not None:
            self.follow(app, staff.menu)
