"""Kivy's process-wide settings, applied before Kivy is first imported.

Owns the environment Kivy reads at import time: no command-line parsing (the CLI owns argv), its home and logs in
a private folder (not ~/.kivy), console logging through our logging, the window size and full screen. It must be
called before any `import kivy…` in the process; importing Kivy first would freeze Kivy's own defaults.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Final

WINDOW_SIZE: Final = (1280, 800)
"""The reference kiosk panel (a common 15.6" / 21.5" landscape touch monitor class); full screen uses the real one."""


def prepare(*, fullscreen: bool, home: Path | None = None, size: tuple[int, int] = WINDOW_SIZE) -> None:
    """Set Kivy's environment and graphics config. Idempotent; must run before Kivy's first import."""
    if "kivy" in sys.modules and "kivy.core.window" in sys.modules:
        return
    kivy_home = home or Path(tempfile.gettempdir()) / f"yibao-kivy-{os.getuid()}"
    kivy_home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KIVY_NO_ARGS", "1")
    os.environ.setdefault("KIVY_HOME", str(kivy_home))
    os.environ.setdefault("KIVY_NO_FILELOG", "1")
    os.environ.setdefault("KIVY_LOG_MODE", "PYTHON")  # Kivy logs through the logging module; we configure it
    os.environ.setdefault("KIVY_NO_CONSOLELOG", "1")
    from kivy.config import Config

    Config.set("graphics", "width", str(size[0]))
    Config.set("graphics", "height", str(size[1]))
    Config.set("graphics", "fullscreen", "auto" if fullscreen else "0")
    Config.set("graphics", "resizable", "0")
    Config.set("kivy", "exit_on_escape", "0")  # a citizen must not be able to close the kiosk
    Config.set("input", "mouse", "mouse,disable_multitouch")
