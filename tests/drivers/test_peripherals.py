"""The simulated peripherals satisfy the driver Protocol and report what a test sets."""

from __future__ import annotations

import pytest

from drivers.peripherals import Peripheral
from hardware_sim import SimulatedPeripheral, simulated_peripherals
from protocol import PeripheralKind, PeripheralState


def test_simulators_are_peripherals_with_one_of_each_kiosk_device() -> None:
    devices = simulated_peripherals()
    assert all(isinstance(d, Peripheral) for d in devices)
    assert [d.kind for d in devices] == [
        PeripheralKind.CAMERA,
        PeripheralKind.QR_SCANNER,
        PeripheralKind.ID_CARD_READER,
        PeripheralKind.SS_CARD_READER,
    ]
    assert len({d.name for d in devices}) == len(devices)
    for device in devices:
        status = device.status()
        assert (status.name, status.kind, status.state, status.simulated) == (
            device.name,
            device.kind,
            PeripheralState.OK,
            True,
        )


@pytest.mark.parametrize("state", list(PeripheralState))
def test_state_is_settable_for_fault_injection(state: PeripheralState) -> None:
    device = SimulatedPeripheral("printer0", PeripheralKind.PRINTER)
    device.set_state(state, None if state is PeripheralState.OK else "paper jam")
    assert device.status().state is state
    device.recover()
    assert device.status().state is PeripheralState.OK
    assert device.status().detail is None
