"""Frames live only inside the verification window and are wiped when it closes or runs out."""

from __future__ import annotations

import numpy as np
import pytest

from terminal.frame_window import FrameWindow, WindowExpiredError
from tests.terminal.conftest import FakeClock


def _frame() -> tuple[np.ndarray, np.ndarray]:
    return np.full((480, 640, 3), 200, dtype=np.uint8), np.full((480, 640), 90, dtype=np.uint8)


def test_closing_the_window_wipes_every_frame() -> None:
    clock = FakeClock()
    rgb, ir = _frame()
    with FrameWindow(clock) as window:
        window.add(rgb, ir, None)
        assert len(window) == 1
        assert [len(f) for f in window] == [2]
    assert len(window) == 0
    assert not rgb.any()
    assert not ir.any()


def test_an_error_inside_the_window_still_wipes() -> None:
    rgb, ir = _frame()

    def verify() -> None:
        with FrameWindow(FakeClock()) as window:
            window.add(rgb, ir)
            raise RuntimeError("verification failed")

    with pytest.raises(RuntimeError):
        verify()
    assert not rgb.any()


def test_frames_after_the_deadline_are_wiped_and_refused() -> None:
    clock = FakeClock()
    window = FrameWindow(clock, max_seconds=5.0)
    kept, _ = _frame()
    window.add(kept)
    clock.advance(5.0)
    late, _ = _frame()
    with pytest.raises(WindowExpiredError):
        window.add(late)
    assert not late.any()
    assert not kept.any()
    with pytest.raises(WindowExpiredError):
        list(window)


def test_only_the_newest_frames_are_kept() -> None:
    window = FrameWindow(FakeClock(), max_frames=2)
    frames = [_frame()[0] for _ in range(3)]
    for f in frames:
        window.add(f)
    assert len(window) == 2
    assert window.frames_seen == 3
    assert not frames[0].any()
    assert frames[2].all()
