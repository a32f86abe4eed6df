"""The care-mode (elderly) rules of source 003 (K-28…K-33), checked against facts read from the real widgets.

Owns the rules and the arithmetic: WCAG 2.x relative luminance and contrast ratio, and `check_widgets`, which
turns a list of `WidgetFacts` (what `ui.kiosk.inspect` read from a live screen: font size in px, line height,
text and background colours, size in dp, whether it is touchable) into violations in words. It must never import
Kivy, so the rules are unit-testable and cannot drift from what the screens are measured against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ui.theme import Rgba

MIN_FONT_PX: Final = 36.0
MIN_CONTRAST: Final = 4.5
MIN_TARGET_DP: Final = 60.0
MIN_LINE_HEIGHT: Final = 1.5


@dataclass(frozen=True)
class WidgetFacts:
    """What the check needs to know about one widget on a screen."""

    path: str
    """Where it is (class names from the screen down), for the message."""
    text: str
    font_px: float | None
    """None for widgets that show no text."""
    line_height: float | None
    """Line pitch as a multiple of the font size (1.5 = lines 1.5 × the font size apart)."""
    color: Rgba | None
    background: Rgba
    """The opaque colour painted behind it (its own, or the nearest ancestor's, else the window's)."""
    width_dp: float
    height_dp: float
    touchable: bool
    visible: bool = True
    on_screen: bool = True
    """Wholly inside the window (a care-mode layout that pushes text off the screen hides it)."""
    overlaps: bool = False
    """Its box overlaps another text or touchable widget's (larger care-mode text squeezed into too little room)."""


@dataclass(frozen=True)
class Violation:
    path: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.rule} ({self.detail})"


def _channel(c: float) -> float:
    return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4


def relative_luminance(color: Rgba) -> float:
    """WCAG 2.x relative luminance of an sRGB colour (alpha ignored)."""
    r, g, b = (_channel(c) for c in color[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def blend(top: Rgba, bottom: Rgba) -> Rgba:
    """`top` painted with its alpha over an opaque `bottom`."""
    a = top[3]
    return (
        top[0] * a + bottom[0] * (1 - a),
        top[1] * a + bottom[1] * (1 - a),
        top[2] * a + bottom[2] * (1 - a),
        1.0,
    )


def contrast_ratio(foreground: Rgba, background: Rgba) -> float:
    """WCAG contrast ratio (1…21) of `foreground` (blended over `background`) against `background`."""
    fg = blend(foreground, background)
    lighter, darker = sorted((relative_luminance(fg), relative_luminance(background)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def check_widgets(widgets: Iterable[WidgetFacts]) -> list[Violation]:
    """Every care-mode rule broken by a visible widget: font ≥ 36 px, line height ≥ 1.5, contrast ≥ 4.5:1 for
    text; ≥ 60×60 dp for anything touchable; nothing readable or touchable partly off the screen
    or overlapping another."""
    found: list[Violation] = []
    for w in widgets:
        if not w.visible:
            continue
        if w.text.strip() and w.font_px is not None:
            if w.font_px < MIN_FONT_PX:
                found.append(Violation(w.path, "font size", f"{w.font_px:.0f} px < {MIN_FONT_PX:.0f} px"))
            if w.line_height is not None and w.line_height < MIN_LINE_HEIGHT:
                found.append(Violation(w.path, "line spacing", f"{w.line_height:.2f} < {MIN_LINE_HEIGHT}"))
            if w.color is not None:
                ratio = contrast_ratio(w.color, w.background)
                if ratio < MIN_CONTRAST:
                    found.append(Violation(w.path, "contrast", f"{ratio:.2f}:1 < {MIN_CONTRAST}:1"))
        if not w.on_screen and (w.text.strip() or w.touchable):
            found.append(Violation(w.path, "off screen", "partly outside the window"))
        if w.overlaps and (w.text.strip() or w.touchable):
            found.append(Violation(w.path, "overlap", "overlaps another text or button"))
        if w.touchable and (w.width_dp < MIN_TARGET_DP or w.height_dp < MIN_TARGET_DP):
            found.append(
                Violation(w.path, "touch target", f"{w.width_dp:.0f}×{w.height_dp:.0f} dp < {MIN_TARGET_DP:.0f} dp")
            )
    return found
