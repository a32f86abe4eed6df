"""`yibao audit …`: checks of HMAC-SM3 hash-chained audit logs, for operators and auditors.

Owns turning a `ChainReport` into what a person or a script reads, and the exit codes: 0 intact, 1 broken,
2 usage errors (missing file, unreadable or unsafe key file). It must never print the key, and never modify
the log it checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from protocol.gm import CryptoError, load_chain_key, verify_chain

EXIT_INTACT = 0
EXIT_BROKEN = 1
EXIT_USAGE = 2


@dataclass(frozen=True, slots=True)
class AuditVerdict:
    exit_code: int
    stdout: str
    stderr: str = ""


def verify_audit_file(path: Path, key_file: Path, *, as_json: bool) -> AuditVerdict:
    """Verify the chain in `path` with the key in `key_file`; one summary line (or one JSON line)."""
    try:
        key = load_chain_key(key_file)
    except CryptoError as exc:
        return AuditVerdict(EXIT_USAGE, "", f"error: {exc}")
    try:
        report = verify_chain(path, key)
    except OSError as exc:
        return AuditVerdict(EXIT_USAGE, "", f"error: cannot read {path}: {exc.strerror}")
    code = EXIT_INTACT if report.ok else EXIT_BROKEN
    if as_json:
        return AuditVerdict(code, json.dumps({"file": str(path), **report.as_dict()}, ensure_ascii=False))
    if report.ok:
        extent = "empty" if report.last_index is None else f"indexes up to {report.last_index}"
        segment = f", segment continuing from {report.starts_after[:16]}…" if report.starts_after else ""
        return AuditVerdict(code, f"intact: {path}: {report.entries} entries ({extent}{segment})")
    return AuditVerdict(
        code,
        f"BROKEN: {path}: line {report.first_broken_line} (expected index {report.first_broken_index}): "
        f"{report.reason}: {report.detail}; {report.entries} entries before it are intact",
    )
