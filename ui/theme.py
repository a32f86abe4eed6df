"""The kiosk's visual metrics in plain Python: colours, font sizes, touch-target sizes and line spacing for the
normal and the care (elderly) mode.

Owns the numbers only; `ui.kiosk.theme` turns them into Kivy properties that every .kv binds to, and `ui.care`
checks the real widgets against the care-mode rules (source 003: K-28…K-33). It must never import Kivy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

Rgba = tuple[float, float, float, float]


def hex_rgba(value: str) -> Rgba:
    """'#RRGGBB' → an RGBA tuple of floats (alpha 1)."""
    raw = value.lstrip("#")
    return (int(raw[0:2], 16) / 255, int(raw[2:4], 16) / 255, int(raw[4:6], 16) / 255, 1.0)


@dataclass(frozen=True)
class Metrics:
    """One mode's metrics. Sizes in px for fonts (Kivy `font_size`), dp for touch targets."""

    name: str
    font_small: float
    font_body: float
    font_title: float
    font_huge: float
    target_dp: float
    line_height: float
    """Kivy's `line_height`: a multiple of the font's own line pitch, which for Noto Sans CJK is already ~1.46 em.
    The care rule is about the pitch in em (line spacing ≥ 1.5 × font size), measured by `ui.kiosk.inspect`."""
    spacing_dp: float
    background: Rgba
    surface: Rgba
    text: Rgba
    muted_text: Rgba
    primary: Rgba
    primary_text: Rgba
    danger: Rgba
    danger_text: Rgba
    ok: Rgba
    ok_text: Rgba


# Calm, high-contrast, no advertising: a pale background, dark text, one strong accent. Normal mode is already
# large (a kiosk is read standing at arm's length); care mode raises every size past the 003 minimums.
NORMAL: Final = Metrics(
    name="normal",
    font_small=22,
    font_body=28,
    font_title=44,
    font_huge=64,
    target_dp=64,
    line_height=1.0,
    spacing_dp=16,
    background=hex_rgba("#F4F7FA"),
    surface=hex_rgba("#FFFFFF"),
    text=hex_rgba("#1B2733"),
    muted_text=hex_rgba("#4A5866"),
    primary=hex_rgba("#0B5CAD"),
    primary_text=hex_rgba("#FFFFFF"),
    danger=hex_rgba("#A61B1B"),
    danger_text=hex_rgba("#FFFFFF"),
    ok=hex_rgba("#1E6B34"),
    ok_text=hex_rgba("#FFFFFF"),
)

CARE: Final = Metrics(
    name="care",
    font_small=36,
    font_body=40,
    font_title=56,
    font_huge=72,
    target_dp=96,
    line_height=1.1,
    spacing_dp=24,
    background=hex_rgba("#FFFDF5"),
    surface=hex_rgba("#FFFFFF"),
    text=hex_rgba("#000000"),
    muted_text=hex_rgba("#2B2B2B"),
    primary=hex_rgba("#003F87"),
    primary_text=hex_rgba("#FFFFFF"),
    danger=hex_rgba("#8B0000"),
    danger_text=hex_rgba("#FFFFFF"),
    ok=hex_rgba("#0F4D22"),
    ok_text=hex_rgba("#FFFFFF"),
)


def metrics_for(care_mode: bool) -> Metrics:
    return CARE if care_mode else NORMAL
