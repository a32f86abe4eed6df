"""The terminal's one composition root: builds the typed runtime container and runs it.

Owns the wiring of config, clock, outbox, MQTT link, delivery loop, heartbeat, peripherals (the opened
`KioskDevices`, `terminal.devices`) and the e-voucher service (its audit events go to this outbox) into a
`TerminalRuntime`, the start/stop order, and the use-case entry points `record_audit` and `record_signed` that the
kiosk and the demo call to put records into the outbox. An enrolled terminal also gets its `TerminalSecurity`
(`terminal.session`): uplink frames sealed, downlink frames opened, `rotate_keys` carried out, security events
chained in its local audit log. `run_terminal` is the process-level loop (signals, demo records, clean exit with the
retained 'offline' status published).

It must never choose concrete peripherals (the CLI or a test passes simulators, or devices opened from the config,
in; `terminal` never imports `hardware_sim`), never keep state in module globals, and never bypass the outbox to
send a record.
"""

from __future__ import annotations

import logging
import signal
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Final

from pydantic import JsonValue, ValidationError

from drivers.peripherals import Peripheral
from protocol import (
    AuditEvent,
    AuditOutcome,
    Clock,
    CommandKind,
    CommandOutcome,
    DeviceCommand,
    Envelope,
    Heartbeat,
    SystemClock,
    Topics,
)
from protocol.evidence import sign_device_record
from protocol.payloads import AuditDetailValue, Payload, SignedRecordKind
from protocol.secure import SessionKey
from terminal.binding import BindingError, BindingState, BindingStore, binding_handlers
from terminal.catalogue import CatalogueStore
from terminal.catalogue_sync import CatalogueSync
from terminal.commands import CommandApplier, TerminalFacts, default_handlers
from terminal.config import TerminalConfig
from terminal.devices import DeviceStartupError, KioskDevices, build_evoucher_service, open_face_verifier
from terminal.errors import InvalidRecordError, OutboxFullError, TerminalError
from terminal.evoucher import EVoucherPlatform, EVoucherService
from terminal.health import PeripheralWatch, compose_heartbeat
from terminal.outbox import Outbox
from terminal.pharmacists import (
    ClosingHourWorker,
    OnDuty,
    PharmacistCommands,
    PharmacistDesk,
    RosterSyncWorker,
    open_desk,
)
from terminal.proxy import ProxyRelationshipsHandler, ProxyRelationshipSync, SqliteProxyRegistry
from terminal.purchase_history import ServerPurchaseHistory
from terminal.review import InboxRefresher, PrescriptionInbox, ReviewDesk, open_inbox, review_handlers
from terminal.server_api import ServerApi
from terminal.session import SessionManager, TerminalSecurity
from terminal.sync import DownlinkReceiver, HeartbeatTimer, MqttUplink, SyncWorker, UplinkDelivery, UplinkLink
from terminal.verification import FaceVerifier

if TYPE_CHECKING:  # the POS API pulls in uvicorn/FastAPI: only terminals that enable it import it
    from terminal.pos_api import PosApiServer

logger = logging.getLogger(__name__)

BINDING_FILE = "binding.json"
"""The binding status file, in the outbox's folder."""
CATALOGUE_FILE = "catalogue.sqlite3"
"""The catalogue store (`terminal.catalogue`), in the outbox's folder."""
PROXY_FILE = "proxy_relationships.sqlite3"
"""The proxy-purchase relationships of this terminal's institution (person references only), beside the outbox."""

START_KEY_WAIT_S: Final = 5.0
"""How long an enrolled terminal waits at start for its first session key before connecting anyway."""


@dataclass
class TerminalRuntime:
    """Everything one running terminal is made of. Built by `build_runtime`; `stop()` is final."""

    config: TerminalConfig
    clock: Clock
    boot_id: uuid.UUID
    outbox: Outbox
    sync: SyncWorker
    peripherals: list[Peripheral]
    health: PeripheralWatch
    started_monotonic: float
    security: TerminalSecurity | None = None
    devices: KioskDevices | None = None
    """The drivers opened from `[devices]` (None when the caller passed bare peripherals); closed by `stop()`."""
    evoucher: EVoucherService | None = None
    """The e-voucher service when `[evoucher]` selects a platform; its audit events go into this outbox."""
    evoucher_platform: EVoucherPlatform | None = None
    face: FaceVerifier | None = None
    """Face verification when `[face]` is set; its decisions go into this outbox as identity audit events."""
    binding: BindingStore | None = None
    """This terminal's binding status (bound/unbound/pending, institution, contact), set by the server's commands."""
    model_versions: dict[str, str] = field(default_factory=dict)
    """sha256 prefix of every loaded ML model, by name; heartbeats report it."""
    proxy_registry: SqliteProxyRegistry | None = None
    """The proxy relationships of this terminal's institution (docs/purchases.md), kept by `proxy_sync`."""
    proxy_sync: ProxyRelationshipSync | None = None
    """Fetches the relationships from the server at start and on each `proxy_relationships` notice (when the
    terminal has a device API: `proxy_sync.api`)."""
    server_api: ServerApi | None = None
    """The server's device API (`terminal.server_api`), signed with the session key; None when not enrolled."""
    prescriptions: PrescriptionInbox | None = None
    """Prescriptions pending review and reviewed here (`terminal.review`, docs/prescriptions.md), beside the outbox."""
    prescription_refresher: InboxRefresher | None = None
    """Refreshes `prescriptions` over the device API at start and on `prescriptions_pending`; None when not enrolled."""
    catalogue: CatalogueStore | None = None
    """The synced catalogues and drug-usage rules (docs/catalogue.md), beside the outbox; None when not enrolled."""
    catalogue_sync: CatalogueSync | None = None
    """Fetches catalogue versions over the device API at start and on `catalogue_update` notices."""
    pharmacist_commands: PharmacistCommands = field(default_factory=PharmacistCommands)
    """`roster_update`, `template_purge` and the `unbind` purge; attached to `pharmacists` once it is built."""
    pharmacists: PharmacistDesk | None = None
    """Pharmacist enrolment and sign-in/out when `[pharmacists]` is set (docs/pharmacists.md)."""
    roster_sync: RosterSyncWorker | None = None
    """Fetches the pharmacist roster at start, on `roster_update` and every few hours (needs `server_api`)."""
    closing_hour: ClosingHourWorker | None = None
    """Closes pharmacist sessions at `[pharmacists] close_hour` while the kiosk is idle."""
    review: ReviewDesk | None = None
    """Prescription review by the pharmacist on duty (`terminal.review`) when the desk, the inbox and the synced
    rules are all there."""
    pos_api: PosApiServer | None = None
    """The local POS API (`terminal.pos_api.build_pos_server`) when `[pos_api] enabled`; started by `start()` after
    delivery (its audit events need the outbox), stopped first by `stop()`."""

    def start(self) -> None:
        """Connect in the background and start delivery and heartbeats; returns at once, works offline."""
        if self.security is not None:
            self.security.start()
            # A short wait so the first CONNECT carries a sealed will and 'online'; offline it goes on without.
            self.security.sessions.wait_ready(START_KEY_WAIT_S)
        self.sync.start()
        if self.prescription_refresher is not None:
            self.prescription_refresher.start()
        if self.catalogue_sync is not None:
            self.catalogue_sync.start()
        if self.proxy_sync is not None:
            self.proxy_sync.start()
        if self.roster_sync is not None:
            self.roster_sync.start()
        if self.closing_hour is not None:
            self.closing_hour.start()
        if self.pos_api is not None:
            self.pos_api.start()
        logger.info(
            "terminal %s started: software %s, config %s (schema %d), boot %s",
            self.config.device_id,
            self.config.software_version,
            self.config.config_version,
            self.config.schema_version,
            self.boot_id,
        )

    def stop(self) -> None:
        """Stop heartbeats and delivery, publish the retained 'offline' status, disconnect, close the outbox, then
        release the devices' ports and the e-voucher platform's connections. The POS API stops first (it uses
        the devices and the outbox)."""
        if self.pos_api is not None:
            self.pos_api.stop()
        if self.prescription_refresher is not None:
            self.prescription_refresher.stop()
        if self.proxy_sync is not None:
            self.proxy_sync.stop()
            self.proxy_sync.registry.close()
        if self.roster_sync is not None:
            self.roster_sync.stop()
        if self.closing_hour is not None:
            self.closing_hour.stop()
        self.sync.stop()
        if self.security is not None:
            self.security.stop()
        if self.catalogue_sync is not None:
            self.catalogue_sync.stop()
        if self.catalogue is not None:
            self.catalogue.close()
        if self.server_api is not None:
            self.server_api.close()
        if self.prescriptions is not None:
            self.prescriptions.close()
        self.outbox.close()
        if self.face is not None:
            self.face.templates.close()
        if self.pharmacists is not None:
            self.pharmacists.close()
        _release(self.devices, self.evoucher_platform)
        logger.info("terminal %s stopped", self.config.device_id)

    def uptime_s(self) -> float:
        return self.clock.monotonic() - self.started_monotonic

    def heartbeat(self) -> Heartbeat:
        """The heartbeat for this moment (what the timer enqueues)."""
        return compose_heartbeat(
            self.config,
            stats=self.outbox.stats(),
            peripherals=self.health.snapshot(),
            uptime_s=self.uptime_s(),
            model_versions=self.model_versions,
        )

    def record_audit(
        self,
        category: str,
        action: str,
        outcome: AuditOutcome | str,
        *,
        actor: str | None = None,
        subject: str | None = None,
        **detail: AuditDetailValue,
    ) -> Envelope:
        """Put one audit event into the outbox (durable when this returns) and return its envelope.

        `actor` and `subject` must already be pseudonymous or masked; `detail` is small flat context. Raises
        `InvalidRecordError` if the event breaks the wire contract and `OutboxFullError` if the outbox refuses it;
        in both cases the caller must treat the operation as not recorded.
        """
        try:
            event = AuditEvent(
                category=category,
                action=action,
                outcome=AuditOutcome(outcome),
                actor=actor,
                subject=subject,
                detail=detail,
            )
        except (ValidationError, ValueError) as exc:
            raise InvalidRecordError(f"audit event {category}/{action} rejected: {_fields_of(exc)}") from exc
        return self.outbox.enqueue(event)

    def record_signed(
        self,
        record_type: SignedRecordKind | str,
        record: dict[str, JsonValue],
        *,
        with_records: Sequence[Payload] = (),
    ) -> Envelope:
        """Sign `record` with the device's SM2 identity key (`protocol.evidence`) and put the `signed_record` into
        the outbox, in one transaction with `with_records` (e.g. its audit event) when given. Needs an enrolled
        identity (`TerminalError` otherwise); `InvalidRecordError` if the record breaks the wire contract. `record`
        must hold no raw personal data (masked ids, hashes, decisions)."""
        if self.security is None:
            raise TerminalError("signed records need an enrolled device identity ([identity] in the config)")
        identity = self.security.identity
        try:
            payload = sign_device_record(
                identity.private_key,
                device_id=identity.device_id,
                key_epoch=identity.key_epoch,
                record_type=SignedRecordKind(record_type),
                record=record,
            )
        except (ValidationError, ValueError) as exc:
            raise InvalidRecordError(f"signed record {record_type} rejected: {_fields_of(exc)}") from exc
        if with_records:
            return self.outbox.enqueue_many([payload, *with_records])[0]
        return self.outbox.enqueue(payload)

    def record_audits(self, events: Sequence[AuditEvent]) -> list[Envelope]:
        """Put several audit events into the outbox in one transaction (all or none)."""
        return self.outbox.enqueue_many(list(events))


def _release(devices: KioskDevices | None, platform: EVoucherPlatform | None) -> None:
    if devices is not None:
        devices.close()
    # The seam has no close(); adapters holding connections (HttpEVoucherPlatform) do.
    close = getattr(platform, "close", None)
    if callable(close):
        close()


def _fields_of(exc: Exception) -> str:
    # Field names only: the rejected values could be personal data.
    if isinstance(exc, ValidationError):
        return ", ".join(".".join(str(p) for p in err["loc"]) or "(root)" for err in exc.errors()) or "invalid"
    return "invalid outcome"


def build_runtime(
    config: TerminalConfig,
    peripherals: Sequence[Peripheral] | KioskDevices,
    clock: Clock | None = None,
    *,
    boot_id: uuid.UUID | None = None,
    link: UplinkLink | None = None,
    security: TerminalSecurity | None = None,
    evoucher_platform: EVoucherPlatform | None = None,
    template_key: bytes | None = None,
) -> TerminalRuntime:
    """Wire a terminal from its config and the peripherals the caller chose. Nothing runs until `start()`.

    `peripherals` is either bare peripherals (status only) or the `KioskDevices` opened from `config.devices`
    (`terminal.devices.open_devices`); `evoucher_platform` (`terminal.devices.open_evoucher_platform`) gets an
    `EVoucherService` whose audit events go into this terminal's outbox. The runtime owns both from here on: they
    are closed by `stop()`, or at once if building fails.
    `link` replaces the MQTT connection (tests pass a fake); by default it is an `MqttUplink` to `config.mqtt`.
    `security` (an enrolled device) seals uplinks, opens downlinks and supplies the broker password.
    With `[face]`, a `FaceVerifier` is built on the devices' camera; `template_key` (default: the enrolled identity
    store's, `IdentityStore.template_key()`) seals its gallery. Anything `[face]` needs but lacks stops the build.
    """
    if isinstance(peripherals, KioskDevices):
        devices: KioskDevices | None = peripherals
        reported = list(peripherals.peripherals)
    else:
        devices, reported = None, list(peripherals)
    try:
        runtime = _build(
            config,
            reported,
            clock if clock is not None else SystemClock(),
            boot_id=boot_id if boot_id is not None else uuid.uuid4(),
            link=link,
            security=security,
        )
    except BaseException:
        _release(devices, evoucher_platform)
        raise
    runtime.devices = devices
    runtime.evoucher_platform = evoucher_platform
    if evoucher_platform is not None:
        try:
            runtime.evoucher = build_evoucher_service(
                evoucher_platform,
                config.evoucher,
                device_id=config.device_id,
                record=lambda event: runtime.record_audits([event]),
                clock=runtime.clock,
            )
        except BaseException:
            _abandon(runtime, devices, evoucher_platform)
            raise
    if config.face is not None:
        if template_key is None and security is not None and security.store is not None:
            template_key = security.store.template_key()
        try:
            runtime.face = open_face_verifier(
                config.face,
                devices.camera if devices is not None else None,
                template_key=template_key,
                record=lambda event: runtime.record_audits([event]),
                clock=runtime.clock,
            )
        except BaseException:
            _abandon(runtime, devices, evoucher_platform)
            raise
        runtime.model_versions.update(runtime.face.model_versions)
    if config.pharmacists is not None:
        try:
            runtime.pharmacists = _pharmacist_desk(runtime, template_key)
        except BaseException:
            _abandon(runtime, devices, evoucher_platform)
            raise
        runtime.pharmacist_commands.attach(runtime.pharmacists)
        runtime.closing_hour = ClosingHourWorker(runtime.pharmacists)
        if runtime.server_api is not None:
            runtime.roster_sync = RosterSyncWorker(runtime.pharmacists, runtime.pharmacist_commands.sync_requested)
        if runtime.prescriptions is not None and runtime.catalogue is not None:
            # The review desk (docs/prescriptions.md): the pharmacist on duty here confirms each decision 1:1
            runtime.review = ReviewDesk(
                runtime.prescriptions,
                runtime.catalogue,
                OnDuty(runtime.pharmacists),
                runtime.pharmacists.verifier,
                runtime.record_signed,
                runtime.clock,
                # the patient's earlier purchases for the period rules, from the platform (K-35)
                history=None
                if runtime.server_api is None
                else ServerPurchaseHistory(runtime.server_api, runtime.catalogue.drug),
            )
    return runtime


def _abandon(runtime: TerminalRuntime, devices: KioskDevices | None, platform: EVoucherPlatform | None) -> None:
    """Close what `_build` opened when building the rest of the runtime fails."""
    for store in (runtime.proxy_registry, runtime.prescriptions, runtime.catalogue, runtime.server_api):
        if store is not None:
            store.close()
    runtime.outbox.close()
    _release(devices, platform)


def _pharmacist_desk(runtime: TerminalRuntime, template_key: bytes | None) -> PharmacistDesk:
    """The desk `[pharmacists]` asks for, on the `[face]` verifier's camera, models and liveness policy."""
    config = runtime.config.pharmacists
    if config is None or runtime.face is None or template_key is None:
        raise DeviceStartupError("pharmacists", None, "[pharmacists] needs [face] and an enrolled identity")
    security = runtime.security
    binding = runtime.binding

    def institution() -> str | None:
        status = binding.load() if binding is not None else None
        return status.institution_code if status is not None and status.state is BindingState.BOUND else None

    return open_desk(
        config,
        runtime.face,
        template_key,
        runtime.clock,
        device_id=runtime.config.device_id,
        institution=institution,
        record_signed=runtime.record_signed,
        record_audit=lambda event: runtime.record_audits([event]),
        api=runtime.server_api,
        keys=security.sessions if security is not None else None,
    )


def _build(
    config: TerminalConfig,
    peripherals: Sequence[Peripheral],
    clock: Clock,
    *,
    boot_id: uuid.UUID,
    link: UplinkLink | None,
    security: TerminalSecurity | None,
) -> TerminalRuntime:
    health = PeripheralWatch(peripherals)
    started = clock.monotonic()
    outbox = Outbox.open(config.outbox, device_id=config.device_id, boot_id=boot_id, clock=clock)
    server_api: ServerApi | None = None
    prescriptions: PrescriptionInbox | None = None
    catalogue: CatalogueStore | None = None
    proxy_registry: SqliteProxyRegistry | None = None
    try:
        if security is not None:
            outbox.ensure_seq_above(security.identity.bundle.seq_floor)
        topics = Topics(prefix=config.mqtt.topic_prefix)
        facts = TerminalFacts(software_version=config.software_version, config_version=config.config_version)
        log = security.log if security is not None else None

        def answered(command: DeviceCommand, outcome: CommandOutcome) -> None:
            if log is not None:
                log.record(
                    "command.applied",
                    command_id=str(command.command_id),
                    kind=command.kind.value,
                    outcome=outcome.value,
                )

        # The binding status the server's decisions set (docs/binding.md), beside the outbox
        binding = BindingStore(config.outbox.path.with_name(BINDING_FILE))
        server_api = (
            ServerApi(security.identity.bundle.server_url, config.device_id, security.sessions.current, clock)
            if security is not None
            else None
        )
        # Prescriptions pending review (docs/prescriptions.md), beside the outbox, refreshed over the device API
        prescriptions = open_inbox(config.outbox.path)
        refresher = (
            InboxRefresher(prescriptions, server_api, clock, bound=lambda: _is_bound(binding))
            if server_api is not None
            else None
        )
        # The synced catalogues and rules (docs/catalogue.md), beside the outbox, fetched over the device API
        catalogue_sync: CatalogueSync | None = None
        if server_api is not None:
            catalogue = CatalogueStore.open(config.outbox.path.with_name(CATALOGUE_FILE))
            catalogue_sync = CatalogueSync(catalogue, server_api)
        # The proxy relationships, fetched over the device API (docs/purchases.md), beside the outbox
        proxy_registry = SqliteProxyRegistry(config.outbox.path.with_name(PROXY_FILE))
        proxy_sync = ProxyRelationshipSync(proxy_registry, server_api)
        # Registered now, attached to the pharmacist desk once face verification is built (docs/pharmacists.md)
        pharmacist_commands = PharmacistCommands()
        commands = CommandApplier(
            outbox,
            device_id=config.device_id,
            clock=clock,
            handlers=default_handlers(
                outbox,
                facts,
                clock,
                request_rotation=security.sessions.request_rotation if security is not None else None,
                extra={
                    **binding_handlers(binding, clock.now, on_unbind=pharmacist_commands.purge_all),
                    **pharmacist_commands.handlers(),
                    **(review_handlers(refresher) if refresher else {}),
                    **(catalogue_sync.handlers() if catalogue_sync is not None else {}),
                    CommandKind.PROXY_RELATIONSHIPS: ProxyRelationshipsHandler(proxy_sync),
                },
            ),
            on_answered=answered if log is not None else None,
        )
        downlink = DownlinkReceiver(
            outbox,
            device_id=config.device_id,
            topics=topics,
            commands=commands,
            opener=security.opener(clock) if security is not None else None,
        )
        sealer = security.sealer(clock) if security is not None else None
        if link is None:
            mqtt_link = MqttUplink(
                config.mqtt,
                device_id=config.device_id,
                boot_id=boot_id,
                clock=clock,
                inflight_window=config.outbox.batch_size,
                downlink_sink=downlink.offer,
                password=security.identity.broker_password if security is not None else None,
                status_sealer=sealer.seal_status if sealer is not None else None,
            )
            if security is not None:
                security.sessions.on_new_key = lambda _key: mqtt_link.announce_online()
            link = mqtt_link
        if security is not None and catalogue_sync is not None:
            _wake_on_new_key(security.sessions, catalogue_sync)
        delivery = UplinkDelivery(
            outbox,
            link,
            topic=topics.uplink(config.device_id),
            batch_size=config.outbox.batch_size,
            publish_timeout_s=config.outbox.publish_timeout_s,
            clock=clock,
            sealer=sealer,
        )

        model_versions: dict[str, str] = {}  # filled when face verification loads its models

        def compose() -> Heartbeat:
            return compose_heartbeat(
                config,
                stats=outbox.stats(),
                peripherals=health.snapshot(),
                uptime_s=clock.monotonic() - started,
                model_versions=model_versions,
            )

        heartbeat = HeartbeatTimer(outbox, compose, interval_s=config.heartbeat.interval_s)
    except BaseException:
        if prescriptions is not None:
            prescriptions.close()
        if server_api is not None:
            server_api.close()
        if catalogue is not None:
            catalogue.close()
        outbox.close()
        if proxy_registry is not None:
            proxy_registry.close()
        raise
    return TerminalRuntime(
        config=config,
        clock=clock,
        boot_id=boot_id,
        outbox=outbox,
        sync=SyncWorker(link, delivery, heartbeat, downlink),
        peripherals=list(peripherals),
        health=health,
        started_monotonic=started,
        security=security,
        model_versions=model_versions,
        binding=binding,
        pharmacist_commands=pharmacist_commands,
        server_api=server_api,
        prescriptions=prescriptions,
        prescription_refresher=refresher,
        catalogue=catalogue,
        catalogue_sync=catalogue_sync,
        proxy_registry=proxy_registry,
        proxy_sync=proxy_sync,
    )


def _is_bound(binding: BindingStore) -> bool:
    """Whether the server's decisions bound this terminal (the prescription inbox asks only then). An unreadable
    status file counts as bound: the server's answer then decides, and a refusal is logged as a real failure."""
    try:
        return binding.load().state is BindingState.BOUND
    except BindingError:
        return True


def _wake_on_new_key(sessions: SessionManager, catalogue_sync: CatalogueSync) -> None:
    """A fresh session key is when the device API works again: the catalogue sync tries at once, not at its back-off."""
    previous = sessions.on_new_key

    def on_new_key(key: SessionKey) -> None:
        if previous is not None:
            previous(key)
        catalogue_sync.wake()

    sessions.on_new_key = on_new_key


def run_terminal(
    config: TerminalConfig,
    peripherals: Sequence[Peripheral] | KioskDevices,
    *,
    emit_records: int = 0,
    stop_event: threading.Event | None = None,
    security: TerminalSecurity | None = None,
    evoucher_platform: EVoucherPlatform | None = None,
) -> None:
    """Run a terminal until SIGINT/SIGTERM (main thread only) or `stop_event`, then stop cleanly.

    Records one `terminal.started` audit event, then `emit_records` demo events (category 'system', action
    'demo.record', detail {'n': i}) in outbox-sized batches, each batch one transaction.
    """
    stop = stop_event if stop_event is not None else threading.Event()
    restore_signals = _stop_on_signals(stop)
    try:
        runtime = build_runtime(config, peripherals, security=security, evoucher_platform=evoucher_platform)
        try:
            if config.pos_api.enabled:
                from terminal.pos_api import attach_pos_api  # FastAPI/uvicorn load only when the POS API is on

                attach_pos_api(runtime)
            runtime.start()
            runtime.record_audit(
                "system",
                "terminal.started",
                AuditOutcome.INFO,
                software_version=config.software_version,
                config_version=config.config_version,
            )
            _emit_demo_records(runtime, emit_records, stop)
            # A bounded wait keeps the main thread responsive to signal handlers on every platform.
            while not stop.wait(0.5):
                continue
        finally:
            runtime.stop()
    finally:
        restore_signals()


def _emit_demo_records(runtime: TerminalRuntime, count: int, stop: threading.Event) -> None:
    batch_size = runtime.config.outbox.batch_size
    emitted = 0
    while emitted < count and not stop.is_set():
        batch = [
            AuditEvent(category="system", action="demo.record", outcome=AuditOutcome.INFO, detail={"n": n})
            for n in range(emitted, min(count, emitted + batch_size))
        ]
        try:
            runtime.record_audits(batch)
        except OutboxFullError:
            logger.error("demo: outbox full after %d of %d records; not emitting the rest", emitted, count)
            return
        emitted += len(batch)
    if count:
        logger.info("demo: enqueued %d record(s)", emitted)


def _stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """Make SIGINT/SIGTERM set `stop`; returns a function restoring the previous handlers (no-op off main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum: int, frame: FrameType | None) -> None:
        # Only set the event: logging from a signal handler can re-enter a handler lock the main thread holds.
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
