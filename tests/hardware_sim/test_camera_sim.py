"""The simulated RGB+IR+depth camera: real sources, synthetic sensors per presentation, faults, motion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from drivers.camera import Camera, CameraFault, CameraUnavailable, NoFrame, classify_frame
from drivers.peripherals import Peripheral
from hardware_sim.camera_sim import Presentation, SimulatedCamera
from models.liveness import Challenge, DepthSignal, yaw_proxy
from models.types import FaceDetector
from protocol import PeripheralState
from tests.face_data import faces_dir
from yibao.pad_harness import make_detector


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return make_detector("mtcnn")


@pytest.fixture
def stills() -> list[Path]:
    root = faces_dir()
    return [root / "obama" / "obama_a.jpg", root / "biden" / "biden_b.jpg"]


def test_plays_stills_and_video_at_640x480_with_ir_and_depth(stills: list[Path], detector: FaceDetector) -> None:
    camera = SimulatedCamera([*stills, faces_dir() / "video" / "short_clip.mp4"], detector, frames_per_still=2)
    assert isinstance(camera, Camera)
    assert isinstance(camera, Peripheral)
    camera.open()
    frames = [camera.read() for _ in range(7)]
    camera.close()
    for frame in frames:
        assert frame.rgb.shape == (480, 640, 3)
        assert frame.rgb.dtype == np.uint8
        assert frame.ir is not None
        assert frame.ir.shape == (480, 640)
        assert frame.ir.dtype == np.uint8
        assert frame.depth is not None
        assert frame.depth.shape == (480, 640)
        assert frame.depth.dtype == np.uint16
    assert [f.index for f in frames] == list(range(7))
    assert np.array_equal(frames[0].rgb, frames[1].rgb)  # a still is held frames_per_still reads
    assert not np.array_equal(frames[1].rgb, frames[2].rgb)
    assert not np.array_equal(frames[4].rgb, frames[5].rgb)  # video frames move
    assert camera.status().simulated


def test_the_same_seed_gives_the_same_frames(stills: list[Path], detector: FaceDetector) -> None:
    def first(seed: int) -> tuple[NDArray[np.uint8], NDArray[np.uint16]]:
        camera = SimulatedCamera(stills, detector, seed=seed, presentation=Presentation.PRINT)
        camera.open()
        frame = camera.read()
        camera.close()
        assert frame.ir is not None
        assert frame.depth is not None
        return frame.ir, frame.depth

    a, b, c = first(5), first(5), first(6)
    assert np.array_equal(a[0], b[0])
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_presentations_differ_where_the_sensors_say_they_should(stills: list[Path], detector: FaceDetector) -> None:
    camera = SimulatedCamera(stills[:1], detector, seed=1)
    camera.open()
    det = detector.detect(camera.read().rgb)[0]
    measures = {}
    for presentation in Presentation:
        camera.set_presentation(presentation)
        frame = camera.read()
        assert frame.depth is not None
        assert frame.ir is not None
        x0, y0, x1, y1 = (int(v) for v in det.box)
        measures[presentation] = (
            DepthSignal().score(frame.depth, det).measures["rms_mm"],
            float(np.subtract(*np.percentile(frame.ir[y0:y1, x0:x1], [75, 25]))),
        )
    camera.close()
    flat_mm = 3.0
    assert measures[Presentation.BONA_FIDE][0] > 2 * flat_mm
    assert measures[Presentation.MASK][0] > 2 * flat_mm
    assert measures[Presentation.PRINT][0] < flat_mm
    assert measures[Presentation.SCREEN_REPLAY][0] < flat_mm
    # A screen shows no face in IR: nothing but sensor noise (and maybe the LED's reflection) in the face box.
    assert measures[Presentation.SCREEN_REPLAY][1] < measures[Presentation.BONA_FIDE][1] / 3


def test_faults_are_injected_and_cleared_at_run_time(stills: list[Path], detector: FaceDetector) -> None:
    camera = SimulatedCamera(stills, detector, degrade_after=2)
    camera.open()
    assert classify_frame(camera.read().rgb) is None
    assert camera.status().state is PeripheralState.OK

    camera.inject_fault(CameraFault.NO_FRAMES)
    with pytest.raises(NoFrame):
        camera.read()
    assert camera.status().state is PeripheralState.FAULT
    camera.clear_fault(CameraFault.NO_FRAMES)
    camera.read()
    assert camera.status().state is PeripheralState.OK

    camera.inject_fault(CameraFault.TOO_DARK)
    assert classify_frame(camera.read().rgb) is CameraFault.TOO_DARK
    assert camera.status().state is PeripheralState.OK  # one dark frame is not yet a degraded camera
    assert classify_frame(camera.read().rgb) is CameraFault.TOO_DARK
    assert camera.status().state is PeripheralState.DEGRADED
    assert camera.status().detail == "too_dark"
    camera.clear_fault()
    camera.inject_fault(CameraFault.BLURRED)
    assert classify_frame(camera.read().rgb) is CameraFault.BLURRED
    camera.clear_fault()

    camera.inject_fault(CameraFault.UNPLUGGED)
    with pytest.raises(CameraUnavailable):
        camera.read()
    assert camera.status().state is PeripheralState.FAULT
    camera.close()
    with pytest.raises(CameraUnavailable):
        camera.open()
    camera.clear_fault(CameraFault.UNPLUGGED)
    camera.open()
    assert camera.read().rgb.shape == (480, 640, 3)
    camera.close()


def test_a_live_subject_turns_when_asked_and_a_print_does_not(stills: list[Path], detector: FaceDetector) -> None:
    def yaw_after_asking(presentation: Presentation) -> tuple[float, float]:
        camera = SimulatedCamera(stills[:1], detector, presentation=presentation, motion_frames=3, seed=2)
        camera.open()
        before = yaw_proxy(detector.detect(camera.read().rgb)[0])
        camera.perform(Challenge.TURN_LEFT)
        frames = [camera.read() for _ in range(3)]
        camera.close()
        return before, yaw_proxy(detector.detect(frames[-1].rgb)[0])

    live_before, live_after = yaw_after_asking(Presentation.BONA_FIDE)
    assert live_after - live_before > 0.12  # the subject's left: the nose moves toward the image's right
    print_before, print_after = yaw_after_asking(Presentation.PRINT)
    assert abs(print_after - print_before) < 0.05


def test_bad_sources_are_refused(tmp_path: Path, detector: FaceDetector) -> None:
    with pytest.raises(ValueError, match="at least one"):
        SimulatedCamera([], detector).open()
    with pytest.raises(ValueError, match="not found"):
        SimulatedCamera([tmp_path / "missing.jpg"], detector).open()
    with pytest.raises(ValueError, match="unsupported"):
        SimulatedCamera([tmp_path / "notes.txt"], detector).open()


def test_another_person_steps_in_front_of_the_camera(stills: list[Path], detector: FaceDetector) -> None:
    first, second = stills[0], stills[-1]
    camera = SimulatedCamera([first], detector, seed=3)
    camera.open()
    try:
        before = camera.read().rgb
        camera.present_person([second], Presentation.PRINT)
        assert camera.presentation is Presentation.PRINT
        after = camera.read()
        assert not np.array_equal(after.rgb, before)
        assert after.ir is not None  # still a full RGB + IR + depth frame
    finally:
        camera.close()
