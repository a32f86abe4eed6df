"""The seam every kiosk peripheral presents to the terminal core for health reporting.

Owns only the `Peripheral` Protocol: a stable name, a kind, and a cheap `status()`. Real drivers (OpenCV camera,
serial QR scanner, card readers) and the simulators in `hardware_sim` implement it; the terminal's composition root
is handed a list of them and never learns which is which. This module must never import `terminal`, `ui` or
`hardware_sim`, and `status()` implementations must never block on I/O for long (the heartbeat calls them in turn).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from protocol import PeripheralKind, PeripheralStatus


@runtime_checkable
class Peripheral(Protocol):
    """A device attached to the terminal whose availability the terminal reports upstream."""

    @property
    def name(self) -> str:
        """Stable name on this terminal, e.g. 'camera0'; appears in heartbeats."""
        ...

    @property
    def kind(self) -> PeripheralKind:
        """What sort of device this is."""
        ...

    def status(self) -> PeripheralStatus:
        """Availability as this peripheral's owner last saw it; quick, never blocks on the device."""
        ...
