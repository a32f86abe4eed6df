"""The terminal's device factory: turns `[devices]` and `[evoucher]` into opened drivers and the e-voucher adapter.

Owns `open_devices` (one backend per peripheral, chosen by the config's `backend` discriminator; every selected serial
port is opened here, at start-up), `KioskDevices` (the typed container the runtime holds and closes), the
`SimulatedPeerPeripheral` wrapper that keeps heartbeats honest when a real driver talks to one of our pty simulators,
`open_evoucher_platform` and `build_evoucher_service`, and `DeviceStartupError`.

A backend that the config selects but that cannot be opened stops start-up with a `DeviceStartupError` naming the
device and its port; it is never logged and skipped, because a kiosk that silently runs without its ID-card reader
turns citizens away with no trace of why. A device whose port opens but that does not answer is a different case:
it starts, and its driver reports it FAULT in every heartbeat until it answers.

This module must never import `hardware_sim` (the caller supplies the status-only stand-in for backend "simulated"),
never read a card or a code itself (the kiosk's use cases do, through the typed drivers), and never put a port's
bytes or any personal data in a message.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from pydantic import ValidationError

from drivers.camera import Camera, CameraError, OpenCvCamera
from drivers.card_reader import CardReaderError
from drivers.idcard import IdCardReader
from drivers.peripherals import Peripheral
from drivers.qr_scanner import QrScanner
from drivers.serial_link import PortUnavailableError, SerialLink
from drivers.sscard import DEFAULT_LAYOUT, SocialSecurityCardReader, SsCardLayout
from models.calibration import CalibrationError
from models.face import engine_from_store
from models.liveness import LivenessChecker
from models.manifest import ModelLoadError, ModelStore
from protocol import AuditEvent, Clock, PeripheralKind, PeripheralState, PeripheralStatus, SystemClock
from terminal.config import (
    DevicesConfig,
    EVoucherConfig,
    FaceConfig,
    OpenCvCameraConfig,
    SerialIdCardReaderConfig,
    SerialQrScannerConfig,
    SerialSsCardReaderConfig,
)
from terminal.errors import ConfigError, TerminalError
from terminal.evoucher import EventSink, EVoucherPlatform, EVoucherService, TerminalContext
from terminal.evoucher_http import HttpEVoucherPlatform
from terminal.face_templates import TemplateStore
from terminal.pharmacists import IdPhotoDecoder
from terminal.verification import FaceVerifier

logger = logging.getLogger(__name__)

ID_CARD_READER_NAME: Final = "idcard0"
SS_CARD_READER_NAME: Final = "sscard0"
QR_SCANNER_NAME: Final = "qr0"
CAMERA_NAME: Final = "camera0"
"""Names in heartbeats; the same as the stand-ins' so a device keeps its name when its backend changes."""

StandInFactory = Callable[[str, PeripheralKind], Peripheral]
"""Makes the status-only stand-in for a device whose backend is "simulated": (heartbeat name, kind) -> Peripheral.
The composition root passes one (e.g. `hardware_sim.SimulatedPeripheral`); it must report `simulated=True`."""


class DeviceStartupError(TerminalError):
    """A device the config selects could not be opened (or its settings file loaded); the terminal must not start.

    `device` is the config entry (e.g. 'id_card_reader'), `port` the serial port when there is one."""

    def __init__(self, device: str, port: str | None, reason: str) -> None:
        where = f"devices.{device}" + (f" on {port}" if port is not None else "")
        super().__init__(f"{where}: {reason}")
        self.device = device
        self.port = port


class SimulatedPeerPeripheral:
    """A real driver whose port (or camera source) leads to one of our simulators: its status says simulated=True.

    The driver's own status is passed through unchanged otherwise (state, and the reason when not OK); while OK, the
    detail names the port so an operator sees which simulator the device is talking to."""

    def __init__(self, driver: Peripheral, port: str) -> None:
        self._driver = driver
        self._port = port

    @property
    def name(self) -> str:
        return self._driver.name

    @property
    def kind(self) -> PeripheralKind:
        return self._driver.kind

    @property
    def driver(self) -> Peripheral:
        return self._driver

    def status(self) -> PeripheralStatus:
        status = self._driver.status()
        detail = status.detail
        if detail is None and status.state is PeripheralState.OK:
            detail = f"real driver, simulator at {self._port}"[:200]
        return status.model_copy(update={"simulated": True, "detail": detail})

    def __repr__(self) -> str:
        return f"SimulatedPeerPeripheral({self._driver!r}, port={self._port!r})"


@dataclass
class KioskDevices:
    """The kiosk's peripherals as the config chose them. A field is None when its backend is the status-only
    stand-in (nothing can be read from it; the kiosk must not offer that path). `peripherals` is what heartbeats
    report, one per device. `close()` releases every port; idempotent."""

    id_card_reader: IdCardReader | None
    ss_card_reader: SocialSecurityCardReader | None
    qr_scanner: QrScanner | None
    camera: Camera | None
    peripherals: list[Peripheral] = field(default_factory=list)
    id_photo_decoder: IdPhotoDecoder | None = None
    """The reader vendor's WLT photo decoder (`[devices.id_card_reader] photo_decoder`), for 人证比对."""

    def close(self) -> None:
        for driver in (self.id_card_reader, self.ss_card_reader, self.qr_scanner, self.camera):
            if driver is not None:
                driver.close()


def _open_link(device: str, port: str, baudrate: int) -> SerialLink:
    link = SerialLink(port, baudrate=baudrate)
    try:
        link.open()
    except PortUnavailableError as exc:
        raise DeviceStartupError(device, port, f"cannot open the serial port ({exc.__cause__ or exc})") from exc
    return link


def _reported(driver: Peripheral, port: str, simulated_peer: bool) -> Peripheral:
    return SimulatedPeerPeripheral(driver, port) if simulated_peer else driver


def load_ss_layout(config: SerialSsCardReaderConfig) -> SsCardLayout:
    """The SS-card reader's layout: the JSON file the config names, else the built-in MOHRSS default."""
    if config.layout is None:
        return DEFAULT_LAYOUT
    try:
        text = config.layout.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{config.layout}: cannot read the SS-card layout (devices.ss_card_reader.layout)") from exc
    try:
        return SsCardLayout.model_validate_json(text)
    except ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"{config.layout}: invalid SS-card layout: {fields}") from exc


def load_photo_decoder(spec: str) -> IdPhotoDecoder:
    """The callable named by 'package.module:function' (the reader vendor's decoder); `DeviceStartupError` when it
    cannot be imported or is not callable, so a misconfigured kiosk stops at start rather than at the first
    enrolment."""
    module_name, _, attribute = spec.partition(":")
    try:
        decoder = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise DeviceStartupError("id_card_reader", spec, f"cannot load the photo decoder ({exc})") from exc
    if not callable(decoder):
        raise DeviceStartupError("id_card_reader", spec, "the photo decoder is not callable")
    checked: IdPhotoDecoder = decoder
    return checked


def open_devices(config: DevicesConfig, *, stand_in: StandInFactory) -> KioskDevices:
    """Open every device `config` selects; raises `DeviceStartupError` (or `ConfigError` for an unusable layout
    file) naming the device, after closing whatever it had opened already.

    Serial ports are opened now, not on first use: a QR scanner's bytes sent before its port is open are lost, and
    a missing reader must stop start-up rather than surface at the first citizen. The ID-card reader is also asked
    for its SAM status once, so the first heartbeat tells whether the module answers (a silent module does not stop
    start-up; its driver reports it FAULT until it answers)."""
    devices = KioskDevices(None, None, None, None)
    try:
        cam_cfg = config.camera
        if isinstance(cam_cfg, OpenCvCameraConfig):
            camera = OpenCvCamera(
                cam_cfg.rgb,
                ir=cam_cfg.ir,
                depth=cam_cfg.depth,
                name=CAMERA_NAME,
                width=cam_cfg.width,
                height=cam_cfg.height,
                read_timeout_s=cam_cfg.read_timeout_s,
            )
            try:
                camera.open()
            except CameraError as exc:
                raise DeviceStartupError("camera", str(cam_cfg.rgb), str(exc)) from exc
            devices.camera = camera
            camera_reported = _reported(camera, str(cam_cfg.rgb), cam_cfg.simulated_peer)
        else:
            camera_reported = stand_in(CAMERA_NAME, PeripheralKind.CAMERA)

        id_cfg = config.id_card_reader
        if isinstance(id_cfg, SerialIdCardReaderConfig):
            link = _open_link("id_card_reader", id_cfg.port, id_cfg.baudrate)
            id_reader = IdCardReader(link, name=ID_CARD_READER_NAME)
            devices.id_card_reader = id_reader
            # A failed probe is already in the reader's status (and logged once) by the driver.
            with contextlib.suppress(CardReaderError):
                id_reader.sam_status()
            id_reported = _reported(id_reader, id_cfg.port, id_cfg.simulated_peer)
            if id_cfg.photo_decoder is not None:
                devices.id_photo_decoder = load_photo_decoder(id_cfg.photo_decoder)
        else:
            id_reported = stand_in(ID_CARD_READER_NAME, PeripheralKind.ID_CARD_READER)

        ss_cfg = config.ss_card_reader
        if isinstance(ss_cfg, SerialSsCardReaderConfig):
            layout = load_ss_layout(ss_cfg)
            baudrate = ss_cfg.baudrate if ss_cfg.baudrate is not None else layout.frame.baudrate
            link = _open_link("ss_card_reader", ss_cfg.port, baudrate)
            ss_reader = SocialSecurityCardReader(link, layout, name=SS_CARD_READER_NAME)
            devices.ss_card_reader = ss_reader
            ss_reported = _reported(ss_reader, ss_cfg.port, ss_cfg.simulated_peer)
        else:
            ss_reported = stand_in(SS_CARD_READER_NAME, PeripheralKind.SS_CARD_READER)

        qr_cfg = config.qr_scanner
        if isinstance(qr_cfg, SerialQrScannerConfig):
            scanner_config = qr_cfg.scanner_config()
            link = _open_link("qr_scanner", qr_cfg.port, scanner_config.baudrate)
            scanner = QrScanner(link, scanner_config, name=QR_SCANNER_NAME)
            devices.qr_scanner = scanner
            qr_reported = _reported(scanner, qr_cfg.port, qr_cfg.simulated_peer)
        else:
            qr_reported = stand_in(QR_SCANNER_NAME, PeripheralKind.QR_SCANNER)
    except BaseException:
        devices.close()
        raise
    devices.peripherals = [camera_reported, qr_reported, id_reported, ss_reported]
    logger.info(
        "devices: %s",
        ", ".join(f"{name}={_backend(cfg)}" for name, cfg in config),
    )
    return devices


def _backend(entry: object) -> str:
    backend = getattr(entry, "backend", "?")
    peer = " (simulated peer)" if getattr(entry, "simulated_peer", False) else ""
    return f"{backend}{peer}"


# ---------------------------------------------------------------- e-voucher


def open_evoucher_platform(config: EVoucherConfig) -> HttpEVoucherPlatform | None:
    """The platform adapter `[evoucher]` selects, or None for platform 'none'. Nothing is sent yet: an unreachable
    platform is not a start-up failure but the offline policy at each scan (docs/evoucher.md)."""
    if config.platform == "none":
        return None
    if config.base_url is None:  # the config validator guarantees it; kept for the type checker without an assert
        raise ConfigError("evoucher.base_url: required for platform 'http'")
    return HttpEVoucherPlatform(config.base_url, timeout_s=config.timeout_s)


def build_evoucher_service(
    platform: EVoucherPlatform,
    config: EVoucherConfig,
    *,
    device_id: str,
    record: EventSink,
    clock: Clock | None = None,
) -> EVoucherService:
    """The kiosk's e-voucher service on `platform`, its audit events going to `record` (the runtime passes its
    outbox: `lambda e: runtime.record_audits([e])`)."""
    if config.org_code is None:
        raise ConfigError("evoucher.org_code: required when an e-voucher platform is used")
    return EVoucherService(
        platform=platform,
        context=TerminalContext(org_code=config.org_code, device_id=device_id),
        record=record,
        clock=clock if clock is not None else SystemClock(),
    )


# ---------------------------------------------------------------- face

FACE_MODELS: Final = ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "dlib_resnet_v1")
"""What `engine_from_store` loads; heartbeats report their sha256 prefixes."""


def open_face_verifier(
    config: FaceConfig,
    camera: Camera | None,
    *,
    template_key: bytes | None,
    record: Callable[[AuditEvent], object],
    clock: Clock,
    models: ModelStore | None = None,
) -> FaceVerifier:
    """The face verifier `[face]` asks for: verified models (manifest hashes, calibrated threshold), the liveness
    policy, the sealed gallery. `DeviceStartupError` when something it needs is missing: a real camera, the
    device's template key (an enrolled identity), a model or its threshold. Never falls back to no liveness or to
    a default threshold."""
    if camera is None:
        raise DeviceStartupError("camera", None, "[face] needs a real camera: set [devices.camera] backend = 'opencv'")
    if template_key is None:
        raise DeviceStartupError(
            "face", None, "face templates are sealed with the device's template key: enrol the device ([identity])"
        )
    store = models if models is not None else ModelStore()
    try:
        engine = engine_from_store(store)
        versions = {name: store.load(name).sha256[:16] for name in FACE_MODELS}  # loaded already: cached
    except (ModelLoadError, CalibrationError) as exc:
        raise DeviceStartupError("face", None, f"face models unusable: {exc}") from exc
    templates = TemplateStore(config.gallery, template_key, model_sha256=engine.embedder.model_sha256)
    stale = templates.stale_subjects()
    if stale:
        logger.warning("face gallery: %d templates were made by another model and must be enrolled again", len(stale))
    verifier = FaceVerifier(
        camera,
        engine,
        LivenessChecker(),
        templates,
        clock,
        window_s=config.window_s,
        challenge_steps=config.challenge_steps,
        always_challenge=config.always_challenge,
        challenge_window_s=config.challenge_window_s,
        record=record,
    )
    verifier.model_versions = versions
    return verifier
