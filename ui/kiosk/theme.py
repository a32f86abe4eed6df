"""The kiosk theme as Kivy properties: every .kv binds its sizes and colours to `app.theme`, so switching care
mode restyles every screen at once.

Owns the CJK font registration (Noto Sans CJK from Debian's fonts-noto-cjk becomes Kivy's default font, so no
label shows tofu boxes) and `KioskTheme.apply(metrics)`. The numbers themselves live in `ui.theme`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from kivy.core.text import LabelBase
from kivy.event import EventDispatcher
from kivy.metrics import dp
from kivy.properties import BooleanProperty, ColorProperty, NumericProperty

from ui.theme import NORMAL, Metrics

CJK_FONTS: Final = (
    Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"),
    Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc"),
    Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
)


class FontMissingError(RuntimeError):
    """No CJK font: the kiosk would show boxes instead of Chinese. Install fonts-noto-cjk (scripts/setup.sh)."""


def register_cjk_font() -> Path:
    """Make the CJK font Kivy's default ("Roboto" is the name every Label uses unless told otherwise)."""
    regular = next((p for p in CJK_FONTS if p.is_file()), None)
    if regular is None:
        raise FontMissingError("no CJK font found; install the Debian package fonts-noto-cjk")
    bold = CJK_FONTS[1] if CJK_FONTS[1].is_file() else regular
    LabelBase.register("Roboto", str(regular), fn_bold=str(bold))
    return regular


class KioskTheme(EventDispatcher):
    """Never name a property `on_<other property>`: Kivy would call it as that property's change handler."""

    care_mode = BooleanProperty(False)
    font_small = NumericProperty(NORMAL.font_small)
    font_body = NumericProperty(NORMAL.font_body)
    font_title = NumericProperty(NORMAL.font_title)
    font_huge = NumericProperty(NORMAL.font_huge)
    target = NumericProperty(dp(NORMAL.target_dp))
    line_height = NumericProperty(NORMAL.line_height)
    spacing = NumericProperty(dp(NORMAL.spacing_dp))
    background = ColorProperty(NORMAL.background)
    surface = ColorProperty(NORMAL.surface)
    text = ColorProperty(NORMAL.text)
    muted_text = ColorProperty(NORMAL.muted_text)
    primary = ColorProperty(NORMAL.primary)
    primary_text = ColorProperty(NORMAL.primary_text)
    danger = ColorProperty(NORMAL.danger)
    danger_text = ColorProperty(NORMAL.danger_text)
    ok = ColorProperty(NORMAL.ok)
    ok_text = ColorProperty(NORMAL.ok_text)

    def apply(self, metrics: Metrics) -> None:
        self.care_mode = metrics.name == "care"
        self.font_small = metrics.font_small
        self.font_body = metrics.font_body
        self.font_title = metrics.font_title
        self.font_huge = metrics.font_huge
        self.target = dp(metrics.target_dp)
        self.line_height = metrics.line_height
        self.spacing = dp(metrics.spacing_dp)
        self.background = metrics.background
        self.surface = metrics.surface
        self.text = metrics.text
        self.muted_text = metrics.muted_text
        self.primary = metrics.primary
        self.primary_text = metrics.primary_text
        self.danger = metrics.danger
        self.danger_text = metrics.danger_text
        self.ok = metrics.ok
        self.ok_text = metrics.ok_text
