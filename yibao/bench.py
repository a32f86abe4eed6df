"""`yibao bench …`: benchmarks that print one JSON line of figures each.

Benchmarks live apart from the tests: the tests prove behaviour, these measure it. Results go into
docs/benchmarks.md together with the command and the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from protocol import AuditEvent, AuditOutcome, SystemClock
from terminal.config import OutboxConfig
from terminal.outbox import Outbox


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):  # not Linux, or /proc hidden: the figure is informative only
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def bench_outbox(*, records: int, batch: int) -> str:
    """Enqueue `records` audit events in transactions of `batch`, then claim and mark them sent."""
    events = [
        AuditEvent(category="bench", action="bench.record", outcome=AuditOutcome.INFO, detail={"n": i})
        for i in range(records)
    ]
    with tempfile.TemporaryDirectory(prefix="yibao-bench-") as tmp:
        config = OutboxConfig(path=Path(tmp) / "outbox.sqlite3", batch_size=min(batch, 1000))
        with Outbox.open(config, device_id="BENCH-0001", boot_id=uuid.uuid4(), clock=SystemClock()) as outbox:
            t0 = time.perf_counter()
            for i in range(0, records, batch):
                outbox.enqueue_many(events[i : i + batch])
            t1 = time.perf_counter()
            drained = 0
            while claimed := outbox.claim(batch):
                drained += outbox.mark_sent(c.seq for c in claimed)
            t2 = time.perf_counter()
            size = outbox.stats().used_bytes
        single = Outbox.open(
            OutboxConfig(path=Path(tmp) / "single.sqlite3"),
            device_id="BENCH-0002",
            boot_id=uuid.uuid4(),
            clock=SystemClock(),
        )
        with single:
            n_single = min(records, 500)
            t3 = time.perf_counter()
            for event in events[:n_single]:
                single.enqueue(event)
            t4 = time.perf_counter()
    return json.dumps(
        {
            "bench": "outbox",
            "records": records,
            "batch": batch,
            "enqueue_batched_per_s": round(records / (t1 - t0), 1),
            "claim_and_ack_per_s": round(drained / (t2 - t1), 1),
            "enqueue_single_per_s": round(n_single / (t4 - t3), 1),
            "drained": drained,
            "used_bytes": size,
            "synchronous": "FULL",
            "machine": machine(),
        }
    )
