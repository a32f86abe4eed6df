"""Fixtures for the terminal core: a private Mosquitto, an injectable clock, config builders, an uplink recorder.

`broker` comes from tests/conftest.py. This FakeClock drives both wall and monotonic time (the server tests' clock
keeps monotonic time real because their worker threads wait on it).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import Client, ConnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocol import DeviceStatusMessage, Envelope, Payload, PayloadType, Topics, decode_envelope, decode_status
from terminal.config import OutboxConfig, TerminalConfig, parse_terminal_config
from terminal.errors import OutboxFullError
from terminal.outbox import Outbox
from yibao.broker import MosquittoBroker

DEVICE_ID = "SIM-0001"


class FakeClock:
    """A `protocol.Clock` that only moves when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self._lock = threading.Lock()
        self._wall = start or datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
        self._mono_ns = 1_000_000_000

    def now(self) -> datetime:
        with self._lock:
            return self._wall

    def monotonic(self) -> float:
        return self.monotonic_ns() / 1e9

    def monotonic_ns(self) -> int:
        with self._lock:
            return self._mono_ns

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._wall += timedelta(seconds=seconds)
            self._mono_ns += int(seconds * 1e9)

    def set_wall(self, when: datetime) -> None:
        """Jump the wall clock only (as NTP or a user might), leaving the monotonic clock alone."""
        with self._lock:
            self._wall = when


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def outbox_config(path: Path, **overrides: Any) -> OutboxConfig:
    values: dict[str, Any] = {
        "path": path,
        "max_bytes": 16 * 1024 * 1024,
        "high_water_ratio": 0.8,
        "batch_size": 50,
        "publish_timeout_s": 2.0,
        "retry_initial_s": 1.0,
        "retry_max_s": 8.0,
        "sent_retention_s": 3600.0,
    }
    values.update(overrides)
    return OutboxConfig.model_validate(values)


def open_outbox(
    path: Path, clock: FakeClock | None = None, *, jitter: Callable[[], float] | None = None, **overrides: Any
) -> Outbox:
    return Outbox.open(
        outbox_config(path, **overrides),
        device_id=DEVICE_ID,
        boot_id=uuid.uuid4(),
        clock=clock or FakeClock(),
        jitter=jitter or (lambda: 0.0),
    )


def fill_until_full(outbox: Outbox, make: Callable[[int], Payload], limit: int = 100_000) -> list[Envelope]:
    """Enqueue records one by one until the outbox refuses with OutboxFullError; returns what it accepted."""
    accepted: list[Envelope] = []
    for n in range(limit):
        try:
            accepted.append(outbox.enqueue(make(n)))
        except OutboxFullError:
            return accepted
    raise AssertionError(f"outbox still accepting after {limit} records")


def terminal_raw_config(
    tmp_path: Path,
    broker: MosquittoBroker | None = None,
    *,
    mqtt: dict[str, Any] | None = None,
    outbox: dict[str, Any] | None = None,
    heartbeat_s: float = 3600.0,
) -> dict[str, Any]:
    """A complete raw config (as TOML would give it) tuned for fast tests."""
    return {
        "schema_version": 1,
        "config_version": "test-1",
        "device_id": DEVICE_ID,
        "software_version": "0.1.0",
        "mqtt": {
            "host": broker.host if broker else "127.0.0.1",
            "port": broker.port if broker else 1883,
            "keepalive_s": 5,
            "topic_prefix": "yibao/v1",
            "reconnect_min_s": 0.5,
            "reconnect_max_s": 1.0,
            **(mqtt or {}),
        },
        "outbox": {
            "path": str(tmp_path / "outbox.sqlite3"),
            "max_bytes": 16 * 1024 * 1024,
            "high_water_ratio": 0.8,
            "batch_size": 50,
            "publish_timeout_s": 2.0,
            "retry_initial_s": 0.2,
            "retry_max_s": 1.0,
            "sent_retention_s": 3600.0,
            **(outbox or {}),
        },
        "heartbeat": {"interval_s": heartbeat_s},
    }


def terminal_config(tmp_path: Path, broker: MosquittoBroker | None = None, **kwargs: Any) -> TerminalConfig:
    return parse_terminal_config(terminal_raw_config(tmp_path, broker, **kwargs), source="test")


def to_toml(raw: dict[str, Any]) -> str:
    """Just enough TOML for our flat config (tomllib only reads)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    head = [f"{k} = {value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    tables = [
        f"\n[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
        for k, v in raw.items()
        if isinstance(v, dict)
    ]
    return "\n".join(head) + "\n" + "\n".join(tables) + "\n"


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


class UplinkRecorder:
    """A plain paho subscriber that records every uplink envelope and status message of the test device.

    Persistent session (clean_start=False, session expiry) and re-subscribe on every connect, so it keeps receiving
    across a broker kill and restart like the real server would."""

    def __init__(self, broker: MosquittoBroker, *, device_id: str = DEVICE_ID, prefix: str = "yibao/v1") -> None:
        self._topics = Topics(prefix=prefix)
        self._device_id = device_id
        self._lock = threading.Lock()
        self._uplinks: list[Envelope] = []
        self._statuses: list[tuple[DeviceStatusMessage, bool]] = []
        self._subscribed = threading.Event()
        self._subacks = 0
        self._client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"recorder-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.reconnect_delay_set(1, 1)
        properties = _properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self._client.connect(broker.host, broker.port, keepalive=5, clean_start=False, properties=properties)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("recorder did not subscribe")

    def _on_connect(
        self, client: Client, userdata: object, flags: ConnectFlags, rc: ReasonCode, props: Properties | None
    ) -> None:
        client.subscribe(
            [(self._topics.uplink(self._device_id), 1), (self._topics.status(self._device_id), 1)],
        )

    def _on_subscribe(
        self, client: Client, userdata: object, mid: int, rcs: list[ReasonCode], props: Properties | None
    ) -> None:
        with self._lock:
            self._subacks += 1
        self._subscribed.set()

    @property
    def subscriptions(self) -> int:
        """How many times the recorder has (re)subscribed: once per connection."""
        with self._lock:
            return self._subacks

    def _on_message(self, client: Client, userdata: object, message: MQTTMessage) -> None:
        with self._lock:
            if message.topic.endswith("/status"):
                self._statuses.append((decode_status(bytes(message.payload)), bool(message.retain)))
            else:
                self._uplinks.append(decode_envelope(bytes(message.payload)))

    def uplinks(self, payload_type: PayloadType | None = None) -> list[Envelope]:
        with self._lock:
            return [e for e in self._uplinks if payload_type is None or e.payload_type is payload_type]

    def statuses(self) -> list[DeviceStatusMessage]:
        with self._lock:
            return [s for s, _ in self._statuses]

    def seqs(self, payload_type: PayloadType | None = None) -> set[int]:
        return {e.seq for e in self.uplinks(payload_type)}

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


_properties: Callable[[int], Properties] = Properties
"""paho's `Properties.__init__` is unannotated; this alias states its signature."""


@pytest.fixture
def recorder(broker: MosquittoBroker) -> Iterator[UplinkRecorder]:
    rec = UplinkRecorder(broker)
    yield rec
    rec.close()


def retained_status(broker: MosquittoBroker, device_id: str = DEVICE_ID, timeout_s: float = 5.0) -> DeviceStatusMessage:
    """What a newcomer sees on the device's status topic: the retained message."""
    got: list[DeviceStatusMessage] = []
    done = threading.Event()
    client = Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)

    def on_message(c: Client, userdata: object, message: MQTTMessage) -> None:
        if message.retain:
            got.append(decode_status(bytes(message.payload)))
            done.set()

    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe(Topics().status(device_id), qos=1)
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            raise AssertionError("no retained status message")
        return got[0]
    finally:
        client.disconnect()
        client.loop_stop()


class ReplyHoldingProxy:
    """A TCP relay between MQTT clients and the broker that can hold back the broker's replies.

    While `hold_replies()` is in force, client -> broker bytes still flow (the broker receives and routes every
    PUBLISH) but broker -> client bytes wait (no PUBACK reaches the client). `release_replies()` lets them through.
    `refuse_connections()` hangs up on new clients, to decide when a client may come back after a broker restart."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self._target = (broker.host, broker.port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.host = "127.0.0.1"
        self.port = int(self._listener.getsockname()[1])
        self._replies_flow = threading.Event()
        self._replies_flow.set()
        self._refusing = False
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def hold_replies(self) -> None:
        self._replies_flow.clear()

    def release_replies(self) -> None:
        self._replies_flow.set()

    def refuse_connections(self) -> None:
        """New clients are hung up on at once, as if the broker were still down."""
        self._refusing = True

    def accept_connections(self) -> None:
        self._refusing = False

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                if self._refusing:
                    raise ConnectionRefusedError("proxy refusing")
                upstream = socket.create_connection(self._target, timeout=2)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream, None)
            self._spawn(self._pump, upstream, client, self._replies_flow)

    def _pump(self, source: socket.socket, sink: socket.socket, gate: threading.Event | None) -> None:
        try:
            with contextlib.suppress(OSError):  # either side closing ends the pump; that is the relay's normal end
                while data := source.recv(65536):
                    if gate is not None:
                        gate.wait()
                    sink.sendall(data)
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._replies_flow.set()
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(2)
