"""`yibao bench sync --chaos`: fault tolerance, proven by breaking the running system on purpose.

Owns one chaos run: a private Mosquitto with persistence, `yibao server run` as a child process, N real terminal
processes (`yibao bench chaos-terminal`, the production runtime from `terminal.runtime.build_runtime`, each emitting
records at a steady rate), and one `yibao.tcpproxy.TcpProxy` per link (one per terminal, one for the server) so that a
cut isolates exactly one side from the broker. Each cycle waits a random while, then injects one fault chosen by a
seeded generator, holds it, heals it and measures how long the system takes to move records again:

* `kill_terminal`: SIGKILL one terminal process, restart it on the same outbox and config;
* `kill_broker`: SIGKILL Mosquitto, restart it on the same port and persistence file;
* `kill_server`: SIGKILL the server, restart it on the same database;
* `cut_terminal_link` / `cut_server_link`: break that proxy (RESET: connections dropped and refused; or BLACKHOLE:
  nothing forwarded, nothing closed), then heal it;
* `disk_full`: fill the filesystem the terminal's outbox lives on (a size-limited tmpfs mounted for the run, filled by
  a filler file until the kernel says ENOSPC), so SQLite's real writes fail; where `mount` is not permitted, an
  RLIMIT_FSIZE set on the running terminal process makes its writes fail with EFBIG instead. The JSON says which.
  The fault is held until the outbox refuses a record, at most DISK_REFUSAL_WAIT_S: a full filesystem only fails
  writes that need new blocks, and an outbox file with free pages inside (pruning after an earlier refusal leaves
  some) keeps accepting for a while; such cycles are counted in `disk_full_absorbed`.

Each record carries its logical id (terminal, life = process start count, n) in its detail. The terminal process
appends `ok LIFE N` to a ledger file (outside the small filesystem) after the outbox committed it, or `refused …` when
the outbox refused it. At the end everything is healed, the terminals stop emitting, the harness waits for the drain,
stops the terminals and accounts from the server database:

* `sent`: logical ids the outbox accepted: the ledger's `ok` lines plus any chaos record found committed in an outbox
  file (a kill between the commit and the ledger line); refused records are counted in `refused_disk_full`, not here;
* `stored`: distinct sent logical ids in the server's `events` table; `lost` = sent − stored;
* `duplicated`: extra rows for a logical id stored more than once, under any seq;
* `recovery_s` of a cycle: from the moment healing begins (the killed process is started again, so its start-up
  counts; the link is healed; the filler is removed) until the harness sees in the server's database, for every
  terminal, a record that terminal enqueued after that moment (`device_time` >= the heal). The database is polled
  every POLL_S (0.25 s), so a figure is at most that much late, never early. `max_recovery_s` is the largest.

It must never send traffic anywhere but 127.0.0.1, never leave a child process, mount or temporary directory behind
(even on Ctrl-C), and never write to a database it did not create.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final

from yibao.procs import spawn, stop, yibao_argv
from yibao.tcpproxy import CutMode, TcpProxy

logger = logging.getLogger(__name__)

FAULT_KINDS: Final = (
    "kill_terminal",
    "kill_broker",
    "kill_server",
    "cut_terminal_link",
    "cut_server_link",
    "disk_full",
)
CHAOS_ACTION: Final = "chaos.record"
DISK_SIZE_BYTES: Final = 48 * 1024 * 1024
"""Size of each terminal's tmpfs: far below the outbox's own 256 MiB bound, so the filesystem is what runs out."""
SERVER_ACK_TIMEOUT_S: Final = 10.0
"""The terminals' `server_ack_timeout_s` in a chaos run (default 120 s). A broker killed within its autosave interval
forgets messages it had PUBACKed; the terminal publishes them again after this timeout. A shorter timeout only makes
that recovery quicker, it changes no guarantee."""
RECONNECT_MAX_S: Final = 2.0
"""The terminals' `reconnect_max_s` (default 30 s): recovery is measured, not the back-off cap."""
KEEPALIVE_S: Final = 5
DISK_REFUSAL_WAIT_S: Final = 30.0
"""Longest a disk_full fault waits for the outbox's first refusal before its outage begins anyway."""
POLL_S: Final = 0.25


class ChaosError(RuntimeError):
    """The chaos run could not set itself up (broker, server, mount) or lost control of a child."""


@dataclass(frozen=True)
class ChaosOptions:
    cycles: int = 20
    seed: int | None = None
    """None: a random seed, reported in the JSON so the run can be repeated."""
    terminals: int = 3
    rate: float = 20.0
    """Records per second each terminal enqueues (one transaction each, as a kiosk recording events)."""
    database_url: str | None = None
    """None: SQLite in the run's temp dir; a PostgreSQL URL: a fresh database there, dropped afterwards."""
    gap_s: tuple[float, float] = (0.5, 3.0)
    """Random wait with traffic flowing before each fault."""
    outage_s: tuple[float, float] = (0.5, 6.0)
    """Random time a fault is held (a killed process stays dead, a link stays cut, the disk stays full after the
    first refusal)."""
    recovery_timeout_s: float = 120.0
    drain_timeout_s: float = 300.0
    disk: str = "auto"
    """'tmpfs' (mount a size-limited tmpfs per terminal and fill it), 'rlimit' (RLIMIT_FSIZE on the terminal
    process), or 'auto': tmpfs if mount works here, else rlimit."""
    kinds: tuple[str, ...] = FAULT_KINDS


# ---------------------------------------------------------------------- the terminal process


def run_chaos_terminal(config_path: Path, ledger_path: Path, *, life: int, rate: float) -> None:
    """The body of `yibao bench chaos-terminal`: a real terminal runtime that enqueues chaos records at `rate`/s.

    SIGTERM/SIGINT stop it cleanly; SIGUSR1 stops the emitting only (the terminal keeps syncing), so the harness can
    wait for the drain. Every ledger line is written after the outbox call returned, so `ok` means committed."""
    from hardware_sim.peripherals import simulated_peripherals
    from protocol import AuditOutcome
    from terminal.config import load_terminal_config
    from terminal.errors import OutboxError, OutboxFullError
    from terminal.runtime import build_runtime

    stopping = threading.Event()
    emitting = threading.Event()
    emitting.set()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    def on_quiet(signum: int, frame: FrameType | None) -> None:
        emitting.clear()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_quiet)
    config = load_terminal_config(config_path)
    runtime = build_runtime(config, simulated_peripherals())
    interval = 1.0 / rate
    with ledger_path.open("a", encoding="ascii", buffering=1) as ledger:
        try:
            runtime.start()
            n = 0
            next_at = time.monotonic()
            while not stopping.is_set() and emitting.is_set():
                try:
                    runtime.record_audit("chaos", CHAOS_ACTION, AuditOutcome.INFO, life=life, n=n)
                    ledger.write(f"ok {life} {n}\n")
                except OutboxFullError:
                    ledger.write(f"refused {life} {n} full\n")
                except OutboxError:
                    ledger.write(f"refused {life} {n} write_error\n")
                n += 1
                next_at += interval
                stopping.wait(max(0.0, next_at - time.monotonic()))
            ledger.write(f"stopped {life} {n}\n")
            while not stopping.wait(0.5):
                continue
        finally:
            runtime.stop()


# ---------------------------------------------------------------------- the harness's pieces


@dataclass
class _Terminal:
    index: int
    device_id: str
    home: Path
    """Config, ledger and log: on the run's ordinary temp dir."""
    data: Path
    """The outbox directory: on the small filesystem when the disk fault uses tmpfs."""
    proxy: TcpProxy
    proc: subprocess.Popen[bytes] | None = None
    life: int = 0

    @property
    def ledger(self) -> Path:
        return self.home / "ledger.txt"

    @property
    def outbox_path(self) -> Path:
        return self.data / "outbox.sqlite3"


def _start_terminal(terminal: _Terminal, *, rate: float) -> None:
    """Write the terminal's config and start its process (a new `life`). The one place a chaos terminal is launched:
    device provisioning and encryption settings belong here."""
    terminal.life += 1
    config = terminal.home / "terminal.toml"
    config.write_text(
        "schema_version = 1\n"
        'config_version = "chaos-1"\n'
        f'device_id = "{terminal.device_id}"\n'
        "[mqtt]\n"
        'host = "127.0.0.1"\n'
        f"port = {terminal.proxy.port}\n"
        f"keepalive_s = {KEEPALIVE_S}\n"
        f"reconnect_max_s = {RECONNECT_MAX_S}\n"
        "[outbox]\n"
        f'path = "{terminal.outbox_path}"\n'
        f"server_ack_timeout_s = {SERVER_ACK_TIMEOUT_S}\n"
        "publish_timeout_s = 10.0\n"
        "retry_max_s = 5.0\n"
        "[heartbeat]\n"
        "interval_s = 2.0\n",
        encoding="utf-8",
    )
    terminal.proc = spawn(
        yibao_argv(
            "bench",
            "chaos-terminal",
            "--config",
            str(config),
            "--ledger",
            str(terminal.ledger),
            "--life",
            str(terminal.life),
            "--rate",
            str(rate),
        ),
        log_path=terminal.home / "terminal.log",
    )


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait()


class _Disk:
    """The terminals' disk-full fault: tmpfs + filler file, or RLIMIT_FSIZE on the process."""

    def __init__(self, method: str) -> None:
        self.method = method
        self._mounts: list[Path] = []
        self._filler: Path | None = None
        self._limited: int | None = None

    @staticmethod
    def choose(wanted: str, probe_dir: Path) -> str:
        if wanted in ("tmpfs", "rlimit"):
            return wanted
        probe = probe_dir / "mount-probe"
        probe.mkdir(parents=True, exist_ok=True)
        if shutil.which("mount") and _run_quiet(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)]):
            _run_quiet(["umount", str(probe)])
            return "tmpfs"
        return "rlimit"

    @property
    def description(self) -> str:
        if self.method == "tmpfs":
            return (
                f"tmpfs of {DISK_SIZE_BYTES // 2**20} MiB per terminal holding its outbox, filled with a filler file "
                "until ENOSPC; SQLite's own writes then fail (SQLITE_FULL)"
            )
        return "RLIMIT_FSIZE lowered on the running terminal process; SQLite's writes then fail with EFBIG"

    def prepare(self, terminal: _Terminal) -> None:
        terminal.data.mkdir(parents=True, exist_ok=True)
        if self.method != "tmpfs":
            return
        argv = ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE_BYTES},mode=0700", "tmpfs", str(terminal.data)]
        if not _run_quiet(argv):
            raise ChaosError(f"cannot mount a tmpfs on {terminal.data} (try --disk rlimit)")
        self._mounts.append(terminal.data)

    def fill(self, terminal: _Terminal) -> int:
        """Make the terminal's next growing write fail; returns the bytes the filler took (0 for rlimit)."""
        if self.method == "tmpfs":
            self._filler = terminal.data / "filler.bin"
            return _fill_until_enospc(self._filler)
        if terminal.proc is None:
            raise ChaosError("no terminal process to limit")
        self._limited = terminal.proc.pid
        # Any write at an offset beyond 64 KiB now fails with EFBIG (Python ignores SIGXFSZ, so it is an error).
        resource.prlimit(terminal.proc.pid, resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        return 0

    def heal(self) -> None:
        if self._filler is not None:
            self._filler.unlink(missing_ok=True)
            self._filler = None
        if self._limited is not None:
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(self._limited, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            self._limited = None

    def release(self) -> None:
        self.heal()
        for mount in reversed(self._mounts):
            if not _run_quiet(["umount", str(mount)]):
                _run_quiet(["umount", "-l", str(mount)])
        self._mounts.clear()


def _run_quiet(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, check=False, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _fill_until_enospc(path: Path) -> int:
    written = 0
    chunk = b"\0" * (1024 * 1024)
    with path.open("wb", buffering=0) as f:
        while len(chunk) >= 512:
            try:
                written += f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk = chunk[: len(chunk) // 2]
    return written


def _read_ledger(path: Path) -> tuple[set[tuple[int, int]], collections.Counter[str], set[int]]:
    """(accepted (life, n), refusals by reason, lives that reported 'stopped')."""
    accepted: set[tuple[int, int]] = set()
    refused: collections.Counter[str] = collections.Counter()
    stopped: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="ascii").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "ok":
                accepted.add((int(parts[1]), int(parts[2])))
            elif len(parts) == 4 and parts[0] == "refused":
                refused[parts[3]] += 1
            elif len(parts) == 3 and parts[0] == "stopped":
                stopped.add(int(parts[1]))
    return accepted, refused, stopped


def _outbox_rows(path: Path) -> list[tuple[str, str, str]]:
    """(payload_type, status, envelope JSON) of every row, read-only, beside or after the terminal."""
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return [
            (str(a), str(b), str(c)) for a, b, c in conn.execute("SELECT payload_type, status, envelope FROM outbox")
        ]
    finally:
        conn.close()


def _outbox_free_pages(path: Path) -> int:
    """Pages inside the outbox file that SQLite can reuse without growing it (0 if it does not exist yet)."""
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    finally:
        conn.close()


def _outbox_live_audits(path: Path) -> int:
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute(
            "SELECT count(*) FROM outbox WHERE payload_type = 'audit_event'"
            " AND status IN ('pending', 'inflight', 'sent')"
        ).fetchone()
        return int(row[0])
    finally:
        conn.close()


def _chaos_id(payload: Any) -> tuple[int, int] | None:
    body = json.loads(payload) if isinstance(payload, str | bytes) else payload
    if not isinstance(body, dict) or body.get("action") != CHAOS_ACTION:
        return None
    detail = body.get("detail") or {}
    return int(detail["life"]), int(detail["n"])


class _ServerReader:
    """Reads the server's events table, read-only and incrementally (by its id), for recovery and accounting."""

    def __init__(self, database_url: str) -> None:
        from sqlalchemy import create_engine

        self._engine = create_engine(database_url)
        self._last_id = 0
        self.first_after: dict[str, datetime] = {}

    def close(self) -> None:
        self._engine.dispose()

    def new_audits(self) -> list[tuple[str, datetime, datetime]]:
        """(device_id, device_time, received_at) of audit rows stored since the last call."""
        from sqlalchemy import text
        from sqlalchemy.exc import SQLAlchemyError

        from yibao.bench import _utc

        try:
            with self._engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT id, device_id, device_time, received_at FROM events"
                        " WHERE id > :last AND payload_type = 'audit_event' ORDER BY id"
                    ),
                    {"last": self._last_id},
                ).all()
        except SQLAlchemyError as exc:  # the server may be restarting a migration; try again on the next poll
            logger.debug("reading events failed: %s", exc)
            return []
        if rows:
            self._last_id = int(rows[-1][0])
        return [(str(r[1]), _utc(r[2]), _utc(r[3])) for r in rows]

    def all_chaos_records(self) -> tuple[collections.Counter[tuple[str, int, int]], dict[str, tuple[int, int]]]:
        """Logical id -> times stored; device -> (rows, highest seq) over all its records (for the seq check)."""
        from sqlalchemy import text

        stored: collections.Counter[tuple[str, int, int]] = collections.Counter()
        with self._engine.connect() as conn:
            for device_id, payload in conn.execute(
                text("SELECT device_id, payload FROM events WHERE payload_type = 'audit_event'")
            ):
                logical = _chaos_id(payload)
                if logical is not None:
                    stored[(str(device_id), *logical)] += 1
            seqs = {
                str(d): (int(c), int(m))
                for d, c, m in conn.execute(text("SELECT device_id, count(*), max(seq) FROM events GROUP BY device_id"))
            }
        return stored, seqs


@dataclass
class _Run:
    options: ChaosOptions
    workdir: Path
    rng: random.Random
    broker: Any = None
    server: Any = None
    server_proxy: TcpProxy | None = None
    terminals: list[_Terminal] = field(default_factory=list)
    disk: _Disk | None = None
    database_url: str = ""
    reader: _ServerReader | None = None
    last_recovered: str = ""
    healed_at: tuple[datetime, float] = (datetime.min.replace(tzinfo=UTC), 0.0)
    """When the last fault's healing began: before a restart (so start-up counts), as a link or disk is healed."""

    def start_server(self) -> None:
        from yibao.server_proc import start_server_process

        if self.server_proxy is None:
            raise ChaosError("no server proxy")
        self.server = start_server_process(
            database_url=self.database_url,
            mqtt_host="127.0.0.1",
            mqtt_port=self.server_proxy.port,
            workdir=self.workdir / "server",
        )

    def wait_recovered(self, healed_at: datetime, healed_mono: float) -> float | None:
        """Seconds from the heal until the database shows, for every terminal, a record it enqueued after the heal
        (`device_time` >= `healed_at`); observed by polling every POLL_S, so at most POLL_S late. None on timeout.
        `last_recovered` names the terminal seen last."""
        if self.reader is None:
            raise ChaosError("no reader")
        waiting = {t.device_id for t in self.terminals}
        deadline = healed_mono + self.options.recovery_timeout_s
        while time.monotonic() < deadline:
            seen = time.monotonic()
            for device_id, device_time, _received_at in self.reader.new_audits():
                if device_time >= healed_at and device_id in waiting:
                    waiting.discard(device_id)
                    self.last_recovered = device_id
            if not waiting:
                return seen - healed_mono
            time.sleep(POLL_S)
        logger.error("no record enqueued after the heal reached the server from %s", sorted(waiting))
        return None

    # ------------------------------------------------------------------ faults

    def _mark_heal(self) -> None:
        self.healed_at = (datetime.now(UTC), time.monotonic())

    def inject(self, kind: str) -> dict[str, Any]:
        """Inject one fault of `kind`, hold it, heal it; returns what was done and when it was healed."""
        lo, hi = self.options.outage_s
        outage = self.rng.uniform(lo, hi)
        info: dict[str, Any] = {"kind": kind}
        if kind == "kill_terminal":
            terminal = self.rng.choice(self.terminals)
            info["terminal"] = terminal.index
            _kill(terminal.proc)
            time.sleep(outage)
            self._mark_heal()
            _start_terminal(terminal, rate=self.options.rate)
        elif kind == "kill_broker":
            self.broker.kill()
            time.sleep(outage)
            self._mark_heal()
            self.broker.start()
            info["restart_s"] = round(time.monotonic() - self.healed_at[1], 2)
        elif kind == "kill_server":
            _kill(self.server.proc)
            time.sleep(outage)
            self._mark_heal()
            self.start_server()
            info["restart_s"] = round(time.monotonic() - self.healed_at[1], 2)  # until /healthz says MQTT connected
        elif kind in ("cut_terminal_link", "cut_server_link"):
            mode = self.rng.choice((CutMode.RESET, CutMode.BLACKHOLE))
            if kind == "cut_terminal_link":
                terminal = self.rng.choice(self.terminals)
                proxy = terminal.proxy
                info["terminal"] = terminal.index
            else:
                if self.server_proxy is None:
                    raise ChaosError("no server proxy")
                proxy = self.server_proxy
            info["mode"] = mode.value
            proxy.cut(mode)
            time.sleep(outage)
            self._mark_heal()
            proxy.heal()
        elif kind == "disk_full":
            if self.disk is None:
                raise ChaosError("no disk")
            # A full filesystem only fails writes that need new blocks: an outbox file with free pages inside (left
            # by pruning after an earlier refusal) keeps accepting. So fill the disk of the terminal with the fewest.
            free = {t.index: _outbox_free_pages(t.outbox_path) for t in self.terminals}
            fewest = min(free.values())
            terminal = self.rng.choice([t for t in self.terminals if free[t.index] == fewest])
            info["terminal"] = terminal.index
            info["outbox_free_pages"] = fewest
            refused0 = sum(_read_ledger(terminal.ledger)[1].values())
            info["filler_bytes"] = self.disk.fill(terminal)
            # Hold until the outbox has really refused a record (at most DISK_REFUSAL_WAIT_S), then the outage.
            t_fill = time.monotonic()
            while sum(_read_ledger(terminal.ledger)[1].values()) == refused0:
                if time.monotonic() - t_fill > DISK_REFUSAL_WAIT_S:
                    break
                time.sleep(POLL_S)
            info["refused"] = sum(_read_ledger(terminal.ledger)[1].values()) > refused0
            info["refusal_after_s"] = round(time.monotonic() - t_fill, 2) if info["refused"] else None
            time.sleep(outage)
            self._mark_heal()
            self.disk.heal()
        else:
            raise ChaosError(f"unknown fault kind {kind!r}")
        info["outage_s"] = round(outage, 2)
        return info

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        for terminal in self.terminals:
            _kill(terminal.proc)
        if self.server is not None:
            stop(self.server.proc, name="server")
        if self.broker is not None:
            self.broker.stop(keep_workdir=True)
        if self.server_proxy is not None:
            self.server_proxy.stop()
        for terminal in self.terminals:
            terminal.proxy.stop()
        if self.reader is not None:
            self.reader.close()
        if self.disk is not None:
            self.disk.release()


def _fault_plan(rng: random.Random, kinds: tuple[str, ...], cycles: int) -> list[str]:
    """`cycles` fault kinds: shuffled rounds of every kind, so any `len(kinds)` consecutive cycles from the start
    cover each kind once, and the order within a round is random."""
    plan: list[str] = []
    while len(plan) < cycles:
        block = list(kinds)
        rng.shuffle(block)
        plan.extend(block)
    return plan[:cycles]


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM to the harness unwinds like Ctrl-C, so the cleanup below runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def bench_sync_chaos(options: ChaosOptions) -> dict[str, Any]:
    """One chaos run; returns the figures (the CLI prints them as one JSON line)."""
    from yibao.bench import _bench_database, machine

    if options.terminals < 1 or options.cycles < 0 or options.rate <= 0:
        raise ChaosError("need at least one terminal, cycles >= 0 and a positive rate")
    unknown = set(options.kinds) - set(FAULT_KINDS)
    if unknown:
        raise ChaosError(f"unknown fault kinds: {sorted(unknown)}")
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)  # noqa: S311 - a fault schedule, repeatable by its seed; nothing secret
    t_start = time.monotonic()
    figures: dict[str, Any] = {"bench": "sync_chaos", "seed": seed}
    with (
        _sigterm_as_interrupt(),
        tempfile.TemporaryDirectory(prefix="yibao-chaos-") as tmp,
        _bench_database(options.database_url, Path(tmp)) as database_url,
    ):
        run = _Run(options=options, workdir=Path(tmp), rng=rng, database_url=database_url)
        try:
            figures |= _run_cycles(run)
        finally:
            run.close()
    figures["seconds"] = round(time.monotonic() - t_start, 1)
    figures["database"] = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    figures["ok"] = bool(
        figures.get("lost") == 0
        and figures.get("duplicated") == 0
        and figures.get("unrecovered_cycles") == 0
        and figures.get("unexpected") == 0
    )
    figures["machine"] = machine()
    return figures


def _run_cycles(run: _Run) -> dict[str, Any]:
    from yibao.broker import MosquittoBroker

    options = run.options
    disk = _Disk(_Disk.choose(options.disk, run.workdir))
    run.disk = disk
    run.broker = MosquittoBroker(workdir=run.workdir / "mosquitto", persistence=True)
    run.broker.start()
    run.server_proxy = TcpProxy(run.broker.host, run.broker.port, name="proxy-server").start()
    run.start_server()
    run.reader = _ServerReader(run.database_url)
    for i in range(options.terminals):
        home = run.workdir / f"terminal-{i}"
        home.mkdir(parents=True)
        proxy = TcpProxy(run.broker.host, run.broker.port, name=f"proxy-t{i}").start()
        terminal = _Terminal(index=i, device_id=f"CHAOS-{i:04d}", home=home, data=home / "data", proxy=proxy)
        run.terminals.append(terminal)
        disk.prepare(terminal)
        _start_terminal(terminal, rate=options.rate)
    first = run.wait_recovered(datetime.now(UTC), time.monotonic())
    if first is None:
        raise ChaosError("the terminals never got a record to the server before any fault")
    logger.info("chaos: stack up, records flowing (%.1f s to the first records); %d cycles", first, options.cycles)

    cycles: list[dict[str, Any]] = []
    for number, kind in enumerate(_fault_plan(run.rng, options.kinds, options.cycles), start=1):
        time.sleep(run.rng.uniform(*options.gap_s))
        info = run.inject(kind)
        recovery = run.wait_recovered(*run.healed_at)
        info["recovery_s"] = round(recovery, 2) if recovery is not None else None
        info["slowest_terminal"] = int(run.last_recovered.rsplit("-", 1)[1]) if run.last_recovered else None
        cycles.append(info)
        logger.info("chaos: cycle %d/%d %s", number, options.cycles, json.dumps(info))

    # The drain: everything is healed; stop emitting, wait until every accepted record is acknowledged by the server.
    for terminal in run.terminals:
        if terminal.proc is not None and terminal.proc.poll() is None:
            terminal.proc.send_signal(signal.SIGUSR1)
    drain0 = time.monotonic()
    drained = False
    while time.monotonic() - drain0 < options.drain_timeout_s:
        quiet = all(t.life in _read_ledger(t.ledger)[2] for t in run.terminals)
        if quiet and all(_outbox_live_audits(t.outbox_path) == 0 for t in run.terminals):
            drained = True
            break
        time.sleep(0.5)
    drain_s = time.monotonic() - drain0
    for terminal in run.terminals:
        if terminal.proc is not None:
            stop(terminal.proc, name=f"terminal {terminal.index}")
    return _account(run, cycles, drained=drained, drain_s=drain_s)


def _account(run: _Run, cycles: list[dict[str, Any]], *, drained: bool, drain_s: float) -> dict[str, Any]:
    if run.reader is None or run.disk is None:
        raise ChaosError("run not started")
    stored_counts, seqs = run.reader.all_chaos_records()
    sent: set[tuple[str, int, int]] = set()
    refused: collections.Counter[str] = collections.Counter()
    unreported = 0
    for terminal in run.terminals:
        accepted, refusals, _ = _read_ledger(terminal.ledger)
        refused.update(refusals)
        ledger_ids = {(terminal.device_id, life, n) for life, n in accepted}
        in_outbox: set[tuple[str, int, int]] = set()
        for payload_type, _status, envelope in _outbox_rows(terminal.outbox_path):
            if payload_type == "audit_event":
                logical = _chaos_id(json.loads(envelope).get("payload"))
                if logical is not None:
                    in_outbox.add((terminal.device_id, *logical))
        unreported += len(in_outbox - ledger_ids)
        sent |= ledger_ids | in_outbox
    stored_ids = set(stored_counts)
    kinds = collections.Counter(c["kind"] for c in cycles)
    recoveries = [c["recovery_s"] for c in cycles if c["recovery_s"] is not None]
    return {
        "terminals": run.options.terminals,
        "rate_per_terminal": run.options.rate,
        "sent": len(sent),
        "stored": len(sent & stored_ids),
        "lost": len(sent - stored_ids),
        "duplicated": sum(c - 1 for c in stored_counts.values() if c > 1),
        "unexpected": len(stored_ids - sent),
        "refused_disk_full": sum(refused.values()),
        "refused_by_reason": dict(refused),
        "committed_but_unreported": unreported,
        "seq_holes": sum(highest - count for count, highest in seqs.values()),
        "cycles": len(cycles),
        "faults": {kind: kinds.get(kind, 0) for kind in run.options.kinds},
        "cut_modes": dict(collections.Counter(c["mode"] for c in cycles if "mode" in c)),
        "disk_full_refusals_seen": sum(1 for c in cycles if c.get("refused")),
        "disk_full_absorbed": sum(1 for c in cycles if c["kind"] == "disk_full" and not c.get("refused")),
        "unrecovered_cycles": len(cycles) - len(recoveries),
        "max_recovery_s": max(recoveries) if recoveries else None,
        "mean_recovery_s": round(sum(recoveries) / len(recoveries), 2) if recoveries else None,
        "max_recovery_by_kind": {
            kind: max(
                (c["recovery_s"] for c in cycles if c["kind"] == kind and c["recovery_s"] is not None), default=None
            )
            for kind in run.options.kinds
        },
        "max_restart_s": {
            kind: max((c["restart_s"] for c in cycles if c["kind"] == kind), default=None)
            for kind in ("kill_broker", "kill_server")
        },
        "drained": drained,
        "drain_s": round(drain_s, 1),
        "disk_fault": run.disk.description,
        "recovery_definition": "heal -> every terminal has a record enqueued after the heal committed on the server"
        " (database polled every 0.25 s)",
        "server_ack_timeout_s": SERVER_ACK_TIMEOUT_S,
    }
