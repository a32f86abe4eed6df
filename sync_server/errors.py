"""The sync server's exception tree.

Every error the server raises on purpose derives from `ServerError`. Vendor exceptions (SQLAlchemy, paho-mqtt,
uvicorn, OS errors while binding) are translated into these exactly once, at the boundary where they are caught,
with `raise ... from exc` so the cause stays attached. This module must never import a vendor library.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base class of every error the sync server raises deliberately."""


class ConfigurationError(ServerError):
    """The configuration selects something that cannot work (unknown database driver, unusable address)."""


class DatabaseError(ServerError):
    """The database could not be reached or refused an operation outside of ingest (migrations, start-up)."""


class IngestError(ServerError):
    """Ingesting MQTT messages failed: the broker client could not be set up, or a batch could not be stored.

    `transient` is True when retrying the same messages later can succeed (connection lost, database locked);
    False when the messages themselves were refused by the database (a poison message).
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient
