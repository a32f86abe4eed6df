"""Fakes for the terminal's seams, built from plain functions (no patching): a scripted `UplinkLink`."""

from __future__ import annotations

import time
from collections.abc import Callable

from terminal.errors import NotConnectedError
from terminal.sync import Delivery, DeliveryState, PublishTicket
from tests.terminal.conftest import FakeClock

TOPIC = "yibao/v1/dev/SIM-0001/up"

Decision = Callable[[int, bytes], Delivery | None]
"""Given the publish index and payload: the final delivery state, or None for 'never acknowledged'."""


class ScriptedTicket:
    def __init__(self, final: Delivery | None, clock: FakeClock, *, time_passes: bool) -> None:
        self._final = final
        self._clock = clock
        self._time_passes = time_passes

    def poll(self) -> Delivery:
        return self._final or Delivery(DeliveryState.WAITING)

    def wait(self, timeout_s: float) -> Delivery:
        if self._final is None:
            if self._time_passes:
                self._clock.advance(timeout_s)  # waiting costs fake time only
            else:
                time.sleep(0.01)  # fake time stands still: the record waits until something else ends it
        return self.poll()


class ScriptedLink:
    """An `UplinkLink` whose broker answers are decided by a plain function."""

    def __init__(
        self, clock: FakeClock, decide: Decision | None = None, *, connected: bool = True, time_passes: bool = True
    ) -> None:
        self._clock = clock
        self._time_passes = time_passes
        self.decide: Decision = decide or (lambda i, p: Delivery(DeliveryState.ACKED))
        self.connected = connected
        self.published: list[bytes] = []
        self.wait_calls = 0
        self.fail_publish_with: Exception | None = None

    def start(self) -> None:
        """Nothing to start: the test scripts connectivity through `connected`."""

    def close(self) -> None:
        self.connected = False

    def is_connected(self) -> bool:
        return self.connected

    def wait_connected(self, timeout_s: float) -> bool:
        self.wait_calls += 1
        if not self.connected:
            time.sleep(timeout_s)
        return self.connected

    def publish(self, topic: str, payload: bytes) -> PublishTicket:
        assert topic == TOPIC
        if not self.connected:
            raise NotConnectedError("down")
        if self.fail_publish_with is not None:
            raise self.fail_publish_with
        index = len(self.published)
        self.published.append(payload)
        return ScriptedTicket(self.decide(index, payload), self._clock, time_passes=self._time_passes)
