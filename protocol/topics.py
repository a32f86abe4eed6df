"""The MQTT topic scheme (see docs/architecture.md, "Topics").

    yibao/v1/dev/{device_id}/up      terminal -> server   envelopes, QoS 1
    yibao/v1/dev/{device_id}/down    server -> terminal   commands and acknowledgements, QoS 1
    yibao/v1/dev/{device_id}/status  retained            "online" on connect; last will "offline"

The server consumes uplinks through a shared subscription so that several ingest workers can split the load; the
broker ACL (issue 3) confines each device to its own three topics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DEVICE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{2,63}$")


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses topic names; `prefix` lets tests and tenants share one broker."""

    prefix: str = "yibao/v1"
    ingest_group: str = "yibao-ingest"

    def uplink(self, device_id: str) -> str:
        return f"{self.prefix}/dev/{self._check(device_id)}/up"

    def downlink(self, device_id: str) -> str:
        return f"{self.prefix}/dev/{self._check(device_id)}/down"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/dev/{self._check(device_id)}/status"

    @property
    def all_uplinks(self) -> str:
        return f"{self.prefix}/dev/+/up"

    @property
    def all_uplinks_shared(self) -> str:
        """Shared subscription (MQTT 5 / Mosquitto >= 1.6) so N ingest workers split the uplink stream."""
        return f"$share/{self.ingest_group}/{self.all_uplinks}"

    @property
    def all_statuses(self) -> str:
        return f"{self.prefix}/dev/+/status"

    def device_of(self, topic: str) -> str | None:
        """The device id named by an uplink/downlink/status topic, or None if the topic is not ours."""
        head = f"{self.prefix}/dev/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 2 or parts[1] not in {"up", "down", "status"}:
            return None
        return parts[0] if _DEVICE_SEGMENT.match(parts[0]) else None

    @staticmethod
    def _check(device_id: str) -> str:
        if not _DEVICE_SEGMENT.match(device_id):
            raise ValueError(f"not a valid device id for a topic: {device_id!r}")
        return device_id
