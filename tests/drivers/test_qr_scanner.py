"""The real serial QR-scanner driver against the scanner simulator on a pty: framings, faults, recovery."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from drivers.peripherals import Peripheral
from drivers.qr_scanner import (
    CodeTooLongError,
    IncompleteCodeError,
    MissingPrefixError,
    QrScanner,
    QrScannerConfig,
    ScannerUnavailableError,
    ScanTimeoutError,
    UndecodableCodeError,
)
from drivers.serial_link import SerialLink
from hardware_sim.pty_device import PtyDevice
from hardware_sim.qr_scanner_sim import QrScannerSimulator
from protocol import PeripheralKind, PeripheralState
from tests.drivers.serial_support import load_transcript

# A synthetic e-voucher payload: the real 医保码 content is opaque to the kiosk and passed on as text.
CODE = "YBM1:0A1B2C3D4E5F60718293A4B5C6D7E8F90112233445566778899AABBCCDDEEFF0"
TRIGGER = "7E 00 08 01 00 02 01 AB CD"  # the common GM65-style 'start decoding' command


@dataclasses.dataclass
class Rig:
    sim: QrScannerSimulator
    device: PtyDevice
    scanner: QrScanner


def make_rig(tmp_path: Path, config: QrScannerConfig, sim: QrScannerSimulator) -> Iterator[Rig]:
    with PtyDevice(sim, link_path=tmp_path / "ttyACM-qr", name="qr-sim") as device:
        scanner = QrScanner(SerialLink(device.path, baudrate=config.baudrate), config)
        scanner.open()  # as the kiosk does at start-up: a scanner's bytes before the port is open are lost
        yield Rig(sim, device, scanner)
        scanner.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from make_rig(tmp_path, QrScannerConfig(stale_partial_s=0.1), QrScannerSimulator(suffix=b"\r"))


def test_a_scan_arrives_as_the_recorded_bytes_and_decodes(rig: Rig) -> None:
    assert isinstance(rig.scanner, Peripheral)
    assert rig.scanner.kind is PeripheralKind.QR_SCANNER
    rig.sim.scan(CODE)
    before = time.monotonic()
    code = rig.scanner.read_code(timeout_s=1.0)
    assert (code.text, code.raw) == (CODE, CODE.encode())
    assert before - 1 <= code.t <= time.monotonic()
    assert rig.device.transcript() == load_transcript("qr_scan.hex")
    assert CODE not in repr(code)
    assert CODE not in str(code)
    assert rig.scanner.status().state is PeripheralState.OK


@pytest.mark.parametrize(("suffix", "wire"), [("crlf", b"\r\n"), ("lf", b"\n"), ("cr", b"\r")])
def test_each_suffix_and_a_prefix(tmp_path: Path, suffix: str, wire: bytes) -> None:
    config = QrScannerConfig.model_validate({"suffix": suffix, "prefix_hex": "02"})
    for r in make_rig(tmp_path, config, QrScannerSimulator(suffix=wire, prefix=b"\x02")):
        r.sim.scan(CODE)
        r.sim.scan("second")
        assert r.scanner.read_code(timeout_s=1.0).text == CODE
        assert r.scanner.read_code(timeout_s=1.0).text == "second"


def test_missing_prefix_is_a_typed_error_and_the_next_scan_reads(tmp_path: Path) -> None:
    config = QrScannerConfig(prefix_hex="02")
    for r in make_rig(tmp_path, config, QrScannerSimulator(suffix=b"\r")):
        r.sim.scan(CODE)  # sent without the prefix
        with pytest.raises(MissingPrefixError):
            r.scanner.read_code(timeout_s=1.0)
        r.sim.scan_raw(b"\x02" + CODE.encode() + b"\r")
        assert r.scanner.read_code(timeout_s=1.0).text == CODE


def test_suffixless_scanner_codes_end_at_the_inter_byte_gap(tmp_path: Path) -> None:
    config = QrScannerConfig(suffix="none", gap_timeout_s=0.05)
    for r in make_rig(tmp_path, config, QrScannerSimulator(suffix=b"")):
        r.sim.scan(CODE)
        assert r.scanner.read_code(timeout_s=1.0).text == CODE
        r.sim.scan_raw(b"abc")
        threading.Timer(0.01, r.sim.scan_raw, args=(b"def",)).start()  # within the gap: same code
        assert r.scanner.read_code(timeout_s=1.0).text == "abcdef"


def test_command_mode_sends_the_trigger_then_reads_the_code(tmp_path: Path) -> None:
    config = QrScannerConfig(trigger_hex=TRIGGER)
    for r in make_rig(tmp_path, config, QrScannerSimulator(trigger=bytes.fromhex(TRIGGER))):
        r.sim.scan(CODE)
        time.sleep(0.05)
        assert r.device.transcript() == []  # nothing leaves the module before the trigger
        assert r.scanner.read_code(timeout_s=1.0).text == CODE
        assert r.sim.triggers == 1
        assert r.device.transcript()[0] == (">", bytes.fromhex(TRIGGER))
        with pytest.raises(ScanTimeoutError):
            r.scanner.read_code(timeout_s=0.1)  # triggered, but nothing in front of the scanner
        assert r.sim.triggers == 2


def test_non_utf8_garbage_is_a_clear_error_and_the_link_stays_usable(rig: Rig) -> None:
    rig.sim.scan_raw(b"\xff\xfe\x80\x81garbage\r")
    with pytest.raises(UndecodableCodeError):
        rig.scanner.read_code(timeout_s=1.0)
    rig.sim.scan_raw(b"ctl\x07char\r")
    with pytest.raises(UndecodableCodeError):
        rig.scanner.read_code(timeout_s=1.0)
    rig.sim.scan(CODE)
    assert rig.scanner.read_code(timeout_s=1.0).text == CODE
    assert rig.scanner.status().state is PeripheralState.OK


def test_partial_line_split_across_writes_is_joined_and_a_stale_one_is_dropped(rig: Rig) -> None:
    data = CODE.encode() + b"\r"
    rig.sim.scan_raw(data[:10])
    threading.Timer(0.03, rig.sim.scan_raw, args=(data[10:],)).start()
    assert rig.scanner.read_code(timeout_s=1.0).text == CODE
    rig.sim.scan_partial(CODE)
    with pytest.raises(IncompleteCodeError):
        rig.scanner.read_code(timeout_s=1.0)
    rig.sim.scan(CODE)
    assert rig.scanner.read_code(timeout_s=1.0).text == CODE


def test_over_long_line_is_refused_without_swallowing_the_next_code(tmp_path: Path) -> None:
    config = QrScannerConfig(max_code_bytes=256)
    for r in make_rig(tmp_path, config, QrScannerSimulator(suffix=b"\r")):
        r.sim.scan("A" * 256)  # exactly the limit is fine
        assert len(r.scanner.read_code(timeout_s=1.0).text) == 256
        r.sim.scan("B" * 3000)
        r.sim.scan(CODE)
        with pytest.raises(CodeTooLongError):
            r.scanner.read_code(timeout_s=1.0)
        assert r.scanner.read_code(timeout_s=1.0).text == CODE


def test_timeout_and_clear(rig: Rig) -> None:
    with pytest.raises(ScanTimeoutError):
        rig.scanner.read_code(timeout_s=0.1)
    rig.sim.scan("an earlier customer's code")
    time.sleep(0.05)
    rig.scanner.clear()
    rig.sim.scan(CODE)
    assert rig.scanner.read_code(timeout_s=1.0).text == CODE


def test_unplugged_scanner_is_unavailable_until_replugged(rig: Rig) -> None:
    rig.device.unplug()
    with pytest.raises(ScannerUnavailableError):
        rig.scanner.read_code(timeout_s=0.5)
    assert rig.scanner.status().state is PeripheralState.ABSENT
    rig.device.replug()
    rig.scanner.open()  # the owner reopens after an unplug; scans before that are lost, as with real hardware
    rig.sim.scan(CODE)
    assert rig.scanner.read_code(timeout_s=1.0).text == CODE
    assert rig.scanner.status().state is PeripheralState.OK


def test_config_fails_closed() -> None:
    with pytest.raises(ValidationError):
        QrScannerConfig.model_validate({"suffix": "cr", "sufix": "lf"})
    with pytest.raises(ValidationError):
        QrScannerConfig(trigger_hex="7E 00 XY")
    with pytest.raises(ValidationError):
        QrScannerConfig.model_validate({"suffix": "tab"})


def test_composition_root_builds_the_scanner_from_a_port_path(rig: Rig) -> None:
    scanner = QrScanner.on_port(rig.device.path, QrScannerConfig(suffix="cr"), name="qr1")
    scanner.open()
    rig.sim.scan(CODE)
    assert scanner.read_code(timeout_s=1.0).text == CODE
    scanner.close()
