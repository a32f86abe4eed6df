"""Waiting on a staff task: what to do now (show the 医保码, the ID card, the face), the face pipeline's live
guidance, and how long it has taken against the estimate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class StaffWaitScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self._app = app
        staff = app.models.staff
        if staff is not None:
            self.follow(app, staff.task)

    def cancel(self) -> None:
        staff = self._app.models.staff
        if staff is not None:
            staff.task.abandon()
            staff.menu.open()
