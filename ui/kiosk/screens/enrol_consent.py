"""Pharmacist face enrolment, step 2: the consent text (what is collected, why, how long it is kept, deleted when
they leave) and its version; "同意" starts the ID card and the face, "不同意" returns to the staff menu."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class EnrolConsentScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        staff = app.models.staff
        if staff is not None:
            self.follow(app, staff.enrolment)
