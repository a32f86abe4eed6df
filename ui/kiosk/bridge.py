"""Worker threads → the Kivy main thread: a queue drained on the Kivy clock.

Owns `MainThread`: `post(fn)` from any thread, `call(fn)` from a non-main thread waits for the result, and
`follow(observable, render)` subscribes a screen to a view-model so `render` always runs on the main thread (view-
models announce new states on whatever thread changed them). Only the main thread touches widgets (Kivy issues
#5575, #5202).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Final, TypeVar

from kivy.clock import Clock

from ui.viewmodels.base import Observable

logger = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S")
DRAIN_BUDGET: Final = 200
"""Jobs run per frame at most, so a burst from a worker cannot freeze a frame."""


class MainThread:
    def __init__(self, on_error: Callable[[BaseException], object] | None = None) -> None:
        self._on_error = on_error
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread = threading.current_thread()
        self._event = Clock.schedule_interval(self._drain, 0)

    def is_main(self) -> bool:
        return threading.current_thread() is self._thread

    def post(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def call(self, fn: Callable[[], T], timeout_s: float = 30.0) -> T:
        """Run `fn` on the main thread and return its result (from a worker thread only)."""
        if self.is_main():
            return fn()
        future: Future[T] = Future()

        def job() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:  # noqa: BLE001 - handed to the waiting thread, which raises it
                future.set_exception(exc)

        self.post(job)
        return future.result(timeout_s)

    def follow(self, observable: Observable[S], render: Callable[[S], None]) -> Callable[[], None]:
        """`render` every state of `observable` on the main thread (the latest one wins if several queue up)."""
        latest: list[S] = []
        lock = threading.Lock()

        def on_state(state: S) -> None:
            with lock:
                pending = bool(latest)
                latest[:] = [state]
            if not pending:
                self.post(flush)

        def flush() -> None:
            with lock:
                if not latest:
                    return
                state = latest.pop()
            render(state)

        return observable.subscribe(on_state)

    def _drain(self, _dt: float) -> None:
        for _ in range(DRAIN_BUDGET):
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            try:
                job()
            except Exception as exc:
                # Caught here, not in Kivy's loop: an exception out of an interval callback unschedules it, and
                # this queue must keep draining for the kiosk to recover.
                if self._on_error is None:
                    raise
                self._on_error(exc)

    def close(self) -> None:
        self._event.cancel()
