"""A fleet of simulated terminals in one process: the real terminal core, many MQTT sessions, a few network threads.

Owns `Fleet` (M terminals, each built by `terminal.runtime.build_runtime` with its own SQLite outbox in a work dir,
its own heartbeat timer, delivery loop and downlink receiver, and simulated peripherals) and the transport that lets
thousands of them share two cores: `FleetLink`, an implementation of `terminal.sync.UplinkLink` whose paho client has
NO network thread of its own, and `FleetNetwork`, a handful of threads that drive all the clients through paho's
external-loop API (`on_socket_open/close/register_write` callbacks, `loop_read`, `loop_write`, `loop_misc`) over one
`selectors` selector per thread. Each link still has what a kiosk's `MqttUplink` has: a unique client id (the device
id), MQTT 5 with a persistent session (`clean_start=False`, session expiry), a retained last will 'offline', a
retained 'online' on every connect, a QoS 1 downlink subscription feeding the terminal's `DownlinkReceiver`, and
PUBACKs correlated per published record (paho's `MQTTMessageInfo`, never a bare `mid`).

Socket IO happens only on the owning network thread: `publish()` queues inside paho and wakes that thread, which
writes. paho's `_packet_write` takes no lock, so two writers on one client would interleave bytes.

Encryption (when the bench asks for it): `enrol_fleet` registers N devices through the admin API, generates each
one's SM2 key here, enrols it, checks and pins the bundle, and runs the session handshake, in parallel; it returns a
`SessionManager` per device (keys in memory only, no identity files). `FleetOptions.sessions` hands them to the
fleet: each terminal then logs in to the broker with its own credentials and seals every uplink (the terminal core's
`SessionSealer`), and opens its downlink frames (`SessionOpener`), exactly as an enrolled kiosk does.

It must never be imported by production code (it is a simulator), never re-implement what the terminal core does
(outbox, delivery, acks, heartbeats all come from `terminal`), never talk to anything but the broker it is given,
and never log payloads.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import resource
import selectors
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final, Literal

from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from drivers.peripherals import Peripheral
from hardware_sim.peripherals import simulated_peripherals
from protocol import AuditEvent, AuditOutcome, DeviceStatusMessage, LinkState, SystemClock, Topics
from protocol.enrolment import make_enrol_request
from protocol.gm.sm2 import SM2PrivateKey
from provisioning.client import ServerClient
from terminal.config import HeartbeatConfig, MqttConfig, OutboxConfig, TerminalConfig
from terminal.identity import SecurityLog, identity_from_enrolment
from terminal.runtime import TerminalRuntime, build_runtime
from terminal.session import HttpDeviceApi, SessionManager, TerminalSecurity
from terminal.sync import (
    SESSION_EXPIRY_S,
    PahoTicket,
    PubackRefusals,
    PublishTicket,
    announce_online,
    publish_qos1,
    wire_status,
)

logger = logging.getLogger(__name__)

FDS_PER_TERMINAL: Final = 6
"""One MQTT socket plus the outbox's SQLite database, WAL and shared-memory files, with a margin."""
MISC_INTERVAL_S: Final = 1.0
"""How often each network thread runs paho's keep-alive bookkeeping and due reconnects for all its clients."""
RECONNECT_MIN_S: Final = 1.0
RECONNECT_MAX_S: Final = 30.0
CLOSE_TIMEOUT_S: Final = 5.0

_connect_properties: Callable[[int], Properties] = Properties
"""paho's `Properties.__init__(packetType)` is unannotated; this alias states the signature it has."""


def raise_open_file_limit(wanted: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (never above the hard limit); returns (soft, hard).

    Children started afterwards (Mosquitto, the server) inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


# ---------------------------------------------------------------------- the link


class FleetLink:
    """One terminal's MQTT session, driven by a `FleetNetwork` thread instead of its own (a `UplinkLink`)."""

    def __init__(
        self,
        config: MqttConfig,
        *,
        device_id: str,
        boot_id: uuid.UUID,
        network: FleetNetwork,
        inflight_window: int,
        password: str | None = None,
        status_sealer: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """`password` goes with `config.username` (an enrolled simulated device's broker credentials);
        `status_sealer` seals its status messages as `MqttUplink` does."""
        self.device_id = device_id
        self._config = config
        self._boot_id = boot_id
        self._network = network
        self._clock = SystemClock()
        topics = Topics(prefix=config.topic_prefix)
        self._status_topic = topics.status(device_id)
        self._downlink_topic = topics.downlink(device_id)
        self._downlink_sink: Callable[[str, bytes], None] | None = None
        self._connected = threading.Event()
        self._gone = threading.Event()
        self._refusals = PubackRefusals()
        self._status_sealer = status_sealer
        self.closing = False
        self.started = False
        self.connects = 0
        self.reconnect_due = 0.0
        self.reconnect_delay_s = RECONNECT_MIN_S
        self.on_connected: Callable[[], None] | None = None
        """Called on the network thread after each connect; must only schedule work."""

        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client = client
        self._refresh_will()
        if config.username is not None:
            client.username_pw_set(config.username, password)
        client.max_inflight_messages_set(inflight_window)
        client.max_queued_messages_set(inflight_window * 4)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._refusals.on_publish
        client.on_message = self._on_message
        client.on_socket_open = network.socket_opened
        client.on_socket_close = network.socket_closed
        client.on_socket_register_write = network.write_wanted
        client.user_data_set(self)

    def attach_downlink(self, sink: Callable[[str, bytes], None]) -> None:
        """Where downlink messages go (the terminal's `DownlinkReceiver.offer`); set before `start()`."""
        self._downlink_sink = sink

    # -- UplinkLink

    def start(self) -> None:
        if self.started:
            return
        properties = _connect_properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self.client.connect_async(
            self._config.host,
            self._config.port,
            keepalive=self._config.keepalive_s,
            clean_start=False,
            properties=properties,
        )
        self.started = True
        self._network.attach(self)

    def close(self) -> None:
        if not self.started or self.closing:
            return
        self.closing = True
        if self._connected.is_set():
            offline = wire_status(self._status(LinkState.OFFLINE, stamped=True), self._status_sealer)
            with contextlib.suppress(ValueError, RuntimeError):
                if offline is not None:
                    info = self.client.publish(self._status_topic, offline, qos=1, retain=True)
                    self._network.write_wanted(self.client, self, None)
                    info.wait_for_publish(CLOSE_TIMEOUT_S)
            self.client.disconnect()
            self._network.write_wanted(self.client, self, None)
            self._gone.wait(CLOSE_TIMEOUT_S)
        self._connected.clear()
        self._network.detach(self)

    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def publish(self, topic: str, payload: bytes) -> PublishTicket:
        info = publish_qos1(self.client, topic, payload, connected=self._connected.is_set())
        # paho only calls register_write when it was not already registered; wake the thread regardless, because
        # the network thread may have just decided there was nothing to write (a lost-wake-up race otherwise).
        self._network.write_wanted(self.client, self, None)
        return PahoTicket(info, self._refusals.take)

    # -- paho callbacks, on the network thread

    def _on_connect(
        self,
        client: Client,
        userdata: object,
        flags: ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            logger.warning("fleet: broker refused %s: %s", self.device_id, reason_code)
            return
        announce_online(
            client,
            status_topic=self._status_topic,
            status=wire_status(self._status(LinkState.ONLINE, stamped=True), self._status_sealer),
            downlink_topic=self._downlink_topic,
        )
        self.connects += 1
        self.reconnect_delay_s = RECONNECT_MIN_S
        self._gone.clear()
        self._connected.set()
        if self.on_connected is not None:
            self.on_connected()

    def _on_disconnect(
        self,
        client: Client,
        userdata: object,
        flags: DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        self._gone.set()
        if not self.closing:
            self._refresh_will()
            logger.debug("fleet: %s lost its connection: %s", self.device_id, reason_code)
            self._network.schedule_reconnect(self)

    def _on_message(self, client: Client, userdata: object, message: MQTTMessage) -> None:
        sink = self._downlink_sink
        if sink is not None:
            sink(message.topic, bytes(message.payload))

    def _status(self, state: LinkState, *, stamped: bool) -> bytes:
        return DeviceStatusMessage(
            device_id=self.device_id,
            state=state,
            boot_id=self._boot_id,
            at=self._clock.now() if stamped else None,
        ).to_bytes()

    def _refresh_will(self) -> None:
        will = wire_status(self._status(LinkState.OFFLINE, stamped=False), self._status_sealer)
        if will is None:
            self.client.will_clear()
        else:
            self.client.will_set(self._status_topic, will, qos=1, retain=True)

    def announce_online(self) -> None:
        """Publish the retained 'online' again (a new session key: the server answers under the new key)."""
        status = wire_status(self._status(LinkState.ONLINE, stamped=True), self._status_sealer)
        if status is not None and self._connected.is_set():
            self.client.publish(self._status_topic, status, qos=1, retain=True)
            self._network.write_wanted(self.client, self, None)


# ---------------------------------------------------------------------- the network threads


def _drain_wakeups(wake_r: socket.socket) -> None:
    """Empty the (non-blocking) wake-up socket: each byte only said 'look at your work lists'."""
    with contextlib.suppress(BlockingIOError):
        while wake_r.recv(4096):
            continue


class _Shard:
    """One network thread: a selector over its clients' sockets, a wake-up socket pair, due reconnects."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.lock = threading.Lock()
        self.links: set[FleetLink] = set()
        self.to_connect: list[FleetLink] = []
        self.to_write: set[FleetLink] = set()
        self.to_detach: list[FleetLink] = []
        self.reconnecting: set[FleetLink] = set()
        self.wake_pending = False
        """A wake-up byte is on its way and the thread has not yet taken the work: no second syscall needed. A
        socket send per publish cost ~10% of the fleet's CPU in the 50 x 100,000 benchmark."""
        self.thread: threading.Thread | None = None

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe already guarantees a wake-up
            self.wake_w.send(b"\0")


class FleetNetwork:
    """`threads` network threads; each drives the paho clients of the links attached to it."""

    def __init__(self, threads: int = 2) -> None:
        self._shards = [_Shard(i) for i in range(max(1, threads))]
        self._shard_of: dict[int, _Shard] = {}
        self._next = 0
        self._stopping = threading.Event()
        self.loop_errors = 0

    def start(self) -> None:
        for shard in self._shards:
            if shard.thread is None:
                shard.thread = threading.Thread(
                    target=self._run, args=(shard,), name=f"fleet-net-{shard.index}", daemon=True
                )
                shard.thread.start()

    def stop(self) -> None:
        self._stopping.set()
        for shard in self._shards:
            shard.wake()
            if shard.thread is not None:
                shard.thread.join(10.0)
                shard.thread = None
            # The thread may have stopped before it dropped links detached just before: close what is left, or
            # their sockets outlive the fleet.
            with shard.lock:
                leftover = set(shard.links) | set(shard.to_detach) | set(shard.reconnecting)
                shard.to_detach = []
            for link in leftover:
                self._drop(shard, link)
            shard.selector.close()
            shard.wake_r.close()
            shard.wake_w.close()

    # -- called from any thread

    def attach(self, link: FleetLink) -> None:
        shard = self._shards[self._next % len(self._shards)]
        self._next += 1
        self._shard_of[id(link.client)] = shard
        with shard.lock:
            shard.links.add(link)
            shard.to_connect.append(link)
        shard.wake()

    def detach(self, link: FleetLink) -> None:
        shard = self._shard_of.get(id(link.client))
        if shard is None:
            return
        with shard.lock:
            shard.to_detach.append(link)
        shard.wake()

    def schedule_reconnect(self, link: FleetLink) -> None:
        shard = self._shard_of[id(link.client)]
        link.reconnect_due = time.monotonic() + link.reconnect_delay_s
        link.reconnect_delay_s = min(RECONNECT_MAX_S, link.reconnect_delay_s * 2)
        with shard.lock:
            shard.reconnecting.add(link)

    # -- paho socket callbacks (signature: client, userdata, socket)

    def write_wanted(self, client: Client, userdata: object, sock: object) -> None:
        shard = self._shard_of.get(id(client))
        if shard is None or not isinstance(userdata, FleetLink):
            return
        with shard.lock:
            shard.to_write.add(userdata)
            wake, shard.wake_pending = not shard.wake_pending, True
        if wake:
            shard.wake()

    def socket_opened(self, client: Client, userdata: object, sock: object) -> None:
        shard = self._shard_of.get(id(client))
        if shard is not None and isinstance(sock, socket.socket):
            shard.selector.register(sock, selectors.EVENT_READ, userdata)

    def socket_closed(self, client: Client, userdata: object, sock: object) -> None:
        shard = self._shard_of.get(id(client))
        if shard is not None and isinstance(sock, socket.socket):
            with contextlib.suppress(KeyError, ValueError):
                shard.selector.unregister(sock)

    # -- the thread

    def _run(self, shard: _Shard) -> None:
        next_misc = time.monotonic() + MISC_INTERVAL_S
        while not self._stopping.is_set():
            try:
                timeout = max(0.0, next_misc - time.monotonic())
                for key, mask in shard.selector.select(timeout):
                    if key.data is None:
                        _drain_wakeups(shard.wake_r)
                        continue
                    link = key.data
                    if not isinstance(link, FleetLink):
                        continue
                    if mask & selectors.EVENT_READ:
                        link.client.loop_read()
                    self._flush(shard, link)
                self._take_work(shard)
                if time.monotonic() >= next_misc:
                    next_misc = time.monotonic() + MISC_INTERVAL_S
                    self._misc(shard)
            except Exception:  # one client's surprise must not silence the other thousands
                self.loop_errors += 1
                logger.exception("fleet: network thread %d: unexpected error", shard.index)

    def _take_work(self, shard: _Shard) -> None:
        with shard.lock:
            connect, shard.to_connect = shard.to_connect, []
            write, shard.to_write = shard.to_write, set()
            detach, shard.to_detach = shard.to_detach, []
            shard.wake_pending = False  # from here on, new work needs a new wake-up byte
        for link in connect:
            self._connect(shard, link)
        for link in write:
            self._flush(shard, link)
        for link in detach:
            self._drop(shard, link)

    def _flush(self, shard: _Shard, link: FleetLink) -> None:
        client = link.client
        if client.want_write():
            client.loop_write()
        sock = client.socket()
        if not isinstance(sock, socket.socket):
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        with contextlib.suppress(KeyError, ValueError):
            if shard.selector.get_key(sock).events != events:
                shard.selector.modify(sock, events, link)

    def _connect(self, shard: _Shard, link: FleetLink) -> None:
        if link.closing:
            return
        try:
            rc = link.client.reconnect()
        except OSError as exc:
            logger.debug("fleet: %s cannot connect: %s", link.device_id, exc)
            self.schedule_reconnect(link)
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.schedule_reconnect(link)
            return
        self._flush(shard, link)

    def _misc(self, shard: _Shard) -> None:
        now = time.monotonic()
        with shard.lock:
            links = list(shard.links)
            due = [link for link in shard.reconnecting if link.reconnect_due <= now]
            shard.reconnecting.difference_update(due)
        for link in links:
            if link.client.socket() is not None:
                link.client.loop_misc()
                self._flush(shard, link)
        for link in due:
            self._connect(shard, link)

    def _drop(self, shard: _Shard, link: FleetLink) -> None:
        with shard.lock:
            shard.links.discard(link)
            shard.reconnecting.discard(link)
        sock = link.client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(KeyError, ValueError):
                shard.selector.unregister(sock)
            sock.close()


# ---------------------------------------------------------------------- the fleet


@dataclass(frozen=True, slots=True)
class FleetOptions:
    terminals: int
    broker_host: str
    broker_port: int
    workdir: Path
    heartbeat_interval_s: float = 30.0
    keepalive_s: int = 30
    batch_size: int = 200
    network_threads: int = 2
    device_prefix: str = "FLEET"
    topic_prefix: str = "yibao/v1"
    build_workers: int = 32
    """Terminals built (outbox files created) and stopped in parallel: each is mostly fsync waits."""
    scheduling: Literal["threads", "pooled"] = "threads"
    """'threads': each terminal runs exactly as a kiosk does (`TerminalRuntime.start()`: its own delivery,
    downlink and heartbeat threads). 'pooled': the same terminal-core objects and methods (`deliver_batch`,
    `DownlinkReceiver.process`, `HeartbeatTimer.beat`), called by `pool_workers` shared threads when there is work,
    so thousands of terminals do not mean thousands of threads polling for the GIL."""
    pool_workers: int = 64
    sweep_s: float = 5.0
    """'pooled': how often every terminal's outbox is looked at even without a trigger (retries, server-ack
    timeouts), where a kiosk's delivery thread looks every second."""
    sessions: Mapping[str, SessionManager] | None = None
    """Enrolled devices by id (`enrol_fleet`): each terminal logs in with its broker credentials and seals its
    uplinks under its session key. None: plaintext, anonymous (security off)."""


@dataclass(eq=False)
class FleetTerminal:
    runtime: TerminalRuntime
    link: FleetLink
    next_beat: float = 0.0
    beat_due: bool = False
    downlink_waiting: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _TerminalScheduler:
    """'pooled' scheduling: a ready queue of terminals (each at most once), worker threads, and a ticker that makes
    heartbeats due and sweeps every outbox now and then."""

    def __init__(self, terminals: Sequence[FleetTerminal], *, workers: int, interval_s: float, sweep_s: float) -> None:
        self._terminals = terminals
        self._interval_s = interval_s
        self._sweep_s = sweep_s
        self._ready: queue.SimpleQueue[FleetTerminal | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued: set[FleetTerminal] = set()
        self._running: set[FleetTerminal] = set()
        self._again: set[FleetTerminal] = set()
        self._stopping = threading.Event()
        self.errors = 0
        self.beats = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"fleet-worker-{i}", daemon=True) for i in range(workers)
        ]
        self._ticker = threading.Thread(target=self._tick, name="fleet-ticker", daemon=True)

    def start(self) -> None:
        now = time.monotonic()
        count = max(1, len(self._terminals))
        for i, terminal in enumerate(self._terminals):
            # The first beat at once (as HeartbeatTimer.start does), the next ones spread over the interval.
            terminal.beat_due = True
            terminal.next_beat = now + self._interval_s * (1 + i / count)
            self.schedule(terminal)
        for thread in self._threads:
            thread.start()
        self._ticker.start()

    def stop(self) -> None:
        self._stopping.set()
        self._ticker.join(10.0)
        for _ in self._threads:
            self._ready.put(None)
        for thread in self._threads:
            thread.join(30.0)

    def schedule(self, terminal: FleetTerminal) -> None:
        with self._lock:
            if terminal in self._running:
                self._again.add(terminal)
            elif terminal not in self._queued:
                self._queued.add(terminal)
                self._ready.put(terminal)

    def _tick(self) -> None:
        next_sweep = time.monotonic() + self._sweep_s
        while not self._stopping.wait(0.1):
            now = time.monotonic()
            sweep = now >= next_sweep
            if sweep:
                next_sweep = now + self._sweep_s
            for terminal in self._terminals:
                if now >= terminal.next_beat:
                    terminal.next_beat = now + self._interval_s
                    terminal.beat_due = True
                    self.schedule(terminal)
                elif sweep:
                    self.schedule(terminal)

    def _work(self) -> None:
        while (terminal := self._ready.get()) is not None:
            with self._lock:
                self._queued.discard(terminal)
                self._running.add(terminal)
            try:
                self._run_once(terminal)
            except Exception:  # one terminal's surprise must not stop the pool
                self.errors += 1
                logger.exception("fleet: %s: unexpected error", terminal.link.device_id)
            with self._lock:
                self._running.discard(terminal)
                if terminal in self._again:
                    self._again.discard(terminal)
                    self._queued.add(terminal)
                    self._ready.put(terminal)

    def _run_once(self, terminal: FleetTerminal) -> None:
        sync = terminal.runtime.sync
        if terminal.runtime.security is not None:
            terminal.runtime.security.sessions.maintain()  # cheap unless a rotation is due
        with terminal.lock:
            waiting, terminal.downlink_waiting = terminal.downlink_waiting, []
        if waiting and sync.downlink is not None:
            sync.downlink.process(waiting)
        if terminal.beat_due:
            terminal.beat_due = False
            if sync.heartbeat.beat() is not None:
                with self._lock:
                    self.beats += 1
        if terminal.link.is_connected() and not self._stopping.is_set():
            # A few rounds, then back in the queue, so one deep outbox cannot starve the others.
            for _ in range(4):
                if sync.delivery.deliver_batch() == 0:
                    return
            self.schedule(terminal)


@dataclass
class Fleet:
    """M terminals from the real terminal core sharing `FleetNetwork` threads. `stop()` is final."""

    options: FleetOptions
    peripherals: Callable[[], Sequence[Peripheral]] = simulated_peripherals
    terminals: list[FleetTerminal] = field(default_factory=list)
    network: FleetNetwork | None = None
    scheduler: _TerminalScheduler | None = None
    nofile_limit: tuple[int, int] = (0, 0)

    def device_id(self, index: int) -> str:
        return fleet_device_id(self.options.device_prefix, index)

    def start(self) -> None:
        """Raise the open-file limit, build every terminal (outbox, link, timers), then start them all."""
        o = self.options
        self.nofile_limit = raise_open_file_limit(o.terminals * FDS_PER_TERMINAL + 1024)
        if self.nofile_limit[0] < o.terminals * FDS_PER_TERMINAL:
            logger.warning(
                "fleet: open-file limit %d may be too low for %d terminals", self.nofile_limit[0], o.terminals
            )
        o.workdir.mkdir(parents=True, exist_ok=True)
        self.network = FleetNetwork(o.network_threads)
        self.network.start()
        with ThreadPoolExecutor(max_workers=o.build_workers, thread_name_prefix="fleet-build") as pool:
            self.terminals = list(pool.map(self._build, range(o.terminals)))
            if o.scheduling == "threads":
                list(pool.map(lambda t: t.runtime.start(), self.terminals))
                return
        self.scheduler = _TerminalScheduler(
            self.terminals, workers=o.pool_workers, interval_s=o.heartbeat_interval_s, sweep_s=o.sweep_s
        )
        for terminal in self.terminals:
            terminal.link.on_connected = partial(self.scheduler.schedule, terminal)
            terminal.link.start()
        self.scheduler.start()

    def _build(self, index: int) -> FleetTerminal:
        o = self.options
        if self.network is None:
            raise RuntimeError("the fleet network is not running")
        device_id = self.device_id(index)
        sessions = None if o.sessions is None else o.sessions.get(device_id)
        if o.sessions is not None and sessions is None:
            raise RuntimeError(f"fleet: {device_id} has no enrolled identity (enrol_fleet with the same prefix)")
        mqtt = MqttConfig(
            host=o.broker_host,
            port=o.broker_port,
            keepalive_s=o.keepalive_s,
            topic_prefix=o.topic_prefix,
            username=None if sessions is None else sessions.identity.bundle.mqtt.username,
        )
        security = None if sessions is None else TerminalSecurity(sessions.identity, sessions, SecurityLog(None))
        home = o.workdir / device_id
        home.mkdir(parents=True, exist_ok=True)
        config = TerminalConfig(
            schema_version=1,
            config_version="fleet-1",
            device_id=device_id,
            mqtt=mqtt,
            # Each terminal has its own folder, as each kiosk has its own disk: the runtime keeps files beside the
            # outbox (binding status, catalogue store, prescription inbox, proxy relationships).
            # No disk ballast: thousands of simulated terminals share one disk, which the harness does not fill.
            outbox=OutboxConfig(path=home / "outbox.sqlite3", batch_size=o.batch_size, disk_reserve_bytes=0),
            heartbeat=HeartbeatConfig(interval_s=o.heartbeat_interval_s),
        )
        boot_id = uuid.uuid4()
        link = FleetLink(
            mqtt,
            device_id=device_id,
            boot_id=boot_id,
            network=self.network,
            inflight_window=o.batch_size,
            password=None if security is None else security.identity.broker_password,
            status_sealer=None if security is None else security.sealer(SystemClock()).seal_status,
        )
        runtime = build_runtime(config, self.peripherals(), boot_id=boot_id, link=link, security=security)
        if sessions is not None:
            sessions.on_new_key = lambda _key: link.announce_online()
        terminal = FleetTerminal(runtime=runtime, link=link)
        if o.scheduling == "pooled":
            link.attach_downlink(partial(self._downlink_arrived, terminal))
        elif runtime.sync.downlink is not None:
            link.attach_downlink(runtime.sync.downlink.offer)
        return terminal

    def _downlink_arrived(self, terminal: FleetTerminal, topic: str, payload: bytes) -> None:
        """'pooled': on the network thread, only keep the message and queue the terminal for a worker."""
        with terminal.lock:
            terminal.downlink_waiting.append((topic, payload))
        if self.scheduler is not None:
            self.scheduler.schedule(terminal)

    def connected(self) -> int:
        return sum(1 for t in self.terminals if t.link.is_connected())

    def wait_connected(self, timeout_s: float, *, want: int | None = None) -> int:
        """Wait until `want` (default: all) terminals are connected or `timeout_s` passed; returns how many are."""
        want = len(self.terminals) if want is None else want
        deadline = time.monotonic() + timeout_s
        while (count := self.connected()) < want and time.monotonic() < deadline:
            time.sleep(0.1)
        return count

    def enqueue_audits(self, per_terminal: int, *, action: str = "fleet.record") -> None:
        """Every terminal puts `per_terminal` audit events (detail {'n': i}) into its outbox, in batches of the
        outbox batch size, terminals in parallel."""
        batch = self.options.batch_size

        def fill(terminal: FleetTerminal) -> None:
            for start in range(0, per_terminal, batch):
                events = [
                    AuditEvent(category="system", action=action, outcome=AuditOutcome.INFO, detail={"n": n})
                    for n in range(start, min(per_terminal, start + batch))
                ]
                terminal.runtime.record_audits(events)
                if self.scheduler is not None:
                    self.scheduler.schedule(terminal)

        with ThreadPoolExecutor(max_workers=self.options.build_workers, thread_name_prefix="fleet-fill") as pool:
            list(pool.map(fill, self.terminals))

    def heartbeats_enqueued(self) -> int | None:
        """Heartbeats the terminals put into their outboxes so far ('pooled' only; None with 'threads')."""
        return self.scheduler.beats if self.scheduler is not None else None

    def outbox_depth(self) -> int:
        """Records not yet acknowledged by the server, over all terminals."""
        return sum(t.runtime.outbox.stats().depth for t in self.terminals)

    def stop(self) -> None:
        """Stop every terminal (retained 'offline', disconnect, outbox closed), then the network threads."""
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        with ThreadPoolExecutor(max_workers=max(1, self.options.build_workers * 4)) as pool:
            # 'pooled': the runtime's own threads never started, so stop() only closes the outbox; close the link
            # first so the retained 'offline' goes out, as SyncWorker.stop() does.
            list(pool.map(lambda t: (t.link.close(), t.runtime.stop()), self.terminals))
        if self.network is not None:
            self.network.stop()
            self.network = None


# ---------------------------------------------------------------------- enrolment of a simulated fleet


def fleet_device_id(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}"


@dataclass(frozen=True, slots=True)
class FleetEnrolment:
    sessions: dict[str, SessionManager]
    seconds: float
    """Wall time of the whole enrolment."""
    register_s: float
    """Time spent in each phase, summed over devices and divided by the workers (about its share of `seconds`)."""
    enrol_s: float
    handshake_s: float


def enrol_fleet(
    server_url: str,
    admin_token: str,
    device_ids: Sequence[str],
    *,
    workers: int = 8,
    workdir: Path | None = None,
) -> FleetEnrolment:
    """Register (admin API), enrol (key generated here, proof, bundle checked against the fingerprint the admin
    API reported) and open a session for every device, `workers` at a time; keys stay in memory.

    Per device: one register, one enrol and one session request over keep-alive HTTP connections (one client per
    worker). Raises the first failure (`provisioning.client.ProvisioningError` or `terminal.session.DeviceApiError`
    / `terminal.identity.IdentityError`), naming the device."""
    clock = SystemClock()
    local = threading.local()
    directory = workdir if workdir is not None else Path()
    clients: list[tuple[ServerClient, HttpDeviceApi]] = []
    clients_lock = threading.Lock()

    def client_pair() -> tuple[ServerClient, HttpDeviceApi]:
        pair: tuple[ServerClient, HttpDeviceApi] | None = getattr(local, "pair", None)
        if pair is None:
            pair = (
                ServerClient(server_url, token=admin_token, timeout_s=60.0),
                HttpDeviceApi(server_url, timeout_s=60.0),
            )
            local.pair = pair
            with clients_lock:
                clients.append(pair)
        return pair

    timings = {"register": 0.0, "enrol": 0.0, "handshake": 0.0}
    timings_lock = threading.Lock()

    def enrol_one(device_id: str) -> SessionManager:
        admin, api = client_pair()
        t0 = time.perf_counter()
        claim = admin.register(device_id, hardware_id=f"sim-{device_id}")
        t1 = time.perf_counter()
        key = SM2PrivateKey.generate()
        request = make_enrol_request(
            key, device_id=device_id, claim_token=claim["claim_token"], hardware_id=f"sim-{device_id}", now=clock.now()
        )
        identity = identity_from_enrolment(
            key,
            api.enrol(request),
            device_id=device_id,
            server_fingerprint=claim["server_fingerprint"],
            directory=directory,
        )
        t2 = time.perf_counter()
        sessions = SessionManager(identity, None, api, clock)
        sessions.handshake("fleet enrolment")
        t3 = time.perf_counter()
        with timings_lock:
            timings["register"] += t1 - t0
            timings["enrol"] += t2 - t1
            timings["handshake"] += t3 - t2
        return sessions

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fleet-enrol") as pool:
            managers = list(pool.map(enrol_one, device_ids))
    finally:
        for admin, api in clients:
            admin.close()
            api.close()
    # the handshakes are done; the managers keep talking to the server through a fresh client when they rotate
    api = HttpDeviceApi(server_url, timeout_s=60.0)
    for manager in managers:
        manager.replace_api(api)
    span = max(1, workers)
    return FleetEnrolment(
        sessions={m.identity.device_id: m for m in managers},
        seconds=time.perf_counter() - started,
        register_s=timings["register"] / span,
        enrol_s=timings["enrol"] / span,
        handshake_s=timings["handshake"] / span,
    )
