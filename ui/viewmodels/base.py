"""The observable base every view-model builds on: one immutable state, replaced whole, announced to listeners.

Owns the listener list and the lock that makes `state` replacement atomic. Listeners are called on the thread that
changed the state (often a worker): the Kivy side marshals them to the main thread (`ui.kiosk.bridge`). It must
never import Kivy or hold personal data beyond what the state's masked display strings say.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from ui.i18n import text

logger = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")
Listener = Callable[[S], None]


class Observable(Generic[S]):
    """Holds one immutable state; `_set` replaces it and tells every listener."""

    def __init__(self, initial: S) -> None:
        self._lock = threading.RLock()
        self._state = initial
        self._listeners: list[Listener[S]] = []

    @property
    def state(self) -> S:
        with self._lock:
            return self._state

    def subscribe(self, listener: Listener[S]) -> Callable[[], None]:
        """Call `listener` with every new state (and once now with the current one); returns an unsubscribe."""
        with self._lock:
            self._listeners.append(listener)
            current = self._state
        listener(current)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def _set(self, state: S) -> None:
        with self._lock:
            self._state = state
            listeners = list(self._listeners)
        for listener in listeners:
            listener(state)


Runner = Callable[[Callable[[], None]], None]
"""Runs a blocking job off the UI thread (a daemon thread in the kiosk, inline in unit tests)."""


def thread_runner(job: Callable[[], None]) -> None:
    threading.Thread(target=job, name="kiosk-worker", daemon=True).start()


def inline_runner(job: Callable[[], None]) -> None:
    job()


@dataclass(frozen=True)
class Paged(Generic[T]):
    """One page of a list as a screen shows it: the rows, where it is, and whether there is more either way."""

    rows: tuple[T, ...]
    page: int
    pages: int
    page_label: str
    has_prev: bool
    has_next: bool


def paged(items: Sequence[T], page: int, per_page: int, *, label_when_empty: bool = True) -> Paged[T]:
    """Page `page` (clamped into range) of `items`, `per_page` rows each; there is always at least one page."""
    pages = max(1, math.ceil(len(items) / per_page))
    page = min(max(page, 0), pages - 1)
    label = text("common.page", page=page + 1, pages=pages) if items or label_when_empty else ""
    return Paged(tuple(items[page * per_page : (page + 1) * per_page]), page, pages, label, page > 0, page < pages - 1)
