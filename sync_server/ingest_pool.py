"""Ingest worker processes: `ingest_workers` children, each one `IngestWorker` on the shared uplink subscription.

One Python process stores at most ~3,500 records/s (the GIL: paho's receive path and the storing thread share one
interpreter). `IngestPool` runs N child processes (`python -m sync_server.ingest_pool`), each with its own broker
session (client id `<mqtt_client_id>-ingest-<i>`, persistent, so a restarted child gets its unacknowledged messages
back) subscribed to `Topics.all_uplinks_shared` only; the broker splits the uplinks among them. The main process
keeps the singletons: HTTP, device statuses (its own `IngestWorker` with `uplinks=False`), the command dispatcher and
the presence sweeper. Every child writes the same database; `sync_server.store` makes concurrent storing of one
device's records safe (unique keys, device rows locked in one order, acks only move forward).

Lifetime: children are started and watched by one thread of the main process; a child that exits is started again
after `restart_delay_s`. Each child asks the kernel to SIGTERM it when that thread (hence the main process) dies
(PR_SET_PDEATHSIG) and exits on SIGTERM after finishing the batch in hand. Settings reach a child on its stdin as
JSON (never in argv or the environment, where other users may read them). A child reports on stdout, one line, once
the broker has granted its subscription; `ready` is true when every child did and is alive.

This module must not serve HTTP, run the sweeper or the dispatcher, or subscribe children to statuses.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from pydantic import SecretStr

from sync_server.settings import ServerSettings

logger = logging.getLogger(__name__)

READY_LINE = "yibao-ingest-worker-ready"
_PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 15.0


def worker_client_id(settings: ServerSettings, index: int) -> str:
    """The MQTT client id (persistent session) of worker `index`; stable across restarts."""
    return f"{settings.mqtt_client_id}-ingest-{index}"


def settings_document(settings: ServerSettings) -> str:
    """The settings as JSON for a child's stdin, secrets included (a pipe only the child reads)."""
    doc: dict[str, Any] = settings.model_dump(mode="json")
    for name, value in settings:
        if isinstance(value, SecretStr):
            doc[name] = value.get_secret_value()
    return json.dumps(doc)


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[str]
    ready: threading.Event = field(default_factory=threading.Event)
    started_at: float = field(default_factory=time.monotonic)


class WorkerPool:
    """N worker processes (`python -m <module> --index i ...`, settings on stdin, `READY_LINE`-style readiness on
    stdout), kept running between `start()` and `stop()`; a worker that exits is started again. Subclasses name the
    child module (`IngestPool`, `sync_server.http_pool.HttpPool`)."""

    kind = "worker"
    module = ""
    ready_line = ""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        count: int,
        restart_delay_s: float = 1.0,
        extra_argv: tuple[str, ...] = (),
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        if count < 1:
            raise ValueError(f"a {self.kind} pool has at least one worker")
        self._settings = settings
        self._count = count
        self._restart_delay_s = restart_delay_s
        self._extra_argv = extra_argv
        self._pass_fds = pass_fds
        self._children: dict[int, _Child] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def ready(self) -> bool:
        """Every worker is running and its broker subscription is granted."""
        with self._lock:
            children = list(self._children.values())
        return len(children) == self._count and all(c.ready.is_set() and c.proc.poll() is None for c in children)

    def pids(self) -> list[int]:
        with self._lock:
            return [c.proc.pid for c in self._children.values() if c.proc.poll() is None]

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        # The children's PR_SET_PDEATHSIG follows the thread that forked them: this one lives until stop().
        self._thread = threading.Thread(target=self._run, name=f"yibao-{self.kind}-pool", daemon=True)
        self._thread.start()
        logger.info("%s pool: starting %d worker process(es)", self.kind, self._count)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every worker (each finishes its batch and disconnects, keeping its session), wait, then SIGKILL."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s + 5.0)

    def _run(self) -> None:
        try:
            for index in range(self._count):
                self._spawn(index)
            while not self._stop.wait(0.2):
                with self._lock:
                    dead = [c for c in self._children.values() if c.proc.poll() is not None]
                for child in dead:
                    logger.warning(
                        "%s worker %d (pid %d) exited with %s; restarting it",
                        self.kind,
                        child.index,
                        child.proc.pid,
                        child.proc.returncode,
                    )
                    # A worker that dies at once (bad settings, database down at start) is not restarted in a loop.
                    if self._stop.wait(self._restart_delay_s):
                        break
                    self.restarts += 1
                    self._spawn(child.index)
        finally:
            self._terminate_all()

    def _spawn(self, index: int) -> None:
        argv = [
            sys.executable,
            "-m",
            self.module,
            "--index",
            str(index),
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            str(logging.getLogger().getEffectiveLevel()),
            *self._extra_argv,
        ]
        proc = subprocess.Popen(  # stderr (the child's log) goes where ours goes
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            pass_fds=self._pass_fds,
        )
        child = _Child(index=index, proc=proc)
        try:
            if proc.stdin is not None:
                proc.stdin.write(settings_document(self._settings))
                proc.stdin.close()
        except OSError as exc:
            logger.warning("%s worker %d did not take its settings: %s", self.kind, index, exc)
        with self._lock:
            self._children[index] = child
        watcher = threading.Thread(
            target=self._watch_output, args=(child,), name=f"{self.kind}-pool-{index}", daemon=True
        )
        watcher.start()
        logger.info("%s worker %d started (pid %d)", self.kind, index, proc.pid)

    def _watch_output(self, child: _Child) -> None:
        stdout = child.proc.stdout
        if stdout is None:
            return
        for line in stdout:
            if line.strip() == self.ready_line:
                child.ready.set()

    def _terminate_all(self) -> None:
        with self._lock:
            children = list(self._children.values())
            self._children.clear()
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in children:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s worker %d did not stop in time; killing it", self.kind, child.index)
                child.proc.kill()
                child.proc.wait()
            if child.proc.stdout is not None:
                child.proc.stdout.close()
        if children:
            logger.info("%s pool stopped", self.kind)


class IngestPool(WorkerPool):
    """`ingest_workers` ingest worker processes on the shared uplink subscription."""

    kind = "ingest"
    module = "sync_server.ingest_pool"
    ready_line = READY_LINE


# ---------------------------------------------------------------------- the child process


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux); exit now if it already has."""
    libc_name = ctypes.util.find_library("c")
    if libc_name and sys.platform == "linux":
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        raise SystemExit(0)


def run_worker(settings: ServerSettings, index: int, *, parent_pid: int) -> None:
    """The body of one worker process: ingest uplinks until SIGTERM/SIGINT or the parent is gone."""
    from protocol import SystemClock
    from sync_server.audit import ServerAudit
    from sync_server.db.engine import create_db_engine
    from sync_server.identity import ServerIdentity
    from sync_server.ingest import IngestWorker
    from sync_server.security import SecurityGate

    stopping = threading.Event()

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    own = settings.model_copy(update={"mqtt_client_id": worker_client_id(settings, index), "ingest_workers": 0})
    engine = create_db_engine(own.database_url)
    clock = SystemClock()
    # The same data dir as the server process: one chain key, this process's own chain file (see ServerAudit).
    audit = ServerAudit(own.data_dir, clock)
    security = SecurityGate(own, engine, ServerIdentity(own), clock=clock, audit=audit)
    worker = IngestWorker(own, engine, clock=clock, security=security, uplinks=True, statuses=False)
    try:
        worker.start()
        announced = False
        while not stopping.wait(0.1):
            if not announced and worker.ready:
                sys.stdout.write(READY_LINE + "\n")
                sys.stdout.flush()
                announced = True
            if os.getppid() != parent_pid:
                logger.warning("ingest worker %d: the server process is gone; stopping", index)
                break
    finally:
        worker.stop()
        audit.close()
        engine.dispose()
        stats = worker.stats()
        logger.info(
            "ingest worker %d stopped: received %d, stored %d, duplicates %d, rejected %d, batches %d, acks %d",
            index,
            stats.received,
            stats.stored,
            stats.duplicates,
            stats.rejected,
            stats.batches,
            stats.acks_sent,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One ingest worker process (started by the server, not by hand).")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s %(levelname)-7s %(name)s[ingest-{args.index}]: %(message)s",
        stream=sys.stderr,
    )
    settings = ServerSettings.model_validate(json.loads(sys.stdin.read()))
    sys.stdin.close()
    run_worker(settings, args.index, parent_pid=args.parent_pid)


if __name__ == "__main__":
    main()
