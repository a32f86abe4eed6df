"""A child process that uses the outbox and gets SIGKILLed by the crash tests in `test_outbox.py`.

    python -m tests.terminal.outbox_child claim <db> <count>   enqueue <count>, claim them all, report, wait
    python -m tests.terminal.outbox_child fill <db> <batch>    enqueue_many(<batch>) forever, reporting each commit

Each report is one line on stdout, flushed, written only after the transaction it describes has committed.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

from protocol import AuditEvent, AuditOutcome, SystemClock
from terminal.config import OutboxConfig
from terminal.outbox import Outbox

DEVICE_ID = "SIM-0001"


def _open(db: Path) -> Outbox:
    config = OutboxConfig(path=db, max_bytes=64 * 1024 * 1024, batch_size=1000)
    return Outbox.open(config, device_id=DEVICE_ID, boot_id=uuid.uuid4(), clock=SystemClock())


def _event(n: int) -> AuditEvent:
    return AuditEvent(category="system", action="crash.test", outcome=AuditOutcome.INFO, detail={"n": n})


def claim(db: Path, count: int) -> None:
    outbox = _open(db)
    envelopes = outbox.enqueue_many([_event(n) for n in range(count)])
    claimed = outbox.claim(count)
    sys.stdout.write(f"enqueued {' '.join(str(e.seq) for e in envelopes)}\n")
    sys.stdout.write(f"claimed {' '.join(str(r.seq) for r in claimed)}\n")
    sys.stdout.flush()
    time.sleep(600)  # killed long before this ends; never acks


def fill(db: Path, batch: int) -> None:
    outbox = _open(db)
    n = 0
    while True:
        envelopes = outbox.enqueue_many([_event(n + i) for i in range(batch)])
        n += batch
        sys.stdout.write(f"committed {envelopes[-1].seq}\n")
        sys.stdout.flush()


def main(argv: list[str]) -> None:
    command, db, number = argv[0], Path(argv[1]), int(argv[2])
    if command == "claim":
        claim(db, number)
    elif command == "fill":
        fill(db, number)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
