"""The OpenCV camera driver against a real video file and a missing device; frame-fault classification."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from drivers.camera import (
    Camera,
    CameraError,
    CameraFault,
    CameraUnavailable,
    NoFrame,
    OpenCvCamera,
    classify_frame,
    fault_of,
)
from drivers.peripherals import Peripheral
from protocol import PeripheralState
from tests.face_data import faces_dir


@pytest.fixture
def clip() -> Path:
    path = faces_dir() / "video" / "short_clip.mp4"
    assert path.is_file()
    return path


class Ticks:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.033
        return self.t


def test_a_video_file_camera_yields_rgb_frames(clip: Path) -> None:
    camera = OpenCvCamera(clip, monotonic=Ticks())
    assert isinstance(camera, Camera)
    assert isinstance(camera, Peripheral)
    assert camera.status().state is PeripheralState.ABSENT
    camera.open()
    try:
        frames = [camera.read() for _ in range(5)]
    finally:
        camera.close()
    reference = cv2.VideoCapture(str(clip))
    ok, bgr = reference.read()
    reference.release()
    assert ok
    first = frames[0]
    assert first.rgb.dtype == np.uint8
    assert first.rgb.shape == bgr.shape
    assert np.array_equal(first.rgb, bgr[:, :, ::-1])  # converted BGR -> RGB once, at the boundary
    assert first.ir is None
    assert first.depth is None
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert all(a.t < b.t for a, b in itertools.pairwise(frames))
    assert camera.status().state is PeripheralState.ABSENT


def test_status_is_ok_while_frames_flow(clip: Path) -> None:
    camera = OpenCvCamera(clip, name="camera7")
    camera.open()
    camera.read()
    status = camera.status()
    camera.close()
    assert (status.name, status.state, status.simulated, status.detail) == ("camera7", PeripheralState.OK, False, None)


def test_an_ir_device_delivers_single_channel_frames(clip: Path) -> None:
    camera = OpenCvCamera(clip, ir=clip)
    camera.open()
    frame = camera.read()
    camera.close()
    assert frame.ir is not None
    assert frame.ir.dtype == np.uint8
    assert frame.ir.shape == frame.rgb.shape[:2]


def test_an_eight_bit_depth_device_is_refused(clip: Path) -> None:
    camera = OpenCvCamera(clip, depth=clip)
    camera.open()
    with pytest.raises(CameraError, match="16-bit"):
        camera.read()
    camera.close()


def test_a_missing_device_is_unavailable(tmp_path: Path) -> None:
    camera = OpenCvCamera(tmp_path / "no-such-camera.mp4")
    with pytest.raises(CameraUnavailable):
        camera.open()
    status = camera.status()
    assert status.state is PeripheralState.FAULT
    assert status.detail is not None
    assert status.detail.startswith("unplugged")
    with pytest.raises(CameraUnavailable, match="not open"):
        camera.read()


def test_a_missing_ir_device_fails_the_whole_open(clip: Path, tmp_path: Path) -> None:
    camera = OpenCvCamera(clip, ir=tmp_path / "nope.mp4")
    with pytest.raises(CameraUnavailable, match="ir device"):
        camera.open()


def test_the_end_of_a_file_is_no_frame(clip: Path) -> None:
    camera = OpenCvCamera(clip)
    camera.open()
    count = 0
    for _ in range(10_000):
        try:
            camera.read()
        except NoFrame:
            break
        count += 1
    status = camera.status()
    camera.close()
    assert count > 100
    assert status.state is PeripheralState.FAULT
    assert status.detail is not None
    assert status.detail.startswith("no_frames")
    assert fault_of(NoFrame("x")) is CameraFault.NO_FRAMES
    assert fault_of(CameraUnavailable("x")) is CameraFault.UNPLUGGED


def test_frame_faults_are_classified(clip: Path) -> None:
    cap = cv2.VideoCapture(str(clip))
    for _ in range(60):
        ok, bgr = cap.read()
    cap.release()
    assert ok
    rgb = np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)
    assert classify_frame(rgb) is None
    assert classify_frame((rgb // 10).astype(np.uint8)) is CameraFault.TOO_DARK
    assert classify_frame(np.asarray(cv2.GaussianBlur(rgb, (0, 0), 6.0), dtype=np.uint8)) is CameraFault.BLURRED


class ScriptedCapture:
    """A device that plays a list of frames (None = no frame) and can be unplugged mid-stream."""

    def __init__(self, frames: list[NDArray[np.uint8] | None]) -> None:
        self.frames = frames
        self.unplugged = False
        self.released = False
        self._current: NDArray[np.uint8] | None = None

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return True

    def set(self, propId: int, value: float) -> bool:  # noqa: N803 - OpenCV's name
        return True

    def grab(self) -> bool:
        if self.unplugged:
            raise cv2.error("device gone")
        self._current = self.frames.pop(0) if self.frames else None
        return self._current is not None

    def retrieve(self) -> tuple[bool, NDArray[np.uint8] | None]:
        return self._current is not None, self._current

    def release(self) -> None:
        self.released = True


def test_picture_faults_degrade_the_status_only_when_they_persist(clip: Path) -> None:
    cap = cv2.VideoCapture(str(clip))
    for _ in range(60):
        ok, frame = cap.read()
    cap.release()
    assert ok
    good: NDArray[np.uint8] = np.asarray(frame, dtype=np.uint8)
    dark = (good // 10).astype(np.uint8)
    device = ScriptedCapture([dark, dark, dark, good, dark])
    camera = OpenCvCamera(0, capture_factory=lambda _source: device, degrade_after=3)
    camera.open()
    states = []
    for _ in range(5):
        camera.read()
        states.append(camera.status().state)
    assert states == [
        PeripheralState.OK,
        PeripheralState.OK,
        PeripheralState.DEGRADED,
        PeripheralState.OK,
        PeripheralState.OK,
    ]
    device.frames = [dark] * 3
    for _ in range(3):
        camera.read()
    assert camera.status().detail == "too_dark"
    device.unplugged = True
    with pytest.raises(CameraUnavailable):
        camera.read()
    assert camera.status().state is PeripheralState.FAULT
    camera.close()
    assert device.released


def test_a_sixteen_bit_depth_device_delivers_millimetres(clip: Path, tmp_path: Path) -> None:
    # A 16-bit PNG sequence stands in for a depth device: OpenCV's image-sequence backend keeps the 16-bit samples
    # when RGB conversion is off, as a depth camera's V4L2 Y16 stream does.
    expected = (np.arange(480 * 640, dtype=np.uint32).reshape(480, 640) % 4000 + 300).astype(np.uint16)
    for i in range(3):
        assert cv2.imwrite(str(tmp_path / f"depth_{i:03d}.png"), expected)
    camera = OpenCvCamera(clip, depth=str(tmp_path / "depth_%03d.png"))
    camera.open()
    try:
        frame = camera.read()
    finally:
        camera.close()
    assert frame.depth is not None
    assert frame.depth.dtype == np.uint16
    np.testing.assert_array_equal(frame.depth, expected)
