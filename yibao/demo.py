"""`yibao demo`: the whole system on one machine, on embedded defaults.

Starts a private Mosquitto on a free port, the sync server on SQLite (or a database URL you give), and one
simulated terminal, each a child process bound to our lifetime; prints where to look; on Ctrl-C stops the terminal
(which publishes 'offline'), then the server, then the broker, and checks that nothing is left running.

The terminal runs the real secure path, set up exactly as a device admin does it, through the real CLI in child
processes (docs/identity.md): `yibao provision register` with the server's bootstrap admin token prints an enrol
code; `yibao provision enrol` (device side, its own identity directory, a passphrase generated for this run and
handed over in the child's environment only) makes the SM2 key, enrols, checks the server-signed bundle and writes
the terminal config; `yibao terminal run` then seals every MQTT payload (SM4-GCM session frames).

The terminal runs its REAL serial drivers: the demo starts the ID-card reader, social-security-card reader and QR
scanner simulators on ptys and the e-voucher platform simulator over HTTP in its own process
(`hardware_sim.kiosk_rig`, the same code as `yibao sim devices`), and writes `[devices]` (backend "serial",
simulated_peer = true) and `[evoucher]` tables pointing at them into the terminal's config. The camera stays the
status-only stand-in.

`--smoke` runs the same stack unattended: the terminal pushes N records through its outbox, and the demo checks
through the server's public API that every one was stored exactly once, then waits until the terminal itself reports
(a heartbeat composed after the records, with `outbox_depth` 0) that the server acknowledged everything, checks in
the device's last heartbeat that the three serial devices are reported ok (simulated, on the demo's pty paths), and
prints one JSON line of figures, among them `enrolled` (the server's provisioning record of the device says
'enrolled', with the key fingerprint the device reported), `encrypted` (a wire observer on the broker saw only sealed
frames for the device, and the server refused no message on security grounds) and `serial_devices_ok`.
This module orchestrates processes only; it must never reach into the terminal's or the server's storage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy.engine import make_url

from hardware_sim.kiosk_rig import KioskSimulatorRig, RigStartError, start_kiosk_simulators
from protocol.secure import is_secure_frame
from provisioning.client import EXIT_REFUSED
from terminal.identity import PASSPHRASE_ENV
from yibao.broker import MosquittoBroker
from yibao.procs import is_alive, spawn, stop, yibao_argv
from yibao.server_proc import ServerStartError, start_server_process

logger = logging.getLogger(__name__)

DEMO_DEVICE_ID = "SIM-0001"
DEMO_ACTION = "demo.record"
SMOKE_HEARTBEAT_S = 1.0
"""Heartbeat interval in smoke mode: the ack check reads the terminal's outbox depth from its heartbeats."""
PROVISION_TIMEOUT_S = 60.0
OPERATOR = "demo-admin"
"""The web pages' operator account of the demo (a device admin)."""
SERIAL_DEVICES = ("idcard0", "sscard0", "qr0")
"""Heartbeat names of the devices the demo terminal drives with its real serial drivers."""


class DemoError(RuntimeError):
    """A part of the stack did not come up, died, or the smoke check failed."""


class _ProvisionError(DemoError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class WireObserver:
    """Subscribes to everything on the broker and classifies the demo device's payloads: sealed frame or not.

    An onlooker on the broker, as an attacker with broker access would be; it never publishes."""

    def __init__(self, host: str, port: int, device_id: str) -> None:
        self._marker = f"/dev/{device_id}/"
        self._lock = threading.Lock()
        self.sealed = 0
        self.plaintext = 0
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            protocol=MQTTProtocolVersion.MQTTv5,
            client_id=f"yibao-demo-observer-{secrets.token_hex(4)}",
        )
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.connect(host, port)
        self._client.subscribe("#", qos=0)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise DemoError("the wire observer could not subscribe on the broker")

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if self._marker not in message.topic or not message.payload:
            return
        with self._lock:
            if is_secure_frame(bytes(message.payload)):
                self.sealed += 1
            else:
                self.plaintext += 1

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.sealed, self.plaintext

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@dataclass
class DemoOptions:
    workdir: Path | None = None
    database_url: str | None = None
    http_port: int = 0
    device_id: str = DEMO_DEVICE_ID
    heartbeat_interval_s: float = 5.0
    records: int = 0
    startup_timeout_s: float = 60.0
    drain_timeout_s: float = 120.0


@dataclass
class DemoStack:
    """The running children; `close()` stops them in order and reports leftovers."""

    options: DemoOptions
    workdir: Path
    broker: MosquittoBroker
    http_port: int
    database_url: str
    server: subprocess.Popen[bytes] | None = None
    terminal: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)
    admin_token: str = ""
    """The server's bootstrap admin token, for the admin API (set when the server starts)."""
    operator_password: str | None = field(default=None, repr=False)
    """The initial password of the web pages' `OPERATOR` account, generated by `yibao server account create` for
    this run (None when a kept database already had the account); shown once on the console, never logged."""
    passphrase: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    """This run's device key passphrase; it only ever travels in the environment of the device-side children."""
    enrolment: dict[str, Any] = field(default_factory=dict)
    """`yibao provision enrol --json` output: device id, key epoch, device and server key fingerprints."""
    device_env: dict[str, str] = field(default_factory=dict, repr=False)
    observer: WireObserver | None = None
    devices: KioskSimulatorRig | None = None
    """The pty device simulators and the e-voucher platform the terminal's real drivers talk to."""
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def terminal_config(self) -> str:
        """The device's local tuning only; `provision enrol` adds what the server's signed bundle decides (device id,
        config version, broker address and user name) and the `[identity]` table."""
        o = self.options
        return (
            "schema_version = 1\n"
            "\n[mqtt]\n"
            "keepalive_s = 10\n"
            "\n[outbox]\n"
            f'path = "{self.workdir / "terminal" / "outbox.sqlite3"}"\n'
            "max_bytes = 268435456\n"
            "batch_size = 200\n"
            "\n[heartbeat]\n"
            f"interval_s = {o.heartbeat_interval_s}\n"
        )

    def start_server(self) -> None:
        try:
            server = start_server_process(
                database_url=self.database_url,
                mqtt_host=self.broker.host,
                mqtt_port=self.broker.port,
                workdir=self.workdir,
                http_port=self.options.http_port,
                timeout_s=self.options.startup_timeout_s,
            )
        except ServerStartError as exc:
            raise DemoError(str(exc)) from exc
        self.server, self.http_port, self.admin_token = server.proc, server.port, server.admin_token
        self.pids.append(server.proc.pid)

    def create_operator(self) -> None:
        """The device admin who signs in to the web pages, created as a security admin would, through the real CLI
        (`yibao server account create`); it must change the generated password at first sign-in."""
        argv = yibao_argv(
            "server", "account", "create", "--username", OPERATOR, "--role", "device_admin",
            "--database-url", self.database_url,
        )  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROVISION_TIMEOUT_S)
        with (self.workdir / "provision.log").open("a", encoding="utf-8") as log:
            log.write(f"$ yibao server account create --username {OPERATOR} (exit {done.returncode})\n{done.stderr}")
        if done.returncode == 0 and done.stdout.strip():
            self.operator_password = done.stdout.strip().splitlines()[-1]
        elif "exists" not in done.stderr:  # a database kept from an earlier run has the account: keep its password
            raise DemoError(
                f"`yibao server account create` failed ({done.returncode}); see {self.workdir}/provision.log"
            )

    def _provision(self, *args: str, env: dict[str, str], step: str) -> dict[str, Any]:
        """Run one `yibao provision ... --json` child; its progress (stderr) goes to provision.log, its JSON back."""
        argv = yibao_argv("provision", *args, "--json")
        try:
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=PROVISION_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise DemoError(f"`yibao provision {step}` did not finish in {PROVISION_TIMEOUT_S:.0f} s") from exc
        with (self.workdir / "provision.log").open("a", encoding="utf-8") as log:
            log.write(f"$ yibao provision {step} (exit {done.returncode})\n{done.stderr}")
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise _ProvisionError(
                done.returncode,
                f"`yibao provision {step}` failed ({done.returncode}); see {self.workdir}/provision.log",
            )
        body: dict[str, Any] = json.loads(lines[-1])
        return body

    def enrol(self) -> None:
        """Register the demo device with the admin token, then enrol it on the device side, each through the CLI."""
        device_id = self.options.device_id
        admin_env = {k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}
        admin_env["YIBAO_ADMIN_TOKEN"] = self.admin_token  # not on the command line, where `ps` would show it
        admin = ["--server", self.base_url]
        try:
            claim = self._provision("register", device_id, *admin, env=admin_env, step="register")
        except _ProvisionError as exc:
            if exc.code != EXIT_REFUSED:
                raise
            # A database kept from an earlier run already knows the device: an admin reset issues a new code.
            claim = self._provision(
                "reset", device_id, "--reason", "demo restarted", *admin, env=admin_env, step="reset"
            )
        (self.workdir / "terminal").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "terminal" / "terminal.toml"
        config.write_text(self.terminal_config(), encoding="utf-8")
        device_env = {k: v for k, v in os.environ.items() if k != "YIBAO_ADMIN_TOKEN"}
        device_env[PASSPHRASE_ENV] = self.passphrase
        self.enrolment = self._provision(
            "enrol",
            str(claim["enrol_code"]),
            "--identity-dir",
            str(self.identity_dir),
            "--config",
            str(config),
            "--force",  # an identity left in a kept workdir belongs to an earlier run's (now reset) enrolment
            env=device_env,
            step="enrol",
        )
        self.device_env = device_env

    @property
    def identity_dir(self) -> Path:
        return self.workdir / "terminal" / "identity"

    def start_devices(self) -> None:
        try:
            self.devices = start_kiosk_simulators(self.workdir / "devices")
        except RigStartError as exc:
            raise DemoError(str(exc)) from exc

    def start_terminal(self) -> None:
        self.enrol()
        config = self.workdir / "terminal" / "terminal.toml"
        if self.devices is not None:
            # Added after `provision enrol` rewrote the file: its TOML writer only knows one level of tables.
            with config.open("a", encoding="utf-8") as fh:
                fh.write(self.devices.terminal_toml())
        argv = ["terminal", "run", "--config", str(config)]
        if self.options.records:
            argv += ["--emit", str(self.options.records)]
        self.terminal = spawn(yibao_argv(*argv), log_path=self.workdir / "terminal.log", env=self.device_env)
        self.pids.append(self.terminal.pid)

    def provisioning_record(self) -> dict[str, Any]:
        """What the server's provisioning API says about the demo device (state, key epoch, key fingerprint)."""
        with httpx.Client(base_url=self.base_url, timeout=5.0, headers=self.admin_headers) as http:
            resp = http.get(f"/api/v1/provisioning/devices/{self.options.device_id}")
            resp.raise_for_status()
            body: dict[str, Any] = resp.json()
            return body

    def security_refused(self) -> int:
        """Messages the server's ingest refused on security grounds (forged, tampered, replayed, plaintext, ...)."""
        with httpx.Client(base_url=self.base_url, timeout=5.0, headers=self.admin_headers) as http:
            resp = http.get("/api/v1/ingest/stats")
            resp.raise_for_status()
            return int(resp.json()["ingest"]["security_refused"])

    def security_state(self) -> dict[str, Any]:
        """`enrolled`: the server's provisioning record says 'enrolled' and holds the key the device made;
        `encrypted`: enrolled, the wire observer saw sealed frames for the device and no plaintext, and the server
        refused no message on security grounds (forged, tampered, replayed, plaintext downgrade)."""
        record = self.provisioning_record()
        fingerprint = self.enrolment.get("device_fingerprint")
        enrolled = record.get("state") == "enrolled" and bool(fingerprint) and record.get("fingerprint") == fingerprint
        refused = self.security_refused()
        sealed, plaintext = self.observer.counts() if self.observer is not None else (0, 0)
        return {
            "enrolled": enrolled,
            "key_epoch": record.get("key_epoch"),
            "key_fingerprint": record.get("fingerprint"),
            "sealed_frames_seen": sealed,
            "plaintext_seen": plaintext,
            "security_refused": refused,
            "encrypted": enrolled and refused == 0 and sealed > 0 and plaintext == 0,
        }

    def device(self) -> dict[str, Any] | None:
        with httpx.Client(base_url=self.base_url, timeout=5.0, headers=self.admin_headers) as http:
            resp = http.get(f"/api/v1/devices/{self.options.device_id}")
            if resp.status_code == 404:
                return None
            resp.raise_for_status()
            body: dict[str, Any] = resp.json()
            return body

    def wait_online(self, want: bool = True, *, interrupted: threading.Event | None = None) -> float:
        """Seconds until the server shows the terminal online (or offline); `interrupted` cuts the wait short."""
        start = time.monotonic()
        deadline = start + self.options.startup_timeout_s
        stop = interrupted or threading.Event()
        while time.monotonic() < deadline:
            self.check_children()
            dev = self.device()
            if dev is not None and bool(dev.get("online")) == want:
                return time.monotonic() - start
            if stop.wait(0.2):
                raise DemoError("interrupted while waiting for the terminal")
        raise DemoError(f"the terminal did not show {'online' if want else 'offline'} on the server in time")

    def serial_devices(self) -> dict[str, str]:
        """What the device's last heartbeat (through the server's API) says of each serial device: its state, or
        why it does not count (missing, not marked simulated, not on the demo's pty path)."""
        dev = self.device()
        heartbeat = (dev or {}).get("heartbeat") or {}
        reported = {p.get("name"): p for p in heartbeat.get("peripherals", [])}
        paths = self.devices.describe() if self.devices is not None else {}
        expected = dict(zip(SERIAL_DEVICES, ("id_card_reader", "ss_card_reader", "qr_scanner"), strict=True))
        seen: dict[str, str] = {}
        for name, entry in expected.items():
            status = reported.get(name)
            if status is None:
                seen[name] = "missing"
            elif status.get("simulated") is not True:
                seen[name] = "not marked simulated"
            elif str(paths.get(entry)) not in str(status.get("detail") or ""):
                seen[name] = f"{status.get('state')}, not the serial driver on the demo's pty"
            else:
                seen[name] = str(status.get("state"))
        return seen

    def wait_serial_devices(self, timeout_s: float = 15.0) -> dict[str, str]:
        """The serial devices' states once all report ok (or what they last reported when `timeout_s` ran out)."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self.serial_devices()
            if all(state == "ok" for state in seen.values()) or time.monotonic() >= deadline:
                return seen
            self.check_children()
            time.sleep(0.2)

    def check_children(self) -> None:
        for name, proc in (("server", self.server), ("terminal", self.terminal)):
            if proc is not None and proc.poll() is not None:
                raise DemoError(f"the {name} exited unexpectedly ({proc.returncode}); see {self.workdir}/{name}.log")

    def close(self) -> list[int]:
        """Stop terminal, server, broker in that order; return the pids still alive afterwards."""
        if self.terminal is not None:
            stop(self.terminal, name="terminal")
        if self.server is not None:
            stop(self.server, name="server")
        if self.observer is not None:
            self.observer.close()
        if self.devices is not None:
            self.devices.stop()
        broker_pid = self.broker.pid
        self.broker.stop(keep_workdir=True)
        pids = [*self.pids, *([broker_pid] if broker_pid else [])]
        leftovers = [pid for pid in pids if is_alive(pid)]
        if self._tmp is not None:
            self._tmp.cleanup()
        return leftovers


def start_stack(options: DemoOptions) -> DemoStack:
    tmp = None
    if options.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="yibao-demo-")
        workdir = Path(tmp.name)
    else:
        workdir = options.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    database_url = options.database_url or f"sqlite:///{workdir / 'server.sqlite3'}"
    broker = MosquittoBroker(workdir=workdir / "mosquitto")
    stack = DemoStack(
        options=options,
        workdir=workdir,
        broker=broker,
        http_port=options.http_port,
        database_url=database_url,
        _tmp=tmp,
    )
    try:
        broker.start()
        stack.observer = WireObserver(broker.host, broker.port, options.device_id)
        stack.start_server()
        stack.create_operator()
        stack.start_devices()
        stack.start_terminal()
    except BaseException:
        stack.close()
        raise
    return stack


def redacted(database_url: str) -> str:
    """The URL with any password masked, fit for a terminal or a log."""
    return make_url(database_url).render_as_string(hide_password=True)


def _fetch_demo_records(stack: DemoStack) -> list[dict[str, Any]]:
    """Every stored demo record of the device, paged through the public events API."""
    items: list[dict[str, Any]] = []
    after = 0
    with httpx.Client(base_url=stack.base_url, timeout=10.0, headers=stack.admin_headers) as http:
        while True:
            resp = http.get(
                f"/api/v1/devices/{stack.options.device_id}/events",
                params={"payload_type": "audit_event", "after_seq": after, "limit": 1000},
            )
            resp.raise_for_status()
            page = resp.json()
            items.extend(e for e in page["items"] if e["payload"].get("action") == DEMO_ACTION)
            if page["next_after_seq"] is None:
                return items
            after = page["next_after_seq"]


def _stored_total(stack: DemoStack) -> int:
    with httpx.Client(base_url=stack.base_url, timeout=10.0, headers=stack.admin_headers) as http:
        resp = http.get(
            f"/api/v1/devices/{stack.options.device_id}/events",
            params={"payload_type": "audit_event", "limit": 1},
        )
        if resp.status_code == 404:
            return 0
        resp.raise_for_status()
        return int(resp.json()["total"])


def _acked_heartbeat(stack: DemoStack, after_seq: int) -> bool:
    """True once a heartbeat with seq above `after_seq` (so composed after those records were enqueued) reports an
    outbox with nothing the server has not acknowledged."""
    with httpx.Client(base_url=stack.base_url, timeout=10.0, headers=stack.admin_headers) as http:
        while True:
            resp = http.get(
                f"/api/v1/devices/{stack.options.device_id}/events",
                params={"payload_type": "heartbeat", "after_seq": after_seq, "limit": 1000},
            )
            resp.raise_for_status()
            page = resp.json()
            if any(e["payload"].get("outbox_depth") == 0 for e in page["items"]):
                return True
            if page["next_after_seq"] is None:
                return False
            after_seq = page["next_after_seq"]


def run_smoke(options: DemoOptions) -> dict[str, Any]:
    """Push `options.records` records through a simulated terminal and account for every one on the server, then
    wait for the terminal's own word that the server acknowledged them all."""
    options = dataclasses.replace(options, heartbeat_interval_s=min(options.heartbeat_interval_s, SMOKE_HEARTBEAT_S))
    t0 = time.monotonic()
    stack = start_stack(options)
    result: dict[str, Any] = {"sent": options.records, "database": redacted(stack.database_url)}
    try:
        t_up = time.monotonic()
        result["startup_s"] = round(t_up - t0, 3)
        # One 'terminal.started' record precedes the demo records.
        expected_total = options.records + 1
        deadline = t_up + options.drain_timeout_s
        while _stored_total(stack) < expected_total and time.monotonic() < deadline:
            stack.check_children()
            time.sleep(0.1)
        drain_s = time.monotonic() - t_up
        result["drain_s"] = round(drain_s, 3)
        result["records_per_s"] = round(options.records / drain_s, 1) if drain_s > 0 else None
        result["online_after_s"] = round(stack.wait_online(True), 3)
        records = _fetch_demo_records(stack)
        per_n = Counter(int(e["payload"]["detail"]["n"]) for e in records)
        result["stored"] = len(per_n)
        # A record stored twice would show up as a second row with the same `n` (a new seq or message id).
        result["duplicates"] = len(records) - len(per_n)
        result["lost"] = sum(1 for n in range(options.records) if n not in per_n)
        seqs = sorted(int(e["seq"]) for e in records)
        result["seq_contiguous"] = bool(seqs) and seqs[-1] - seqs[0] + 1 == len(seqs)
        t_ack = time.monotonic()
        ack_deadline = t_ack + options.drain_timeout_s
        acked = False
        while not (acked := _acked_heartbeat(stack, seqs[-1] if seqs else 0)) and time.monotonic() < ack_deadline:
            stack.check_children()
            time.sleep(0.2)
        result["server_acked"] = acked
        result["ack_wait_s"] = round(time.monotonic() - t_ack, 3)
        security = stack.security_state()
        result["enrolled"] = security["enrolled"]
        result["encrypted"] = security["encrypted"]
        result["key_fingerprint"] = security["key_fingerprint"]
        result["sealed_frames_seen"] = security["sealed_frames_seen"]
        result["plaintext_seen"] = security["plaintext_seen"]
        result["security_refused"] = security["security_refused"]
        devices = stack.wait_serial_devices()
        result["serial_devices"] = devices
        result["serial_devices_ok"] = all(state == "ok" for state in devices.values())
    finally:
        t_down = time.monotonic()
        leftovers = stack.close()
        result["teardown_s"] = round(time.monotonic() - t_down, 3)
        result["leftover_processes"] = len(leftovers)
        result["total_s"] = round(time.monotonic() - t0, 3)
    result["ok"] = (
        result.get("stored") == options.records
        and result.get("duplicates") == 0
        and result.get("lost") == 0
        and result.get("server_acked") is True
        and result.get("enrolled") is True
        and result.get("encrypted") is True
        and result.get("serial_devices_ok") is True
        and result["leftover_processes"] == 0
    )
    return result


def run_interactive(options: DemoOptions, echo: Any) -> int:
    """Run until Ctrl-C (or SIGTERM); returns the process exit code."""
    stopping = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stack = start_stack(options)
    code = 0
    try:
        echo(f"Broker     mqtt://{stack.broker.host}:{stack.broker.port}")
        echo(f"Server     {stack.base_url}/   (API: {stack.base_url}/api/v1/devices, docs: {stack.base_url}/docs)")
        echo(f"Database   {redacted(stack.database_url)}")
        echo(f"Logs       {stack.workdir}/server.log, {stack.workdir}/terminal.log, {stack.workdir}/provision.log")
        e = stack.enrolment
        echo(
            f"Device     {options.device_id} registered and enrolled through `yibao provision` (key epoch "
            f"{e.get('key_epoch')}, device key fingerprint {e.get('device_fingerprint')}, server key "
            f"{e.get('server_fingerprint')} pinned); identity in {stack.identity_dir}"
        )
        took = stack.wait_online(True, interrupted=stopping)
        security = stack.security_state()
        if not (security["enrolled"] and security["encrypted"]):
            raise DemoError(f"the terminal is online but not on the secure path: {security}")
        echo(
            f"Security   traffic encrypted (SM4-GCM): the server has the device as enrolled, "
            f"{security['sealed_frames_seen']} sealed frames and no plaintext seen on the broker, "
            f"{security['security_refused']} security refusals"
        )
        if stack.devices is not None:
            d = stack.devices.describe()
            states = ", ".join(f"{name} {state}" for name, state in stack.wait_serial_devices().items())
            echo(
                f"Devices    real serial drivers on pty simulators: ID card {d['id_card_reader']}, SS card "
                f"{d['ss_card_reader']}, QR {d['qr_scanner']} ({states}); e-voucher platform {d['evoucher_url']}"
            )
        echo(f"Terminal   {options.device_id} is online ({took:.1f} s). Open {stack.base_url}/ in a browser.")
        if stack.operator_password is not None:
            # the password alone at the end of its line: it may end in punctuation
            echo(f"Sign in    as {OPERATOR} (device admin) with this initial password, shown once (then change it):")
            echo(f"Password   {stack.operator_password}")
        else:
            echo(f"Sign in    as {OPERATOR} with the password you gave it in an earlier run (the database is kept)")
        echo("Press Ctrl-C to stop everything.")
        while not stopping.wait(0.5):
            stack.check_children()
    except DemoError as exc:
        if stopping.is_set():  # Ctrl-C during start-up is a normal stop, not a failure
            echo("Interrupted during start-up.")
        else:
            echo(f"error: {exc}")
            code = 1
    finally:
        echo("Stopping terminal, server and broker ...")
        leftovers = stack.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if leftovers:
            echo(f"warning: processes still running: {leftovers}")
            code = 1
        else:
            echo("Stopped; nothing left running.")
    return code


def smoke_json(result: dict[str, Any]) -> str:
    return json.dumps(result, ensure_ascii=False, sort_keys=False)
