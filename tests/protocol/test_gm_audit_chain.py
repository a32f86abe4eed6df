"""The HMAC-SM3 hash-chained audit log: intact chains, every kind of tampering, resume, segments, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from protocol.gm import AuditChainError, AuditChainWriter, KeyFormatError, verify_chain, write_chain_key
from protocol.gm.audit_chain import GENESIS_PREV, entry_mac

KEY = bytes(range(32))


class StepClock:
    """A clock that moves one second per reading."""

    def __init__(self) -> None:
        self._t = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)

    def now(self) -> datetime:
        self._t += timedelta(seconds=1)
        return self._t

    def monotonic(self) -> float:
        return self._t.timestamp()

    def monotonic_ns(self) -> int:
        return int(self._t.timestamp() * 1e9)


def _write(path: Path, count: int) -> None:
    with AuditChainWriter.open(path, KEY, StepClock()) as writer:
        for i in range(count):
            writer.append({"type": "flow.step", "n": i})


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    _write(path, 6)
    return path


def test_intact_chain(chain: Path) -> None:
    report = verify_chain(chain, KEY)
    assert report.ok
    assert report.entries == 6
    assert report.last_index == 5
    first = json.loads(_lines(chain)[0])
    assert first["prev"] == GENESIS_PREV
    assert first["index"] == 0
    assert first["time"] == "2026-11-23T08:00:01.000000Z"
    assert stat_mode(chain) == 0o600


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_empty_file_is_an_intact_empty_chain(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.touch()
    report = verify_chain(path, KEY)
    assert report.ok
    assert report.entries == 0


def test_edited_field_is_a_mac_mismatch(chain: Path) -> None:
    lines = _lines(chain)
    lines[3] = lines[3].replace('"n":3', '"n":4')
    chain.write_text("".join(lines), encoding="utf-8")
    report = verify_chain(chain, KEY)
    assert not report.ok
    assert (report.reason, report.first_broken_index, report.first_broken_line, report.entries) == (
        "mac_mismatch",
        3,
        4,
        3,
    )


def test_deleted_middle_line_is_a_prev_mismatch(chain: Path) -> None:
    lines = _lines(chain)
    del lines[2]
    chain.write_text("".join(lines), encoding="utf-8")
    report = verify_chain(chain, KEY)
    assert (report.reason, report.first_broken_index, report.first_broken_line) == ("prev_mismatch", 2, 3)
    assert "deleted" in report.detail


def test_reordered_lines_are_a_prev_mismatch(chain: Path) -> None:
    lines = _lines(chain)
    lines[1], lines[2] = lines[2], lines[1]
    chain.write_text("".join(lines), encoding="utf-8")
    report = verify_chain(chain, KEY)
    assert (report.reason, report.first_broken_line) == ("prev_mismatch", 2)


def test_inserted_forged_line_without_the_key_is_refused(chain: Path) -> None:
    lines = _lines(chain)
    previous = json.loads(lines[2])
    forged = {"index": 3, "time": previous["time"], "event": {"type": "flow.step", "n": 99}, "prev": previous["mac"]}
    forged["mac"] = entry_mac(b"attacker guess key!", forged)
    lines.insert(3, json.dumps(forged) + "\n")
    chain.write_text("".join(lines), encoding="utf-8")
    report = verify_chain(chain, KEY)
    assert (report.reason, report.first_broken_line) == ("mac_mismatch", 4)


def test_replayed_duplicate_line_is_refused(chain: Path) -> None:
    lines = _lines(chain)
    lines.insert(3, lines[2])
    chain.write_text("".join(lines), encoding="utf-8")
    report = verify_chain(chain, KEY)
    assert (report.reason, report.first_broken_line) == ("prev_mismatch", 4)


def test_truncated_tail_and_garbage_line(chain: Path) -> None:
    data = chain.read_bytes()
    chain.write_bytes(data[:-10])
    report = verify_chain(chain, KEY)
    assert (report.reason, report.first_broken_line, report.entries) == ("truncated", 6, 5)
    chain.write_bytes(data + b"not json\n")
    assert verify_chain(chain, KEY).reason == "unparseable"


def test_removed_head_is_a_bad_start(chain: Path) -> None:
    chain.write_text("".join(_lines(chain)[2:]), encoding="utf-8")
    assert verify_chain(chain, KEY).reason == "bad_start"


def test_wrong_key_breaks_at_the_first_line(chain: Path) -> None:
    report = verify_chain(chain, bytes(32))
    assert (report.reason, report.first_broken_line, report.entries) == ("mac_mismatch", 1, 0)


def test_resume_after_restart_continues_the_chain(chain: Path) -> None:
    with AuditChainWriter.open(chain, KEY, StepClock()) as writer:
        assert writer.next_index == 6
        entry = writer.append({"type": "terminal.started"})
    assert entry["index"] == 6
    assert entry["prev"] == json.loads(_lines(chain)[5])["mac"]
    report = verify_chain(chain, KEY)
    assert report.ok
    assert report.entries == 7


def test_second_writer_is_refused_while_one_holds_the_file(chain: Path) -> None:
    with AuditChainWriter.open(chain, KEY, StepClock()), pytest.raises(AuditChainError, match="another writer"):
        AuditChainWriter.open(chain, KEY, StepClock())


def test_broken_tail_refuses_append_until_a_new_segment_links_on(chain: Path, tmp_path: Path) -> None:
    chain.write_bytes(chain.read_bytes()[:-10])  # a crash cut the last write
    with pytest.raises(AuditChainError, match="start a new segment"):
        AuditChainWriter.open(chain, KEY, StepClock())
    segment = tmp_path / "audit.0002.jsonl"
    with AuditChainWriter.start_segment(segment, KEY, StepClock(), after=chain) as writer:
        writer.append({"type": "flow.step", "n": 100})
    first = json.loads(_lines(segment)[0])
    assert first["event"] == {
        "type": "audit.segment",
        "follows": "audit.jsonl",
        "intact_entries": 5,
        "reason": "truncated",
        "first_broken_line": 6,
    }
    old = verify_chain(chain, KEY)
    new = verify_chain(segment, KEY)
    assert new.ok
    assert new.starts_after == old.last_mac
    assert first["index"] == 5
    # the segment continues: appending to it after a restart works
    with AuditChainWriter.open(segment, KEY, StepClock()) as writer:
        assert writer.next_index == 7


def test_events_must_be_small_typed_objects(tmp_path: Path) -> None:
    with AuditChainWriter.open(tmp_path / "a.jsonl", KEY, StepClock()) as writer:
        with pytest.raises(AuditChainError, match="type"):
            writer.append({"n": 1})
        with pytest.raises(AuditChainError, match="over"):
            writer.append({"type": "x", "blob": "a" * 5000})
    with pytest.raises(KeyFormatError):
        AuditChainWriter.open(tmp_path / "b.jsonl", b"short", StepClock())


def test_concurrent_appends_from_threads_keep_the_chain_intact(tmp_path: Path) -> None:
    path = tmp_path / "threads.jsonl"
    with AuditChainWriter.open(path, KEY, StepClock()) as writer:

        def record(worker: int) -> None:
            for n in range(50):
                writer.append({"type": "flow.step", "worker": worker, "n": n})

        threads = [threading.Thread(target=record, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    report = verify_chain(path, KEY)
    assert report.ok
    assert report.entries == 200


def test_a_failed_write_stops_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "fail.jsonl"
    writer = AuditChainWriter.open(path, KEY, StepClock())
    writer.append({"type": "flow.step"})
    fd = writer._fd
    assert fd is not None
    os.close(fd)  # the disk "goes away" under the writer
    with pytest.raises(AuditChainError, match="cannot append"):
        writer.append({"type": "flow.step"})
    with pytest.raises(AuditChainError, match="failed"):
        writer.append({"type": "flow.step"})
    writer._fd = None  # already closed above


def test_times_are_written_in_utc(tmp_path: Path) -> None:
    class BeijingClock(StepClock):
        def now(self) -> datetime:
            return datetime(2026, 11, 23, 16, 0, tzinfo=timezone(timedelta(hours=8)))

    path = tmp_path / "tz.jsonl"
    with AuditChainWriter.open(path, KEY, BeijingClock()) as writer:
        entry = writer.append({"type": "flow.step"})
    assert entry["time"] == "2026-11-23T08:00:00.000000Z"


# ---------------------------------------------------------------- the CLI, end to end


def _yibao(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "yibao", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def test_cli_verify_intact_broken_and_usage_errors(chain: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "audit.key"
    write_chain_key(key_file, KEY)

    ok = _yibao("audit", "verify", str(chain), "--key-file", str(key_file))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("intact:")
    assert "6 entries" in ok.stdout

    lines = _lines(chain)
    del lines[4]
    chain.write_text("".join(lines), encoding="utf-8")
    broken = _yibao("audit", "verify", str(chain), "--key-file", str(key_file), "--json")
    assert broken.returncode == 1
    report = json.loads(broken.stdout)
    assert (report["ok"], report["reason"], report["first_broken_line"]) == (False, "prev_mismatch", 5)

    assert _yibao("audit", "verify", str(tmp_path / "missing.jsonl"), "--key-file", str(key_file)).returncode == 2
    key_file.chmod(0o644)
    unsafe = _yibao("audit", "verify", str(chain), "--key-file", str(key_file))
    assert unsafe.returncode == 2
    assert "chmod 600" in unsafe.stderr
    assert _yibao("audit", "verify", str(chain)).returncode == 2  # --key-file missing
    assert KEY.hex() not in unsafe.stdout + unsafe.stderr + broken.stdout + ok.stdout


def test_cli_new_key_creates_a_private_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "new.key"
    assert _yibao("audit", "new-key", str(key_file)).returncode == 0
    assert stat_mode(key_file) == 0o600
    assert len(bytes.fromhex(key_file.read_text())) == 32
    assert _yibao("audit", "new-key", str(key_file)).returncode == 2
