"""The base of every kiosk screen: paints the theme background and is attached to the App once it is built.

A screen subclass overrides `attach(app)` to `app.main.follow(view_model, self.render)` and renders the view-
model's state into its widgets (kv binds to `root.state`). Screens hold no state of their own and call only the
view-models' intents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kivy.properties import ColorProperty, ObjectProperty
from kivy.uix.screenmanager import Screen

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp


class KioskScreen(Screen):
    bg_color = ColorProperty((1, 1, 1, 1))
    state = ObjectProperty(None, allownone=True)

    def attach(self, app: KioskApp) -> None:
        """Subscribe to the view-models this screen shows (override)."""

    def follow(self, app: KioskApp, observable: Any) -> None:
        if app.main is None:
            raise RuntimeError("the kiosk is not built yet")
        app.main.follow(observable, self.render)

    def render(self, state: Any) -> None:
        self.state = state
