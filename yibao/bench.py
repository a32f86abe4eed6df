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
from collections.abc import Callable
from functools import partial
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


def _rate(op: Callable[[], object], seconds: float) -> float:
    """Calls per second of `op`, timed over about `seconds` (at least 3 calls)."""
    calls = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while calls < 3 or time.perf_counter() < deadline:
        op()
        calls += 1
    return calls / (time.perf_counter() - t0)


def bench_crypto(*, seconds: float) -> str:
    """国密 figures: SM2 via GmSSL (gmssl_pyx), SM3/SM4 via OpenSSL (cryptography), and pure gmssl for comparison."""
    from protocol.gm import Party, agree_session_key, hmac_sm3, sm2, sm3_digest, sm4

    key = sm2.SM2PrivateKey.generate()
    message = os.urandom(256)
    signature = sm2.sign(key, message)
    peer = sm2.SM2PrivateKey.generate()
    initiator, responder = Party(key.public_key), Party(peer.public_key)

    def agreement() -> bytes:
        mine = sm2.SM2PrivateKey.generate()  # ephemeral, as a real handshake does
        return agree_session_key(mine, peer.public_key, initiator=initiator, responder=responder, info=b"bench")

    figures: dict[str, Any] = {
        "sm2_keygen_per_s": round(_rate(sm2.SM2PrivateKey.generate, seconds)),
        "sm2_sign_per_s": round(_rate(partial(sm2.sign, key, message), seconds)),
        "sm2_verify_per_s": round(_rate(partial(sm2.verify, key.public_key, message, signature), seconds)),
        "key_agreement_per_s": round(_rate(agreement, seconds)),
    }
    mac_key = os.urandom(32)
    aead_key = sm4.generate_key()
    for size, label in ((1024, "1k"), (64 * 1024, "64k"), (1024 * 1024, "1m")):
        data = os.urandom(size)
        sealed = sm4.seal(aead_key, data, b"aad")
        mb = size / 1e6
        if size >= 64 * 1024:
            figures[f"sm3_mb_s_{label}"] = round(_rate(partial(sm3_digest, data), seconds) * mb, 1)
            figures[f"hmac_sm3_mb_s_{label}"] = round(_rate(partial(hmac_sm3, mac_key, data), seconds) * mb, 1)
        if size <= 64 * 1024:
            seal, unseal = partial(sm4.seal, aead_key, data, b"aad"), partial(sm4.open, aead_key, sealed, b"aad")
            figures[f"sm4_gcm_seal_mb_s_{label}"] = round(_rate(seal, seconds) * mb, 1)
            figures[f"sm4_gcm_open_mb_s_{label}"] = round(_rate(unseal, seconds) * mb, 1)
    figures["sm4_gcm_seal_per_s_1k"] = round(figures["sm4_gcm_seal_mb_s_1k"] * 1e6 / 1024)
    figures |= _bench_audit_chain(seconds)
    figures |= _bench_pure_gmssl(key, message, seconds)
    return json.dumps({"bench": "crypto", "seconds_per_figure": seconds, **figures, "machine": machine()})


def _bench_audit_chain(seconds: float) -> dict[str, Any]:
    """Durable appends (one fsync each) and full verification of the HMAC-SM3 audit chain on this disk."""
    from protocol.gm import AuditChainWriter, verify_chain

    key = os.urandom(32)
    event = {"type": "flow.step", "flow": "settlement", "step": "pay", "outcome": "ok", "terminal": "BENCH-0001"}
    with tempfile.TemporaryDirectory(prefix="yibao-bench-") as tmp:
        path = Path(tmp) / "audit.jsonl"
        with AuditChainWriter.open(path, key, SystemClock()) as writer:
            append_rate = _rate(partial(writer.append, event), seconds)
            entries = writer.next_index
        t0 = time.perf_counter()
        report = verify_chain(path, key)
        verify_s = time.perf_counter() - t0
        size = path.stat().st_size
    return {
        "audit_append_fsync_per_s": round(append_rate),
        "audit_verify_entries_per_s": round(report.entries / verify_s),
        "audit_entries_written": entries,
        "audit_entry_bytes": round(size / entries),
    }


def _bench_pure_gmssl(key: Any, message: bytes, seconds: float) -> dict[str, Any]:
    """The pure-Python `gmssl` (a dev-only dependency) on the same key, for the comparison in docs/crypto.md."""
    try:
        from gmssl import func
        from gmssl import sm2 as pure_sm2
    except ImportError:
        return {"pure_gmssl": "not installed (dev extra)"}
    crypt = pure_sm2.CryptSM2(private_key=key.secret_bytes().hex(), public_key=key.public_key.raw_xy.hex(), mode=1)
    signature = crypt.sign_with_sm3(message, func.random_hex(crypt.para_len))
    return {
        "pure_gmssl_sm2_sign_per_s": round(
            _rate(lambda: crypt.sign_with_sm3(message, func.random_hex(crypt.para_len)), seconds), 1
        ),
        "pure_gmssl_sm2_verify_per_s": round(_rate(lambda: crypt.verify_with_sm3(signature, message), seconds), 1),
    }
