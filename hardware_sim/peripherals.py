"""Simulated kiosk peripherals for the demo, the fleet simulator and tests.

Owns stand-ins for the camera, QR scanner, 2nd-generation ID-card reader and social-security-card reader that
implement `drivers.peripherals.Peripheral`. Their state is settable (`inject_fault`, `set_state`, `recover`) so tests
and demos can show a terminal reporting a broken device. They report `simulated=True` always, so a simulated device
can never be mistaken for real hardware upstream. This module must never be imported by production code (only
composition roots and tests choose simulators) and holds no personal data.
"""

from __future__ import annotations

import threading

from drivers.peripherals import Peripheral
from protocol import PeripheralKind, PeripheralState, PeripheralStatus


class SimulatedPeripheral:
    """A peripheral whose state a test or demo sets; thread-safe because the heartbeat reads it from its thread."""

    def __init__(
        self,
        name: str,
        kind: PeripheralKind,
        *,
        state: PeripheralState = PeripheralState.OK,
        detail: str | None = None,
    ) -> None:
        self._name = name
        self._kind = kind
        self._lock = threading.Lock()
        self._state = state
        self._detail = detail

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> PeripheralKind:
        return self._kind

    def status(self) -> PeripheralStatus:
        with self._lock:
            state, detail = self._state, self._detail
        return PeripheralStatus(name=self._name, kind=self._kind, state=state, simulated=True, detail=detail)

    def set_state(self, state: PeripheralState, detail: str | None = None) -> None:
        with self._lock:
            self._state = state
            self._detail = detail

    def inject_fault(self, detail: str = "simulated fault") -> None:
        self.set_state(PeripheralState.FAULT, detail)

    def recover(self) -> None:
        self.set_state(PeripheralState.OK, None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r}, state={self.status().state.value!r})"


class SimulatedCamera(SimulatedPeripheral):
    """RGB(+IR) face camera stand-in."""

    def __init__(
        self, name: str = "camera0", *, state: PeripheralState = PeripheralState.OK, detail: str | None = None
    ) -> None:
        super().__init__(name, PeripheralKind.CAMERA, state=state, detail=detail)


class SimulatedQrScanner(SimulatedPeripheral):
    """Serial QR scanner stand-in (医保码 e-voucher)."""

    def __init__(
        self, name: str = "qr0", *, state: PeripheralState = PeripheralState.OK, detail: str | None = None
    ) -> None:
        super().__init__(name, PeripheralKind.QR_SCANNER, state=state, detail=detail)


class SimulatedIdCardReader(SimulatedPeripheral):
    """2nd-generation resident ID-card reader stand-in."""

    def __init__(
        self, name: str = "idcard0", *, state: PeripheralState = PeripheralState.OK, detail: str | None = None
    ) -> None:
        super().__init__(name, PeripheralKind.ID_CARD_READER, state=state, detail=detail)


class SimulatedSocialSecurityCardReader(SimulatedPeripheral):
    """Social-security-card reader stand-in."""

    def __init__(
        self, name: str = "sscard0", *, state: PeripheralState = PeripheralState.OK, detail: str | None = None
    ) -> None:
        super().__init__(name, PeripheralKind.SS_CARD_READER, state=state, detail=detail)


def simulated_peripherals() -> list[Peripheral]:
    """One of each simulated kiosk peripheral, all healthy: what the demo terminal runs with."""
    return [SimulatedCamera(), SimulatedQrScanner(), SimulatedIdCardReader(), SimulatedSocialSecurityCardReader()]
