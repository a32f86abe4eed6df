"""`yibao bench sync --encryption on`: the fleet enrolled and its payloads sealed with SM4-GCM (docs/identity.md).

What changes against `--encryption off`, and nothing else:

- the server runs with `uplink_security = "required"` (YIBAO_SERVER_UPLINK_SECURITY), so a plaintext envelope
  would be refused and counted in `security_events`, never stored;
- before the fleet starts, every device of the fleet is registered, enrolled and handshaken against that server
  (`hardware_sim.fleet.enrol_fleet`); that time is reported as `enrol_s` and is outside the throughput window;
- the fleet gets the sessions: each terminal seals its uplinks, statuses and heartbeats and opens its sealed downlinks;
- the ack listener's downlinks are sealed too: they are opened after the run with the device's session key, so the
  latency definition ("stored" = arrival of the first `uplink_ack` covering the record) is the same in both modes.

After the run the server's database says how many messages it refused for security reasons (`security_refusals`,
must be 0) and how many devices are enrolled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import Topics
from protocol.secure import is_secure_frame, open_frame, parse_frame

if TYPE_CHECKING:
    from terminal.session import SessionManager
    from yibao.server_proc import ServerProcess

ENCRYPTION_CHOICES = ("off", "on")
SERVER_ENV_REQUIRED = {"YIBAO_SERVER_UPLINK_SECURITY": "required"}


def check_encryption(encryption: str, *, ceiling: bool) -> None:
    """Raise ValueError for a combination the bench does not measure. (`--ceiling-too` is fine: our run is
    encrypted, the ceiling copies the raw payloads of its own plaintext run, as the issue defines it.)"""
    if encryption not in ENCRYPTION_CHOICES:
        raise ValueError(f"--encryption is 'off' or 'on', not {encryption!r}")
    if encryption == "on" and ceiling:
        raise ValueError("--encryption on measures our server; the ceiling consumer copies raw payloads only")


def server_env(encryption: str) -> Mapping[str, str]:
    """Extra environment of the server child: uplink security required when the fleet encrypts."""
    return SERVER_ENV_REQUIRED if encryption == "on" else {}


def reported_encryption(encryption: str) -> str:
    return "sm4-gcm" if encryption == "on" else "off"


@dataclass(frozen=True)
class SecureFleet:
    """The enrolled fleet: session managers by device id and the enrolment's timing."""

    sessions: dict[str, SessionManager]
    enrol_s: float
    phases_s: dict[str, float]
    """register / enrol / handshake: each phase's time summed over devices, divided by the workers."""
    topics: Topics

    def unseal(self, topic: str, payload: bytes) -> bytes | None:
        """The plaintext of a sealed downlink on `topic`, opened with that device's session key (current or
        previous); None if it is not a frame or not one of our devices' (the caller then skips it)."""
        device_id = self.topics.device_of(topic)
        manager = self.sessions.get(device_id) if device_id is not None else None
        if manager is None or not is_secure_frame(payload):
            return None
        key = manager.key_for(parse_frame(payload).key_id)
        if key is None:
            return None
        return open_frame(key.key, device_id or "", payload)

    def figures(self) -> dict[str, Any]:
        n = len(self.sessions)
        return {
            "enrolled": n,
            "enrol_s": round(self.enrol_s, 2),
            "enrol_per_s": round(n / self.enrol_s, 1) if self.enrol_s > 0 else 0.0,
            "enrol_phases_s": {name: round(value, 2) for name, value in self.phases_s.items()},
        }


def enrol_bench_fleet(
    server: ServerProcess,
    terminals: int,
    workdir: Path,
    *,
    device_prefix: str = "FLEET",
    workers: int = 8,
    topic_prefix: str = "yibao/v1",
) -> SecureFleet:
    """Register, enrol and handshake the fleet's devices (`fleet_device_id(device_prefix, i)`, the ids the fleet
    will use) against the running server, `workers` at a time; keys in memory only."""
    from hardware_sim.fleet import enrol_fleet, fleet_device_id

    device_ids = [fleet_device_id(device_prefix, i) for i in range(terminals)]
    enrolment = enrol_fleet(server.base_url, server.admin_token, device_ids, workers=workers, workdir=workdir)
    phases = {"register": enrolment.register_s, "enrol": enrolment.enrol_s, "handshake": enrolment.handshake_s}
    return SecureFleet(
        sessions=enrolment.sessions, enrol_s=enrolment.seconds, phases_s=phases, topics=Topics(topic_prefix)
    )


def security_figures(database_url: str) -> dict[str, Any]:
    """Read-only, after the run: the server's security refusals (by kind) and its enrolled devices."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            by_kind = {
                str(kind): int(count)
                for kind, count in conn.execute(
                    text("SELECT kind, coalesce(sum(count), 0) FROM security_events GROUP BY kind")
                ).all()
            }
            enrolled = int(
                conn.execute(text("SELECT count(*) FROM devices WHERE registration = 'enrolled'")).scalar_one()
            )
    finally:
        engine.dispose()
    return {
        "security_refusals": sum(by_kind.values()),
        "security_refusals_by_kind": by_kind,
        "devices_enrolled_in_db": enrolled,
    }
