"""Face templates at rest: the kiosk's small gallery (a pharmacy's pharmacists), each template sealed with SM4-GCM.

Owns the SQLite file that holds enrolled templates and the rules around it (DESIGN.md §4, issue 4 point 9):

* a template is stored only sealed (`protocol.gm.sm4`, key from `IdentityStore.template_key()`), with the subject
  reference and the embedding model's sha256 bound in as associated data, so a row copied to another subject or
  read by a different model fails to open instead of matching the wrong person;
* templates of another model are never compared (a model upgrade means re-enrolment, reported, not guessed);
* what may leave the device about a template is `template_hash` (HMAC-SM3 under a key derived from the template
  key, so the same face gives unlinkable hashes on different devices), never the template.

Subject references are pseudonymous ids (a pharmacist's staff id on the server), never names or ID numbers. This
module must never log or return a template outside `load_gallery`, and never write one unsealed.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray

from models.face import Gallery
from protocol.gm import sm4
from protocol.gm.errors import DecryptionFailedError
from protocol.gm.sm3 import hmac_sm3, sm3_kdf
from terminal.errors import TerminalError

logger = logging.getLogger(__name__)

_AAD_PREFIX: Final = b"yibao/face-template/v1\x00"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS face_template (
    subject_ref   TEXT PRIMARY KEY,
    model_sha256  TEXT NOT NULL,
    dims          INTEGER NOT NULL,
    sealed        BLOB NOT NULL,
    template_hash TEXT NOT NULL
) STRICT
"""


class TemplateStoreError(TerminalError):
    """The template store cannot do what was asked; the message says why (never containing a template)."""


class TemplateTamperedError(TemplateStoreError):
    """A stored template failed to open: altered bytes, moved between subjects, or a different key."""


def _aad(subject_ref: str, model_sha256: str) -> bytes:
    return _AAD_PREFIX + subject_ref.encode("utf-8") + b"\x00" + model_sha256.encode("ascii")


class TemplateStore:
    """The gallery file. Thread-safe (one connection behind a lock; the kiosk enrols rarely and reads at start-up)."""

    def __init__(self, path: Path, key: bytes, *, model_sha256: str) -> None:
        if len(key) != sm4.KEY_SIZE:
            raise TemplateStoreError(f"the template key must be {sm4.KEY_SIZE} bytes")
        if len(model_sha256) != 64:
            raise TemplateStoreError("model_sha256 must be the embedding model's full sha256 (64 hex characters)")
        self.path = path
        self.model_sha256 = model_sha256
        self._key = key
        self._hash_key = sm3_kdf(key + b"template-hash", 32)
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        path.chmod(0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def template_hash(self, template: NDArray[np.float32]) -> str:
        """A device-keyed hash of a template: what the decision record carries instead of the template."""
        return hmac_sm3(self._hash_key, np.ascontiguousarray(template, dtype="<f4").tobytes()).hex()[:32]

    def enrol(self, subject_ref: str, template: NDArray[np.float32]) -> str:
        """Store (or replace) `subject_ref`'s template, sealed; returns its template hash."""
        if not subject_ref or len(subject_ref) > 64:
            raise TemplateStoreError("subject_ref must be a pseudonymous id of 1–64 characters")
        vector = np.asarray(template, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(vector))
        if vector.size == 0 or not np.isfinite(norm) or norm == 0.0:
            raise TemplateStoreError("refusing an empty, zero or non-finite template")
        vector = vector / norm
        sealed = sm4.seal(self._key, vector.astype("<f4").tobytes(), _aad(subject_ref, self.model_sha256))
        digest = self.template_hash(vector)
        with self._lock:
            self._db.execute(
                "INSERT INTO face_template (subject_ref, model_sha256, dims, sealed, template_hash) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (subject_ref) DO UPDATE SET "
                "model_sha256 = excluded.model_sha256, dims = excluded.dims, sealed = excluded.sealed, "
                "template_hash = excluded.template_hash",
                (subject_ref, self.model_sha256, vector.size, sealed, digest),
            )
        logger.info("face template enrolled (hash %s)", digest[:12])
        return digest

    def remove(self, subject_ref: str) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM face_template WHERE subject_ref = ?", (subject_ref,))
        return cursor.rowcount > 0

    def subjects(self) -> dict[str, str]:
        """Enrolled subject references and the model each template belongs to (no templates)."""
        with self._lock:
            rows = self._db.execute("SELECT subject_ref, model_sha256 FROM face_template ORDER BY subject_ref")
            return {str(ref): str(model) for ref, model in rows}

    def stale_subjects(self) -> list[str]:
        """Subjects whose template was made by another model: they must enrol again before 1:N can find them."""
        return [ref for ref, model in self.subjects().items() if model != self.model_sha256]

    def load_gallery(self) -> Gallery:
        """Open every template of the current model into memory for 1:N (`models.face.Gallery`, ids = subject
        references); `TemplateTamperedError` if any fails to open."""
        with self._lock:
            rows = self._db.execute(
                "SELECT subject_ref, dims, sealed FROM face_template WHERE model_sha256 = ? ORDER BY subject_ref",
                (self.model_sha256,),
            ).fetchall()
        refs: list[str] = []
        vectors: list[NDArray[np.float32]] = []
        for subject_ref, dims, sealed in rows:
            try:
                raw = sm4.open(self._key, bytes(sealed), _aad(str(subject_ref), self.model_sha256))
            except DecryptionFailedError as exc:
                raise TemplateTamperedError(
                    "a stored face template failed to open (altered, moved between subjects, or another key)"
                ) from exc
            vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
            if vector.size != int(dims):
                raise TemplateTamperedError("a stored face template has the wrong length")
            refs.append(str(subject_ref))
            vectors.append(vector)
        width = vectors[0].size if vectors else 0
        matrix = np.stack(vectors) if vectors else np.zeros((0, width), dtype=np.float32)
        return Gallery(ids=tuple(refs), templates=matrix)
