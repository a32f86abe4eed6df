"""Face capture with live guidance: the face pipeline's own instructions (distance, light, the liveness challenge)
shown large as they come, and the elapsed time. No camera image is shown or kept here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ui.kiosk.screens.base import KioskScreen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class FaceScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self.follow(app, app.models.identity)
