"""The terminal core's exception tree.

Owns the one documented hierarchy that callers of `terminal` (the kiosk UI, the CLI, the demo) catch. Vendor errors
(sqlite3, paho-mqtt, pydantic, tomllib) are translated into these exactly once, at the boundary that talks to the
vendor, with `raise ... from exc` so the cause stays visible. Nothing in here may import a vendor library, and no
message may carry personal data (names, ID numbers, face data): messages name files, fields, sequence numbers.

    TerminalError
    ├── ConfigError          the terminal config file is missing, unreadable or invalid (fail closed at start-up)
    ├── InvalidRecordError   a record breaks the wire contract (invalid field, too large) and was not stored
    ├── OutboxError          the local outbox database failed
    │   └── OutboxFullError       the outbox reached its disk bound; already accepted records are intact
    └── SyncError            the MQTT link failed
        ├── NotConnectedError  no broker connection right now; the record stays in the outbox
        └── PublishError       the client library refused to queue a publish
"""

from __future__ import annotations


class TerminalError(Exception):
    """Base of every error the terminal core raises on purpose."""


class ConfigError(TerminalError):
    """The terminal configuration cannot be used; the message names the file and the offending field(s)."""


class InvalidRecordError(TerminalError):
    """A record was refused before it reached the outbox because it breaks the wire contract."""


class OutboxError(TerminalError):
    """The local SQLite outbox failed (I/O, corruption, locked past the busy timeout, unknown schema)."""


class OutboxFullError(OutboxError):
    """The outbox is at its configured disk bound even after pruning delivered records.

    Records accepted earlier are untouched and still deliverable; the caller must refuse the new operation (fail
    closed) rather than carry on without a trace of it.
    """


class SyncError(TerminalError):
    """The MQTT link to the sync server failed."""


class NotConnectedError(SyncError):
    """There is no broker connection; records wait in the outbox until the link is back."""


class PublishError(SyncError):
    """The MQTT client refused to queue a publish (its queue is full, or the packet could not be sent)."""
