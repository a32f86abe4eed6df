"""`yibao bench …`: benchmarks that print one JSON line of figures each.

Benchmarks live apart from the tests: the tests prove behaviour, these measure it. Results go into
docs/benchmarks.md together with the command and the machine.

`bench_sync` / `bench_sync_prefilled` own their whole stack for one run: a private Mosquitto on 127.0.0.1, the
server as a child process, a fresh PostgreSQL database (created and dropped) or SQLite in a temp dir, and the fleet
simulator. They must never send traffic anywhere but 127.0.0.1, never run unbounded (record counts and `duration_s`
bound every wait), never write to a database they did not create, and read the server's tables only after or
beside the run, read-only, for the accounting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import queue
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import AuditEvent, AuditOutcome, SystemClock, Topics
from terminal.config import OutboxConfig
from terminal.outbox import Outbox
from yibao.bench_secure import (
    SecureFleet,
    check_encryption,
    enrol_bench_fleet,
    reported_encryption,
    security_figures,
    server_env,
)
from yibao.procs import stop
from yibao.server_proc import ServerProcess, start_server_process

if TYPE_CHECKING:
    from hardware_sim.fleet import Fleet


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


# ---------------------------------------------------------------------- sync throughput and fleet


@dataclass(frozen=True)
class SyncBenchOptions:
    terminals: int
    events: int
    database_url: str | None = None
    """None: SQLite in the run's temp dir. A PostgreSQL URL names a server where we may CREATE DATABASE: the run
    gets a fresh database there and drops it afterwards."""
    duration_s: float = 300.0
    """Upper bound on waiting for every record to be stored (the run stops by itself then, reporting `lost`)."""
    hold_s: float = 0.0
    """After the records are stored (or with --events 0), keep the fleet connected this long to count heartbeats."""
    heartbeat_interval_s: float = 30.0
    network_threads: int = 2
    connect_timeout_s: float = 120.0
    scheduling: str = "threads"
    """How the fleet runs its terminals: 'threads' (each as a kiosk) or 'pooled'; see `hardware_sim.fleet`."""
    ceiling: bool = False
    """Instead of the server, a bare paho subscriber COPYing the same payloads into PostgreSQL (the ceiling)."""
    ceiling_too: bool = False
    """After the server's run, the same run again with the ceiling consumer; report both and their ratio."""
    ingest_workers: int = 0
    """`yibao server run --ingest-workers N`: 0 = the server process ingests itself."""
    encryption: str = "off"
    """'off': plaintext, anonymous. 'on': the fleet is enrolled first and seals every payload with SM4-GCM, the server
    requires it (`yibao.bench_secure`)."""


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of `pid` in seconds, from /proc/PID/stat (0.0 if unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (every thread's list in /proc; [] if unreadable)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found += [int(c) for c in (task / "children").read_text(encoding="ascii").split()]
    return found


def _postgres_cpu_s() -> float:
    """CPU seconds of every process named 'postgres' on this machine now (backends that exited are not counted)."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "comm").read_text(encoding="ascii").strip() == "postgres":
                    total += _proc_cpu_s(int(proc.name))
    return total


def _machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / tick, sum(values) / tick


def _utc(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"not a timestamp: {value!r}")
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


@contextlib.contextmanager
def _bench_database(url: str | None, workdir: Path) -> Iterator[str]:
    """The database URL for one run: SQLite in `workdir`, or a fresh PostgreSQL database dropped afterwards."""
    if url is None:
        yield f"sqlite:///{workdir / 'server.sqlite3'}"
        return
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    admin_url = make_url(url)
    if not admin_url.get_backend_name().startswith("postgresql"):
        yield url
        return
    name = f"yibao_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield admin_url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


class _Sampler:
    """Once a second: terminals connected (fleet side and the server's devices_online) and a CPU snapshot."""

    def __init__(self, fleet: Fleet, base_url: str | None) -> None:
        self._fleet = fleet
        self._base_url = base_url
        self._stop = threading.Event()
        self.fleet_connected_peak = 0
        self.server_online_peak = 0
        self.status_online_peak = 0
        self.database_url: str | None = None
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def sample(self) -> None:
        import httpx

        self.fleet_connected_peak = max(self.fleet_connected_peak, self._fleet.connected())
        if self._base_url is None:
            return
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            body = httpx.get(f"{self._base_url}/api/v1/ingest/stats", timeout=10.0).json()
            self.server_online_peak = max(self.server_online_peak, int(body["database"]["devices_online"]))
        if self.database_url is not None:
            from sqlalchemy import create_engine, text
            from sqlalchemy.exc import SQLAlchemyError

            # Read-only: devices whose retained MQTT status the server holds as 'online' (no heartbeat condition).
            engine = create_engine(self.database_url)
            with contextlib.suppress(SQLAlchemyError), engine.connect() as conn:
                query = text("SELECT count(*) FROM devices WHERE link_state = 'online'")
                self.status_online_peak = max(self.status_online_peak, int(conn.execute(query).scalar_one()))
            engine.dispose()


class _AckClock:
    """When each record was stored, as the server says it: a listener on every device's downlink topic that keeps
    the arrival time of each `uplink_ack` (published right after the commit that stored the records it covers).

    The callback only appends; decoding happens after the run, so the listener costs the fleet's process little."""

    def __init__(self, host: str, port: int, prefix: str = "yibao/v1") -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self._seen: list[tuple[str, bytes, float]] = []
        self.unseal: Callable[[str, bytes], bytes | None] | None = None
        """With encryption on: opens a sealed downlink after the run (the arrival time is taken the same way)."""
        self._subscribed = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-acks-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.on_message = lambda _c, _u, m: self._seen.append((m.topic, bytes(m.payload), time.time()))
        client.on_subscribe = lambda *_args: self._subscribed.set()
        client.connect(host, port)
        client.subscribe(f"{prefix}/dev/+/down", qos=0)
        client.loop_start()
        self._client = client
        if not self._subscribed.wait(10.0):
            raise RuntimeError("the benchmark's ack listener got no SUBACK")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def stored_at(self) -> dict[str, tuple[list[int], list[float]]]:
        """Per device: the running maximum of `acked_through_seq` and the time each new maximum arrived."""
        from protocol import ContractError, UplinkAck, decode_downlink

        by_device: dict[str, tuple[list[int], list[float]]] = {}
        for topic, raw, at in self._seen:
            payload = raw if self.unseal is None else self.unseal(topic, raw)
            if payload is None:
                continue
            try:
                message = decode_downlink(payload)
            except ContractError:
                continue
            if not isinstance(message, UplinkAck):
                continue
            throughs, times = by_device.setdefault(message.device_id, ([], []))
            if not throughs or message.acked_through_seq > throughs[-1]:
                throughs.append(message.acked_through_seq)
                times.append(at)
        return by_device


def _stored_latencies(
    rows: list[tuple[str, int, datetime]], acks: dict[str, tuple[list[int], list[float]]]
) -> tuple[list[float], int]:
    """Enqueue → stored (first ack covering the record) in ms for each record; and how many no ack covered."""
    import bisect

    latencies: list[float] = []
    uncovered = 0
    for device_id, seq, device_time in rows:
        throughs, times = acks.get(device_id, ([], []))
        i = bisect.bisect_left(throughs, seq)
        if i == len(throughs):
            uncovered += 1
            continue
        latencies.append((times[i] - device_time.timestamp()) * 1000)
    latencies.sort()
    return latencies, uncovered


def _server_pids(server_pid: int) -> dict[str, list[int]]:
    return {"server": [server_pid], "ingest_workers": _child_pids(server_pid)}


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(_proc_cpu_s(p) for p in group) for name, group in pids.items()}


def bench_sync(options: SyncBenchOptions) -> str:
    """One JSON line: the server's run, and with `ceiling_too` the same run against the ceiling consumer."""
    return _run_with_ceiling(options, _sync_once)


def _run_with_ceiling(options: SyncBenchOptions, once: Callable[..., dict[str, Any]]) -> str:
    check_encryption(options.encryption, ceiling=options.ceiling)
    if options.ceiling_too:
        ours = once(options, ceiling=False)
        ceiling = once(options, ceiling=True)
        return json.dumps(_with_ceiling(ours, ceiling))
    return json.dumps(once(options, ceiling=options.ceiling))


def _with_ceiling(ours: dict[str, Any], ceiling: dict[str, Any]) -> dict[str, Any]:
    keep = ("records_per_s", "stored", "cpu_s_during_drain", "cpu_s_while_draining", "drain_s", "machine_busy_share")
    ours["ceiling"] = {k: ceiling[k] for k in keep if k in ceiling}
    if ceiling.get("records_per_s"):
        ours["ratio_to_ceiling"] = round(ours["records_per_s"] / ceiling["records_per_s"], 2)
    return ours


def _sync_once(options: SyncBenchOptions, *, ceiling: bool) -> dict[str, Any]:
    """Broker + server (child process, with its ingest workers) or the ceiling consumer (child process) + fleet on
    loopback; every terminal enqueues events/terminals audit records at once."""
    from hardware_sim.fleet import FDS_PER_TERMINAL, Fleet, FleetOptions, raise_open_file_limit
    from yibao.broker import MosquittoBroker

    per_terminal = options.events // options.terminals if options.terminals else 0
    total = per_terminal * options.terminals
    nofile = raise_open_file_limit(options.terminals * FDS_PER_TERMINAL + 4096)
    # One start/stop line per terminal is noise at fleet scale; warnings and errors still show.
    logging.getLogger("terminal.runtime").setLevel(logging.WARNING)
    figures: dict[str, Any] = {"bench": "sync_ceiling" if ceiling else "sync"}
    with tempfile.TemporaryDirectory(prefix="yibao-bench-sync-") as tmp:
        workdir = Path(tmp)
        with _bench_database(options.database_url, workdir) as database_url:
            broker = MosquittoBroker(workdir=workdir / "mosquitto", max_queued_messages=1_000_000)
            broker.start()
            server: subprocess.Popen[bytes] | None = None
            consumer: _CeilingProcess | None = None
            fleet: Fleet | None = None
            acks: _AckClock | None = None
            secure: SecureFleet | None = None
            try:
                base_url: str | None = None
                if ceiling:
                    consumer = _CeilingProcess(broker, database_url, workdir, create=True)
                    consumer_pids = {"ceiling": [consumer.pid]}
                else:
                    env = server_env(options.encryption)
                    started = start_server_child(database_url, broker, workdir, options.ingest_workers, env)
                    server, base_url = started.proc, started.base_url
                    consumer_pids = _server_pids(server.pid)
                    if options.encryption == "on":  # enrolment is outside the throughput window
                        secure = enrol_bench_fleet(started, options.terminals, workdir)
                    acks = _AckClock(broker.host, broker.port)
                fleet = Fleet(
                    FleetOptions(
                        terminals=options.terminals,
                        broker_host=broker.host,
                        broker_port=broker.port,
                        workdir=workdir / "fleet",
                        heartbeat_interval_s=options.heartbeat_interval_s,
                        network_threads=options.network_threads,
                        scheduling="pooled" if options.scheduling == "pooled" else "threads",
                        sessions=None if secure is None else secure.sessions,
                    )
                )
                sampler = _Sampler(fleet, base_url)
                sampler.database_url = None if ceiling else database_url
                sampler.start()
                t_start = time.monotonic()
                fleet.start()
                connected = fleet.wait_connected(options.connect_timeout_s)
                connect_s = time.monotonic() - t_start
                sampler.sample()
                pids = consumer_pids | {"broker": [broker.pid or 0], "fleet": [os.getpid()]}
                logging.getLogger(__name__).info("bench: pids %s", pids)
                cpu0 = _cpu(pids) | {"postgres": _postgres_cpu_s()}
                busy0 = _machine_busy_s()
                t0 = time.monotonic()
                wall0 = datetime.now(UTC)
                fleet.enqueue_audits(per_terminal, action="bench.record")
                enqueue_s = time.monotonic() - t0
                stored_now = _wait_stored(options, database_url, total, t0, consumer)
                drain_s = time.monotonic() - t0
                sampler.sample()
                cpu1 = _cpu(pids) | {"postgres": _postgres_cpu_s()}
                busy1 = _machine_busy_s()
                hold_from = datetime.now(UTC)
                beats0 = fleet.heartbeats_enqueued()
                if options.hold_s > 0:
                    time.sleep(options.hold_s)
                hold_to = datetime.now(UTC)
                beats1 = fleet.heartbeats_enqueued()
                cpu2 = _cpu(pids) | {"postgres": _postgres_cpu_s()}
                busy2 = _machine_busy_s()
                sampler.stop()
                figures |= {
                    "terminals": options.terminals,
                    "scheduling": options.scheduling,
                    "ingest_workers": 0 if ceiling else options.ingest_workers,
                    "heartbeat_interval_s": options.heartbeat_interval_s,
                    "events": total,
                    "connected_after_start": connected,
                    "connect_s": round(connect_s, 1),
                    "enqueue_s": round(enqueue_s, 2),
                    "drain_s": round(drain_s, 2),
                    "stored_seen": stored_now,
                }
                if consumer is not None:
                    figures |= consumer.figures(total, wall0)
                else:
                    if acks is not None and secure is not None:
                        acks.unseal = secure.unseal
                    figures |= read_sync_results(database_url, total, wall0, hold_from, hold_to, acks)
                    if secure is not None:
                        figures |= secure.figures() | security_figures(database_url)
                    # The poll that saw every record committed (0.5 s resolution) ends the run.
                    figures["records_per_s"] = round(figures["stored"] / drain_s, 1) if stored_now >= total else 0.0
                    figures["connected_peak"] = sampler.server_online_peak
                    figures["connected_by_status_peak"] = sampler.status_online_peak
                figures["fleet_connected_peak"] = sampler.fleet_connected_peak
                busy = {name: round(cpu1[name] - cpu0[name], 2) for name in cpu1}
                figures["cpu_s_during_drain"] = busy
                cores = os.cpu_count() or 1
                figures["cpu_share_of_cores"] = {
                    name: round(value / max(drain_s, 1e-9) / cores, 2) for name, value in busy.items()
                }
                figures["machine_busy_share"] = round((busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1e-9), 2)
                if options.hold_s > 0:
                    held = (hold_to - hold_from).total_seconds()
                    figures["cpu_share_of_cores_while_holding"] = {
                        name: round((cpu2[name] - cpu1[name]) / held / cores, 2) for name in cpu2
                    }
                    figures["machine_busy_share_while_holding"] = round(
                        (busy2[0] - busy1[0]) / max(busy2[1] - busy1[1], 1e-9), 2
                    )
                    if beats0 is not None and beats1 is not None:
                        figures["heartbeats_enqueued_per_s_while_holding"] = round((beats1 - beats0) / held, 1)
                stored = int(figures.get("stored", 0))
                if stored:
                    per_k = stored / 1000
                    figures["cpu_s_per_1000"] = {name: round(value / per_k, 3) for name, value in busy.items()}
                    consumer_cpu = sum(busy[name] for name in consumer_pids)
                    key = "ceiling_cpu_s_per_1000" if ceiling else "ingest_cpu_s_per_1000"
                    figures[key] = round(consumer_cpu / per_k, 3)
            finally:
                if acks is not None:
                    acks.stop()
                if fleet is not None:
                    fleet.stop()
                if consumer is not None:
                    consumer.stop()
                if server is not None:
                    stop(server, name="server")
                broker.stop()
    figures |= {
        "database": "postgresql" if database_url.startswith("postgresql") else "sqlite",
        "encryption": reported_encryption(options.encryption),
        "open_files_limit": nofile[0],
        "machine": machine(),
    }
    return figures


def start_server_child(
    database_url: str, broker: Any, workdir: Path, ingest_workers: int = 0, env: Mapping[str, str] | None = None
) -> ServerProcess:
    return start_server_process(
        database_url=database_url,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        workdir=workdir,
        ingest_workers=ingest_workers,
        env=env,
    )


def _count_stored(database_url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(text("SELECT count(*) FROM events WHERE payload_type = 'audit_event'")).scalar_one()
            )
    finally:
        engine.dispose()


def _wait_stored(
    options: SyncBenchOptions, database_url: str, total: int, t0: float, consumer: _CeilingProcess | None
) -> int:
    """Poll (read-only, twice a second) until `total` records are stored or `duration_s` passed since `t0`."""
    stored = 0
    while time.monotonic() - t0 < options.duration_s:
        stored = consumer.copied() if consumer is not None else _count_stored(database_url)
        if stored >= total:
            break
        time.sleep(0.5)
    return stored


def read_sync_results(
    database_url: str,
    total: int,
    wall0: datetime,
    hold_from: datetime,
    hold_to: datetime,
    acks: _AckClock | None = None,
) -> dict[str, Any]:
    """After the run, read the stored records read-only: exactly-once accounting, latency, throughput, heartbeats."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT device_id, seq, device_time, received_at, payload FROM events "
                    "WHERE payload_type = 'audit_event'"
                )
            ).all()
            beats = conn.execute(
                text("SELECT received_at FROM events WHERE payload_type = 'heartbeat' AND received_at >= :t0"),
                {"t0": wall0.replace(tzinfo=None) if database_url.startswith("sqlite") else wall0},
            ).all()
    finally:
        engine.dispose()
    seen: set[tuple[str, int]] = set()
    duplicated = 0
    to_receipt: list[float] = []
    keyed: list[tuple[str, int, datetime]] = []
    first_enqueue: datetime | None = None
    last_received: datetime | None = None
    for device_id, seq, device_time, received_at, payload in rows:
        body = json.loads(payload) if isinstance(payload, str) else payload
        key = (str(device_id), int(body["detail"]["n"]))
        if key in seen:
            duplicated += 1
        seen.add(key)
        sent, got = _utc(device_time), _utc(received_at)
        to_receipt.append((got - sent).total_seconds() * 1000)
        keyed.append((str(device_id), int(seq), sent))
        first_enqueue = sent if first_enqueue is None else min(first_enqueue, sent)
        last_received = got if last_received is None else max(last_received, got)
    to_receipt.sort()
    span = (last_received - first_enqueue).total_seconds() if first_enqueue and last_received else 0.0
    beat_times = [_utc(b[0]) for b in beats]
    in_hold = sum(1 for t in beat_times if hold_from <= t <= hold_to)
    hold_s = (hold_to - hold_from).total_seconds()
    figures: dict[str, Any] = {
        "stored": len(seen),
        "lost": total - len(seen),
        "duplicated": duplicated,
        "records_per_s_by_received_at": round(len(seen) / span, 1) if span > 0 else 0.0,
        "p50_ms_to_receipt": round(_percentile(to_receipt, 0.50), 1),
        "p99_ms_to_receipt": round(_percentile(to_receipt, 0.99), 1),
        "heartbeats_received": len(beat_times),
        "heartbeats_per_s_while_holding": round(in_hold / hold_s, 1) if hold_s > 0 else None,
        "hold_s": round(hold_s, 1),
    }
    if acks is not None:
        to_stored, uncovered = _stored_latencies(keyed, acks.stored_at())
        figures |= {
            "latency_to": "stored: the uplink_ack covering the record, published after its commit",
            "p50_ms": round(_percentile(to_stored, 0.50), 1),
            "p99_ms": round(_percentile(to_stored, 0.99), 1),
            "records_without_ack_seen": uncovered,
        }
    return figures


class _CeilingSubscriber:
    """The ceiling: a bare paho subscriber on every uplink topic COPYing the raw payloads into PostgreSQL.

    No decoding, no validation, no per-device acks, PUBACK on receipt (not after the commit): what the hardware and
    the libraries allow at best, so our server's figure can be read as a fraction of it. It runs in a process of its
    own (`yibao bench ceiling-consumer`, `_CeilingProcess`), as the server does, and reports its progress in a small
    JSON status file after every COPY."""

    def __init__(self, host: str, port: int, database_url: str, status_file: Path, *, create: bool = True) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        if not database_url.startswith("postgresql"):
            raise ValueError("the ceiling needs a PostgreSQL --database-url (it measures COPY)")
        self._dsn = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._status_file = status_file
        self.copied = 0
        self.first_copy: float | None = None
        self.last_copy: float | None = None
        self._create = create
        self._topics = Topics()
        # A persistent session (clean_session=False), like the server's: the broker queues for it while it is away.
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-ceiling", clean_session=False
        )
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(self._topics.all_uplinks, qos=1)
        client.on_subscribe = lambda *_args: self._subscribed.set()
        client.on_message = lambda c, u, m: self._inbox.put((m.topic, bytes(m.payload)))
        client.max_inflight_messages_set(1000)
        self._client = client
        self._host, self._port = host, port
        self._writer = threading.Thread(target=self._run, name="bench-ceiling-copy", daemon=True)

    def start(self) -> None:
        import psycopg

        if self._create:
            with psycopg.connect(self._dsn) as conn:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS ceiling_events (device_id text NOT NULL, payload text NOT NULL)"
                )
        self._writer.start()
        self._client.connect(self._host, self._port)
        self._client.loop_start()
        if not self._subscribed.wait(10.0):
            raise RuntimeError("the ceiling subscriber got no SUBACK")
        self._write_status()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._stop.set()
        self._writer.join(10.0)

    def _write_status(self) -> None:
        doc = {"subscribed": True, "copied": self.copied, "first_copy": self.first_copy, "last_copy": self.last_copy}
        tmp = self._status_file.with_name(self._status_file.name + ".tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        tmp.replace(self._status_file)

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(self._dsn) as conn:
            while not self._stop.is_set():
                try:
                    batch = [self._inbox.get(timeout=0.05)]
                except queue.Empty:
                    continue
                with contextlib.suppress(queue.Empty):
                    while len(batch) < 500:
                        batch.append(self._inbox.get_nowait())
                with conn.cursor() as cur, cur.copy("COPY ceiling_events (device_id, payload) FROM STDIN") as copy:
                    for topic, payload in batch:
                        copy.write_row((self._topics.device_of(topic) or "", payload.decode("utf-8")))
                conn.commit()
                self.copied += sum(1 for _t, p in batch if b'"audit_event"' in p)
                self.last_copy = time.time()
                if self.first_copy is None:
                    self.first_copy = self.last_copy
                self._write_status()


def run_ceiling_consumer(host: str, port: int, database_url: str, status_file: Path, *, create: bool) -> None:
    """`yibao bench ceiling-consumer`: the ceiling subscriber until SIGTERM/SIGINT."""
    import signal

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: stopping.set())
    subscriber = _CeilingSubscriber(host, port, database_url, status_file, create=create)
    subscriber.start()
    try:
        stopping.wait()
    finally:
        subscriber.stop()


class _CeilingProcess:
    """The ceiling subscriber as a child process; its progress is read from its status file."""

    def __init__(self, broker: Any, database_url: str, workdir: Path, *, create: bool) -> None:
        from yibao.procs import spawn, yibao_argv

        self._status = workdir / f"ceiling-{uuid.uuid4().hex[:6]}.json"
        argv = ["bench", "ceiling-consumer", "--mqtt-host", broker.host, "--mqtt-port", str(broker.port)]
        argv += ["--database-url", database_url, "--status-file", str(self._status)]
        argv += ["--create"] if create else []
        self.proc = spawn(yibao_argv(*argv), log_path=workdir / "ceiling.log")
        deadline = time.monotonic() + 60.0
        while not self._status.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the ceiling consumer did not start; see {workdir / 'ceiling.log'}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def state(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self._status.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"copied": 0, "first_copy": None, "last_copy": None}
        return doc

    def copied(self) -> int:
        return int(self.state()["copied"])

    def stop(self) -> None:
        stop(self.proc, name="ceiling consumer")

    def drain_figures(self) -> dict[str, Any]:
        doc = self.state()
        first, last = doc["first_copy"], doc["last_copy"]
        span = last - first if first is not None and last is not None else 0.0
        return {"stored": doc["copied"], "records_per_s": round(doc["copied"] / span, 1) if span > 0 else 0.0}

    def figures(self, total: int, wall0: datetime) -> dict[str, Any]:
        doc = self.state()
        span = doc["last_copy"] - wall0.timestamp() if doc["last_copy"] else 0.0
        return {
            "stored": min(doc["copied"], total),
            "records_per_s": round(doc["copied"] / span, 1) if span > 0 else 0.0,
        }


def bench_sync_prefilled(options: SyncBenchOptions) -> str:
    """One JSON line: the server draining a prefilled broker alone, and with `ceiling_too` the ceiling likewise."""
    return _run_with_ceiling(options, _prefilled_once)


def _prefilled_once(options: SyncBenchOptions, *, ceiling: bool) -> dict[str, Any]:
    """The consumer alone on the machine: the fleet publishes everything into the broker while the server (or the
    ceiling subscriber) is away, the fleet stops, then the consumer drains the broker's queue for its persistent
    session(s). With ingest workers, each worker's session holds its share of the shared subscription."""
    from hardware_sim.fleet import FDS_PER_TERMINAL, Fleet, FleetOptions, raise_open_file_limit
    from yibao.broker import MosquittoBroker

    per_terminal = options.events // options.terminals
    total = per_terminal * options.terminals
    raise_open_file_limit(options.terminals * FDS_PER_TERMINAL + 4096)
    logging.getLogger("terminal.runtime").setLevel(logging.WARNING)
    figures: dict[str, Any] = {"bench": "sync_prefilled_ceiling" if ceiling else "sync_prefilled"}
    with tempfile.TemporaryDirectory(prefix="yibao-bench-sync-") as tmp:
        workdir = Path(tmp)
        with _bench_database(options.database_url, workdir) as database_url:
            broker = MosquittoBroker(workdir=workdir / "mosquitto", max_queued_messages=10_000_000)
            broker.start()
            consumer: _CeilingProcess | None = None
            server: subprocess.Popen[bytes] | None = None
            try:
                # 1. The consumer subscribes once (creating its persistent sessions), then goes away. With
                # encryption the fleet is enrolled and handshaken against that first server run (keys and sessions
                # are in its database and data dir, so the second run opens the frames).
                secure: SecureFleet | None = None
                env = server_env(options.encryption)
                if ceiling:
                    _CeilingProcess(broker, database_url, workdir, create=True).stop()
                else:
                    first = start_server_child(database_url, broker, workdir, options.ingest_workers, env=env)
                    try:
                        if options.encryption == "on":
                            secure = enrol_bench_fleet(first, options.terminals, workdir / "enrolment")
                    finally:
                        stop(first.proc, name="server")
                # 2. The fleet publishes everything; the broker queues it for the absent consumer.
                fleet = Fleet(
                    FleetOptions(
                        terminals=options.terminals,
                        broker_host=broker.host,
                        broker_port=broker.port,
                        workdir=workdir / "fleet",
                        heartbeat_interval_s=3600.0,
                        network_threads=options.network_threads,
                        scheduling="pooled" if options.scheduling == "pooled" else "threads",
                        sessions=None if secure is None else secure.sessions,
                    )
                )
                try:
                    fleet.start()
                    fleet.wait_connected(options.connect_timeout_s)
                    fleet.enqueue_audits(per_terminal, action="bench.record")
                    deadline = time.monotonic() + options.duration_s
                    while time.monotonic() < deadline:
                        if sum(t.runtime.outbox.stats().unpublished for t in fleet.terminals) == 0:
                            break
                        time.sleep(0.5)
                finally:
                    fleet.stop()
                # 3. The consumer alone drains the queue. Its CPU includes its start-up (conservative).
                cpu0 = {"broker": _proc_cpu_s(broker.pid or 0), "postgres": _postgres_cpu_s()}
                busy0 = _machine_busy_s()
                t0 = time.monotonic()
                if ceiling:
                    consumer = _CeilingProcess(broker, database_url, workdir, create=False)
                    consumer_pids = {"ceiling": [consumer.pid]}
                else:
                    server = start_server_child(database_url, broker, workdir, options.ingest_workers, env=env).proc
                    consumer_pids = _server_pids(server.pid)
                started_s = time.monotonic() - t0
                while time.monotonic() - t0 < options.duration_s:
                    done = consumer.copied() if consumer is not None else _count_stored(database_url)
                    if done >= total:
                        break
                    time.sleep(0.5)
                drain_s = time.monotonic() - t0
                cpu1 = _cpu(consumer_pids) | {"broker": _proc_cpu_s(broker.pid or 0), "postgres": _postgres_cpu_s()}
                busy1 = _machine_busy_s()
                if consumer is not None:
                    figures |= consumer.drain_figures()
                else:
                    figures |= _drain_figures(database_url, total)
                    figures["records_per_s_by_received_at"] = figures.pop("records_per_s")
                    figures["records_per_s"] = round(figures["stored"] / drain_s, 1)
                busy = {k: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1}
                consumer_cpu = sum(busy[name] for name in consumer_pids)
                key = "ceiling_cpu_s_per_1000" if ceiling else "ingest_cpu_s_per_1000"
                figures[key] = round(consumer_cpu / max(figures["stored"] / 1000, 1e-9), 3)
                figures |= {
                    "terminals": options.terminals,
                    "ingest_workers": 0 if ceiling else options.ingest_workers,
                    "events": total,
                    "wall_s_including_consumer_start": round(drain_s, 1),
                    "consumer_start_s": round(started_s, 1),
                    "records_per_s_after_start": round(total / max(drain_s - started_s, 1e-9), 1),
                    "cpu_s_while_draining": busy,
                    "machine_busy_share": round((busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1e-9), 2),
                }
                if secure is not None:
                    figures |= secure.figures() | security_figures(database_url)
            finally:
                if consumer is not None:
                    consumer.stop()
                if server is not None:
                    stop(server, name="server")
                broker.stop()
    figures |= {
        "database": "postgresql" if database_url.startswith("postgresql") else "sqlite",
        "encryption": "off" if ceiling else reported_encryption(options.encryption),
        "machine": machine(),
    }
    return figures


def _drain_figures(database_url: str, total: int) -> dict[str, Any]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            count, first, last = conn.execute(
                text(
                    "SELECT count(*), min(received_at), max(received_at) FROM events WHERE payload_type = 'audit_event'"
                )
            ).one()
    finally:
        engine.dispose()
    span = (_utc(last) - _utc(first)).total_seconds() if first is not None and last is not None else 0.0
    return {
        "stored": int(count),
        "lost": total - int(count),
        "records_per_s": round(int(count) / span, 1) if span > 0 else 0.0,
    }
