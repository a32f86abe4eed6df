"""The composition root and the health snapshot, with a scripted link instead of a broker."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.peripherals import Peripheral
from hardware_sim import SimulatedCamera, SimulatedQrScanner, simulated_peripherals
from protocol import AuditEvent, AuditOutcome, Heartbeat, PeripheralKind, PeripheralState, PeripheralStatus
from terminal.errors import InvalidRecordError
from terminal.health import PeripheralWatch
from terminal.outbox import OutboxStatus
from terminal.runtime import TerminalRuntime, build_runtime
from tests.terminal.conftest import FakeClock, terminal_config
from tests.terminal.fakes import ScriptedLink


@pytest.fixture
def runtime(tmp_path: Path, clock: FakeClock) -> Iterator[TerminalRuntime]:
    link = ScriptedLink(clock, connected=False)
    rt = build_runtime(terminal_config(tmp_path), simulated_peripherals(), clock, boot_id=uuid.UUID(int=7), link=link)
    yield rt
    rt.stop()


def test_record_audit_puts_a_durable_record_in_the_outbox(runtime: TerminalRuntime) -> None:
    envelope = runtime.record_audit(
        "identity", "qr.verified", "success", actor="pharmacist:7f3a", subject="voucher:****1234", attempts=1
    )
    assert envelope.boot_id == uuid.UUID(int=7)
    assert isinstance(envelope.payload, AuditEvent)
    assert envelope.payload.outcome is AuditOutcome.SUCCESS
    assert envelope.payload.detail == {"attempts": 1}
    assert [r.status for r in runtime.outbox.rows()] == [OutboxStatus.PENDING]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("", "x", "info"), "category"),
        (("system", "y" * 65, "info"), "action"),
        (("system", "x", "maybe"), "outcome"),
    ],
)
def test_invalid_audit_events_are_rejected_naming_the_field(
    runtime: TerminalRuntime, args: tuple[str, str, str], field: str
) -> None:
    with pytest.raises(InvalidRecordError, match=field):
        runtime.record_audit(*args)
    assert runtime.outbox.rows() == []


def test_heartbeat_reflects_config_outbox_and_peripherals(runtime: TerminalRuntime, clock: FakeClock) -> None:
    runtime.record_audits([AuditEvent(category="system", action="a", outcome=AuditOutcome.INFO)] * 3)
    clock.advance(12)
    beat = runtime.heartbeat()
    assert isinstance(beat, Heartbeat)
    assert beat.uptime_s == 12
    assert beat.outbox_depth == 3
    assert beat.outbox_oldest_age_s == 12
    assert beat.config_version == "test-1"
    assert [p.name for p in beat.peripherals] == ["camera0", "qr0", "idcard0", "sscard0"]


def test_start_enqueues_the_first_heartbeat_and_stop_is_clean(tmp_path: Path, clock: FakeClock) -> None:
    link = ScriptedLink(clock, connected=False)
    rt = build_runtime(terminal_config(tmp_path), simulated_peripherals(), clock, link=link)
    rt.start()
    rt.stop()
    assert link.connected is False
    # The outbox is closed by stop(); reopen the file to look.
    rt2 = build_runtime(terminal_config(tmp_path), simulated_peripherals(), clock, link=ScriptedLink(clock))
    try:
        assert [r.payload_type for r in rt2.outbox.rows()] == ["heartbeat"]
    finally:
        rt2.stop()


class BrokenReader:
    """A driver whose status() raises: the heartbeat must still report every other device."""

    name = "idcard0"
    kind = PeripheralKind.ID_CARD_READER

    def status(self) -> PeripheralStatus:
        raise OSError("serial port vanished")


def test_peripheral_watch_reports_broken_drivers_as_fault_and_logs_changes_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="terminal.health")
    camera = SimulatedCamera()
    peripherals: list[Peripheral] = [camera, BrokenReader(), SimulatedQrScanner()]
    watch = PeripheralWatch(peripherals)
    first = watch.snapshot()
    assert [s.state for s in first] == [PeripheralState.OK, PeripheralState.FAULT, PeripheralState.OK]
    assert first[1].detail == "status query failed"

    camera.inject_fault("usb reset")
    watch.snapshot()
    watch.snapshot()
    camera.recover()
    watch.snapshot()
    camera_lines = [r.getMessage() for r in caplog.records if "camera0" in r.getMessage()]
    assert camera_lines == ["peripheral camera0 (camera) is fault: usb reset", "peripheral camera0 (camera) recovered"]


def test_peripheral_watch_refuses_duplicate_names() -> None:
    with pytest.raises(ValueError, match="used twice"):
        PeripheralWatch([SimulatedCamera("cam"), SimulatedCamera("cam")])
