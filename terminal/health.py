"""The terminal's health snapshot: what goes into each heartbeat.

Owns polling the peripherals for their status (one owner per device, Home-Assistant-coordinator style: it logs once
when a device becomes unavailable and once when it recovers, not on every poll) and composing a `protocol.Heartbeat`
from the config's versions, the outbox statistics and those statuses. It must never talk to the network or the
outbox itself (the heartbeat timer does that), never block on a device, and never let one misbehaving peripheral
stop the heartbeat of the others.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from drivers.peripherals import Peripheral
from protocol import Heartbeat, PeripheralKind, PeripheralState, PeripheralStatus
from terminal.config import TerminalConfig
from terminal.outbox import OutboxStats

logger = logging.getLogger(__name__)


class PeripheralWatch:
    """Asks each peripheral for its status and remembers what it last reported, to log only the changes.

    Names and kinds are read once, here, and checked (unique, valid), so a misconfigured peripheral list stops
    start-up instead of producing heartbeats the server would refuse."""

    def __init__(self, peripherals: Sequence[Peripheral]) -> None:
        self._peripherals = list(peripherals)
        self._identity: list[tuple[str, PeripheralKind]] = []
        for peripheral in self._peripherals:
            name, kind = peripheral.name, peripheral.kind
            if not isinstance(name, str) or not 1 <= len(name) <= 64:
                raise ValueError(f"peripheral name must be 1-64 characters, got {name!r}")
            if not isinstance(kind, PeripheralKind):
                raise ValueError(f"peripheral {name}: kind must be a PeripheralKind, got {kind!r}")
            if any(name == seen for seen, _ in self._identity):
                raise ValueError(f"peripheral name {name!r} is used twice")
            self._identity.append((name, kind))
        self._last: dict[str, PeripheralState] = {}

    @property
    def peripherals(self) -> list[Peripheral]:
        return list(self._peripherals)

    def snapshot(self) -> list[PeripheralStatus]:
        statuses = [
            self._status_of(p, name, kind) for p, (name, kind) in zip(self._peripherals, self._identity, strict=True)
        ]
        for status in statuses:
            self._log_change(status)
        return statuses

    def _status_of(self, peripheral: Peripheral, name: str, kind: PeripheralKind) -> PeripheralStatus:
        try:
            status = peripheral.status()
        except Exception:  # a driver bug must not silence the heartbeat of every other device
            logger.exception("peripheral %s: status() raised; reporting it as fault", name)
            return PeripheralStatus(
                name=name, kind=kind, state=PeripheralState.FAULT, simulated=False, detail="status query failed"
            )
        if status.name != name:
            # The heartbeat must name devices consistently, whatever a driver puts in its status.
            status = status.model_copy(update={"name": name})
        return status

    def _log_change(self, status: PeripheralStatus) -> None:
        before = self._last.get(status.name)
        self._last[status.name] = status.state
        if before == status.state:
            return
        if status.state is PeripheralState.OK:
            if before is not None:
                logger.info("peripheral %s (%s) recovered", status.name, status.kind.value)
        else:
            logger.warning(
                "peripheral %s (%s) is %s: %s",
                status.name,
                status.kind.value,
                status.state.value,
                status.detail or "no detail",
            )


def compose_heartbeat(
    config: TerminalConfig,
    *,
    stats: OutboxStats,
    peripherals: Sequence[PeripheralStatus],
    uptime_s: float,
    model_versions: dict[str, str] | None = None,
) -> Heartbeat:
    """The heartbeat for this moment; alarms are the outbox's (peripheral faults travel in `peripherals`)."""
    return Heartbeat(
        software_version=config.software_version,
        model_versions=dict(model_versions or {}),
        config_version=config.config_version,
        config_schema_version=config.schema_version,
        interval_s=config.heartbeat.interval_s,
        uptime_s=max(0.0, uptime_s),
        outbox_depth=stats.depth,
        outbox_sent_total=stats.acked_total,
        outbox_oldest_age_s=stats.oldest_age_s,
        outbox_used_bytes=stats.used_bytes,
        outbox_capacity_bytes=stats.capacity_bytes,
        alarms=list(stats.alarms),
        peripherals=list(peripherals),
    )
