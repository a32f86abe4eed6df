"""`yibao bench outbox-kill`: SIGKILL a process in the middle of outbox transactions, many times, and check the file.

Owns both sides of the experiment:

* the child (`python -m yibao.outbox_kill child DB SEED`): opens the outbox (which recovers INFLIGHT rows, as a
  restarted terminal does) and runs a random mix of the sync worker's transactions forever: `enqueue_many` of 1..100
  records, `claim`, `mark_sent`, `mark_acked_through` (as the server acks: the highest seq below which everything
  was sent) and `release`. Before each operation it writes `begin OP ARGS` on stdout, after it returned
  `done OP RESULT`, flushed, so the parent knows exactly what committed;
* the parent (`bench_outbox_kill`): each round starts the child, waits until it begins the round's target operation
  (enqueue, claim, mark_sent, ack, release in turn), waits a random fraction of that operation's typical duration and
  SIGKILLs it. Then, before any recovery, it checks the file with plain sqlite3: `PRAGMA integrity_check`, seqs
  contiguous from 1, every row the child reported committed present, every row's status exactly what the reported
  operations imply — except that the one interrupted operation either happened entirely or not at all —, every
  envelope decodes into this device's envelope with its row's seq and message id. Then it opens the outbox the
  production way (recovery) and the next round's child continues on the same file.

It must never delete or rewrite the file between rounds (the file the child left is the evidence) and never import
from tests/.
"""

from __future__ import annotations

import collections
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from yibao.procs import die_with_parent

DEVICE_ID: Final = "KILL-0001"
PHASES: Final = ("enqueue", "claim", "sent", "ack", "release")
LIVE: Final = frozenset({"pending", "inflight", "sent"})


# ---------------------------------------------------------------------- the child


def _open_outbox(db: Path) -> Any:
    from protocol import SystemClock
    from terminal.config import OutboxConfig
    from terminal.outbox import Outbox

    config = OutboxConfig(path=db, max_bytes=1024**3, batch_size=1000, sent_retention_s=90 * 86400)
    return Outbox.open(config, device_id=DEVICE_ID, boot_id=uuid.uuid4(), clock=SystemClock())


def run_child(db: Path, seed: int) -> None:
    """The child's loop; never returns (the parent kills it)."""
    from protocol import AuditEvent, AuditOutcome
    from terminal.outbox import OutboxStatus

    rng = random.Random(seed)  # noqa: S311 - a workload mix, repeatable by its seed; nothing secret
    outbox = _open_outbox(db)
    status = {row.seq: row.status.value for row in outbox.rows() if row.status.value in LIVE}
    inflight = sorted(s for s, st in status.items() if st == OutboxStatus.INFLIGHT.value)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    n = 0
    while True:
        pending = [s for s, st in status.items() if st == "pending"]
        choices = ["enqueue"] + (["claim"] if pending else []) + (["sent", "release"] if inflight else [])
        ack_to = _ack_point(status)
        if ack_to:
            choices.append("ack")
        op = rng.choice(choices)
        if op == "enqueue":
            k = rng.randint(1, 100)
            out.write(f"begin enqueue {k}\n")
            out.flush()
            events = [
                AuditEvent(category="system", action="kill.test", outcome=AuditOutcome.INFO, detail={"n": n + i})
                for i in range(k)
            ]
            envelopes = outbox.enqueue_many(events)
            n += k
            status.update({e.seq: "pending" for e in envelopes})
            out.write(f"done enqueue {envelopes[0].seq} {envelopes[-1].seq}\n")
        elif op == "claim":
            k = rng.randint(1, 200)
            out.write(f"begin claim {k}\n")
            out.flush()
            claimed = [r.seq for r in outbox.claim(k)]
            status.update(dict.fromkeys(claimed, "inflight"))
            inflight = sorted(set(inflight) | set(claimed))
            out.write(f"done claim {' '.join(map(str, claimed))}\n")
        elif op in ("sent", "release"):
            chosen = inflight[: rng.randint(1, len(inflight))]
            out.write(f"begin {op} {' '.join(map(str, chosen))}\n")
            out.flush()
            if op == "sent":
                outbox.mark_sent(chosen)
            else:
                outbox.release(chosen, "kill test", backoff=False)
            status.update(dict.fromkeys(chosen, "sent" if op == "sent" else "pending"))
            inflight = [s for s in inflight if s not in set(chosen)]
            out.write(f"done {op}\n")
        else:
            out.write(f"begin ack {ack_to}\n")
            out.flush()
            outbox.mark_acked_through(ack_to)
            for seq in [s for s in status if s <= ack_to]:
                del status[seq]
            inflight = [s for s in inflight if s > ack_to]
            out.write("done ack\n")
        out.flush()


def _ack_point(status: dict[int, str]) -> int:
    """What a server would ack: the highest seq such that every live row at or below it is SENT (0 if none)."""
    point = 0
    for seq in sorted(status):
        if status[seq] != "sent":
            break
        point = seq
    return point


# ---------------------------------------------------------------------- the parent


@dataclass
class _Round:
    """What the child reported in one life: the operations it completed and the one it was in when killed."""

    done: list[tuple[str, list[int]]] = field(default_factory=list)
    interrupted: tuple[str, list[int]] | None = None


def _parse(lines: list[str]) -> _Round:
    result = _Round()
    pending: tuple[str, list[int]] | None = None
    for line in lines:
        parts = line.split()
        if not parts or parts[0] == "ready":
            continue
        if parts[0] == "begin":
            pending = (parts[1], [int(x) for x in parts[2:]])
        elif parts[0] == "done" and pending is not None:
            op, args = pending
            if op == "enqueue":
                first, last = int(parts[2]), int(parts[3])
                result.done.append((op, list(range(first, last + 1))))
            elif op == "claim":
                result.done.append((op, [int(x) for x in parts[2:]]))
            else:
                result.done.append((op, args))
            pending = None
    result.interrupted = pending
    return result


def _apply(model: dict[int, str], op: str, seqs: list[int]) -> None:
    if op == "enqueue":
        model.update(dict.fromkeys(seqs, "pending"))
    elif op == "claim":
        model.update(dict.fromkeys(seqs, "inflight"))
    elif op == "sent":
        model.update({s: "sent" for s in seqs if model.get(s) == "inflight"})
    elif op == "release":
        model.update({s: "pending" for s in seqs if model.get(s) == "inflight"})
    elif op == "ack":
        model.update({s: "acked" for s, st in model.items() if s <= seqs[0] and st in LIVE})


def _interrupted_outcome(model: dict[int, str], actual: dict[int, str], op: str, args: list[int]) -> str:
    """'rolled_back' (the file is as before the operation), 'committed' (the whole operation is there) or 'torn'
    (anything else: the rows that differ from the model are not exactly what the operation does)."""
    diff = {s for s in set(model) | set(actual) if model.get(s) != actual.get(s)}
    if not diff:
        return "rolled_back"
    if op == "enqueue":
        top = max(model, default=0)
        whole = diff == set(range(top + 1, top + args[0] + 1)) and all(actual[s] == "pending" for s in diff)
    elif op == "claim":
        whole = (
            len(diff) <= args[0]
            and all(model.get(s) == "pending" and actual.get(s) == "inflight" for s in diff)
            and diff == set(sorted(s for s, st in model.items() if st == "pending")[: len(diff)])
        )
    else:
        after = dict(model)
        _apply(after, op, args)
        whole = all(after.get(s) == actual.get(s) for s in set(after) | set(actual))
    return "committed" if whole else "torn"


def _check(db: Path, model: dict[int, str], report: _Round) -> tuple[list[str], int, int, dict[int, str], str]:
    """(problems, rows checked, reported-committed rows missing, actual statuses, outcome of the interrupted
    operation) of the file as the child left it."""
    from protocol import ContractError, decode_envelope

    problems: list[str] = []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        rows = conn.execute("SELECT seq, message_id, status, envelope FROM outbox ORDER BY seq").fetchall()
    finally:
        conn.close()
    if integrity != ["ok"]:
        problems.append(f"integrity_check: {integrity[:3]}")
    actual = {int(seq): str(st) for seq, _m, st, _e in rows}
    seqs = sorted(actual)
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append("seqs are not contiguous from 1")
    for seq, message_id, _st, envelope in rows:
        try:
            decoded = decode_envelope(str(envelope).encode("utf-8"))
        except ContractError as exc:
            problems.append(f"seq {seq} does not decode: {exc}")
            continue
        if decoded.seq != seq or str(decoded.message_id) != message_id or decoded.device_id != DEVICE_ID:
            problems.append(f"seq {seq}: envelope does not match its row")
    expected = dict(model)
    for op, seqs_done in report.done:
        _apply(expected, op, seqs_done)
    missing = sum(1 for s in expected if s not in actual)
    if missing:
        problems.append(f"{missing} committed row(s) missing")
    interrupted = report.interrupted
    outcome = "between_operations"
    if interrupted is None:
        if expected != actual:
            problems.append("statuses differ from the committed operations (killed between operations)")
    else:
        outcome = _interrupted_outcome(expected, actual, *interrupted)
        if outcome == "torn":
            problems.append(f"statuses differ from the committed operations plus all-or-nothing {interrupted[0]}")
    return problems, len(rows), missing, actual, outcome


def _reader(
    proc: subprocess.Popen[str],
    lines: list[str],
    begins: collections.deque[str],
    durations: dict[str, list[float]],
) -> None:
    """Collect the child's lines; announce each operation it begins; time the operations it completes."""
    if proc.stdout is None:
        return
    current: tuple[str, float] | None = None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("begin "):
            current = (line.split()[1], time.monotonic())
            begins.append(current[0])
        elif line.startswith("done ") and current is not None:
            durations[current[0]].append(time.monotonic() - current[1])
            current = None


def bench_outbox_kill(*, rounds: int, seed: int | None = None) -> dict[str, Any]:
    seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)  # noqa: S311 - a kill schedule, repeatable by its seed; nothing secret
    kills: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    durations: dict[str, list[float]] = collections.defaultdict(list)
    rows_checked = lost = corrupt_rounds = 0
    problems_seen: list[str] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="yibao-outbox-kill-") as tmp:
        db = Path(tmp) / "outbox.sqlite3"
        _open_outbox(db).close()
        model: dict[int, str] = {}
        for number in range(rounds):
            target = PHASES[number % len(PHASES)]
            proc = subprocess.Popen(
                [sys.executable, "-m", "yibao.outbox_kill", "child", str(db), str(rng.randrange(2**32))],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,  # prctl must run in the child
            )
            lines: list[str] = []
            begins: collections.deque[str] = collections.deque()
            reader = threading.Thread(target=_reader, args=(proc, lines, begins, durations), daemon=True)
            reader.start()
            try:
                _kill_during(proc, target, begins, durations, rng)
            finally:
                proc.kill()
                proc.wait()
                reader.join(10)
                if proc.stdout is not None:
                    proc.stdout.close()
            report = _parse(lines)
            phase = report.interrupted[0] if report.interrupted else "between_operations"
            kills[phase] += 1
            problems, checked, missing, actual, outcome = _check(db, model, report)
            outcomes[outcome] += 1
            rows_checked += checked
            lost += missing
            if problems:
                corrupt_rounds += 1
                problems_seen.extend(f"round {number}: {p}" for p in problems[:3])
            # Recovery the production way, then carry the file's real state into the next round's model.
            with _open_outbox(db) as outbox:
                if outbox.integrity_check() != ["ok"]:
                    corrupt_rounds += 1
                    problems_seen.append(f"round {number}: integrity after recovery")
            model = {s: ("pending" if st == "inflight" else st) for s, st in actual.items()}
    return {
        "bench": "outbox_kill",
        "rounds": rounds,
        "seed": seed,
        "kills_by_phase": dict(sorted(kills.items())),
        "interrupted_operation": dict(sorted(outcomes.items())),
        "rows_checked": rows_checked,
        "rows_at_end": len(model),
        "lost": lost,
        "corrupt": corrupt_rounds,
        "problems": problems_seen[:10],
        "ok": lost == 0 and corrupt_rounds == 0,
        "seconds": round(time.monotonic() - t0, 1),
        "median_op_ms": {op: round(sorted(v)[len(v) // 2] * 1000, 2) for op, v in sorted(durations.items()) if v},
    }


def _kill_during(
    proc: subprocess.Popen[str],
    target: str,
    begins: collections.deque[str],
    durations: dict[str, list[float]],
    rng: random.Random,
) -> None:
    """Wait (at most 10 s) for the child to begin `target`, then let it run a random fraction of that operation's
    typical duration (as the parent sees it, pipe latency included); the caller kills it right after."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and proc.poll() is None:
        while begins:
            if begins.popleft() == target:
                seen = list(durations[target])
                typical = sorted(seen)[len(seen) // 2] if seen else 0.005
                time.sleep(rng.uniform(0.0, typical))
                return
        time.sleep(0.0005)


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "child":
        run_child(Path(argv[1]), int(argv[2]))
        return
    raise SystemExit("usage: python -m yibao.outbox_kill child DB SEED")


if __name__ == "__main__":
    main(sys.argv[1:])
