"""Waiting for a 医保码, an ID card or a social-security card: what to do, how long it has taken, cancel."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class ScanScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self.follow(app, app.models.identity)
