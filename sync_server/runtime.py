"""The typed runtime container of one server process: settings, engine, session factory, clock, background workers.

`create_app`'s lifespan builds one `ServerRuntime`, starts it, and stops it at shutdown; request handlers reach it
through `sync_server.api.deps`. It owns the start/stop order (ingest, then the command dispatcher, which publishes
through ingest's MQTT client, then the sweeper; stopped in reverse; the engine disposed last, and only when this
runtime created it). With `ingest_workers` > 0 it also owns the `IngestPool` of worker processes that store uplinks,
and this process's own ingest worker takes device statuses only. When `national_platform` is configured it builds the
`HttpNationalPlatform` the citizen-query relay calls (its key opened at build: a configured platform whose key cannot
be opened stops start-up) and closes it at stop. It must never be a module-level global.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from protocol import Clock, SystemClock, Topics
from protocol.gm.errors import CryptoError
from protocol.gm.keystore import load_private_key
from sync_server.audit import ServerAudit
from sync_server.broker_admin import BrokerAdmin, DynsecAdmin, UnmanagedBroker
from sync_server.catalogues import DocumentCache
from sync_server.commands import CommandDispatcher
from sync_server.db.async_pg import AsyncPostgres
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.steps import Steps, T, run_steps
from sync_server.errors import ConfigurationError
from sync_server.identity import ServerIdentity
from sync_server.ingest import IngestWorker
from sync_server.ingest_pool import IngestPool
from sync_server.national import HttpNationalPlatform, NationalPlatform, NationalPlatformSettings
from sync_server.presence import PresenceSweeper
from sync_server.security import SecurityGate
from sync_server.settings import ServerSettings
from sync_server.signed_requests import RequestAuthority

logger = logging.getLogger(__name__)

MqttState = Literal["connected", "disconnected", "disabled"]


@dataclass
class ServerRuntime:
    settings: ServerSettings
    engine: Engine
    clock: Clock
    owns_engine: bool
    ingest: IngestWorker | None = None
    sweeper: PresenceSweeper | None = None
    dispatcher: CommandDispatcher | None = None
    identity: ServerIdentity = field(init=False)
    """The server's SM2 key (loaded on first use) and the seal of session keys at rest."""
    audit: ServerAudit = field(init=False)
    broker_admin: BrokerAdmin = field(init=False)
    security: SecurityGate = field(init=False)
    """Ingest's message-security checks and downlink sealing (shared with the API for cache invalidation)."""
    pool: IngestPool | None = None
    """The ingest worker processes (None when this process ingests uplinks itself)."""
    national: NationalPlatform | None = None
    """The national platform client the citizen-query relay calls (None: not configured, the relay answers 503)."""
    catalogue_documents: DocumentCache = field(default_factory=DocumentCache)
    """Serialised catalogue documents served to terminals (each built once per publish and process)."""
    sessions: sessionmaker[Session] = field(init=False)
    writer_sessions: sessionmaker[Session] = field(init=False)
    """For the few requests that write (issuing a command): SQLite takes its write lock when they begin."""
    read_sessions: sessionmaker[Session] = field(init=False)
    """For the busiest requests that only read (HIS queries): no transaction round trips on PostgreSQL."""
    requests: RequestAuthority = field(init=False)
    """Authenticates signed machine requests: HIS clients on /his/v1, terminals on /device/v1."""
    hot: AsyncPostgres | None = field(init=False)
    """PostgreSQL only: the async pool for the hottest statements (nonces, HIS reads); opened by the app's lifespan."""

    def __post_init__(self) -> None:
        self.sessions = session_factory(self.engine)
        self.writer_sessions = session_factory(self.engine, write_intent=True)
        self.read_sessions = session_factory(self.engine, statement_reads=True)
        self.identity = ServerIdentity(self.settings)
        self.audit = ServerAudit(self.settings.data_dir, self.clock)
        self.broker_admin = _broker_admin(self.settings)
        self.security = SecurityGate(self.settings, self.engine, self.identity, clock=self.clock, audit=self.audit)
        self.hot = AsyncPostgres.for_engine(self.engine)
        self.requests = RequestAuthority(
            self.sessions, self.engine, self.identity, self.security, self.clock, hot=self.hot
        )

    @classmethod
    def build(
        cls,
        settings: ServerSettings,
        *,
        engine: Engine | None = None,
        clock: Clock | None = None,
        start_ingest: bool = True,
    ) -> ServerRuntime:
        """Assemble the runtime; nothing is started yet. With `engine=None` one is created from the settings and
        disposed by `stop()`."""
        owns_engine = engine is None
        the_engine = engine if engine is not None else create_db_engine(settings.database_url)
        the_clock: Clock = clock if clock is not None else SystemClock()
        runtime = cls(settings=settings, engine=the_engine, clock=the_clock, owns_engine=owns_engine)
        runtime.national = _national_platform(settings, the_clock)
        if start_ingest:
            workers = settings.ingest_workers
            # With worker processes, this process keeps the singletons: statuses, dispatcher, sweeper.
            runtime.ingest = IngestWorker(
                settings, the_engine, clock=the_clock, security=runtime.security, uplinks=workers == 0
            )
            if workers > 0:
                runtime.pool = IngestPool(settings, count=workers)
            runtime.dispatcher = CommandDispatcher(
                the_engine,
                runtime.ingest.publish_downlink,
                interval_s=settings.command_dispatch_interval_s,
                republish_after_s=settings.command_republish_after_s,
                clock=the_clock,
            )
            runtime.sweeper = PresenceSweeper(
                the_engine,
                interval_s=settings.presence_sweep_interval_s,
                clock=the_clock,
                gap_alarm_after_s=settings.seq_gap_alarm_after_s,
            )
        return runtime

    async def run_steps(self, make: Callable[[], Steps[T]], *, write: bool) -> T:
        """HIS's database work (`sync_server.db.steps`), from the event loop: on PostgreSQL on the async pool, in one
        transaction when `write`; on any other database in a worker thread, in a session of its own (a writer's
        transaction when `write`)."""
        if self.hot is not None and self.hot.is_open:
            return await self.hot.run(make(), transaction=write)
        return await anyio.to_thread.run_sync(self._run_steps_in_session, make, write)

    def _run_steps_in_session(self, make: Callable[[], Steps[T]], write: bool) -> T:
        if not write:
            with self.read_sessions() as session:
                return run_steps(session.connection(), make())
        with self.writer_sessions() as session, session.begin():
            return run_steps(session.connection(), make())

    def start(self) -> None:
        if self.settings.secret_key_is_placeholder:
            logger.warning("secret_key is a placeholder; acceptable in dev only (set YIBAO_SERVER_SECRET_KEY)")
        if self.settings.auto_register_devices and self.settings.environment == "prod":
            logger.warning("auto_register_devices is on in prod: any publisher the broker admits creates a device")
        if self.settings.environment == "prod":
            self.identity.private_key()  # fail fast: prod never creates its key implicitly
        logger.info(
            "uplink security %s; broker %s",
            self.settings.effective_uplink_security,
            "managed (dynamic security)" if self.broker_admin.managed else "not managed",
        )
        if self.pool is not None:
            if self.engine.dialect.name == "sqlite":
                logger.warning("ingest_workers on SQLite: correct, but one writer at a time; use PostgreSQL to scale")
            self.pool.start()
        if self.ingest is not None:
            self.ingest.start()
        if self.dispatcher is not None:
            self.dispatcher.start()
        if self.sweeper is not None:
            self.sweeper.start()

    def stop(self) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self.ingest is not None:
            self.ingest.stop()
        if self.pool is not None:
            self.pool.stop()
        self.audit.close()
        if self.national is not None:
            self.national.close()
        if self.owns_engine:
            self.engine.dispose()

    @property
    def mqtt_state(self) -> MqttState:
        """'connected' (broker session up and subscriptions granted, in every ingest worker process too),
        'disconnected', or 'disabled' when this process runs no ingest."""
        if self.ingest is None:
            return "disabled"
        ready = self.ingest.ready and (self.pool is None or self.pool.ready)
        return "connected" if ready else "disconnected"


def _broker_admin(settings: ServerSettings) -> BrokerAdmin:
    if settings.broker_admin_username is None or settings.broker_admin_password is None:
        return UnmanagedBroker()
    return DynsecAdmin(
        settings.mqtt_host,
        settings.mqtt_port,
        settings.broker_admin_username,
        settings.broker_admin_password.get_secret_value(),
        topics=Topics(prefix=settings.topic_prefix),
    )


def _national_platform(settings: ServerSettings, clock: Clock) -> NationalPlatform | None:
    """The configured national-platform client; a configured one whose key cannot be opened stops start-up."""
    platform = settings.national_platform
    if platform is None:
        return None
    key_file, passphrase = settings.national_platform_key_file, settings.national_platform_key_passphrase
    if key_file is None or passphrase is None:  # the settings validator requires both; kept for the type checker
        raise ConfigurationError("national_platform needs national_platform_key_file and its passphrase")
    try:
        key = load_private_key(key_file, passphrase.get_secret_value())
    except (OSError, CryptoError) as exc:
        raise ConfigurationError(f"cannot open the national-platform key {key_file}: {exc}") from exc
    return HttpNationalPlatform(_msgid_range(settings, platform), key, clock=clock)


def _msgid_range(settings: ServerSettings, platform: NationalPlatformSettings) -> NationalPlatformSettings:
    """Every HTTP process of this server calls the platform for the same institution: each takes its own share of
    the msgid sequence (`msgid_worker` of `msgid_workers`, docs/national-platform.md), within the share this server
    was configured with, so two processes never send the same msgid in the same second."""
    processes = settings.http_workers + 1
    if processes == 1:
        return platform
    return platform.model_copy(
        update={
            "msgid_worker": platform.msgid_worker * processes + settings.http_process_index,
            "msgid_workers": platform.msgid_workers * processes,
        }
    )
