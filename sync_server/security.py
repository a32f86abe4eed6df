"""Message security in ingest: placeholder until the ingest checks land (see docs/identity.md)."""

from __future__ import annotations

from sqlalchemy import Engine

from protocol import Clock
from sync_server.audit import ServerAudit
from sync_server.identity import ServerIdentity
from sync_server.settings import ServerSettings


class SecurityGate:
    def __init__(
        self, settings: ServerSettings, engine: Engine, identity: ServerIdentity, *, clock: Clock, audit: ServerAudit
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._identity = identity
        self._clock = clock
        self._audit = audit

    def forget_device(self, device_id: str) -> None:
        """Drop what this process cached about `device_id` (after a revoke, reset or rotation)."""
