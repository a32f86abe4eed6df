"""The server's HMAC-SM3 hash-chained audit log (`protocol.gm.audit_chain`) of admin actions and security refusals.

Owns where the chain and its key live (`<data_dir>/audit/server-audit.jsonl` and `<data_dir>/audit/chain.key`, the
key created on first use, mode 0600) and opening them lazily, once per process. A second process on the same data
dir (several ingest workers) writes its own file `server-audit-<pid>.jsonl` under the same key; a broken chain is
continued in a new segment. `yibao audit verify FILE --key-file KEY` checks a chain offline.

Recording never fails the action it records: an unwritable log is reported in the server log (an operator must fix
it). It must never record secrets (tokens, passwords, keys) or personal data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from protocol import Clock
from protocol.gm.audit_chain import AuditChainWriter, load_chain_key, write_chain_key
from protocol.gm.errors import AuditChainError, CryptoError

logger = logging.getLogger(__name__)

CHAIN_FILE = "server-audit.jsonl"
KEY_FILE = "chain.key"


class ServerAudit:
    def __init__(self, data_dir: Path, clock: Clock) -> None:
        self.directory = data_dir / "audit"
        self._clock = clock
        self._writer: AuditChainWriter | None = None
        self._lock = threading.Lock()
        self._broken = False

    @property
    def key_file(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def path(self) -> Path | None:
        """The chain file this process writes, once opened."""
        return self._writer.path if self._writer is not None else None

    def record(self, event_type: str, **fields: Any) -> None:
        """Append `{"type": event_type, **fields}`; logs (never raises) when the chain cannot be written."""
        try:
            writer = self._open()
            writer.append({"type": event_type, **fields})
        except (OSError, CryptoError) as exc:
            if not self._broken:
                logger.error("cannot write the server audit chain in %s: %s", self.directory, exc)
            self._broken = True

    def _open(self) -> AuditChainWriter:
        with self._lock:
            if self._writer is not None:
                return self._writer
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.key_file.exists():
                with contextlib.suppress(FileExistsError):  # another process created it first
                    write_chain_key(self.key_file, secrets.token_bytes(32))
            key = load_chain_key(self.key_file)
            main = self.directory / CHAIN_FILE
            try:
                self._writer = AuditChainWriter.open(main, key, self._clock)
            except AuditChainError as exc:
                if "held by another writer" in str(exc):
                    own = self.directory / f"server-audit-{os.getpid()}.jsonl"
                    self._writer = AuditChainWriter.open(own, key, self._clock)
                else:
                    stamp = self._clock.now().strftime("%Y%m%dT%H%M%S")
                    logger.error("%s; continuing in a new segment", exc)
                    segment = self.directory / f"server-audit-{stamp}-{os.getpid()}.jsonl"
                    self._writer = AuditChainWriter.start_segment(segment, key, self._clock, after=main)
            return self._writer

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
