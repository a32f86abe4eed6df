"""The verification window: the only place camera frames live, and only while one verification runs.

Owns the rule "frames stay in memory only for the verification window and are then dropped" (issue 4 point 9;
China's 2025 face-recognition rules, PIPL): a `FrameWindow` is opened when a verification starts, frames (RGB, IR,
depth arrays) are added to it, and when the window closes — normally, on error, or because its time ran out — every
array it holds is overwritten with zeros and released. A frame added after the deadline is wiped at once and
refused (`WindowExpiredError`), so a stuck flow cannot keep collecting faces.

It must never copy a frame elsewhere, write one to disk, or log one; callers keep only derived values (scores,
decisions, template hashes) once the window closes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import TracebackType
from typing import Self

import numpy as np
from numpy.typing import NDArray

from protocol import Clock
from terminal.errors import TerminalError

logger = logging.getLogger(__name__)


class WindowExpiredError(TerminalError):
    """The verification window's time is up (or it was closed): start a new verification."""


def _wipe(array: NDArray[np.generic]) -> None:
    if array.flags.writeable:
        array.fill(0)


class FrameWindow:
    """Holds one verification's frames for at most `max_seconds` and `max_frames` (oldest wiped first)."""

    def __init__(self, clock: Clock, *, max_seconds: float = 15.0, max_frames: int = 30) -> None:
        if max_seconds <= 0 or max_frames < 1:
            raise ValueError("a verification window needs a positive duration and room for one frame")
        self._clock = clock
        self._deadline = clock.monotonic() + max_seconds
        self._max_frames = max_frames
        self._frames: list[tuple[NDArray[np.generic], ...]] = []
        self._closed = False
        self.frames_seen = 0

    @property
    def expired(self) -> bool:
        return self._closed or self._clock.monotonic() >= self._deadline

    def add(self, *arrays: NDArray[np.generic] | None) -> None:
        """Keep these arrays (one frame's RGB/IR/depth; None for an absent channel) until the window closes."""
        kept = tuple(a for a in arrays if a is not None)
        if self.expired:
            for array in kept:
                _wipe(array)
            self.close()
            raise WindowExpiredError("the verification window has closed; its frames were wiped")
        self._frames.append(kept)
        self.frames_seen += 1
        while len(self._frames) > self._max_frames:
            for array in self._frames.pop(0):
                _wipe(array)

    def __iter__(self) -> Iterator[tuple[NDArray[np.generic], ...]]:
        if self.expired:
            self.close()
            raise WindowExpiredError("the verification window has closed; its frames were wiped")
        return iter(list(self._frames))

    def __len__(self) -> int:
        return len(self._frames)

    def close(self) -> None:
        """Wipe and drop every frame. Idempotent."""
        for frame in self._frames:
            for array in frame:
                _wipe(array)
        self._frames.clear()
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
