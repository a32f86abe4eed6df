"""The kiosk's few building blocks, styled by `app.theme` in widgets.kv: labels that wrap and grow, large buttons
that paint their own background, panels with a background colour.

Every widget that paints a background exposes it as `bg_color`, which is what the care-mode check reads to
compute contrast (`ui.kiosk.inspect`): keep it that way when adding widgets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kivy.metrics import dp
from kivy.properties import BooleanProperty, ColorProperty, OptionProperty
from kivy.uix.behaviors import ButtonBehavior
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.label import Label
from kivy.uix.textinput import TextInput

if TYPE_CHECKING:
    from ui.kiosk.theme import KioskTheme

SCALES = ("small", "body", "title", "huge")
TONES = ("text", "muted", "accent", "inverse")


class KioskLabel(Label):
    """Text that wraps to its width and grows to its height. Size and colour come from `scale` and `tone`, which
    the one kv rule maps to the theme: never bind `font_size` or `color` to the theme in another rule (a subclass
    or instance rule would leave this rule bound too, and on a care-mode switch whichever fired last would win)."""

    scale = OptionProperty("body", options=SCALES)
    tone = OptionProperty("text", options=TONES)


class TitleLabel(KioskLabel):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("scale", "title")
        super().__init__(**kwargs)


class HintLabel(KioskLabel):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("tone", "muted")
        super().__init__(**kwargs)


class StatusLabel(KioskLabel):
    """A result or error line on a coloured band: shown in words and colour (never colour alone)."""

    bg_color = ColorProperty((0, 0, 0, 0))
    status = OptionProperty("none", options=("none", "ok", "danger", "neutral"))

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("tone", "inverse")
        super().__init__(**kwargs)


class KioskButton(ButtonBehavior, Label):
    bg_color = ColorProperty((0, 0, 0, 0))
    scale = OptionProperty("body", options=SCALES)
    secondary = BooleanProperty(False)
    """Outlined (primary-coloured text on the surface) instead of filled. One kv rule styles both: a subclass rule
    redefining `color` would leave the base rule bound too, and whichever fired last would win."""


class SecondaryButton(KioskButton):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("secondary", True)
        super().__init__(**kwargs)


class Panel(BoxLayout):
    bg_color = ColorProperty((0, 0, 0, 0))


def list_row(
    theme: KioskTheme,
    title: str,
    detail: str,
    action: tuple[str, Callable[[], None]] | None = None,
    *,
    centred: bool = False,
) -> Panel:
    """One row of a paged list: `title` in bold over `detail`, and a large button at the right when `action` is
    given (its label and what it does); the row is as tall as its words."""
    panel = Panel(
        orientation="horizontal",
        size_hint_y=None,
        padding=(dp(16), dp(6)),
        spacing=theme.spacing,
        bg_color=theme.surface,
    )
    words = BoxLayout(orientation="vertical", size_hint_y=None, **({"pos_hint": {"center_y": 0.5}} if centred else {}))
    words.add_widget(KioskLabel(text=title, bold=True))
    words.add_widget(HintLabel(text=detail, halign="left"))
    words.bind(minimum_height=words.setter("height"))
    panel.add_widget(words)
    if action is not None:
        label, run = action
        button = KioskButton(text=label, size_hint_x=0.25, pos_hint={"center_y": 0.5})
        button.bind(on_release=lambda _button: run())
        panel.add_widget(button)
    panel.bind(minimum_height=panel.setter("height"))
    return panel


class KioskInput(TextInput):
    """The kiosk's text field: its size, font and colours come from the `<KioskInput>` rule in widgets.kv (a class
    of its own so that rule styles the kiosk's fields only, not every TextInput)."""
