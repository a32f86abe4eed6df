"""The calm prompt to the pharmacist on duty: their periodic face check is due ("请药师刷脸确认在岗"), with a button
to check now and one to leave it for later (it stays on the staff menu). Shown only over the attract screen or the
staff menu (`ui.viewmodels.reverify`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class ReverifyScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        staff = app.models.staff
        if staff is not None:
            self.follow(app, staff.reverify)
