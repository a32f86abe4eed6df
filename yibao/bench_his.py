"""`yibao bench his`: the HIS interfaces under a steady request rate (source 003 asks ≥ 200 requests/s; issue 5's bar
is p95 ≤ 100 ms at 200/s against PostgreSQL).

Owns one run: a private Mosquitto, the server as a child process (`yibao server run`) on a fresh PostgreSQL database
(created and dropped) or SQLite in a temp dir, institutions and their HIS clients made through the admin API, then an
OPEN-LOOP load: requests are scheduled at fixed instants (rate × duration) and each latency is measured from its
scheduled instant, not from when the client got round to sending it, so a slow server cannot hide its queue
(no coordinated omission). Every request is a real signed HIS request (`protocol.request_signing`) with its own
nonce; the mix is the HIS's working day (`MIX`): register prescriptions, query them, settle the approved ones,
register purchases with traceability codes, plus the signing check. Each operation's answers are checked (2xx, or
the documented 409 for settling a prescription that is not approved) and any other status counts as an error.

Prints one JSON line: target and achieved rate, latency median/p95/p99/max over all requests and per operation,
errors by status, server CPU. With `--per-operation N` it instead sends N requests of each operation one after
another to a server without extra HTTP workers and prints the server's CPU per operation, also divided by the CPU
time of a fixed Python loop timed beside it (`_calibration_s`: this machine's speed drifts, the ratio does not).
It must never send traffic anywhere but 127.0.0.1 and never run unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import httpx
import uvloop

from protocol.request_signing import signed_headers
from yibao.bench import _bench_database, _child_pids, _percentile, _postgres_cpu_s, _proc_cpu_s
from yibao.broker import MosquittoBroker
from yibao.procs import stop
from yibao.server_proc import start_server_process

HIS_PREFIX = "X-HIS-"
REGION = "320583"
"""昆山 (Kunshan), the buyer of source 004."""


@dataclass(frozen=True)
class HisBenchOptions:
    rate: float = 200.0
    duration_s: float = 30.0
    warmup_s: float = 3.0
    institutions: int = 20
    database_url: str | None = None
    concurrency: int = 256
    seed: int = 1
    http_workers: int = 1


@dataclass(frozen=True)
class Client:
    client_id: str
    secret: bytes
    institution_code: str


@dataclass
class Sample:
    operation: str
    latency_ms: float
    status: int
    ok: bool


@dataclass
class _State:
    """What earlier requests created, so later ones (queries, settlements) name real things."""

    rng: random.Random
    prescriptions: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    purchases: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))


@dataclass(frozen=True)
class Request:
    operation: str
    method: str
    target: str
    body: Any
    good: frozenset[int]
    """Statuses that count as success."""
    on_ok: Callable[[], None] | None = None
    """Called when it succeeded (what later requests may then name)."""


def _prescription(state: _State, client: Client) -> Request:
    """HIS registers a prescription (H-06); the bench's terminals never review it, so it stays pending."""
    n = next(state.counter)
    rx = f"RX{client.institution_code[-6:]}{n:010d}"
    body = {
        "rx_no": rx,
        "prescribing_institution_code": "H32058300100",
        "prescribing_institution_name": "昆山市示例人民医院",
        "department_code": "A03",
        "department_name": "内科",
        "prescriber_code": "D320583000123",
        "prescriber_name": "周医生",
        "prescribed_at": datetime.now(UTC).isoformat(),
        "source": "1",
        "channel": "2",
        "patient_ref": f"pt-{n:08d}",
        "patient_masked": "李*",
        "patient_age_years": 20 + n % 70,
        "patient_sex": "1" if n % 2 else "2",
        "diagnosis_codes": ["J20.900"],
        "lines": [
            {
                "line_no": 1,
                "drug_code": "XJ01CAA040A001010100534",
                "drug_name": "阿莫西林胶囊",
                "specification": "0.25g*24粒",
                "quantity": 1 + n % 3,
                "unit": "盒",
                "dosage": "口服 一次2粒 一日3次",
                "days_supply": 7,
            }
        ],
    }
    return Request(
        "prescription",
        "POST",
        "/his/v1/prescriptions",
        body,
        frozenset({201}),
        lambda: state.prescriptions[client.client_id].append(rx),
    )


def _review_result(state: _State, client: Client) -> Request:
    """HIS reads a prescription's review result (H-07) — one it registered earlier (or the signing check)."""
    mine = state.prescriptions.get(client.client_id)
    if not mine:
        return _ping(state, client)
    rx = mine[state.rng.randrange(len(mine))]
    return Request("review_result", "GET", f"/his/v1/prescriptions/{rx}", None, frozenset({200}))


def _early_settlement(state: _State, client: Client) -> Request:
    """HIS tries to settle a prescription nobody has reviewed: refused with the documented 409."""
    mine = state.prescriptions.get(client.client_id)
    if not mine:
        return _ping(state, client)
    rx = mine[state.rng.randrange(len(mine))]
    body = {"settlement_id": f"SETL-{rx}"}
    return Request("early_settlement", "POST", f"/his/v1/prescriptions/{rx}/settlement", body, frozenset({409}))


def _ping(_state: _State, _client: Client) -> Request:
    return Request("ping", "GET", "/his/v1/ping", None, frozenset({200}))


MIX: list[tuple[str, float, Callable[[_State, Client], Request]]] = [
    ("ping", 0.5, _ping),
    ("prescription", 2.0, _prescription),
    ("review_result", 3.0, _review_result),
    ("early_settlement", 0.5, _early_settlement),
]
"""The HIS working day's request mix: (operation, weight, request maker)."""

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def _synthetic_id_number(n: int) -> str:
    """A valid (check digit) but synthetic resident identity number, different for each n < 1000 per day of birth."""
    body = f"{REGION}{1940 + n % 60:04d}{1 + n % 12:02d}{1 + n % 28:02d}{n % 1000:03d}"
    return body + "10X98765432"[sum(int(d) * w for d, w in zip(body, _ID_WEIGHTS, strict=True)) % 11]


def _purchase(state: _State, client: Client) -> Request:
    """A settled purchase registration (docs/his-integration.md) with two traceability codes; its kiosk verification
    never arrives in the bench, so it is stored `pending` (the path of a kiosk that is offline)."""
    n = next(state.counter)
    body = {
        "settlement_no": f"SETL{client.institution_code[-6:]}{n:010d}",
        "transaction_code": f"BENCH{client.institution_code[-6:]}{n:012d}",
        "settled_at": datetime.now(UTC).isoformat(),
        "buyer": {"psn_cert_type": "01", "certno": _synthetic_id_number(n)},
        "lines": [
            {
                "med_list_codg": f"XA01ABC{n % 997:03d}A001010101001",
                "cnt": 1 + n % 3,
                "amount_fen": 1250 * (1 + n % 3),
                "trace_codes": [f"8{n:012d}{k:07d}" for k in range(2)],
            }
        ],
    }
    number = str(body["settlement_no"])
    return Request(
        "purchase",
        "POST",
        "/his/v1/purchases",
        body,
        frozenset({201}),
        lambda: state.purchases[client.client_id].append(number),
    )


def _purchase_query(state: _State, client: Client) -> Request:
    """HIS reads back a purchase it registered (and whether the kiosk's verification backs it)."""
    mine = state.purchases.get(client.client_id)
    if not mine:
        return _ping(state, client)
    number = mine[state.rng.randrange(len(mine))]
    return Request("purchase_query", "GET", f"/his/v1/purchases/{number}", None, frozenset({200}))


MIX += [("purchase", 2.0, _purchase), ("purchase_query", 1.0, _purchase_query)]


def _sign(client: Client, method: str, target: str, body: bytes) -> dict[str, str]:
    headers = signed_headers(HIS_PREFIX, client.client_id, client.secret, method, target, body, now=time.time())
    if body:
        headers["Content-Type"] = "application/json"
    return headers


async def _one(http: aiohttp.ClientSession, client: Client, request: Request, due: float) -> Sample:
    content = b"" if request.body is None else json.dumps(request.body, ensure_ascii=False).encode()
    method, target = request.method, request.target
    try:
        async with http.request(
            method, target, data=content or None, headers=_sign(client, method, target, content)
        ) as resp:
            await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError):
        status = 0
    ok = status in request.good
    if ok and request.on_ok is not None:
        request.on_ok()
    return Sample(request.operation, (time.perf_counter() - due) * 1000.0, status, ok)


async def _load(base_url: str, clients: list[Client], options: HisBenchOptions) -> tuple[list[Sample], float]:
    state = _State(random.Random(options.seed))  # noqa: S311 - a reproducible request mix, not a secret
    weights = [w for _, w, _ in MIX]
    makers = [m for _, _, m in MIX]
    total = int(options.rate * (options.warmup_s + options.duration_s))
    samples: list[Sample] = []
    # aiohttp, not httpx, for the load: the generator shares the machine's cores with the server it measures, and
    # its C HTTP parser costs a fraction of httpx's CPU per request (docs/benchmarks.md). Each institution's HIS is
    # its own client with its own connections, as in a town: 20 systems, not one pool multiplexing all of them
    # (a single pool keeps the few connections it opened first, all on whichever server process accepted them).
    timeout = aiohttp.ClientTimeout(total=30.0)
    per_client = max(1, options.concurrency // len(clients))
    async with contextlib.AsyncExitStack() as stack:
        sessions = [
            await stack.enter_async_context(
                aiohttp.ClientSession(
                    base_url=base_url, connector=aiohttp.TCPConnector(limit=per_client), timeout=timeout
                )
            )
            for _ in clients
        ]
        start = time.perf_counter() + 0.2
        tasks: list[asyncio.Task[Sample]] = []
        for i in range(total):
            due = start + i / options.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            k = i % len(clients)
            client = clients[k]
            maker = state.rng.choices(makers, weights)[0]
            tasks.append(asyncio.create_task(_one(sessions[k], client, maker(state, client), due)))
        samples = list(await asyncio.gather(*tasks))
        elapsed = time.perf_counter() - start
    warm = int(options.rate * options.warmup_s)
    return samples[warm:], elapsed


def _figures(samples: list[Sample]) -> dict[str, Any]:
    values = sorted(s.latency_ms for s in samples)
    if not values:
        return {"requests": 0}
    return {
        "requests": len(values),
        "median_ms": round(_percentile(values, 0.50), 2),
        "p95_ms": round(_percentile(values, 0.95), 2),
        "p99_ms": round(_percentile(values, 0.99), 2),
        "max_ms": round(values[-1], 2),
        "errors": sum(1 for s in samples if not s.ok),
    }


def _setup(base_url: str, admin_headers: dict[str, str], institutions: int) -> list[Client]:
    clients: list[Client] = []
    with httpx.Client(base_url=base_url, headers=admin_headers, timeout=30.0) as http:
        for i in range(institutions):
            code = f"P{REGION}{i:05d}"
            resp = http.put(
                f"/api/v1/institutions/{code}",
                json={"name": f"基准药房{i:03d}", "kind": "pharmacy", "region_code": REGION},
            )
            resp.raise_for_status()
            made = http.post("/api/v1/his-clients", json={"institution_code": code, "label": f"bench HIS {i}"})
            made.raise_for_status()
            answer = made.json()
            clients.append(Client(answer["client_id"], bytes.fromhex(answer["secret"]), code))
    return clients


@contextlib.contextmanager
def _stack(options: HisBenchOptions, workdir: Path) -> Iterator[tuple[str, dict[str, str], int]]:
    with (
        MosquittoBroker(workdir=workdir / "broker") as broker,
        _bench_database(options.database_url, workdir) as db_url,
    ):
        server = start_server_process(
            database_url=db_url,
            mqtt_host=broker.host,
            mqtt_port=broker.port,
            workdir=workdir / "server",
            env={"YIBAO_SERVER_HTTP_WORKERS": str(options.http_workers)},
        )
        try:
            yield server.base_url, server.admin_headers, server.proc.pid
        finally:
            stop(server.proc, name="server")


def _await_http_processes(base_url: str, count: int, timeout_s: float = 60.0) -> None:
    """Return once `count` distinct processes answer /healthz on new connections: the extra HTTP workers start after
    the main process, and load sent before they accept would stay on the main process's keep-alive connections."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(seen)} of {count} HTTP processes answered within {timeout_s:.0f} s")
        with httpx.Client(base_url=base_url, timeout=5.0) as fresh:  # a new connection each time
            answer = fresh.get("/healthz")
        if answer.status_code == 200:
            seen.add(int(answer.json()["pid"]))
        else:
            time.sleep(0.1)


def run_his_bench(options: HisBenchOptions) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="yibao-bench-his-") as tmp, _stack(options, Path(tmp)) as stack:
        base_url, admin_headers, pid = stack
        _await_http_processes(base_url, 1 + options.http_workers)
        clients = _setup(base_url, admin_headers, options.institutions)
        pids = [pid, *_child_pids(pid)]
        cpu_before = sum(_proc_cpu_s(p) for p in pids)
        pg_before = _postgres_cpu_s() if options.database_url else 0.0
        own_before = time.process_time()
        samples, elapsed = uvloop.run(_load(base_url, clients, options))
        cpu = sum(_proc_cpu_s(p) for p in pids) - cpu_before
        pg_cpu = _postgres_cpu_s() - pg_before if options.database_url else 0.0
        own_cpu = time.process_time() - own_before
    sent = int(options.rate * (options.warmup_s + options.duration_s))
    per_op: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        per_op[s.operation].append(s)
    measured_s = options.duration_s
    return {
        "bench": "his",
        "database": "postgresql" if options.database_url else "sqlite",
        "target_rate": options.rate,
        "achieved_rate": round(len(samples) / measured_s, 1),
        "duration_s": options.duration_s,
        "wall_s": round(elapsed, 1),
        "institutions": options.institutions,
        "http_workers": options.http_workers,
        **_figures(samples),
        "statuses": dict(sorted(Counter(str(s.status) for s in samples).items())),
        "operations": {op: _figures(group) for op, group in sorted(per_op.items())},
        "server_cpu_s": round(cpu, 1),
        "server_cpu_ms_per_request": round(cpu * 1000.0 / sent, 2),
        "postgres_cpu_ms_per_request": round(pg_cpu * 1000.0 / sent, 2),
        "load_generator_cpu_ms_per_request": round(own_cpu * 1000.0 / sent, 2),
    }


CALIBRATION_LOOP: Final = 1_000_000
"""Multiply-adds of the fixed Python loop timed beside each operation (`_calibration_s`)."""


def _calibration_s() -> float:
    """CPU seconds of a fixed Python loop: this machine's speed drifts by a third from minute to minute, and the
    per-operation figures are also given divided by it, so that runs at different moments compare."""
    start = time.process_time()
    x = 0
    for i in range(CALIBRATION_LOOP):
        x += i * i
    return time.process_time() - start


async def _one_by_one(
    base_url: str, clients: list[Client], pid: int, count: int, *, postgres: bool
) -> dict[str, dict[str, float | int]]:
    state = _State(random.Random(1))  # noqa: S311 - a reproducible request mix, not a secret
    figures: dict[str, dict[str, float | int]] = {}
    async with aiohttp.ClientSession(base_url=base_url, timeout=aiohttp.ClientTimeout(total=30.0)) as http:
        for operation, _, maker in MIX:
            for i in range(max(10, count // 10)):  # warm-up: caches, prepared statements, the pool's connections
                client = clients[i % len(clients)]
                await _one(http, client, maker(state, client), time.perf_counter())
            calibration = _calibration_s()
            cpu_before, pg_before = _proc_cpu_s(pid), _postgres_cpu_s() if postgres else 0.0
            started, errors = time.perf_counter(), 0
            for i in range(count):
                client = clients[i % len(clients)]
                sample = await _one(http, client, maker(state, client), time.perf_counter())
                errors += not sample.ok
            wall = time.perf_counter() - started
            cpu = _proc_cpu_s(pid) - cpu_before
            pg = _postgres_cpu_s() - pg_before if postgres else 0.0
            calibration = (calibration + _calibration_s()) / 2
            figures[operation] = {
                "server_cpu_ms": round(cpu * 1000.0 / count, 3),
                "server_cpu_per_calibration": round(cpu / count / calibration, 4),
                "postgres_cpu_ms": round(pg * 1000.0 / count, 3),
                "latency_ms": round(wall * 1000.0 / count, 3),
                "errors": errors,
            }
    return figures


def run_his_per_operation(options: HisBenchOptions, count: int) -> dict[str, Any]:
    """Each operation of `MIX` `count` times in a row against a server with no extra HTTP worker: the server's CPU
    per operation, and the mix's weighted mean (what the load run pays per request, less the cost of concurrency)."""
    single = replace(options, http_workers=0)
    with tempfile.TemporaryDirectory(prefix="yibao-bench-his-") as tmp, _stack(single, Path(tmp)) as stack:
        base_url, admin_headers, pid = stack
        _await_http_processes(base_url, 1)
        clients = _setup(base_url, admin_headers, options.institutions)
        postgres = options.database_url is not None
        figures = uvloop.run(_one_by_one(base_url, clients, pid, count, postgres=postgres))
    weights = {operation: weight for operation, weight, _ in MIX}
    mean = sum(weights[op] * float(f["server_cpu_ms"]) for op, f in figures.items()) / sum(weights.values())
    return {
        "bench": "his_per_operation",
        "database": "postgresql" if options.database_url else "sqlite",
        "requests_per_operation": count,
        "calibration_loop": CALIBRATION_LOOP,
        "operations": figures,
        "mix_server_cpu_ms": round(mean, 3),
        "errors": sum(int(f["errors"]) for f in figures.values()),
    }
