"""`yibao sim day`: a small town's working day over the real stack, reconciled at the end.

The stack is the real one: a private Mosquitto, the server as a child process (`yibao server run`, SQLite in the
run's directory or a fresh PostgreSQL database), and in this process the TERMINAL CORE of each kiosk
(`terminal.runtime.build_runtime`: outbox, MQTT sync with sealed frames, downlink commands, the device API, the POS
API, face verification on real ONNX models) on simulated peripherals: the serial ID-card / social-security-card
readers and QR scanner on ptys driven by the real drivers, the e-voucher platform over HTTP (`hardware_sim.kiosk_rig`),
and a camera that plays real photos with synthetic IR and depth (`hardware_sim.camera_sim`). HIS systems are
signed HTTP clients of `/his/v1` (`protocol.request_signing`); the pharmacy POS calls each kiosk's POS API over HTTP.

The day (docs/simulation.md):

    morning   institutions and HIS clients exist; each terminal is enrolled, its head applies to bind it
              (face + ID card), a device admin approves; HIS syncs the pharmacists; each pharmacist enrols at the
              kiosk (人证比对 against the ID-card photo, consent) and signs in by face
    day       HIS registers prescriptions; the kiosk receives them, the pharmacist reviews each (drug rules, face
              confirmation, signed); HIS reads the result and settles the approved ones. Citizens buy: the POS asks
              the kiosk to verify the buyer (医保码, or ID card + live face, or a proxy purchase by a registered agent
              entered by hand), gets a transaction code, settles, and registers the purchase with 追溯码 per line
    evening   pharmacists sign out; every outbox drains

Reconciliation (one JSON line): per terminal, records created in its outbox vs records the server stored for it, by
payload type; every purchase HIS registered is on the server and linked to the kiosk's signed verification; every
review decision made at a kiosk is stored against its prescription with the same outcome; prescriptions registered
and settled agree between HIS and the server; sign-ins and sign-outs agree. `discrepancies` counts every mismatch.

It must never send traffic anywhere but 127.0.0.1, never log personal data (the town's people are synthetic, but
the code paths are the production ones), and never run unbounded: every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from protocol.request_signing import signed_headers

logger = logging.getLogger(__name__)

HIS_PREFIX = "X-HIS-"
POS_PREFIX = "X-POS-"
REGION = "320583"
"""昆山 (Kunshan)."""
WAIT_S = 60.0


class SimError(RuntimeError):
    """The day could not be run (a component did not come up, a step timed out); the text says which."""


@dataclass(frozen=True)
class SimDayOptions:
    institutions: int = 2
    pharmacists_per_institution: int = 2
    prescriptions_per_institution: int = 4
    purchases_per_institution: int = 6
    database_url: str | None = None
    workdir: Path | None = None
    faces_dir: Path | None = None
    seed: int = 1


@dataclass
class HisClient:
    """One pharmacy's HIS system: signs its requests, and keeps its own ledger (what it believes it did)."""

    http: httpx.Client
    client_id: str
    secret: bytes
    institution_code: str
    registered_rx: list[str] = field(default_factory=list)
    settled_rx: list[str] = field(default_factory=list)
    purchases: list[str] = field(default_factory=list)

    def call(self, method: str, target: str, body: Any = None) -> httpx.Response:
        content = b"" if body is None else json.dumps(body, ensure_ascii=False).encode()
        headers = signed_headers(HIS_PREFIX, self.client_id, self.secret, method, target, content, now=time.time())
        if body is not None:
            headers["Content-Type"] = "application/json"
        return self.http.request(method, target, content=content, headers=headers)


@dataclass
class Ledger:
    """What the town did, as the people who did it saw it (compared with the server at the end)."""

    reviews: dict[str, str] = field(default_factory=dict)
    """rx_no → decision made at the kiosk."""
    sign_ins: int = 0
    sign_outs: int = 0
    verifications: list[str] = field(default_factory=list)
    """Transaction codes the kiosks handed to the POS."""
    proxy_purchases: int = 0
    methods: Counter[str] = field(default_factory=Counter)


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SimError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


@contextlib.contextmanager
def _server(options: SimDayOptions, workdir: Path) -> Iterator[tuple[Any, str]]:
    from yibao.bench import _bench_database
    from yibao.broker import MosquittoBroker
    from yibao.procs import stop
    from yibao.server_proc import start_server_process

    with (
        MosquittoBroker(workdir=workdir / "broker") as broker,
        _bench_database(options.database_url, workdir) as db_url,
    ):
        server = start_server_process(
            database_url=db_url,
            mqtt_host=broker.host,
            mqtt_port=broker.port,
            workdir=workdir / "server",
            env={"YIBAO_SERVER_COMMAND_DISPATCH_INTERVAL_S": "0.2"},
        )
        try:
            yield (server, broker), db_url
        finally:
            stop(server.proc, name="server")


def run_sim_day(options: SimDayOptions) -> dict[str, Any]:
    """Run the day; the figures and the reconciliation as one dict (`discrepancies` first among equals)."""
    from yibao.sim_town import Town

    started = time.monotonic()
    rng = random.Random(options.seed)  # noqa: S311 - a reproducible town, not a secret
    with contextlib.ExitStack() as stack:
        if options.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="yibao-sim-day-")))
        else:
            workdir = options.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        (server, broker), db_url = stack.enter_context(_server(options, workdir))
        town = stack.enter_context(Town.open(options, workdir, server, broker, rng))
        town.morning()
        town.day()
        town.evening()
        report = town.reconcile(db_url)
    report["duration_s"] = round(time.monotonic() - started, 1)
    report["database"] = "postgresql" if options.database_url else "sqlite"
    return report
