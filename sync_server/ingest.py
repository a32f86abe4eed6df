"""The MQTT ingest worker: uplink envelopes and device statuses from the broker into the database, exactly once.

It owns the broker session of this server process (paho-mqtt 2, MQTT 5, a persistent session with
`clean_start=False` and a session expiry, so the broker queues uplinks while the server is down) and the
receive → decode → store → acknowledge pipeline:

* paho's network thread only enqueues (`on_message` never blocks, never touches the database);
* one worker thread drains the queue in batches (`ingest_batch_size` / `ingest_flush_interval_s`), decodes and
  checks each message, stores the batch in ONE transaction, and only after the commit sends the PUBACKs
  (`manual_ack=True`), in the order the messages arrived. A crash anywhere before the commit loses nothing: the
  broker still holds the unacknowledged messages and redelivers them, and the unique keys make the redelivery
  harmless;
* a message that cannot be a valid envelope or status (garbage, wrong shape, topic naming another device) is
  rejected: logged with its topic, size and the reason, counted, and acknowledged so it cannot loop. It never
  reaches the database, so it cannot disturb stored rows;
* when the database fails, the batch is kept unacknowledged and retried with back-off (the broker stops sending
  once our Receive Maximum of unacknowledged messages is reached, which bounds memory); a batch the database
  refuses for what it contains is split so a single poison message is rejected instead of blocking ingest.

After each commit (never before), the worker tells every device the batch touched how far its records are stored:
one `protocol.UplinkAck` (QoS 1) per device per batch on the device's downlink topic, carrying `acked_through_seq`
(the highest contiguous stored seq, advanced in the same transaction). A device whose batch held only duplicates
gets the ack again (a duplicate means it missed one), as does a device announcing itself `online`. A lost ack costs
nothing but a re-send: the terminal publishes again after its ack timeout, the duplicate triggers a new ack.

A `CommandResult` envelope is stored like any other record and, in the same transaction, moves the command it answers
to `acknowledged` (`sync_server.commands.record_command_results`); a result naming no command issued to that device
is stored anyway, counted (`command_results_unmatched`) and logged. The command dispatcher publishes commands through
this worker's client (`publish_downlink`), so one server process has one broker session.

Several workers (distinct `mqtt_client_id`s, in one process or several: `sync_server.ingest_pool`) split the uplink
stream through the shared subscription and may store records of one device concurrently (`sync_server.store` makes
that safe). `uplinks` / `statuses` choose what a worker subscribes to: with worker processes, only the main process
takes device statuses.

It must never log payload contents (they may reference people), never hold a lock or do IO inside a paho
callback, and never acknowledge a message (to the broker or to the device) before the transaction that stores it has
committed.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError
from sqlalchemy.orm import Session

from protocol import (
    Clock,
    ContractError,
    DeviceStatusMessage,
    Envelope,
    LinkState,
    SystemClock,
    Topics,
    UplinkAck,
    decode_envelope,
    decode_status,
)
from sync_server.binding import record_binding_applications
from sync_server.commands import ResultsApplied, record_command_results
from sync_server.db.engine import session_factory
from sync_server.errors import IngestError
from sync_server.pharmacists import record_pharmacist_sessions
from sync_server.prescriptions import record_review_decisions
from sync_server.purchases import record_pos_verifications
from sync_server.security import Refused, SecurityGate, SecurityRefusal
from sync_server.settings import ServerSettings
from sync_server.store import (
    AckState,
    StoreResult,
    advance_acks,
    apply_statuses,
    known_devices,
    log_seq_gap_changes,
    record_device_activity,
    register_devices,
    store_envelopes,
)

logger = logging.getLogger(__name__)

# paho leaves `Properties.__init__` unannotated; this states the signature it has, so calls stay type-checked.
_new_properties: Callable[[int], Properties] = Properties

MAX_RETRY_DELAY_S = 30.0
REJECT_LOG_LINES_PER_BATCH = 5
DISCONNECT_WAIT_S = 5.0
"""How long `stop()` waits for the broker connection to close cleanly (queued acknowledgements written first)."""


class StoreBatch(Protocol):
    """The seam through which ingest inserts envelopes; `sync_server.store.store_envelopes` in production."""

    def __call__(self, session: Session, envelopes: Sequence[Envelope], *, received_at: datetime) -> StoreResult: ...


@dataclass(slots=True)
class IngestStats:
    """Counters since the worker started. A redelivered message is received (and stored or counted) again.

    The worker keeps one live instance under its lock; `IngestWorker.stats()` hands out copies."""

    started_at: datetime | None
    connected: bool
    received: int = 0
    """Messages taken from the broker (uplinks and statuses, including redeliveries)."""
    stored: int = 0
    """Envelopes newly inserted."""
    duplicates: int = 0
    """Envelopes already stored (redeliveries, repeats) and therefore not inserted again."""
    conflicts: int = 0
    """Subset of duplicates that reused a stored key for a different record (a broken terminal outbox)."""
    statuses: int = 0
    """Device status messages applied."""
    rejected: int = 0
    """Messages refused and acknowledged without storing: malformed, topic/device mismatch, unknown device."""
    batches: int = 0
    """Transactions committed."""
    store_failures: int = 0
    """Attempts to store a batch that failed (the batch was retried, not acknowledged)."""
    last_commit_at: datetime | None = None
    acks_sent: int = 0
    """`uplink_ack` messages handed to the MQTT client (after their batch committed)."""
    commands_acknowledged: int = 0
    """Commands moved to `acknowledged` by a stored `CommandResult`."""
    command_results_unmatched: int = 0
    """`CommandResult`s stored that name no command issued to their device (flagged in the log)."""
    security_refused: int = 0
    """Subset of `rejected` refused by message security (recorded in `security_events`, see docs/identity.md)."""


class _Kind(Enum):
    ENVELOPE = "envelope"
    STATUS = "status"
    IGNORED = "ignored"
    REJECTED = "rejected"


@dataclass(slots=True)
class _Inbound:
    """One message as paho delivered it; `generation` names the broker connection its `mid` belongs to."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int
    received_at: datetime
    kind: _Kind = _Kind.IGNORED
    envelope: Envelope | None = None
    status: DeviceStatusMessage | None = None
    reason: str = ""
    refused: Refused | None = None
    """Set when message security refused it (`sync_server.security`)."""

    @property
    def device_id(self) -> str | None:
        if self.envelope is not None:
            return self.envelope.device_id
        if self.status is not None:
            return self.status.device_id
        return None


_NO_RESULTS = ResultsApplied(0, 0, ())


def _describe_db_error(exc: SQLAlchemyError) -> str:
    """Short text for logs: the driver's own message (engines hide bound parameters), first line only."""
    detail = str(exc.orig) if isinstance(exc, DBAPIError) else str(exc)
    first_line = detail.strip().splitlines()[0] if detail.strip() else ""
    return f"{type(exc).__name__}: {first_line[:300]}"


def _is_poison(exc: SQLAlchemyError) -> bool:
    """True when the database refused the data itself, so retrying the same batch cannot help."""
    if isinstance(exc, IntegrityError | DataError):
        return True
    return isinstance(exc, StatementError) and not isinstance(exc, DBAPIError)


class IngestWorker:
    """One broker session and one storing thread. `start()` returns at once (the broker may be unreachable; it is
    retried in the background); `stop()` finishes the batch in hand and disconnects, keeping the broker session."""

    def __init__(
        self,
        settings: ServerSettings,
        engine: Engine,
        *,
        clock: Clock | None = None,
        store: StoreBatch = store_envelopes,
        security: SecurityGate | None = None,
        uplinks: bool = True,
        statuses: bool = True,
    ) -> None:
        self._settings = settings
        self._clock: Clock = clock if clock is not None else SystemClock()
        # Message security is never off: a worker built without a shared gate gets one of its own.
        self._security: SecurityGate | None = (
            security if security is not None else SecurityGate.for_settings(settings, engine, clock=self._clock)
        )
        if not (uplinks or statuses):
            raise ValueError("an ingest worker subscribes to uplinks, statuses or both")
        self._subscribe_uplinks = uplinks
        self._subscribe_statuses = statuses
        self._sessions = session_factory(engine, write_intent=True)
        self._store = store
        self._topics = Topics(prefix=settings.topic_prefix)
        self._broker = f"{settings.mqtt_host}:{settings.mqtt_port}"
        self._inbox: queue.SimpleQueue[_Inbound] = queue.SimpleQueue()
        self._counts = IngestStats(started_at=None, connected=False)
        self._counts_lock = threading.Lock()
        self._stop = threading.Event()
        self._gone = threading.Event()
        """Set by `_on_disconnect`: the socket is closed (after a clean DISCONNECT, everything queued before it)."""
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._generation = 0
        self._connected = False
        self._subscribed = False
        self._broker_lost = False
        self._ever_connected = False
        self._stopping = False
        self._failing_since: int = 0
        self._started_at: datetime | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        """True while the broker session is up."""
        return self._connected

    @property
    def ready(self) -> bool:
        """True once the broker granted our subscriptions on the current connection."""
        return self._connected and self._subscribed

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._stopping = False
        client = self._make_client()
        props = _new_properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._settings.mqtt_session_expiry_s
        # Bounds how many unacknowledged messages the broker hands us, hence our memory while the database is slow.
        props.ReceiveMaximum = min(65535, max(20, 2 * self._settings.ingest_batch_size))
        try:
            client.connect_async(
                self._settings.mqtt_host,
                self._settings.mqtt_port,
                keepalive=self._settings.mqtt_keepalive_s,
                clean_start=False,
                properties=props,
            )
            client.loop_start()
        except (OSError, ValueError) as exc:
            raise IngestError(f"cannot start the MQTT client for {self._broker}: {exc}") from exc
        self._client = client
        self._started_at = self._clock.now()
        self._thread = threading.Thread(target=self._run, name="yibao-ingest", daemon=True)
        self._thread.start()
        topics = [self._topics.all_uplinks_shared] if self._subscribe_uplinks else []
        topics += [self._topics.all_statuses] if self._subscribe_statuses else []
        logger.info(
            "ingest started: broker %s, client id %s, topics %s",
            self._broker,
            self._settings.mqtt_client_id,
            ", ".join(topics),
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop storing, then disconnect. Messages received but not yet committed stay unacknowledged, so the
        broker redelivers them to the next session with this client id."""
        self._stopping = True
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning("ingest thread did not finish within %.1f s; disconnecting anyway", timeout_s)
        client, self._client = self._client, None
        if client is not None:
            connected = self._connected
            self._gone.clear()
            client.disconnect()
            # The acknowledgements of the last batch are queued in paho; stopping its network thread before the
            # DISCONNECT behind them is written would drop them, and the broker would redeliver messages that are
            # stored already (found under load by test_ingest's poison-message test).
            if connected and not self._gone.wait(DISCONNECT_WAIT_S):
                logger.warning("the MQTT disconnect did not complete within %.1f s", DISCONNECT_WAIT_S)
            client.loop_stop()
        self._connected = False
        self._subscribed = False
        if thread is not None:
            logger.info("ingest stopped")

    def stats(self) -> IngestStats:
        with self._counts_lock:
            return replace(self._counts, started_at=self._started_at, connected=self._connected)

    def publish_downlink(self, device_id: str, payload: bytes) -> bool:
        """Queue one QoS 1 message on `device_id`'s downlink topic through this worker's client; True if the client
        accepted it (connected). Never blocks: paho sends it from its network thread. The command dispatcher's
        `DownlinkPublisher`."""
        client = self._client
        if client is None or not self._connected:
            return False
        sealed = self._seal(device_id, payload)
        if sealed is None:
            return False  # enrolled without a valid session key (or revoked): the command stays pending
        info = client.publish(self._topics.downlink(device_id), sealed, qos=1)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _seal(self, device_id: str, payload: bytes) -> bytes | None:
        """A downlink as it may be published (sealed for an enrolled device), or None to hold it back."""
        return payload if self._security is None else self._security.seal_downlink(device_id, payload)

    # ------------------------------------------------------------------ paho callbacks (network thread; no IO)

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._settings.mqtt_client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        client.reconnect_delay_set(min_delay=1, max_delay=int(MAX_RETRY_DELAY_S))
        if self._settings.mqtt_username is not None:
            password = self._settings.mqtt_password
            client.username_pw_set(self._settings.mqtt_username, password.get_secret_value() if password else None)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            if not self._broker_lost:
                logger.warning("MQTT broker %s refused the connection: %s; retrying", self._broker, reason_code)
                self._broker_lost = True
            return
        # New connection: packet ids of messages from the previous one must never be acknowledged on this one.
        self._generation += 1
        self._connected = True
        self._subscribed = False
        wanted = {
            self._topics.all_uplinks_shared: self._subscribe_uplinks,
            self._topics.all_statuses: self._subscribe_statuses,
        }
        # A persistent session keeps the subscriptions of an earlier run in another role: drop the unwanted ones.
        unwanted = [topic for topic, keep in wanted.items() if not keep]
        if unwanted:
            client.unsubscribe(unwanted)
        client.subscribe([(topic, SubscribeOptions(qos=1)) for topic, keep in wanted.items() if keep])
        if self._broker_lost:
            logger.info("MQTT broker %s reachable again; ingest resumed", self._broker)
        elif not self._ever_connected:
            logger.info("connected to MQTT broker %s (session present: %s)", self._broker, flags.session_present)
        self._broker_lost = False
        self._ever_connected = True

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        if not self._broker_lost:
            logger.warning("cannot reach MQTT broker %s; ingest paused, retrying in the background", self._broker)
            self._broker_lost = True

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._connected = False
        self._subscribed = False
        self._gone.set()
        if not self._stopping and not self._broker_lost:
            logger.warning("lost MQTT broker %s (%s); ingest paused, reconnecting", self._broker, reason_code)
            self._broker_lost = True

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            logger.error(
                "MQTT broker %s refused our subscriptions: %s; nothing will be ingested", self._broker, refused
            )
            return
        self._subscribed = True

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "(topic is not UTF-8)"
        self._inbox.put(
            _Inbound(
                topic=topic,
                payload=bytes(message.payload),
                mid=message.mid,
                qos=message.qos,
                generation=self._generation,
                received_at=self._clock.now(),
            )
        )
        with self._counts_lock:
            self._counts.received += 1

    # ------------------------------------------------------------------ storing thread

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._collect_batch()
            if not batch:
                continue
            if self._classify_all(batch):
                self._store_until_done(batch)

    def _collect_batch(self) -> list[_Inbound]:
        try:
            first = self._inbox.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = self._clock.monotonic() + self._settings.ingest_flush_interval_s
        while len(batch) < self._settings.ingest_batch_size:
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._inbox.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _classify_all(self, batch: list[_Inbound]) -> bool:
        """Classify every message; when message security cannot read the database, wait and try again (False:
        stopping, the batch stays unacknowledged)."""
        delay = self._settings.ingest_retry_delay_s
        while True:
            try:
                for item in batch:
                    self._classify(item)
                return True
            except IngestError as exc:
                self._note_failure(exc, len(batch))
                if self._stop.wait(delay):
                    return False
                delay = min(delay * 2, MAX_RETRY_DELAY_S)

    def _classify(self, item: _Inbound) -> None:
        item.refused = None
        device_in_topic = self._topics.device_of(item.topic)
        try:
            if device_in_topic is not None and item.topic.endswith("/up"):
                payload, counter = self._screen(device_in_topic, item.payload, status=False)
                envelope = decode_envelope(payload)
                if envelope.device_id != device_in_topic:
                    raise ContractError(f"envelope names device {envelope.device_id}, topic names {device_in_topic}")
                if self._security is not None:
                    self._security.check_envelope(envelope, counter)
                item.kind, item.envelope = _Kind.ENVELOPE, envelope
            elif device_in_topic is not None and item.topic.endswith("/status"):
                if not item.payload:  # a retained status being cleared
                    item.kind = _Kind.IGNORED
                    return
                payload, _ = self._screen(device_in_topic, item.payload, status=True)
                status = decode_status(payload)
                if status.device_id != device_in_topic:
                    raise ContractError(f"status names device {status.device_id}, topic names {device_in_topic}")
                item.kind, item.status = _Kind.STATUS, status
            else:
                raise ContractError("topic is not an uplink or status topic of ours")
        except ContractError as exc:
            item.kind, item.reason = _Kind.REJECTED, str(exc)
        except SecurityRefusal as exc:
            item.kind, item.reason = _Kind.REJECTED, str(exc)
            item.refused = Refused(device_in_topic, item.topic, exc.kind, exc.detail)

    def _screen(self, device_id: str, payload: bytes, *, status: bool) -> tuple[bytes, int | None]:
        """Message security (`sync_server.security`): the plaintext and frame counter, or `SecurityRefusal`."""
        if self._security is None:
            return payload, None
        screened = self._security.screen(device_id, payload, status=status)
        return screened.payload, screened.counter

    def _store_until_done(self, batch: list[_Inbound]) -> None:
        """Commit `batch`, retrying transient failures until it succeeds or the worker stops; then acknowledge."""
        delay = self._settings.ingest_retry_delay_s
        while True:
            try:
                result = self._commit(batch)
            except IngestError as exc:
                if not exc.transient:
                    if len(batch) == 1:
                        self._reject(batch[0], f"refused by the database ({exc})")
                        self._finish(batch, StoreResult(0, 0), [], _NO_RESULTS)
                    else:
                        for item in batch:  # isolate the message the database refuses
                            self._store_until_done([item])
                    return
                self._note_failure(exc, len(batch))
                if self._stop.wait(delay):
                    return  # stopping: leave the batch unacknowledged for redelivery
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
                continue
            self._note_recovery()
            self._finish(batch, *result)
            return

    def _commit(self, batch: Sequence[_Inbound]) -> tuple[StoreResult, list[AckState], ResultsApplied]:
        """Store the batch in one transaction. SQLAlchemy errors are translated here, once."""
        received_at = batch[0].received_at
        try:
            with self._sessions.begin() as session:
                live = [i for i in batch if i.kind in (_Kind.ENVELOPE, _Kind.STATUS)]
                device_ids = {d for i in live if (d := i.device_id) is not None}
                if self._settings.auto_register_devices:
                    register_devices(session, device_ids, now=received_at)
                else:
                    unknown = device_ids - known_devices(session, device_ids)
                    for item in live:
                        if item.device_id in unknown:
                            item.kind, item.reason = _Kind.REJECTED, "device is not registered"
                envelopes = [i.envelope for i in batch if i.kind is _Kind.ENVELOPE and i.envelope is not None]
                statuses = [i.status for i in batch if i.kind is _Kind.STATUS and i.status is not None]
                result = self._store(session, envelopes, received_at=received_at)
                record_device_activity(
                    session,
                    envelopes,
                    received_at=received_at,
                    heartbeat_timeout_factor=self._settings.heartbeat_timeout_factor,
                )
                apply_statuses(session, statuses, received_at=received_at)
                answered = record_command_results(session, envelopes, now=received_at)
                record_binding_applications(session, envelopes, now=received_at)
                record_review_decisions(session, envelopes, now=received_at)
                record_pos_verifications(session, envelopes, now=received_at)
                record_pharmacist_sessions(session, envelopes, now=received_at)
                # Coalesced: one ack per device per batch, for stored records and duplicates alike, and for a
                # device that just came online (it may have missed the last ack while away).
                ack_devices = {e.device_id for e in envelopes}
                ack_devices |= {s.device_id for s in statuses if s.state is LinkState.ONLINE}
                acks = advance_acks(
                    session,
                    ack_devices,
                    now=self._clock.now(),
                    gap_alarm_after_s=self._settings.seq_gap_alarm_after_s,
                )
                if self._security is not None:
                    self._security.record(session, [r for i in batch if (r := i.refused) is not None])
        except SQLAlchemyError as exc:
            raise IngestError(
                f"storing {len(batch)} messages failed: {_describe_db_error(exc)}", transient=not _is_poison(exc)
            ) from exc
        return result, acks, answered

    def _reject(self, item: _Inbound, reason: str) -> None:
        item.kind, item.reason = _Kind.REJECTED, reason

    def _finish(
        self, batch: Sequence[_Inbound], result: StoreResult, acks: Sequence[AckState], answered: ResultsApplied
    ) -> None:
        """After the commit: count, log rejections and gap alarms, acknowledge to the broker in arrival order, then
        tell each touched device how far its records are stored."""
        log_seq_gap_changes(acks)
        if answered.unmatched:
            logger.warning(
                "stored %d command result(s) that answer no command issued to their device: %s",
                len(answered.unmatched),
                ", ".join(answered.unmatched[:REJECT_LOG_LINES_PER_BATCH]),
            )
        rejected = [i for i in batch if i.kind is _Kind.REJECTED]
        refused = [r for i in rejected if (r := i.refused) is not None]
        if refused and self._security is not None:
            self._security.after_commit(refused)
        malformed = [i for i in rejected if i.refused is None]  # security refusals are logged aggregated
        for item in malformed[:REJECT_LOG_LINES_PER_BATCH]:
            logger.warning("rejected message on %s (%d bytes): %s", item.topic, len(item.payload), item.reason)
        if len(malformed) > REJECT_LOG_LINES_PER_BATCH:
            logger.warning(
                "... and %d more rejected messages in this batch", len(malformed) - REJECT_LOG_LINES_PER_BATCH
            )
        c = self._counts
        with self._counts_lock:
            c.stored += result.stored
            c.duplicates += result.duplicates
            c.conflicts += result.conflicts
            c.statuses += sum(1 for i in batch if i.kind is _Kind.STATUS)
            c.rejected += len(rejected)
            c.security_refused += len(refused)
            c.batches += 1
            c.last_commit_at = self._clock.now()
            c.commands_acknowledged += answered.acknowledged
            c.command_results_unmatched += len(answered.unmatched)
        client = self._client
        if client is None:
            return
        generation = self._generation
        for item in batch:
            # A message from an earlier connection is redelivered on this one under a new packet id; its old id
            # must not be acknowledged here (it could name a different message).
            if item.qos > 0 and item.generation == generation:
                client.ack(item.mid, item.qos)
        self._publish_acks(client, acks)

    def _publish_acks(self, client: mqtt.Client, acks: Sequence[AckState]) -> None:
        """Queue one QoS 1 `uplink_ack` per device; never waits (paho sends it from its network thread)."""
        sent = 0
        now = self._clock.now()
        for state in acks:
            ack = UplinkAck(device_id=state.device_id, acked_through_seq=state.acked_through_seq, server_time=now)
            payload = self._seal(state.device_id, ack.to_bytes())
            if payload is None:
                continue  # enrolled without a valid session key: the next ack covers it
            info = client.publish(self._topics.downlink(state.device_id), payload, qos=1)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                sent += 1
            else:
                # Not fatal: the terminal publishes again after its ack timeout, and the duplicate brings a new ack.
                logger.debug("uplink_ack for %s not queued: %s", state.device_id, mqtt.error_string(info.rc))
        with self._counts_lock:
            self._counts.acks_sent += sent

    def _note_failure(self, exc: IngestError, size: int) -> None:
        with self._counts_lock:
            self._counts.store_failures += 1
        if self._failing_since == 0:
            logger.warning("%s; keeping %d messages unacknowledged and retrying", exc, size)
        self._failing_since += 1

    def _note_recovery(self) -> None:
        if self._failing_since:
            logger.info("database writes recovered after %d failed attempts", self._failing_since)
            self._failing_since = 0
