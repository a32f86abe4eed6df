"""Simulators of everything outside our code; implement `drivers` Protocols; never imported by production code.

The kiosk rig (`start_kiosk_simulators`: pty device simulators plus the e-voucher platform over HTTP) is exported
lazily: it pulls in FastAPI and uvicorn, which tests that only want a status-only stand-in should not pay for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hardware_sim.peripherals import (
    SimulatedCamera,
    SimulatedIdCardReader,
    SimulatedPeripheral,
    SimulatedQrScanner,
    SimulatedSocialSecurityCardReader,
    simulated_peripherals,
)

if TYPE_CHECKING:
    from hardware_sim.kiosk_rig import KioskSimulatorRig, RigStartError, start_kiosk_simulators

_LAZY = {"KioskSimulatorRig", "RigStartError", "start_kiosk_simulators"}

__all__ = [
    "KioskSimulatorRig",
    "RigStartError",
    "SimulatedCamera",
    "SimulatedIdCardReader",
    "SimulatedPeripheral",
    "SimulatedQrScanner",
    "SimulatedSocialSecurityCardReader",
    "simulated_peripherals",
    "start_kiosk_simulators",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("hardware_sim.kiosk_rig"), name)
    raise AttributeError(f"module 'hardware_sim' has no attribute {name!r}")
