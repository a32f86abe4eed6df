"""The injected time source.

Everything that waits, times out or stamps a record takes a `Clock` so tests can advance time instead of sleeping
(idle timeouts, heartbeat timeouts, retry back-off). Production code must never call `time.time()` or
`datetime.now()` directly where a clock is available.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Wall-clock and monotonic time, injectable."""

    def now(self) -> datetime:
        """Current wall-clock time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (not related to wall time)."""
        ...

    def monotonic_ns(self) -> int:
        """The monotonic clock in nanoseconds."""
        ...


class SystemClock:
    """The real clocks of this machine."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()
