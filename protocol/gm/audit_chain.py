"""The hash-chained audit log (S-09, S-28, S-39): append-only JSON Lines, each entry MACed with HMAC-SM3.

One entry per line, in canonical JSON:

    {"event": {...}, "index": 7, "mac": hex, "prev": hex, "time": "2026-11-23T15:00:00.123456Z"}

`mac = HMAC-SM3(key, canonical_json(entry without "mac"))` and `prev` is the previous entry's `mac` (64 zeros for
the first entry of a chain), so editing, deleting, reordering or inserting any line breaks a link that
`verify_chain` names. A chain may continue in a new file (a *segment*) when a file's tail is found broken: its
first entry is an `audit.segment` event whose `prev` and `index` continue from the last good entry of the old file.

This module owns the file format, the writer and the verifier. It must never rewrite or truncate an existing
file (evidence is only ever appended to), never append after a broken tail, and never accept personal data in
events: events are small JSON objects of codes, counts and ids (see docs/crypto.md); names, ID numbers and images
stay out.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC
from pathlib import Path
from typing import Any, Literal, Self

from protocol.clock import Clock
from protocol.gm.errors import AuditChainError, CanonicalFormError, KeyFormatError
from protocol.gm.records import canonical_json
from protocol.gm.sm3 import MIN_MAC_KEY_BYTES, hmac_sm3, mac_equal

GENESIS_PREV = "0" * 64
SEGMENT_EVENT = "audit.segment"
MAX_EVENT_BYTES = 4096
"""Events are codes and counts, not documents; a bigger one is a bug (or personal data sneaking in)."""

BreakReason = Literal["mac_mismatch", "prev_mismatch", "index_gap", "unparseable", "truncated", "bad_start"]
_ENTRY_KEYS = frozenset({"index", "time", "event", "prev", "mac"})


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What `verify_chain` found. `entries` counts the intact entries before the first broken one."""

    ok: bool
    entries: int
    first_broken_index: int | None = None
    """Chain index the first broken line should have had (None when intact)."""
    first_broken_line: int | None = None
    """1-based line number of the first broken line (None when intact)."""
    reason: BreakReason | None = None
    detail: str = ""
    last_index: int | None = None
    """Index of the last intact entry (None for an empty file or a broken first line)."""
    last_mac: str | None = None
    """MAC of the last intact entry: where an appender, or a new segment, links on."""
    starts_after: str | None = None
    """For a segment file: the `prev` its first entry links to (the last good MAC of the file before)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def entry_mac(key: bytes, entry: dict[str, Any]) -> str:
    """HMAC-SM3 over the canonical form of `entry` without its "mac" field, hex."""
    body = {k: v for k, v in entry.items() if k != "mac"}
    return hmac_sm3(key, canonical_json(body)).hex()


def _check_key(key: bytes) -> None:
    if len(key) < MIN_MAC_KEY_BYTES:
        raise KeyFormatError(f"audit chain key too short: {len(key)} bytes, need at least {MIN_MAC_KEY_BYTES}")


def _break_detail(reason: BreakReason, *, expected_index: int, found_index: object) -> str:
    if reason == "mac_mismatch":
        return "MAC does not match: the entry was edited or forged, or the key is wrong"
    if reason == "prev_mismatch":
        if isinstance(found_index, int) and found_index > expected_index:
            return f"expected index {expected_index}, found {found_index}: entries were deleted"
        if isinstance(found_index, int) and found_index < expected_index:
            return f"expected index {expected_index}, found {found_index}: entries were reordered or replayed"
        return "link to the previous entry does not match: an entry was inserted, replaced or reordered"
    if reason == "index_gap":
        return f"index {found_index} where {expected_index} was expected, though the link matches"
    if reason == "truncated":
        return "the last line is incomplete (a write was cut short)"
    if reason == "bad_start":
        return "the first entry neither starts a chain nor a segment: the head of the file was removed"
    return "the line is not a chain entry"


def verify_chain(path: Path, key: bytes) -> ChainReport:
    """Check every link of the chain in `path` and name the first broken one."""
    _check_key(key)
    with path.open("rb") as fh:  # streamed: a segment may be larger than we want in memory
        return _verify_lines(fh, key)


def _verify_lines(lines: Iterable[bytes], key: bytes) -> ChainReport:
    expected_index = 0
    prev = GENESIS_PREV
    intact = 0
    last_mac: str | None = None
    last_index: int | None = None
    starts_after: str | None = None

    def broken(line_no: int, reason: BreakReason, found_index: object = None) -> ChainReport:
        return ChainReport(
            ok=False,
            entries=intact,
            first_broken_index=expected_index,
            first_broken_line=line_no,
            reason=reason,
            detail=_break_detail(reason, expected_index=expected_index, found_index=found_index),
            last_index=last_index,
            last_mac=last_mac,
            starts_after=starts_after,
        )

    for line_no, raw in enumerate(lines, start=1):
        if not raw.endswith(b"\n"):  # only the last line can lack it: the writer ends every entry with one
            return broken(line_no, "truncated")
        try:
            entry = json.loads(raw)
        except ValueError:
            return broken(line_no, "unparseable")
        if (
            not isinstance(entry, dict)
            or set(entry) != _ENTRY_KEYS
            or not isinstance(entry["index"], int)
            or not isinstance(entry["mac"], str)
            or not isinstance(entry["prev"], str)
            or not isinstance(entry["event"], dict)
        ):
            return broken(line_no, "unparseable")
        try:
            mac_ok = mac_equal(entry_mac(key, entry).encode(), entry["mac"].encode())
        except CanonicalFormError:
            mac_ok = False
        if not mac_ok:
            return broken(line_no, "mac_mismatch", entry["index"])
        if line_no == 1 and entry["prev"] != GENESIS_PREV:
            if entry["event"].get("type") != SEGMENT_EVENT:
                return broken(line_no, "bad_start", entry["index"])
            expected_index, prev, starts_after = entry["index"], entry["prev"], entry["prev"]
        if entry["prev"] != prev:
            return broken(line_no, "prev_mismatch", entry["index"])
        if entry["index"] != expected_index:
            return broken(line_no, "index_gap", entry["index"])
        intact += 1
        last_index, last_mac = entry["index"], entry["mac"]
        prev = entry["mac"]
        expected_index += 1
    return ChainReport(ok=True, entries=intact, last_index=last_index, last_mac=last_mac, starts_after=starts_after)


def load_chain_key(path: Path) -> bytes:
    """Read an audit-chain key file: the key as hex on one line; refused if group/others may access it."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFormatError(f"cannot read key file {path}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFormatError(f"{path} is accessible to group/others (mode {stat.S_IMODE(mode):04o}); chmod 600")
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise KeyFormatError(f"{path} does not hold a hex key") from exc
    _check_key(key)
    return key


def write_chain_key(path: Path, key: bytes) -> None:
    """Create a key file (mode 0600) holding `key` as hex; never overwrites."""
    _check_key(key)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class AuditChainWriter:
    """The single appender of one chain file. Every append is fsynced before it returns.

    Opening verifies the whole file and resumes after its last entry; a broken file is refused
    (`AuditChainError`) — continue in a new file with `start_segment`. An exclusive lock keeps a second writer out.
    """

    def __init__(self, fd: int, path: Path, key: bytes, clock: Clock, next_index: int, prev: str) -> None:
        self._fd: int | None = fd
        self.path = path
        self._key = key
        self._clock = clock
        self._next_index = next_index
        self._prev = prev
        self._append_lock = threading.Lock()  # flows on several threads may record; lines must not interleave
        self._failed = False

    @classmethod
    def open(cls, path: Path, key: bytes, clock: Clock) -> Self:
        """Open (creating if absent, mode 0600) and resume the chain in `path`."""
        _check_key(key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            cls._lock(fd, path)
            report = verify_chain(path, key)
            if not report.ok:
                raise AuditChainError(
                    f"{path}: chain broken at line {report.first_broken_line} ({report.reason}); "
                    "refusing to append: start a new segment"
                )
        except BaseException:
            os.close(fd)
            raise
        next_index = 0 if report.last_index is None else report.last_index + 1
        return cls(fd, path, key, clock, next_index, report.last_mac or GENESIS_PREV)

    @classmethod
    def start_segment(cls, path: Path, key: bytes, clock: Clock, *, after: Path) -> Self:
        """Begin a new file that continues the chain of `after` from its last intact entry.

        Its first entry is an `audit.segment` event naming the old file and why it was left (its report).
        """
        _check_key(key)
        report = verify_chain(after, key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            cls._lock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        next_index = 0 if report.last_index is None else report.last_index + 1
        writer = cls(fd, path, key, clock, next_index, report.last_mac or GENESIS_PREV)
        event: dict[str, Any] = {"type": SEGMENT_EVENT, "follows": after.name, "intact_entries": report.entries}
        if not report.ok:
            event |= {"reason": report.reason, "first_broken_line": report.first_broken_line}
        writer.append(event)
        return writer

    @staticmethod
    def _lock(fd: int, path: Path) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise AuditChainError(f"{path} is held by another writer") from exc

    @property
    def next_index(self) -> int:
        return self._next_index

    @property
    def last_mac(self) -> str:
        return self._prev

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Append one event durably (written and fsynced before this returns); returns the entry written.

        After a failed write or fsync the writer refuses further appends: the file may end in a partial line, and
        only a new segment (after a restart) may continue the chain.
        """
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise AuditChainError('an audit event is a JSON object with a string "type"')
        if len(canonical_json(event)) > MAX_EVENT_BYTES:
            raise AuditChainError(f"audit event over {MAX_EVENT_BYTES} bytes")
        with self._append_lock:
            if self._fd is None or self._failed:
                raise AuditChainError(f"audit chain writer for {self.path} is closed or failed")
            entry: dict[str, Any] = {
                "index": self._next_index,
                "time": self._clock.now().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "event": event,
                "prev": self._prev,
            }
            entry["mac"] = entry_mac(self._key, entry)
            line = canonical_json(entry) + b"\n"
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(f"short write: {written} of {len(line)} bytes")
                os.fsync(self._fd)
            except OSError as exc:
                self._failed = True
                raise AuditChainError(f"cannot append to {self.path}: {exc}") from exc
            self._next_index += 1
            self._prev = entry["mac"]
            return entry

    def close(self) -> None:
        with self._append_lock:
            if self._fd is not None:
                os.close(self._fd)  # closing releases the flock
                self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
