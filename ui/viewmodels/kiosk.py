"""The kiosk as a whole: which screen is showing, care mode, the idle timeout, error recovery, voice prompts.

Owns navigation (`go`, `home`), the care-mode switch, the idle clock (any touch restarts it; when it runs out every
view-model's personal state is cleared and the kiosk returns to the attract screen) and the calm error state that
replaces a crash (`fail`) and recovers to the start on its own. Time comes from an injected `protocol.Clock`, and
`tick()` is called by the UI once a second (or by a test after advancing its fake clock). It must never import
Kivy and never keep personal data: it only asks the view-models holding some to forget it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final, Protocol

from protocol import Clock
from ui.i18n import DEFAULT_LOCALE, Locale, text
from ui.viewmodels.base import Observable
from ui.voice import SilentSpeaker, Speaker

logger = logging.getLogger(__name__)

IDLE_TIMEOUT_S: Final = 60.0
IDLE_TIMEOUT_CARE_S: Final = 120.0
"""Elderly citizens read and move more slowly: twice the time before the kiosk gives up on them."""
IDLE_WARNING_S: Final = 10.0
ERROR_RECOVERY_S: Final = 8.0


class ScreenName(StrEnum):
    """Every screen the kiosk can show. Add a member here and a spec in `ui.kiosk.registry` to add a screen."""

    ATTRACT = "attract"
    IDENTITY = "identity"
    SCAN = "scan"
    FACE = "face"
    RESULT = "result"
    QUERIES = "queries"
    QUERY_LIST = "query_list"
    MAINTENANCE_LOGIN = "maintenance_login"
    MAINTENANCE = "maintenance"
    POS = "pos"
    ERROR = "error"
    # staff screens (pharmacist, review, binding)
    STAFF = "staff"
    STAFF_WAIT = "staff_wait"
    STAFF_RESULT = "staff_result"
    ATTENDANCE = "attendance"
    RX_LIST = "rx_list"
    RX_REVIEW = "rx_review"
    BINDING = "binding"
    # national queries (K-11…K-16)
    NATIONAL_ID = "national_id"
    NATIONAL_LIST = "national_list"
    # pharmacist face enrolment and re-verification
    ENROL_LIST = "enrol_list"
    ENROL_CONSENT = "enrol_consent"
    REVERIFY = "reverify"


ENGLISH_SCREENS: Final = frozenset({ScreenName.MAINTENANCE_LOGIN, ScreenName.MAINTENANCE})
"""Screens for maintainers, shown in English (issue 6 point 4)."""
NO_IDLE_SCREENS: Final = frozenset({ScreenName.ATTRACT, ScreenName.ERROR, ScreenName.POS})
"""Screens that leave by themselves: the error screen recovers, the POS screen follows the register's request."""


class HoldsPersonalData(Protocol):
    def clear_personal(self) -> None:
        """Forget everything about the person at the kiosk (called on idle timeout, home and errors)."""


@dataclass(frozen=True)
class KioskState:
    screen: ScreenName = ScreenName.ATTRACT
    care_mode: bool = False
    locale: Locale = DEFAULT_LOCALE
    idle_warning: str = ""
    """Shown when the idle timeout is close ("10 秒后将自动返回首页"); empty otherwise."""
    care_label: str = text("attract.care_off")
    error_text: str = ""


class KioskModel(Observable[KioskState]):
    def __init__(self, clock: Clock, *, speaker: Speaker | None = None) -> None:
        super().__init__(KioskState())
        self.clock = clock
        self.speaker: Speaker = speaker if speaker is not None else SilentSpeaker()
        self._personal: list[HoldsPersonalData] = []
        self._last_touch = clock.monotonic()
        self._entered = clock.monotonic()

    # ------------------------------------------------------------------ wiring

    def holds_personal_data(self, model: HoldsPersonalData) -> None:
        self._personal.append(model)

    @property
    def care_mode(self) -> bool:
        return self.state.care_mode

    def idle_timeout_s(self) -> float:
        return IDLE_TIMEOUT_CARE_S if self.state.care_mode else IDLE_TIMEOUT_S

    # ------------------------------------------------------------------ intents

    def go(self, screen: ScreenName) -> None:
        self.touch()
        self._entered = self.clock.monotonic()
        locale = Locale.EN if screen in ENGLISH_SCREENS else DEFAULT_LOCALE
        self._set(replace(self.state, screen=screen, locale=locale, idle_warning=""))

    def home(self) -> None:
        """Back to the attract screen with every view-model's personal state cleared."""
        self.clear_personal()
        self.speaker.stop()
        self.go(ScreenName.ATTRACT)

    def clear_personal(self) -> None:
        for model in self._personal:
            model.clear_personal()

    def set_care_mode(self, on: bool) -> None:
        self.touch()
        label = text("attract.care_on" if on else "attract.care_off")
        self._set(replace(self.state, care_mode=on, care_label=label))

    def toggle_care_mode(self) -> None:
        self.set_care_mode(not self.state.care_mode)

    def touch(self) -> None:
        """Any user input: restarts the idle clock."""
        self._last_touch = self.clock.monotonic()
        if self.state.idle_warning:
            self._set(replace(self.state, idle_warning=""))

    def speak(self, key: str) -> None:
        """Speak a catalogue phrase in care mode (voice prompts for key steps, K-33); never personal data."""
        if self.state.care_mode:
            self.speaker.say(text(key))

    def fail(self, summary: str) -> None:
        """Something went wrong that the screen cannot handle: clear personal data, show the calm error screen.
        `summary` goes to the log only (it may name an exception, never personal data)."""
        logger.error("kiosk error screen shown: %s", summary)
        self.clear_personal()
        self._entered = self.clock.monotonic()
        self._set(replace(self.state, screen=ScreenName.ERROR, locale=DEFAULT_LOCALE, error_text=text("error.body")))

    def tick(self) -> None:
        """Once a second: idle timeout, its warning, and the error screen's own recovery."""
        now = self.clock.monotonic()
        state = self.state
        if state.screen is ScreenName.ERROR:
            if now - self._entered >= ERROR_RECOVERY_S:
                self.home()
            return
        if state.screen in NO_IDLE_SCREENS:
            return
        remaining = self.idle_timeout_s() - (now - self._last_touch)
        if remaining <= 0:
            logger.info("idle timeout on %s: personal data cleared, back to start", state.screen.value)
            self.home()
        elif remaining <= IDLE_WARNING_S:
            warning = text("common.idle_warning", state.locale, seconds=int(remaining + 0.999))
            if warning != state.idle_warning:
                self._set(replace(state, idle_warning=warning))
