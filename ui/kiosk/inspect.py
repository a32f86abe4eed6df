"""Reads the facts the care-mode rules need from a live widget tree (`ui.care.WidgetFacts`).

Owns the mapping from Kivy widgets to facts: text widgets (Label and its subclasses, TextInput) give font size in
px, line pitch in em and text colour (the disabled colour when disabled); the background is the nearest `bg_color`
painted at or above the widget (blended up to the window's background); anything with button behaviour or a text
input counts as touchable and is measured in dp. Main thread only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kivy.core.text import Label as CoreLabel
from kivy.metrics import dp
from kivy.uix.behaviors import ButtonBehavior
from kivy.uix.label import Label
from kivy.uix.textinput import TextInput
from kivy.uix.widget import Widget

from ui.care import WidgetFacts, blend
from ui.theme import Rgba


def _rgba(value: Any) -> Rgba:
    r, g, b, a = (float(c) for c in value)
    return (r, g, b, a)


def _visible(widget: Widget) -> bool:
    node: Widget | None = widget
    while node is not None:
        if float(node.opacity) <= 0.0 or node.width <= 0 or node.height <= 0:
            return False
        node = node.parent if isinstance(node.parent, Widget) else None
    return True


def _background(widget: Widget, window_background: Rgba) -> Rgba:
    """The colour painted behind `widget`: its own or its ancestors' `bg_color`s, top-most last, over the window."""
    layers: list[Rgba] = []
    node: Widget | None = widget
    while node is not None:
        color = getattr(node, "bg_color", None)
        if color is not None and float(color[3]) > 0:
            layers.append(_rgba(color))
        node = node.parent if isinstance(node.parent, Widget) else None
    result = window_background
    for layer in reversed(layers):
        result = blend(layer, result)
    return result


def _path(widget: Widget) -> str:
    names: list[str] = []
    node: Widget | None = widget
    while node is not None and len(names) < 6:
        names.append(type(node).__name__)
        node = node.parent if isinstance(node.parent, Widget) else None
    return "/".join(reversed(names))


def _line_pitch_em(label: Label) -> float:
    """The distance from one line to the next as a multiple of the font size, as Kivy will draw it: the font's
    own line pitch (measured on CJK and Latin glyphs) times the label's `line_height`."""
    core = CoreLabel(font_size=label.font_size, font_name=label.font_name, bold=label.bold)
    _, pitch = core.get_extents("汉Ag")
    return float(pitch) * float(label.line_height) / float(label.font_size)


def _on_screen(widget: Widget, window_size: tuple[float, float]) -> bool:
    x0, y0 = widget.to_window(widget.x, widget.y)
    x1, y1 = widget.to_window(widget.right, widget.top)
    slack = 1.0  # sub-pixel layout rounding
    return bool(x0 >= -slack and y0 >= -slack and x1 <= window_size[0] + slack and y1 <= window_size[1] + slack)


OVERLAP_SLACK_PX = 2.0


def _rect(widget: Widget) -> tuple[float, float, float, float]:
    x0, y0 = widget.to_window(widget.x, widget.y)
    x1, y1 = widget.to_window(widget.right, widget.top)
    return (float(x0), float(y0), float(x1), float(y1))


def _related(a: Widget, b: Widget) -> bool:
    """Whether one contains the other (a button's own label, a panel's text): overlap there is by design."""
    for inner, outer in ((a, b), (b, a)):
        node = inner.parent
        while isinstance(node, Widget):
            if node is outer:
                return True
            node = node.parent
    return False


def _overlapping(widgets: list[Widget]) -> set[int]:
    """Indexes of widgets whose box overlaps another's (neither containing the other) by more than the slack."""
    rects = [_rect(w) for w in widgets]
    found: set[int] = set()
    for i, a in enumerate(rects):
        for j in range(i + 1, len(rects)):
            b = rects[j]
            dx = min(a[2], b[2]) - max(a[0], b[0])
            dy = min(a[3], b[3]) - max(a[1], b[1])
            if dx > OVERLAP_SLACK_PX and dy > OVERLAP_SLACK_PX and not _related(widgets[i], widgets[j]):
                found.update((i, j))
    return found


def widget_facts(root: Widget, window_background: Rgba, window_size: tuple[float, float]) -> Iterator[WidgetFacts]:
    """Facts for every widget under (and including) `root`."""
    shown = [
        w
        for w in root.walk(restrict=True)
        if _visible(w) and (isinstance(w, ButtonBehavior | TextInput) or str(getattr(w, "text", "")))
    ]
    overlapping = _overlapping(shown)
    unit = float(dp(1))
    for widget in root.walk(restrict=True):
        touchable = isinstance(widget, ButtonBehavior | TextInput)
        text = ""
        font: float | None = None
        line_height: float | None = None
        color: Rgba | None = None
        background = _background(widget, window_background)
        if isinstance(widget, Label):
            text = str(widget.text)
            font = float(widget.font_size)
            line_height = _line_pitch_em(widget)
            color = _rgba(widget.disabled_color if widget.disabled else widget.color)
        elif isinstance(widget, TextInput):
            text = str(widget.text or widget.hint_text)
            font = float(widget.font_size)
            color = _rgba(widget.foreground_color if widget.text else widget.hint_text_color)
            background = blend(_rgba(widget.background_color), background)
        if not text and not touchable:
            continue
        yield WidgetFacts(
            path=_path(widget),
            text=text,
            font_px=font,
            line_height=line_height,
            color=color,
            background=background,
            width_dp=float(widget.width) / unit,
            height_dp=float(widget.height) / unit,
            touchable=touchable,
            visible=_visible(widget),
            on_screen=_on_screen(widget, window_size),
            overlaps=any(widget is shown[i] for i in overlapping),
        )
