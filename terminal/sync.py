"""The sync worker: moves records from the outbox to the MQTT broker, applies the server's acks, and the heartbeat.

Owns four things:

* `MqttUplink` — the thin paho-mqtt 2 adapter (the only code here that imports paho). MQTT v5, client id = device id,
  a persistent session (`clean_start=False` + session expiry), a retained last will 'offline' on the device's status
  topic and a retained 'online' published on every connect, a QoS 1 subscription to the device's downlink topic,
  paho's own network thread and reconnect back-off. Its callbacks only flip an event, record a broker refusal, hand a
  downlink message to a queue or log; they never block and never touch the outbox.
* `UplinkDelivery` — the worker thread: claim a batch, publish each envelope at QoS 1, correlate acknowledgements by
  OUR record (the `MQTTMessageInfo` each publish returned, never paho's recycled `mid` alone), mark SENT only what the
  broker PUBACKed, release the rest; and, about once a second, put SENT records the server never acknowledged back
  to PENDING (`Outbox.requeue_unacked`). Offline it sleeps on the connection event instead of spinning. Each record
  passes the `Sealer` at publish time (an enrolled device's SM4-GCM frame, `terminal.session.SessionSealer`; as
  stored otherwise), and nothing is claimed while the sealer has no key.
* `DownlinkReceiver` — the worker thread that drains downlink messages: opens each with its `FrameOpener` when the
  device is enrolled (plaintext refused), decodes each with
  `protocol.decode_downlink`, refuses (counts, logs once) a malformed one or one for another device, hands each
  `protocol.DeviceCommand` to the `terminal.commands.CommandApplier` (once per command id, answered through the
  outbox), and applies the highest `uplink_ack` of what is waiting with `Outbox.mark_acked_through`. An ack may
  overtake the PUBACK of the same records; the outbox's transition table lets INFLIGHT (and PENDING) rows become
  ACKED directly. An ack beyond
  the highest seq this outbox ever assigned is refused: the server then holds records under our id that we never
  made (a replaced outbox file, a cloned device id), and applying it would drop records it does not have.
* `HeartbeatTimer` — enqueues a `protocol.Heartbeat` through the outbox every interval and prunes acknowledged rows.

`SyncWorker` composes them with a graceful `stop()`: retained 'offline', disconnect, threads joined.

It must never mark a record SENT without a PUBACK for it, never mark one ACKED without a server ack covering it, never
hold an application lock across `publish()`, never let a paho exception escape (they become
`terminal.errors.SyncError`), and never log a payload or personal data: log lines carry sequence numbers, counts and
reasons only. Connection loss and recovery are logged once each, not per retry.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol

from paho.mqtt.client import (
    MQTT_LOG_ERR,
    MQTT_LOG_WARNING,
    Client,
    ConnectFlags,
    DisconnectFlags,
    MQTTMessage,
    MQTTMessageInfo,
)
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocol import (
    Clock,
    ContractError,
    DeviceCommand,
    DeviceStatusMessage,
    Envelope,
    Heartbeat,
    LinkState,
    Topics,
    decode_downlink,
)
from terminal.commands import CommandApplier, Disposition
from terminal.config import MqttConfig
from terminal.errors import NotConnectedError, OutboxError, OutboxFullError, PublishError, SyncError
from terminal.outbox import ClaimedRecord, Outbox

logger = logging.getLogger(__name__)
_paho_logger = logging.getLogger(f"{__name__}.paho")

SESSION_EXPIRY_S: Final = 7 * 24 * 3600
"""How long the broker keeps our session (and queued downlink commands) while we are away; matches the broker's
`persistent_client_expiration` in `yibao.broker`."""
STATUS_PUBLISH_TIMEOUT_S: Final = 5.0
"""How long `close()` waits for the broker to acknowledge the retained 'offline' before disconnecting anyway."""
QUEUE_WINDOWS: Final = 4
"""paho's outgoing queue holds this many batches: enough for one batch in flight plus stragglers re-sent after a
reconnect; beyond it publish() fails fast instead of growing memory while the broker does not acknowledge."""
POLL_SLICE_S: Final = 0.25
"""Longest uninterrupted sleep of the worker, so stop() and a dropped link are noticed promptly."""
REQUEUE_CHECK_S: Final = 1.0
"""How often the delivery loop looks for SENT records whose server ack is overdue."""
MAX_DOWNLINK_QUEUE: Final = 10_000
"""Downlink messages waiting for the receiver thread; beyond this they are dropped (acks are cumulative, so a
later one makes up for a dropped one)."""
IDLE_POLL_S: Final = 1.0

_connect_properties: Callable[[int], Properties] = Properties
"""paho's `Properties.__init__(packetType)` is unannotated; this alias states the signature it has."""
"""With nothing due, re-check at least this often (records released with back-off become due on their own)."""


# ---------------------------------------------------------------------- the transport seam


class DeliveryState(Enum):
    WAITING = "waiting"
    """Published, no PUBACK yet."""
    ACKED = "acked"
    """The broker acknowledged it with a success reason code."""
    REJECTED = "rejected"
    """The broker answered with a failure reason code (quota, not authorised, ...)."""
    FAILED = "failed"
    """The client library could not send it."""
    LINK_DOWN = "link_down"
    """The connection was not up, so no real attempt was made."""


@dataclass(frozen=True, slots=True)
class Delivery:
    state: DeliveryState
    reason: str = ""


class PublishTicket(Protocol):
    """Tracks one published record until the broker acknowledges it."""

    def poll(self) -> Delivery:
        """Current state, without blocking."""
        ...

    def wait(self, timeout_s: float) -> Delivery:
        """Block up to `timeout_s` for a final state; returns the state then (maybe still WAITING)."""
        ...


class Sealer(Protocol):
    """Turns a stored record into the bytes published for it, at publish time (`terminal.session.SessionSealer`
    seals an enrolled device's records as SM4-GCM frames; `Plaintext` publishes them as stored)."""

    def ready(self) -> bool:
        """Whether `seal` can work now; while False the delivery loop publishes nothing."""
        ...

    def seal(self, seq: int, wire: bytes) -> bytes:
        """The payload for record `seq`; raises `SyncError` when it cannot (the record is requeued)."""
        ...

    def unacknowledged(self, count: int) -> None:
        """`count` records went back to PENDING because the server did not acknowledge them in time."""
        ...


class FrameOpener(Protocol):
    """Turns a downlink payload into the message bytes, or raises `ContractError` (refused)."""

    def open(self, raw: bytes) -> bytes: ...


class Plaintext:
    """The `Sealer` of a terminal without an enrolled identity (security off): records go out as stored."""

    def ready(self) -> bool:
        return True

    def seal(self, seq: int, wire: bytes) -> bytes:
        return wire

    def unacknowledged(self, count: int) -> None:
        return None


class UplinkLink(Protocol):
    """The MQTT connection as the delivery loop sees it; `MqttUplink` in production, a fake in unit tests."""

    def start(self) -> None: ...

    def close(self) -> None:
        """Publish the retained 'offline' status if possible, disconnect, stop the network thread; idempotent."""
        ...

    def is_connected(self) -> bool: ...

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until connected or `timeout_s` passed; True if connected."""
        ...

    def publish(self, topic: str, payload: bytes) -> PublishTicket:
        """Queue a QoS 1 publish; raises `NotConnectedError` or `PublishError` instead of queueing blindly."""
        ...


# ---------------------------------------------------------------------- paho adapter


class PahoTicket:
    """A `PublishTicket` over paho's `MQTTMessageInfo`; `take_refusal(mid)` supplies the broker's PUBACK refusal.

    Shared by `MqttUplink` and the fleet simulator's link, so both classify deliveries the same way."""

    def __init__(self, info: MQTTMessageInfo, take_refusal: Callable[[int], str | None]) -> None:
        self._info = info
        self._take_refusal = take_refusal

    def poll(self) -> Delivery:
        try:
            published = self._info.is_published()
        except ValueError:
            return Delivery(DeliveryState.FAILED, "client queue full")
        except RuntimeError:
            if self._info.rc in (MQTTErrorCode.MQTT_ERR_NO_CONN, MQTTErrorCode.MQTT_ERR_CONN_LOST):
                return Delivery(DeliveryState.LINK_DOWN, "not connected")
            return Delivery(DeliveryState.FAILED, f"publish failed: {MQTTErrorCode(self._info.rc).name}")
        if not published:
            return Delivery(DeliveryState.WAITING)
        refusal = self._take_refusal(self._info.mid)
        if refusal is not None:
            return Delivery(DeliveryState.REJECTED, f"rejected by broker: {refusal}")
        return Delivery(DeliveryState.ACKED)

    def wait(self, timeout_s: float) -> Delivery:
        with contextlib.suppress(ValueError, RuntimeError):  # poll() classifies the same condition
            self._info.wait_for_publish(max(0.0, timeout_s))
        return self.poll()


class PubackRefusals:
    """PUBACK failure reasons by message id. paho marks a message published whatever the PUBACK's reason code, so
    `on_publish` records refusals here and the ticket holding that mid reads them once `is_published()` is true
    (paho calls `on_publish` before setting it)."""

    _LIMIT = 4096  # refusals for messages nobody waits for any more are dropped beyond this

    def __init__(self) -> None:
        self._by_mid: dict[int, str] = {}
        self._lock = threading.Lock()

    def on_publish(
        self, client: Client, userdata: object, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> None:
        if reason_code.is_failure:
            with self._lock:
                if len(self._by_mid) > self._LIMIT:
                    self._by_mid.clear()
                self._by_mid[mid] = str(reason_code)

    def take(self, mid: int) -> str | None:
        """The refusal for `mid`, if any (consumed on read)."""
        with self._lock:
            return self._by_mid.pop(mid, None)


def publish_qos1(client: Client, topic: str, payload: bytes, *, connected: bool) -> MQTTMessageInfo:
    """Queue one QoS 1 uplink with paho, or raise the `SyncError` the delivery loop sorts by (shared by the kiosk's
    link and the fleet simulator's)."""
    if not connected:
        raise NotConnectedError("not connected to the broker")
    try:
        info = client.publish(topic, payload, qos=1, retain=False)
    except (ValueError, TypeError) as exc:
        raise PublishError(f"publish refused by the MQTT client: {exc}") from exc
    if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
        raise PublishError("MQTT client queue is full")
    return info


def announce_online(client: Client, *, status_topic: str, status: bytes | None, downlink_topic: str | None) -> None:
    """On every connect: subscribe to the downlink (the persistent session keeps it, but a broker that lost its state
    has not), THEN publish the retained 'online'. The broker handles one client's packets in order, so whatever the
    server sends in answer to 'online' (the current ack, re-published commands) finds the subscription. Both calls
    only queue packets; nothing here waits for the network. `status` None (an enrolled device without a session
    key yet): only subscribe; 'online' follows when the key is there."""
    if downlink_topic is not None:
        rc, _mid = client.subscribe(downlink_topic, qos=1)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            logger.warning("mqtt: could not subscribe to the downlink topic: %s", MQTTErrorCode(rc).name)
    if status is None:
        return
    info = client.publish(status_topic, status, qos=1, retain=True)
    if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
        logger.warning("mqtt: could not queue the online status: %s", MQTTErrorCode(info.rc).name)


def wire_status(status: bytes, sealer: Callable[[bytes], bytes] | None) -> bytes | None:
    """A status message as published: as is, sealed, or None while the sealer has no key."""
    if sealer is None:
        return status
    try:
        return sealer(status)
    except SyncError:
        return None


class MqttUplink:
    """The terminal's MQTT connection (paho-mqtt 2, MQTT v5); see the module docstring for the contract."""

    def __init__(
        self,
        config: MqttConfig,
        *,
        device_id: str,
        boot_id: uuid.UUID,
        clock: Clock,
        inflight_window: int,
        downlink_sink: Callable[[str, bytes], None] | None = None,
        password: str | None = None,
        status_sealer: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """`password` goes with `config.username` (an enrolled device's broker credentials); `status_sealer` seals
        its status messages (retained 'online', the last will), raising `SyncError` while it has no key.

        `downlink_sink(topic, payload)` receives each message on the device's downlink topic, on paho's network
        thread: it must only enqueue (`DownlinkReceiver.offer`)."""
        self._config = config
        self._device_id = device_id
        self._downlink_sink = downlink_sink
        self._boot_id = boot_id
        self._clock = clock
        self._topics = Topics(prefix=config.topic_prefix)
        self._status_topic = self._topics.status(device_id)
        self._downlink_topic = self._topics.downlink(device_id)
        self._connected = threading.Event()
        self._closing = False
        self._started = False
        self._state_lock = threading.Lock()
        self._available: bool | None = None  # None until the first connect attempt resolves
        self._unavailable_since = 0.0
        self._refusals = PubackRefusals()
        self._status_sealer = status_sealer

        client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.on_log = self._on_log
        if config.username is not None:
            client.username_pw_set(config.username, password)
        self._client = client
        self._refresh_will()
        # paho schedules reconnects in whole seconds; round the configured fractions up rather than busy-retry.
        client.reconnect_delay_set(
            min_delay=max(1, math.ceil(config.reconnect_min_s)),
            max_delay=max(1, math.ceil(config.reconnect_max_s)),
        )
        client.max_inflight_messages_set(inflight_window)
        client.max_queued_messages_set(inflight_window * QUEUE_WINDOWS)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._refusals.on_publish
        client.on_message = self._on_message

    # -- life cycle

    def start(self) -> None:
        """Begin connecting in the background; returns at once (the terminal works offline from the first second)."""
        if self._started:
            return
        self._refresh_will()
        properties = _connect_properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        try:
            self._client.connect_async(
                self._config.host,
                self._config.port,
                keepalive=self._config.keepalive_s,
                clean_start=False,
                properties=properties,
            )
            rc = self._client.loop_start()
        except (ValueError, OSError) as exc:
            raise SyncError(f"cannot start MQTT client for {self._config.host}:{self._config.port}: {exc}") from exc
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise SyncError(f"cannot start the MQTT network thread: {MQTTErrorCode(rc).name}")
        self._started = True

    def close(self) -> None:
        if not self._started or self._closing:
            return
        self._closing = True
        offline = self._wire_status(LinkState.OFFLINE, stamped=True)
        if self._connected.is_set() and offline is not None:
            try:
                info = self._client.publish(self._status_topic, offline, qos=1, retain=True)
                info.wait_for_publish(STATUS_PUBLISH_TIMEOUT_S)
                if not info.is_published():
                    logger.warning("mqtt: broker did not acknowledge the offline status before disconnect")
            except (ValueError, RuntimeError) as exc:
                logger.warning("mqtt: could not publish the offline status: %s", exc)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        logger.info("mqtt: disconnected from %s:%d", self._config.host, self._config.port)

    # -- what the delivery loop uses

    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def publish(self, topic: str, payload: bytes) -> PublishTicket:
        info = publish_qos1(self._client, topic, payload, connected=self._connected.is_set())
        return PahoTicket(info, self._refusals.take)

    # -- paho callbacks: run on paho's network thread; flip state, log, return

    def _on_connect(
        self,
        client: Client,
        userdata: object,
        flags: ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._became_unavailable(f"broker refused the connection: {reason_code}")
            return
        announce_online(
            client,
            status_topic=self._status_topic,
            status=self._wire_status(LinkState.ONLINE, stamped=True),
            downlink_topic=self._downlink_topic if self._downlink_sink is not None else None,
        )
        self._connected.set()
        self._became_available(session_present=flags.session_present)

    def announce_online(self) -> None:
        """Publish the retained 'online' again (an enrolled device that just got a new session key: the server
        answers it with the current ack and pending commands, sealed under the new key)."""
        status = self._wire_status(LinkState.ONLINE, stamped=True)
        if status is not None and self._connected.is_set():
            self._client.publish(self._status_topic, status, qos=1, retain=True)

    def _on_connect_fail(self, client: Client, userdata: object) -> None:
        self._became_unavailable("broker unreachable")

    def _on_disconnect(
        self,
        client: Client,
        userdata: object,
        flags: DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        if not self._closing:
            self._refresh_will()  # the next CONNECT carries a will sealed under the key of that moment
            self._became_unavailable(f"connection lost: {reason_code}")

    def _on_message(self, client: Client, userdata: object, message: MQTTMessage) -> None:
        sink = self._downlink_sink
        if sink is None:
            return
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "(topic is not UTF-8)"
        sink(topic, bytes(message.payload))

    def _on_log(self, client: Client, userdata: object, level: int, message: str) -> None:
        # paho 2.2 logs "Client is not connected" at ERROR from its loop after every disconnect, including our own
        # orderly one; it is not actionable, so it goes to DEBUG with paho's chatter. Real errors (an exception in
        # one of our callbacks) stay errors.
        if level == MQTT_LOG_ERR and not message.startswith("Client is not connected"):
            _paho_logger.error("%s", message)
        elif level == MQTT_LOG_WARNING:
            _paho_logger.warning("%s", message)
        else:
            _paho_logger.debug("%s", message)

    # -- availability: log once on loss, once on recovery

    def _became_unavailable(self, reason: str) -> None:
        with self._state_lock:
            if self._available is False:
                logger.debug("mqtt: still unavailable (%s)", reason)
                return
            self._available = False
            self._unavailable_since = self._clock.monotonic()
        logger.warning(
            "mqtt: %s (%s:%d); records wait in the outbox until the link is back",
            reason,
            self._config.host,
            self._config.port,
        )

    def _became_available(self, *, session_present: bool) -> None:
        with self._state_lock:
            previously, self._available = self._available, True
            down_for = self._clock.monotonic() - self._unavailable_since
        if previously is False:
            logger.info("mqtt: connection restored after %.1f s (session present: %s)", down_for, session_present)
        else:
            logger.info("mqtt: connected to %s:%d as %s", self._config.host, self._config.port, self._device_id)

    def _status(self, state: LinkState, *, stamped: bool) -> bytes:
        return DeviceStatusMessage(
            device_id=self._device_id,
            state=state,
            boot_id=self._boot_id,
            at=self._clock.now() if stamped else None,
        ).to_bytes()

    def _wire_status(self, state: LinkState, *, stamped: bool) -> bytes | None:
        return wire_status(self._status(state, stamped=stamped), self._status_sealer)

    def _refresh_will(self) -> None:
        will = self._wire_status(LinkState.OFFLINE, stamped=False)
        if will is None:
            self._client.will_clear()
        else:
            self._client.will_set(self._status_topic, will, qos=1, retain=True)


# ---------------------------------------------------------------------- the delivery loop


@dataclass(slots=True)
class _Outcome:
    acked: list[int]
    retry: dict[str, list[int]]
    """Reason -> seqs that had a fair attempt and failed: released with back-off."""
    requeue: dict[str, list[int]]
    """Reason -> seqs that never had a fair attempt (link down, stopping): released without back-off."""

    def is_empty(self) -> bool:
        return not (self.acked or self.retry or self.requeue)


class UplinkDelivery:
    """The worker thread that drains the outbox into the uplink topic."""

    def __init__(
        self,
        outbox: Outbox,
        link: UplinkLink,
        *,
        topic: str,
        batch_size: int,
        publish_timeout_s: float,
        clock: Clock,
        sealer: Sealer | None = None,
    ) -> None:
        self._outbox = outbox
        self._link = link
        self._sealer: Sealer = sealer if sealer is not None else Plaintext()
        self._topic = topic
        self._batch_size = batch_size
        self._publish_timeout_s = publish_timeout_s
        self._clock = clock
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsettled: _Outcome | None = None
        self._outbox_failing = False
        self._last_requeue_check: float | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="outbox-delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the loop to finish its batch (unacked records go back to PENDING) and join it."""
        self._stopping.set()
        self._outbox.wake()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.error("delivery: worker did not stop within %.1f s", timeout_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self._link.wait_connected(POLL_SLICE_S):
                    continue
                if not self._sealer.ready():  # no session key yet: records wait in the outbox
                    self._stopping.wait(POLL_SLICE_S)
                    continue
                if self.deliver_batch() == 0:
                    self._outbox.wait_for_work(IDLE_POLL_S)
            except Exception:  # the worker must outlive any single bad batch; the outbox keeps the records
                logger.exception("delivery: unexpected error; retrying in 1 s")
                self._stopping.wait(1.0)
        self._settle_leftovers()

    def deliver_batch(self) -> int:
        """One round: settle what a failed round left, claim, publish, await PUBACKs, settle. Returns records claimed.

        Public so unit tests can drive the loop step by step with a fake link."""
        if not self._settle_leftovers():
            self._stopping.wait(1.0)
            return 0
        if not self._sealer.ready():  # nothing goes out unsealed: the records wait for a session key
            return 0
        try:
            self._requeue_overdue()
            batch = self._outbox.claim(self._batch_size)
        except OutboxError as exc:
            self._report_outbox_failure(exc)
            self._stopping.wait(1.0)
            return 0
        if not batch:
            return 0
        try:
            self._unsettled = self._publish_and_await(batch)
        except Exception:  # a bug here must not strand the claimed rows INFLIGHT until the next restart
            logger.exception("delivery: unexpected error while publishing seq %d..%d", batch[0].seq, batch[-1].seq)
            self._unsettled = _Outcome(acked=[], retry={"internal error": [r.seq for r in batch]}, requeue={})
        self._settle_leftovers()
        return len(batch)

    def _requeue_overdue(self) -> None:
        """About once every REQUEUE_CHECK_S: SENT records without a server ack in time go back to PENDING."""
        now = self._clock.monotonic()
        if self._last_requeue_check is not None and now - self._last_requeue_check < REQUEUE_CHECK_S:
            return
        self._last_requeue_check = now
        requeued = self._outbox.requeue_unacked()
        if requeued:
            self._sealer.unacknowledged(requeued)

    def _publish_and_await(self, batch: Sequence[ClaimedRecord]) -> _Outcome:
        outcome = _Outcome(acked=[], retry={}, requeue={})
        tickets: list[tuple[int, PublishTicket]] = []
        for record in batch:
            if self._stopping.is_set():
                outcome.requeue.setdefault("terminal stopping", []).append(record.seq)
                continue
            try:
                payload = self._sealer.seal(record.seq, record.wire)
                tickets.append((record.seq, self._link.publish(self._topic, payload)))
            except NotConnectedError:
                outcome.requeue.setdefault("not connected", []).append(record.seq)
            except SyncError as exc:
                outcome.retry.setdefault(str(exc), []).append(record.seq)

        deadline = self._clock.monotonic() + self._publish_timeout_s
        for seq, ticket in tickets:
            delivery = ticket.poll()
            while delivery.state is DeliveryState.WAITING:
                remaining = deadline - self._clock.monotonic()
                if remaining <= 0 or self._stopping.is_set() or not self._link.is_connected():
                    break
                delivery = ticket.wait(min(remaining, POLL_SLICE_S))
            self._classify(seq, delivery, outcome)
        return outcome

    def _classify(self, seq: int, delivery: Delivery, outcome: _Outcome) -> None:
        state = delivery.state
        if state is DeliveryState.ACKED:
            outcome.acked.append(seq)
        elif state in (DeliveryState.REJECTED, DeliveryState.FAILED):
            outcome.retry.setdefault(delivery.reason, []).append(seq)
        elif state is DeliveryState.LINK_DOWN:
            outcome.requeue.setdefault("connection lost", []).append(seq)
        elif self._stopping.is_set():
            outcome.requeue.setdefault("terminal stopping", []).append(seq)
        elif not self._link.is_connected():
            outcome.requeue.setdefault("connection lost", []).append(seq)
        else:
            outcome.retry.setdefault(f"no PUBACK within {self._publish_timeout_s:g} s", []).append(seq)

    def _settle_leftovers(self) -> bool:
        """Write the last round's outcome to the outbox; kept and retried if the outbox fails. True when settled."""
        outcome = self._unsettled
        if outcome is None or outcome.is_empty():
            self._unsettled = None
            return True
        try:
            if outcome.acked:
                self._outbox.mark_sent(outcome.acked)
                outcome.acked = []
            # Each group leaves the outcome only once the outbox has taken it, so a failure keeps the rest.
            for reason, seqs in list(outcome.retry.items()):
                self._outbox.release(seqs, reason, backoff=True)
                del outcome.retry[reason]
            for reason, seqs in list(outcome.requeue.items()):
                self._outbox.release(seqs, reason, backoff=False)
                del outcome.requeue[reason]
        except OutboxError as exc:
            self._report_outbox_failure(exc)
            return False
        self._unsettled = None
        if self._outbox_failing:
            self._outbox_failing = False
            logger.info("delivery: outbox bookkeeping works again")
        return True

    def _report_outbox_failure(self, exc: OutboxError) -> None:
        if not self._outbox_failing:
            self._outbox_failing = True
            logger.error("delivery: outbox failed (%s); retrying every second", exc)


# ---------------------------------------------------------------------- downlink


@dataclass(frozen=True, slots=True)
class DownlinkStats:
    received: int
    """Downlink messages taken from the MQTT client."""
    acks_applied: int
    """Acks that moved at least one record to ACKED."""
    refused: int
    """Messages refused: malformed, for another device, or on a topic that is not ours."""
    dropped: int
    """Messages dropped because the queue was full (a later cumulative ack makes up for them)."""
    highest_ack: int
    """The highest acked_through_seq received so far in this run."""
    commands_answered: int = 0
    """Commands carried out (or answered rejected/expired) for the first time in this run."""
    commands_redelivered: int = 0
    """Commands delivered again after they were answered: not carried out again."""


class DownlinkReceiver:
    """Drains the device's downlink topic on its own thread and applies the server's acks to the outbox."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        device_id: str,
        topics: Topics,
        commands: CommandApplier | None = None,
        opener: FrameOpener | None = None,
    ) -> None:
        """Without `commands`, every command is refused (counted, logged once) and left unanswered. With `opener`
        (an enrolled device) every payload must pass it first (sealed frames only)."""
        self._outbox = outbox
        self._opener = opener
        self._commands = commands
        self._commands_answered = 0
        self._commands_redelivered = 0
        self._device_id = device_id
        self._topic = topics.downlink(device_id)
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=MAX_DOWNLINK_QUEUE)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._received = 0
        self._applied = 0
        self._refused = 0
        self._dropped = 0
        self._highest_ack = 0
        self._refusal_logged = False
        self._outbox_failing = False

    def offer(self, topic: str, payload: bytes) -> None:
        """Hand one message over; called on paho's network thread, so it never blocks."""
        try:
            self._inbox.put_nowait((topic, payload))
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="downlink", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def stats(self) -> DownlinkStats:
        with self._lock:
            return DownlinkStats(
                self._received,
                self._applied,
                self._refused,
                self._dropped,
                self._highest_ack,
                self._commands_answered,
                self._commands_redelivered,
            )

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                first = self._inbox.get(timeout=POLL_SLICE_S)
            except queue.Empty:
                continue
            waiting = [first]
            with contextlib.suppress(queue.Empty):
                while len(waiting) < MAX_DOWNLINK_QUEUE:
                    waiting.append(self._inbox.get_nowait())
            try:
                self.process(waiting)
            except Exception:  # the receiver must outlive any single bad message; acks are cumulative
                logger.exception("downlink: unexpected error")

    def process(self, messages: Sequence[tuple[str, bytes]]) -> int:
        """Decode `messages`, carry out the commands among them in order, and apply the highest valid ack among them;
        returns the records that became ACKED.

        Public so tests can drive it without a broker."""
        highest = 0
        commands: list[DeviceCommand] = []
        for topic, payload in messages:
            with self._lock:
                self._received += 1
            try:
                if topic != self._topic:
                    raise ContractError("not this device's downlink topic")
                if self._opener is not None:
                    payload = self._opener.open(payload)
                message = decode_downlink(payload)
                if message.device_id != self._device_id:
                    raise ContractError(f"{message.type} names another device")
                if isinstance(message, DeviceCommand) and self._commands is None:
                    raise ContractError("this terminal carries out no commands")
            except ContractError as exc:
                self._refuse(topic, len(payload), str(exc))
                continue
            if isinstance(message, DeviceCommand):
                commands.append(message)
            else:
                highest = max(highest, message.acked_through_seq)
        for command in commands:
            self._carry_out(command)
        if highest == 0:
            return 0
        try:
            assigned = self._outbox.highest_seq()
            if highest > assigned:
                # The server holds records under our id that this outbox never made: the outbox file was replaced
                # or another terminal uses our id. Applying the ack would drop records the server does not have.
                self._refuse(self._topic, 0, f"ack through seq {highest} is beyond our highest seq {assigned}")
                return 0
            with self._lock:
                self._highest_ack = max(self._highest_ack, highest)
            moved = self._outbox.mark_acked_through(highest)
        except OutboxError as exc:
            # Not lost: the records stay SENT, are published again after the ack timeout, and bring a new ack.
            if not self._outbox_failing:
                self._outbox_failing = True
                logger.error("downlink: could not apply the server ack through seq %d: %s", highest, exc)
            return 0
        if self._outbox_failing:
            self._outbox_failing = False
            logger.info("downlink: applying server acks works again")
        if moved:
            with self._lock:
                self._applied += 1
        return moved

    def _carry_out(self, command: DeviceCommand) -> None:
        if self._commands is None:
            return
        try:
            disposition = self._commands.apply(command)
        except OutboxError as exc:
            # Nothing was remembered: the server re-publishes the command (on reconnect or after its interval).
            logger.error("downlink: could not record the answer to command %s: %s", command.command_id, exc)
            return
        with self._lock:
            if disposition is Disposition.ANSWERED:
                self._commands_answered += 1
            elif disposition is Disposition.REDELIVERED:
                self._commands_redelivered += 1

    def _refuse(self, topic: str, size: int, reason: str) -> None:
        with self._lock:
            self._refused += 1
            first = not self._refusal_logged
            self._refusal_logged = True
        if first:
            # Logged once per run; the count is in stats(). The payload itself is never logged.
            logger.warning("downlink: refused a message on %s (%d bytes): %s", topic, size, reason[:200])


# ---------------------------------------------------------------------- heartbeat


class HeartbeatTimer:
    """Enqueues a heartbeat at start and then every `interval_s`, and prunes delivered records on the same tick."""

    def __init__(self, outbox: Outbox, compose: Callable[[], Heartbeat], *, interval_s: float) -> None:
        self._outbox = outbox
        self._compose = compose
        self._interval_s = interval_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._refusing = False

    def start(self) -> None:
        """Beat once right here, so the first heartbeat precedes every record enqueued after start, then keep time
        on a thread."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._safe_beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            self._safe_beat()

    def _safe_beat(self) -> None:
        try:
            self.beat()
        except Exception:  # a failed beat must not end all future beats
            logger.exception("heartbeat: unexpected error")

    def beat(self) -> Envelope | None:
        """One tick: prune, compose, enqueue. Returns the heartbeat's envelope, or None if the outbox refused it."""
        try:
            self._outbox.prune_acked()
            envelope = self._outbox.enqueue(self._compose())
        except OutboxFullError:
            if not self._refusing:
                self._refusing = True
                logger.warning("heartbeat: outbox is full; heartbeats are skipped until it drains")
            return None
        except OutboxError as exc:
            logger.error("heartbeat: could not enqueue: %s", exc)
            return None
        if self._refusing:
            self._refusing = False
            logger.info("heartbeat: enqueued again")
        return envelope


# ---------------------------------------------------------------------- composition


class SyncWorker:
    """The MQTT link, the delivery loop, the downlink receiver and the heartbeat timer, started and stopped in the
    right order."""

    def __init__(
        self,
        link: UplinkLink,
        delivery: UplinkDelivery,
        heartbeat: HeartbeatTimer,
        downlink: DownlinkReceiver | None = None,
    ) -> None:
        self.link = link
        self.delivery = delivery
        self.heartbeat = heartbeat
        self.downlink = downlink
        self._running = False

    def start(self) -> None:
        if self._running:
            return
        if self.downlink is not None:
            self.downlink.start()
        self.link.start()
        self.delivery.start()
        self.heartbeat.start()
        self._running = True

    def stop(self) -> None:
        """Stop heartbeats, let the delivery loop requeue what it holds, publish retained 'offline', disconnect."""
        if not self._running:
            return
        self._running = False
        self.heartbeat.stop()
        self.delivery.stop()
        self.link.close()
        if self.downlink is not None:
            self.downlink.stop()
