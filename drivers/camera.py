"""The face camera: one RGB device with optional IR and depth devices, behind a small Protocol.

Owns the `Frame` the kiosk's identity flow consumes, the `Camera` Protocol (which is also a
`drivers.peripherals.Peripheral`, so the heartbeat reports the camera's health), the typed error tree
(`CameraError` → `CameraUnavailable`, `NoFrame`), the frame-quality fault classification the kiosk shows
(no frames, too dark, blurred, unplugged) and `OpenCvCamera`, the real driver over `cv2.VideoCapture`.

OpenCV speaks BGR; frames are converted to RGB exactly once, here. cv2 failures are translated into this module's
errors at the boundary. This module must never import `terminal`, `ui`, `models` or `hardware_sim`, and it never
writes a frame to disk or puts frame content in a log line (frames are personal data: PIPL, DESIGN.md §4).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
from numpy.typing import NDArray

from protocol import PeripheralKind, PeripheralState, PeripheralStatus

logger = logging.getLogger(__name__)

# The same array conventions as models.types (drivers and models may not import each other).
RgbImage = NDArray[np.uint8]
GrayImage = NDArray[np.uint8]
DepthImage = NDArray[np.uint16]

FRAME_WIDTH = 640
FRAME_HEIGHT = 480

DARK_P95_LUMA = 40.0
"""95th-percentile luma (0-255) below which a frame is too dark to verify a face in. A percentile, not the mean:
dim rooms and letterboxed pictures have low means yet a well-exposed face (measured: real frames ≥ 49)."""

BLUR_LAPLACIAN_VAR = 20.0
"""Variance of the Laplacian of the luma below which a frame is too blurred (measured on 640x480 frames)."""


class CameraError(Exception):
    """Base of every camera failure the driver reports."""


class CameraUnavailable(CameraError):  # noqa: N818 - the name the kiosk and the issue use for "unplugged"
    """The device cannot be opened or has gone away (unplugged, wrong index/path, permission)."""


class NoFrame(CameraError):  # noqa: N818 - a state of the stream (no frame arrived), named as such
    """The device is open but delivered no frame in time (read timeout, end of a file source)."""


class CameraFault(StrEnum):
    """What is wrong with the camera or its picture, in terms the kiosk can explain to a citizen or an admin."""

    NO_FRAMES = "no_frames"
    TOO_DARK = "too_dark"
    BLURRED = "blurred"
    UNPLUGGED = "unplugged"


@dataclass(frozen=True, slots=True)
class Frame:
    """One capture: RGB always, IR and depth when the camera has them; `t` in monotonic seconds."""

    rgb: RgbImage
    ir: GrayImage | None
    depth: DepthImage | None
    t: float
    index: int


@runtime_checkable
class Camera(Protocol):
    """A face camera; also a `Peripheral` (name, kind, status) so the heartbeat can report it."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> PeripheralKind: ...

    def open(self) -> None:
        """Open the device(s); raises `CameraUnavailable` when it cannot."""
        ...

    def close(self) -> None:
        """Release the device(s); idempotent."""
        ...

    def read(self) -> Frame:
        """The next frame; raises `NoFrame` on timeout, `CameraUnavailable` when the device is gone."""
        ...

    def status(self) -> PeripheralStatus:
        """Health as last seen by `open`/`read`; never touches the device."""
        ...


def luma(rgb: RgbImage) -> NDArray[np.uint8]:
    """ITU-R BT.601 luma of an RGB frame."""
    return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.uint8)


def classify_frame(rgb: RgbImage) -> CameraFault | None:
    """The picture fault of one RGB frame (too dark, blurred), or None when the picture is usable."""
    gray = luma(rgb)
    if float(np.percentile(gray[::4, ::4], 95)) < DARK_P95_LUMA:
        return CameraFault.TOO_DARK
    if float(cv2.Laplacian(gray, cv2.CV_64F).var()) < BLUR_LAPLACIAN_VAR:
        return CameraFault.BLURRED
    return None


def fault_of(error: CameraError) -> CameraFault:
    """The kiosk-facing fault for a driver error."""
    if isinstance(error, CameraUnavailable):
        return CameraFault.UNPLUGGED
    return CameraFault.NO_FRAMES


class CameraHealth:
    """The camera's availability as its owner (the reading thread) last saw it; thread-safe for the heartbeat.

    Logs once on entering a fault and once on recovery, never per frame.
    """

    def __init__(self, name: str, *, simulated: bool, degrade_after: int = 15) -> None:
        self._name = name
        self._simulated = simulated
        self._degrade_after = max(1, degrade_after)
        self._bad_frames = 0
        self._lock = threading.Lock()
        self._state = PeripheralState.ABSENT
        self._detail: str | None = "not opened"

    def ok(self) -> None:
        self._set(PeripheralState.OK, None)

    def fault(self, fault: CameraFault, detail: str | None = None) -> None:
        text = fault.value if detail is None else f"{fault.value}: {detail}"
        self._set(PeripheralState.FAULT, text[:200])

    def picture(self, fault: CameraFault | None) -> None:
        """A frame arrived; `fault` is its `classify_frame` verdict. The device works either way; the status turns
        DEGRADED only after `degrade_after` faulty frames in a row (an empty, plain scene for a moment is not a
        broken camera) and back to OK on the first good frame."""
        if fault is None:
            self._bad_frames = 0
            self.ok()
            return
        self._bad_frames += 1
        if self._bad_frames >= self._degrade_after:
            self._set(PeripheralState.DEGRADED, fault.value)
        elif self.status().state is not PeripheralState.DEGRADED:
            self.ok()

    def closed(self) -> None:
        self._set(PeripheralState.ABSENT, "closed")

    def status(self) -> PeripheralStatus:
        with self._lock:
            state, detail = self._state, self._detail
        return PeripheralStatus(
            name=self._name, kind=PeripheralKind.CAMERA, state=state, simulated=self._simulated, detail=detail
        )

    def _set(self, state: PeripheralState, detail: str | None) -> None:
        with self._lock:
            before = self._state
            self._state, self._detail = state, detail
        if state is PeripheralState.FAULT and before is not PeripheralState.FAULT:
            logger.warning("camera %s fault: %s", self._name, detail)
        elif state is PeripheralState.OK and before is PeripheralState.FAULT:
            logger.info("camera %s recovered", self._name)


Source = int | str | Path
"""A V4L2 device index, a device path such as /dev/video2, or a video file path."""


class Capture(Protocol):
    """The part of `cv2.VideoCapture` the driver uses: the seam tests use to script a device."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name

    def set(self, propId: int, value: float) -> bool: ...  # noqa: N803 - OpenCV's name

    def grab(self) -> bool: ...

    def retrieve(self) -> tuple[bool, Any]: ...

    def release(self) -> None: ...


CaptureFactory = Callable[[Source], Capture]


def _open_capture(source: Source) -> Capture:
    if isinstance(source, str | Path) and "%" in str(source):
        # A printf-style image sequence (recorded frames, e.g. 16-bit depth PNGs): OpenCV's image-sequence backend
        # keeps the samples' bit depth, where the default (FFmpeg) would render them as 8-bit BGR.
        return cv2.VideoCapture(str(source), cv2.CAP_IMAGES)
    return cv2.VideoCapture(str(source) if isinstance(source, Path) else source)


class OpenCvCamera:
    """An RGB camera with optional IR and depth devices, each a `cv2.VideoCapture` (index, device path or file).

    Frames are returned as delivered by the devices (640x480 is requested through CAP_PROP settings, which file
    sources ignore). IR frames are single-channel uint8; depth frames must arrive as 16-bit millimetres (the
    depth device is opened with RGB conversion off); anything else is a `CameraError`.
    """

    def __init__(
        self,
        rgb: Source,
        *,
        ir: Source | None = None,
        depth: Source | None = None,
        name: str = "camera0",
        width: int = FRAME_WIDTH,
        height: int = FRAME_HEIGHT,
        read_timeout_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
        capture_factory: CaptureFactory = _open_capture,
        degrade_after: int = 15,
    ) -> None:
        self._sources: dict[str, Source | None] = {"rgb": rgb, "ir": ir, "depth": depth}
        self._name = name
        self._size = (width, height)
        self._timeout_ms = max(1, round(read_timeout_s * 1000))
        self._monotonic = monotonic
        self._factory = capture_factory
        self._caps: dict[str, Capture] = {}
        self._index = 0
        self._health = CameraHealth(name, simulated=False, degrade_after=degrade_after)

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> PeripheralKind:
        return PeripheralKind.CAMERA

    def status(self) -> PeripheralStatus:
        return self._health.status()

    def open(self) -> None:
        if self._caps:
            return
        for role, source in self._sources.items():
            if source is None:
                continue
            try:
                cap = self._factory(source)
                opened = bool(cap.isOpened())
            except cv2.error as exc:
                self._release()
                self._health.fault(CameraFault.UNPLUGGED, f"{role} device cannot be opened")
                raise CameraUnavailable(f"{role} device {source!r} cannot be opened") from exc
            if not opened:
                cap.release()
                self._release()
                self._health.fault(CameraFault.UNPLUGGED, f"{role} device cannot be opened")
                raise CameraUnavailable(f"{role} device {source!r} cannot be opened")
            self._configure(role, cap)
            self._caps[role] = cap
        self._health.ok()

    def close(self) -> None:
        self._release()
        self._health.closed()

    def read(self) -> Frame:
        if not self._caps:
            raise CameraUnavailable(f"camera {self._name} is not open")
        try:
            # Latch every device first, decode after: keeps the RGB, IR and depth exposures close in time.
            for role in self._caps:
                self._latch(role)
            bgr = self._grab("rgb")
            if bgr.dtype != np.uint8:
                raise CameraError(f"RGB device delivered {bgr.dtype} frames, expected uint8")
            code = cv2.COLOR_GRAY2RGB if bgr.ndim == 2 else cv2.COLOR_BGR2RGB
            rgb: RgbImage = np.asarray(cv2.cvtColor(bgr, code), dtype=np.uint8)
            ir = self._ir() if "ir" in self._caps else None
            depth = self._depth() if "depth" in self._caps else None
        except NoFrame as exc:
            self._health.fault(CameraFault.NO_FRAMES, str(exc))
            raise
        except CameraError as exc:
            self._health.fault(fault_of(exc), str(exc))
            raise
        frame = Frame(rgb=rgb, ir=ir, depth=depth, t=self._monotonic(), index=self._index)
        self._index += 1
        self._health.picture(classify_frame(rgb))
        return frame

    def _configure(self, role: str, cap: Capture) -> None:
        # Requests only: file sources and some drivers ignore them, which is why frames are checked on read.
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, self._size[0])
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self._size[1])
        cap.set(cv2.CAP_PROP_READ_TIMEOUT_MSEC, self._timeout_ms)
        if role == "depth":
            # Keep the device's 16-bit samples instead of an 8-bit BGR rendering of them.
            cap.set(cv2.CAP_PROP_CONVERT_RGB, 0)

    def _latch(self, role: str) -> None:
        try:
            ok = self._caps[role].grab()
        except cv2.error as exc:
            raise CameraUnavailable(f"{role} device failed while reading") from exc
        if not ok:
            raise NoFrame(f"{role} device delivered no frame")

    def _grab(self, role: str) -> NDArray[Any]:
        cap = self._caps[role]
        try:
            ok, image = cap.retrieve()
        except cv2.error as exc:
            raise CameraUnavailable(f"{role} device failed while reading") from exc
        if not ok or image is None:
            raise NoFrame(f"{role} device delivered no frame")
        frame: NDArray[Any] = np.asarray(image)
        return frame

    def _ir(self) -> GrayImage:
        image = self._grab("ir")
        if image.dtype != np.uint8:
            raise CameraError(f"IR device delivered {image.dtype} frames, expected uint8")
        if image.ndim == 3:
            return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), dtype=np.uint8)
        return image.astype(np.uint8, copy=False)

    def _depth(self) -> DepthImage:
        image = self._grab("depth")
        if image.dtype != np.uint16:
            raise CameraError(f"depth device delivered {image.dtype} frames, expected 16-bit millimetres")
        if image.ndim == 3:
            image = image[:, :, 0]
        return np.ascontiguousarray(image, dtype=np.uint16)

    def _release(self) -> None:
        for cap in self._caps.values():
            cap.release()
        self._caps.clear()

    def __repr__(self) -> str:
        return f"OpenCvCamera(name={self._name!r}, state={self._health.status().state.value!r})"
