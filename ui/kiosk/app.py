"""The Kivy App: one window, a ScreenManager whose screens are loaded lazily, the theme, the main-thread queue,
the once-a-second tick and the global exception handler.

Owns the window's life. It follows `KioskModel`'s state: the screen named there is loaded on first use (module and
.kv from `ui.kiosk.registry`) and shown; care mode re-applies the theme; the idle warning shows in a banner. Any
exception that reaches Kivy's loop is logged, the personal data cleared and the calm error screen shown (it
recovers to the start by itself) — no traceback ever reaches the citizen. Call `ui.kiosk.env.prepare()` before
importing this module.
"""

from __future__ import annotations

import importlib
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from kivy.app import App
from kivy.base import ExceptionHandler, ExceptionManager
from kivy.clock import Clock
from kivy.core.window import Window
from kivy.lang import Builder
from kivy.uix.floatlayout import FloatLayout
from kivy.uix.screenmanager import NoTransition, ScreenManager

from ui.kiosk.bridge import MainThread
from ui.kiosk.registry import SCREENS
from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.theme import KioskTheme, register_cjk_font
from ui.kiosk.widgets import Panel  # noqa: F401 - importing registers every kiosk widget class with the kv Factory
from ui.theme import metrics_for
from ui.viewmodels.kiosk import KioskState, ScreenName
from ui.viewmodels.models import KioskModels

logger = logging.getLogger(__name__)

HERE: Final = Path(__file__).resolve().parent
TICK_S: Final = 1.0


class _CalmErrors(ExceptionHandler):
    def __init__(self, app: KioskApp) -> None:
        super().__init__()
        self.app = app

    def handle_exception(self, inst: BaseException) -> int:
        if isinstance(inst, KeyboardInterrupt | SystemExit):
            return int(ExceptionManager.RAISE)
        # The message is a programming error's (the UI holds no full personal data to leak into it).
        logger.error(
            "kiosk: unhandled %s in the UI loop: %s\n%s",
            type(inst).__name__,
            str(inst)[:300],
            "".join(traceback.format_tb(inst.__traceback__)),
        )
        try:
            self.app.models.kiosk.fail(type(inst).__name__)
        except Exception:  # the error screen itself failed: keep the loop alive, the next tick retries
            logger.exception("kiosk: the error screen could not be shown")
        return int(ExceptionManager.PASS)


class KioskApp(App):
    title = "医保自助服务"

    def __init__(self, models: KioskModels, *, on_started: Callable[[KioskApp], None] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.models = models
        self.theme = KioskTheme()
        self.main: MainThread | None = None
        self.manager: ScreenManager | None = None
        self._on_started = on_started
        self._handler = _CalmErrors(self)
        self._loaded_kv: set[str] = set()

    # ------------------------------------------------------------------ Kivy life cycle

    def build(self) -> FloatLayout:
        register_cjk_font()
        Builder.load_file(str(HERE / "widgets.kv"))
        self.main = MainThread(on_error=self._handler.handle_exception)
        ExceptionManager.add_handler(self._handler)
        root = Builder.load_file(str(HERE / "root.kv"))
        self.manager = root.ids.manager
        self.manager.transition = NoTransition()  # calm: no sliding screens
        self.main.follow(self.models.kiosk, self._on_kiosk)
        Window.bind(on_touch_down=self._on_touch)
        Window.bind(on_key_down=self._on_key)
        Clock.schedule_interval(self._tick, TICK_S)
        return root

    def on_start(self) -> None:
        logger.info("kiosk window open (%dx%d)", Window.width, Window.height)
        if self._on_started is not None:
            self._on_started(self)

    def on_stop(self) -> None:
        ExceptionManager.remove_handler(self._handler)
        if self.main is not None:
            self.main.close()
        self.models.kiosk.speaker.stop()

    # ------------------------------------------------------------------ following the model

    def screen(self, name: ScreenName) -> KioskScreen:
        """The screen called `name`, imported and built the first time it is asked for."""
        manager = self.manager
        if manager is None:
            raise RuntimeError("the kiosk is not built yet")
        if manager.has_screen(name.value):
            screen: KioskScreen = manager.get_screen(name.value)
            return screen
        module_name, class_name = SCREENS[name]
        module = importlib.import_module(module_name)
        kv = Path(str(module.__file__)).with_suffix(".kv")
        if str(kv) not in self._loaded_kv:
            Builder.load_file(str(kv))
            self._loaded_kv.add(str(kv))
        screen = getattr(module, class_name)(name=name.value)
        manager.add_widget(screen)
        screen.attach(self)
        return screen

    def _on_kiosk(self, state: KioskState) -> None:
        care = state.care_mode
        if self.theme.care_mode != care:
            self.theme.apply(metrics_for(care))
            self.models.queries.repage()
        self.root.ids.banner.text = state.idle_warning
        self.screen(state.screen)
        if self.manager is not None and self.manager.current != state.screen.value:
            self.manager.current = state.screen.value

    def _tick(self, _dt: float) -> None:
        self.models.tick()

    def _on_touch(self, _window: Any, _touch: Any) -> bool:
        self.models.kiosk.touch()
        return False  # never swallow the touch

    def _on_key(self, *_args: Any) -> bool:
        self.models.kiosk.touch()
        return False
