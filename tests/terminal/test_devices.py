"""The device factory: `[devices]` turns into the real serial drivers talking byte for byte to the pty simulators (or
the status-only stand-ins), a port that cannot be opened stops start-up naming the device, heartbeats stay honest
about simulated peers, and the e-voucher service built from `[evoucher]` records into the runtime's outbox."""

from __future__ import annotations

import json
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drivers.card_reader import ReaderUnavailableError
from drivers.idcard import IdCardReader
from drivers.sscard import DEFAULT_LAYOUT
from hardware_sim import SimulatedPeripheral, start_kiosk_simulators
from hardware_sim.evoucher import synthetic_insured
from hardware_sim.idcard_sim import IdCardSimulator, synthetic_card
from hardware_sim.kiosk_rig import KioskSimulatorRig
from hardware_sim.pty_device import PtyDevice
from hardware_sim.sscard_sim import SsCardSimulator, synthetic_ss_card
from models.types import RgbImage
from protocol import PeripheralKind, PeripheralState, PeripheralStatus, decode_envelope
from terminal.config import DevicesConfig, TerminalConfig, parse_terminal_config
from terminal.devices import (
    DeviceStartupError,
    KioskDevices,
    SimulatedPeerPeripheral,
    open_devices,
    open_evoucher_platform,
)
from terminal.errors import ConfigError
from terminal.evoucher import (
    BusinessType,
    ConsumeReceipt,
    EVoucherAccepted,
    EVoucherIdentity,
    EVoucherRefused,
    RefusalReason,
    TerminalContext,
)
from terminal.runtime import TerminalRuntime, build_runtime
from tests.face_data import faces_dir
from tests.terminal.conftest import FakeClock, terminal_raw_config
from tests.terminal.fakes import ScriptedLink


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KioskSimulatorRig]:
    with start_kiosk_simulators(tmp_path_factory.mktemp("rig"), seed=3) as running:
        yield running


def config_with(tmp_path: Path, toml: str = "", **raw_tables: Any) -> TerminalConfig:
    raw = terminal_raw_config(tmp_path)
    raw.update(tomllib.loads(toml))
    raw.update(raw_tables)
    return parse_terminal_config(raw, source="test.toml", base_dir=tmp_path)


def statuses(devices: KioskDevices) -> dict[str, PeripheralStatus]:
    return {p.name: p.status() for p in devices.peripherals}


def test_real_drivers_read_through_the_factory_from_the_pty_simulators(rig: KioskSimulatorRig, tmp_path: Path) -> None:
    config = config_with(tmp_path, rig.terminal_toml())
    devices = open_devices(config.devices, stand_in=SimulatedPeripheral)
    try:
        assert devices.id_card_reader is not None
        assert devices.ss_card_reader is not None
        assert devices.qr_scanner is not None
        id_card = devices.id_card_reader.read_card(timeout_s=3)
        assert id_card.id_number == synthetic_card(3).id_number
        ss_card = devices.ss_card_reader.read_card(timeout_s=3)
        assert ss_card.card_number == synthetic_ss_card(3).card_number
        assert ss_card.ss_number == id_card.id_number
        rig.qr_scanner.scan("EC-DEMO-0123456789abcdef")
        assert devices.qr_scanner.read_code(timeout_s=3).text == "EC-DEMO-0123456789abcdef"

        seen = statuses(devices)
        assert sorted(seen) == ["camera0", "idcard0", "qr0", "sscard0"]
        for name, port in (("idcard0", rig.id_card_pty.path), ("sscard0", rig.ss_card_pty.path)):
            assert seen[name].state is PeripheralState.OK
            assert seen[name].simulated is True, "a real driver on a pty simulator must not pass for hardware"
            assert port in (seen[name].detail or "")
        assert seen["qr0"].simulated is True
        assert seen["camera0"].detail is None  # the status-only stand-in, not a driver
        # the start-up probe went over the wire to the simulated SAM module
        assert any(c is not None and c.name == "SAM_STATUS" for c in rig.id_card.commands)
    finally:
        devices.close()


def test_a_driver_fault_shows_through_the_simulated_peer_wrapper(tmp_path: Path) -> None:
    sim = IdCardSimulator(synthetic_card(1))
    with PtyDevice(sim, link_path=tmp_path / "idcard") as pty:
        entry = {"backend": "serial", "port": pty.path, "simulated_peer": True}
        config = config_with(tmp_path, devices={"id_card_reader": entry})
        devices = open_devices(config.devices, stand_in=SimulatedPeripheral)
        try:
            pty.unplug()
            reader = devices.id_card_reader
            assert reader is not None
            with pytest.raises(ReaderUnavailableError):
                reader.read_card(timeout_s=0.5)
            status = statuses(devices)["idcard0"]
            assert status.state is PeripheralState.ABSENT
            assert status.simulated is True
            assert "ReaderUnavailableError" in (status.detail or "")
        finally:
            devices.close()


def test_a_real_peer_reports_simulated_false(tmp_path: Path) -> None:
    with PtyDevice(SsCardSimulator(synthetic_ss_card(2)), link_path=tmp_path / "sscard") as pty:
        config = config_with(tmp_path, devices={"ss_card_reader": {"backend": "serial", "port": pty.path}})
        devices = open_devices(config.devices, stand_in=SimulatedPeripheral)
        try:
            status = statuses(devices)["sscard0"]
            assert (status.state, status.simulated, status.detail) == (PeripheralState.OK, False, None)
            assert not isinstance(devices.peripherals[3], SimulatedPeerPeripheral)
        finally:
            devices.close()


def test_default_config_gives_status_only_stand_ins(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    assert config.devices == DevicesConfig()
    devices = open_devices(config.devices, stand_in=SimulatedPeripheral)
    assert (devices.id_card_reader, devices.ss_card_reader, devices.qr_scanner) == (None, None, None)
    seen = statuses(devices)
    assert {s.kind for s in seen.values()} == {
        PeripheralKind.CAMERA,
        PeripheralKind.QR_SCANNER,
        PeripheralKind.ID_CARD_READER,
        PeripheralKind.SS_CARD_READER,
    }
    assert all(s.simulated and s.state is PeripheralState.OK for s in seen.values())
    devices.close()


def test_a_missing_port_stops_start_up_naming_device_and_port(tmp_path: Path) -> None:
    missing = str(tmp_path / "ttyUSB-nothing")
    sim = IdCardSimulator(synthetic_card(1))
    with PtyDevice(sim, link_path=tmp_path / "idcard") as pty:
        config = config_with(
            tmp_path,
            devices={
                "id_card_reader": {"backend": "serial", "port": pty.path},
                "qr_scanner": {"backend": "serial", "port": missing, "suffix": "crlf"},
            },
        )
        with pytest.raises(DeviceStartupError) as info:
            open_devices(config.devices, stand_in=SimulatedPeripheral)
    assert info.value.device == "qr_scanner"
    assert info.value.port == missing
    assert str(info.value).startswith(f"devices.qr_scanner on {missing}: cannot open the serial port")


def test_ss_layout_file_is_loaded_relative_to_the_config_and_refused_when_invalid(tmp_path: Path) -> None:
    layout = DEFAULT_LAYOUT.model_copy(update={"name": "vendor-x"})
    (tmp_path / "layout.json").write_text(layout.model_dump_json(), encoding="utf-8")
    sim = SsCardSimulator(synthetic_ss_card(5), layout)
    with PtyDevice(sim, link_path=tmp_path / "sscard") as pty:
        entry = {"backend": "serial", "port": pty.path, "layout": "layout.json"}
        config = config_with(tmp_path, devices={"ss_card_reader": entry})
        devices = open_devices(config.devices, stand_in=SimulatedPeripheral)
        try:
            assert devices.ss_card_reader is not None
            assert devices.ss_card_reader.layout.name == "vendor-x"
            assert devices.ss_card_reader.read_card(timeout_s=3).card_number == synthetic_ss_card(5).card_number
        finally:
            devices.close()

        broken = json.loads(layout.model_dump_json())
        broken["fields"]["name"]["encoding"] = "ebcdic"
        (tmp_path / "bad.json").write_text(json.dumps(broken), encoding="utf-8")
        config = config_with(tmp_path, devices={"ss_card_reader": {**entry, "layout": "bad.json"}})
        with pytest.raises(ConfigError, match=r"bad\.json: invalid SS-card layout: fields\.name\.encoding"):
            open_devices(config.devices, stand_in=SimulatedPeripheral)
        config = config_with(tmp_path, devices={"ss_card_reader": {**entry, "layout": "absent.json"}})
        with pytest.raises(ConfigError, match=r"absent\.json: cannot read"):
            open_devices(config.devices, stand_in=SimulatedPeripheral)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _outbox_audits(runtime: TerminalRuntime) -> list[tuple[dict[str, Any], bytes]]:
    records = runtime.outbox.claim()
    audits = []
    for record in records:
        envelope = decode_envelope(record.wire)
        if envelope.payload.type == "audit_event":
            audits.append((envelope.payload.model_dump(mode="json"), record.wire))
    return audits


def test_an_offline_refusal_lands_in_the_outbox_without_the_code(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    evoucher = {"platform": "http", "base_url": dead, "org_code": "H32058300001", "timeout_s": 1.0}
    config = config_with(tmp_path, evoucher=evoucher)
    clock = FakeClock()
    runtime = build_runtime(
        config,
        open_devices(config.devices, stand_in=SimulatedPeripheral),
        clock,
        link=ScriptedLink(clock),
        evoucher_platform=open_evoucher_platform(config.evoucher),
    )
    try:
        assert runtime.evoucher is not None
        code = "ECQR1234567890abcdefSECRETPART"
        outcome = runtime.evoucher.verify(code, source="scanner")
        assert isinstance(outcome, EVoucherRefused)
        assert outcome.reason is RefusalReason.OFFLINE
        audits = _outbox_audits(runtime)
        refused = [payload for payload, _ in audits if payload["action"] == "evoucher.decode.refused"]
        assert len(refused) == 1
        assert refused[0]["detail"]["reason"] == "offline"
        assert refused[0]["detail"]["offline"] is True
        assert all(code.encode() not in wire and b"SECRETPART" not in wire for _, wire in audits)
    finally:
        runtime.stop()


def test_an_accepted_code_from_the_rig_platform_is_recorded(rig: KioskSimulatorRig, tmp_path: Path) -> None:
    config = config_with(tmp_path, rig.terminal_toml())
    person = synthetic_insured(1, seed=9)[0]
    account = rig.evoucher.enrol(person)
    clock = FakeClock()
    runtime = build_runtime(
        config,
        open_devices(config.devices, stand_in=SimulatedPeripheral),
        clock,
        link=ScriptedLink(clock),
        evoucher_platform=open_evoucher_platform(config.evoucher),
    )
    try:
        assert runtime.devices is not None
        assert runtime.devices.qr_scanner is not None
        assert runtime.evoucher is not None
        # the whole path: the code goes through the scanner simulator, the real driver, then the HTTP platform
        rig.qr_scanner.scan(rig.evoucher.issue_code(account))
        scanned = runtime.devices.qr_scanner.read_code(timeout_s=3)
        outcome = runtime.evoucher.verify(scanned.text, source="scanner")
        assert isinstance(outcome, EVoucherAccepted)
        assert outcome.identity.id_number == person.id_number
        actions = [payload["action"] for payload, _ in _outbox_audits(runtime)]
        assert actions == ["evoucher.decode.accepted"]
    finally:
        runtime.stop()


class _RecordingPlatform:
    def __init__(self) -> None:
        self.closed = 0

    def decode(self, code: str, context: TerminalContext) -> EVoucherIdentity:
        raise AssertionError("the runtime must not call the platform in this test")

    def consume(self, ec_token: str, business: BusinessType, context: TerminalContext) -> ConsumeReceipt:
        raise AssertionError("the runtime must not call the platform in this test")

    def close(self) -> None:
        self.closed += 1


class _RecordingLink:
    """A ByteLink that only remembers being closed."""

    def __init__(self) -> None:
        self.closed = 0

    @property
    def port(self) -> str:
        return "/dev/null-link"

    def open(self) -> None:
        return None

    def write(self, data: bytes) -> None:
        return None

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        return b""

    def discard_input(self) -> None:
        return None

    def close(self) -> None:
        self.closed += 1


def test_the_runtime_closes_devices_and_platform_on_stop_and_on_a_failed_build(tmp_path: Path) -> None:
    evoucher = {"platform": "http", "base_url": "http://127.0.0.1:9", "org_code": "H1"}
    config = config_with(tmp_path, evoucher=evoucher)
    clock = FakeClock()

    def devices(link: _RecordingLink) -> KioskDevices:
        reader = IdCardReader(link)
        camera = SimulatedPeripheral("camera0", PeripheralKind.CAMERA)
        return KioskDevices(reader, None, None, None, [camera, reader])

    link, platform = _RecordingLink(), _RecordingPlatform()
    runtime = build_runtime(config, devices(link), clock, link=ScriptedLink(clock), evoucher_platform=platform)
    assert runtime.evoucher is not None
    assert runtime.evoucher.context.org_code == "H1"
    runtime.stop()
    assert (link.closed, platform.closed) == (1, 1)

    # a duplicate peripheral name makes the build fail: what was handed over is released all the same
    link, platform = _RecordingLink(), _RecordingPlatform()
    kiosk = devices(link)
    kiosk.peripherals.append(kiosk.peripherals[0])
    with pytest.raises(ValueError, match="camera0"):
        build_runtime(config, kiosk, clock, link=ScriptedLink(clock), evoucher_platform=platform)
    assert (link.closed, platform.closed) == (1, 1)


def test_the_opencv_camera_backend_reads_real_frames_and_reports_its_source(tmp_path: Path) -> None:
    video = faces_dir() / "video" / "short_clip.mp4"
    config = config_with(tmp_path, f'[devices.camera]\nbackend = "opencv"\nrgb = "{video}"\nsimulated_peer = true\n')
    devices = open_devices(config.devices, stand_in=SimulatedPeripheral)
    try:
        assert devices.camera is not None
        frame = devices.camera.read()
        assert frame.rgb.ndim == 3
        assert frame.rgb.shape[2] == 3
        assert frame.ir is None
        assert frame.depth is None
        camera_status = statuses(devices)["camera0"]
        assert camera_status.simulated is True
        assert str(video) in (camera_status.detail or "")
    finally:
        devices.close()


def test_a_missing_camera_stops_start_up_naming_the_source(tmp_path: Path) -> None:
    config = config_with(tmp_path, '[devices.camera]\nbackend = "opencv"\nrgb = "/dev/video-nonexistent"\n')
    with pytest.raises(DeviceStartupError, match=r"devices\.camera on /dev/video-nonexistent"):
        open_devices(config.devices, stand_in=SimulatedPeripheral)


def test_camera_config_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="camera"):
        config_with(tmp_path, '[devices.camera]\nbackend = "opencv"\n')  # no rgb source
    with pytest.raises(ConfigError, match="camera"):
        config_with(tmp_path, '[devices.camera]\nbackend = "opencv"\nrgb = 0\nfps = 30\n')  # unknown key


def _face_config(tmp_path: Path, *, camera: bool = True) -> TerminalConfig:
    video = faces_dir() / "video" / "short_clip.mp4"
    toml = '[face]\ngallery = "gallery.sqlite3"\nwindow_s = 3.0\n'
    if camera:
        toml += f'[devices.camera]\nbackend = "opencv"\nrgb = "{video}"\nsimulated_peer = true\n'
    return config_with(tmp_path, toml)


def test_face_section_builds_a_verifier_on_the_real_camera_and_records_into_the_outbox(tmp_path: Path) -> None:
    config = _face_config(tmp_path)
    assert config.face is not None
    assert config.face.gallery == tmp_path / "gallery.sqlite3"
    clock = FakeClock()
    devices = open_devices(config.devices, stand_in=SimulatedPeripheral)
    runtime = build_runtime(config, devices, clock, link=ScriptedLink(clock), template_key=bytes(range(16)))
    try:
        assert runtime.face is not None
        versions = runtime.heartbeat().model_versions
        assert sorted(versions) == ["dlib_resnet_v1", "mtcnn_onet", "mtcnn_pnet", "mtcnn_rnet"]
        assert versions["dlib_resnet_v1"] == runtime.face.engine.embedder.model_sha256[:16]
        decision = runtime.face.identify()  # an empty gallery: nothing to match against, said so
        assert decision.outcome.value == "not_enrolled"
        identity = [a for a, _ in _outbox_audits(runtime) if a["category"] == "identity"]
        assert [(a["action"], a["outcome"], a["detail"]["decision"]) for a in identity] == [
            ("face_1toN", "failure", "not_enrolled")
        ]
    finally:
        runtime.stop()
    assert (tmp_path / "gallery.sqlite3").exists()


def test_face_section_without_camera_or_enrolment_stops_start_up(tmp_path: Path) -> None:
    clock = FakeClock()
    no_camera = _face_config(tmp_path, camera=False)
    devices = open_devices(no_camera.devices, stand_in=SimulatedPeripheral)
    with pytest.raises(DeviceStartupError, match="needs a real camera"):
        build_runtime(no_camera, devices, clock, link=ScriptedLink(clock), template_key=bytes(16))

    with_camera = _face_config(tmp_path / "b")
    devices = open_devices(with_camera.devices, stand_in=SimulatedPeripheral)
    with pytest.raises(DeviceStartupError, match="enrol the device"):
        build_runtime(with_camera, devices, clock, link=ScriptedLink(clock))
    assert devices.camera is not None
    assert devices.camera.status().state is PeripheralState.ABSENT  # closed: released on the failed build


# ---------------------------------------------------------------- the reader vendor's WLT photo decoder


def stub_wlt_decoder(wlt: bytes) -> RgbImage:
    """Stands in for a vendor's decoder (the real WLT codec is licensed): a grey image whose shade is the first
    byte, so a test can tell it ran on the card's bytes."""
    return np.full((126, 102, 3), wlt[0], dtype=np.uint8)


def test_the_configured_photo_decoder_is_loaded_at_start_and_reads_the_cards_photo(
    rig: KioskSimulatorRig, tmp_path: Path
) -> None:
    toml = rig.terminal_toml().replace(
        "[devices.id_card_reader]\n",
        '[devices.id_card_reader]\nphoto_decoder = "tests.terminal.test_devices:stub_wlt_decoder"\n',
    )
    devices = open_devices(config_with(tmp_path, toml).devices, stand_in=SimulatedPeripheral)
    try:
        decoder = devices.id_photo_decoder
        assert decoder is stub_wlt_decoder
        assert devices.id_card_reader is not None
        card = devices.id_card_reader.read_card(timeout_s=3)
        assert decoder(card.photo_wlt)[0, 0, 0] == card.photo_wlt[0]
    finally:
        devices.close()


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("no_such_package.wlt:decode", "cannot load the photo decoder"),
        ("json:no_such_function", "cannot load the photo decoder"),
        ("json:__doc__", "not callable"),
    ],
)
def test_a_photo_decoder_that_cannot_be_loaded_stops_start_up(
    rig: KioskSimulatorRig, tmp_path: Path, spec: str, reason: str
) -> None:
    toml = rig.terminal_toml().replace(
        "[devices.id_card_reader]\n", f'[devices.id_card_reader]\nphoto_decoder = "{spec}"\n'
    )
    with pytest.raises(DeviceStartupError, match=reason):
        open_devices(config_with(tmp_path, toml).devices, stand_in=SimulatedPeripheral)


def test_a_photo_decoder_is_named_as_module_and_function(tmp_path: Path) -> None:
    raw = {"id_card_reader": {"backend": "serial", "port": "/dev/ttyS9", "photo_decoder": "vendor.wlt; rm -rf /"}}
    with pytest.raises(ConfigError, match="photo_decoder"):
        config_with(tmp_path, devices=raw)
