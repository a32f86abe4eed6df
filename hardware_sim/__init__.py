"""Simulators of everything outside our code; implement `drivers` Protocols; never imported by production code."""

from hardware_sim.peripherals import (
    SimulatedCamera,
    SimulatedIdCardReader,
    SimulatedPeripheral,
    SimulatedQrScanner,
    SimulatedSocialSecurityCardReader,
    simulated_peripherals,
)

__all__ = [
    "SimulatedCamera",
    "SimulatedIdCardReader",
    "SimulatedPeripheral",
    "SimulatedQrScanner",
    "SimulatedSocialSecurityCardReader",
    "simulated_peripherals",
]
