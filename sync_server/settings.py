"""Typed, fail-closed configuration of the sync server.

`ServerSettings` is read from the environment (prefix `YIBAO_SERVER_`) or built in code. It owns validation of every
knob (addresses, topic prefix, database URL shape, timeouts) and refuses placeholder secrets in production. It must
never open connections or start anything: building settings has no side effects.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from sync_server.accounts import PasswordPolicy
from sync_server.national import NationalPlatformSettings

DEV_SERVER_KEY_PLACEHOLDER = "changeme-server-key"
"""The default passphrase of the server's SM2 key file: fine in dev, refused in prod."""
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "changethis", "change-me", "secret", "password", "dev", "test", DEV_SERVER_KEY_PLACEHOLDER}
)
"""Secret values that are refused when `environment` is "prod" (compared case-insensitively, stripped)."""

MIN_PROD_SECRET_LENGTH = 32


def _default_client_id() -> str:
    return f"yibao-ingest-{socket.gethostname()}"


class ServerSettings(BaseSettings):
    """Everything the sync server needs to start. Unknown keys are an error, not something to ignore."""

    model_config = SettingsConfigDict(
        env_prefix="YIBAO_SERVER_",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    environment: Literal["dev", "prod"] = Field(
        default="dev",
        description="'dev' allows placeholder secrets (with a warning at start-up); 'prod' refuses them.",
    )
    database_url: str = Field(
        default="sqlite:///./var/yibao-server.sqlite3",
        description=(
            "SQLAlchemy URL of the database. SQLite (embedded demo default; its directory is created) or "
            "PostgreSQL as 'postgresql+psycopg://user@host:5432/dbname'."
        ),
    )
    http_host: str = Field(default="127.0.0.1", min_length=1, description="Address the HTTP API listens on.")
    http_port: int = Field(default=8000, ge=0, le=65535, description="HTTP port; 0 lets the OS choose a free one.")
    mqtt_host: str = Field(default="127.0.0.1", min_length=1, description="MQTT broker host name or address.")
    mqtt_port: int = Field(default=1883, ge=1, le=65535, description="MQTT broker TCP port.")
    mqtt_client_id: str = Field(
        default_factory=_default_client_id,
        min_length=1,
        max_length=128,
        description=(
            "MQTT client id of this ingest worker. It names the persistent broker session that queues uplinks "
            "while the server is down, so it must be stable across restarts and unique per worker process."
        ),
    )
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keep-alive interval in seconds.")
    mqtt_session_expiry_s: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        le=0xFFFFFFFE,
        description="How long the broker keeps this worker's session (and queues its messages) while disconnected.",
    )
    topic_prefix: str = Field(
        default="yibao/v1",
        min_length=1,
        max_length=100,
        description="Prefix of every topic (see protocol.topics); lets tenants or test runs share one broker.",
    )
    heartbeat_timeout_factor: float = Field(
        default=3.0,
        ge=1.0,
        le=100.0,
        description=(
            "A device stays online while its last heartbeat is younger than this factor times the heartbeat's own "
            "`interval_s`."
        ),
    )
    presence_sweep_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often the sweeper marks devices whose heartbeat timed out as offline.",
    )
    seq_gap_alarm_after_s: float = Field(
        default=300.0,
        gt=0,
        le=30 * 86400,
        description=(
            "A hole in a device's stored sequence numbers (a seq above the acknowledged range is stored, one below "
            "it is missing) that persists this long raises the 'seq_gap' alarm; it clears when the hole fills."
        ),
    )
    ingest_batch_size: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="Most messages stored (and acknowledged to the broker) in one database transaction.",
    )
    ingest_workers: int = Field(
        default=0,
        ge=0,
        le=32,
        description=(
            "Ingest worker processes next to the main process, each with its own broker session "
            "(client id `<mqtt_client_id>-ingest-<i>`) on the shared uplink subscription. 0: the main process "
            "ingests. With N > 0 the main process serves HTTP and takes device statuses, command dispatch and "
            "presence only. Use it on PostgreSQL; on SQLite it is correct but cannot be faster (one writer)."
        ),
    )
    http_workers: int = Field(
        default=0,
        ge=0,
        le=32,
        description=(
            "Extra HTTP worker processes serving the API and pages on the same socket as the main process "
            "(`sync_server.http_pool`); the main process keeps ingest, dispatch and presence. One process answers "
            "on one core: on a 2-core server 1 or 2 extra workers carry the HIS interfaces at 200 requests/s "
            "(docs/benchmarks.md)."
        ),
    )
    ingest_flush_interval_s: float = Field(
        default=0.05,
        gt=0,
        le=10,
        description="Longest a received message waits for its batch to fill before the batch is stored anyway.",
    )
    ingest_retry_delay_s: float = Field(
        default=2.0,
        gt=0,
        le=600,
        description=(
            "After a batch could not be stored, wait this long before reconnecting to the broker, which then "
            "redelivers the unacknowledged messages."
        ),
    )
    command_dispatch_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=600,
        description="How often the command dispatcher looks for commands to publish, re-publish or expire.",
    )
    command_republish_after_s: float = Field(
        default=300.0,
        gt=0,
        le=7 * 86400,
        description=(
            "A delivered command without an answer is published again after this long (and at once when its device "
            "comes back online); the terminal carries out each command id once, so repeats are harmless."
        ),
    )
    command_max_ttl_s: float = Field(
        default=7 * 86400.0,
        gt=0,
        le=90 * 86400,
        description="Longest lifetime (ttl_s) a command may be issued with.",
    )
    auto_register_devices: bool = Field(
        default=True,
        description=(
            "Register an unknown device id on its first message with registration state 'unprovisioned'. Until "
            "device enrolment with keys exists (a later issue), anything that may publish on the broker can create "
            "a device this way; confine publishers with the broker ACL. When false, messages from unknown devices "
            "are rejected (acknowledged, counted and logged, not stored)."
        ),
    )
    display_timezone: str = Field(
        default="Asia/Shanghai",
        description="IANA time zone used to show times on the web pages (the API always speaks UTC).",
    )
    secret_key: SecretStr = Field(
        default=SecretStr("changeme"),
        description=(
            "Key for signing web sessions and tokens. Placeholders such as 'changeme' are refused when "
            f"environment is 'prod', as is anything shorter than {MIN_PROD_SECRET_LENGTH} characters."
        ),
    )

    data_dir: Path = Field(
        default=Path("./var"),
        description="Directory of the server's own files: its SM2 key file, the audit chain and its HMAC key.",
    )
    server_key_file: Path | None = Field(
        default=None,
        description=(
            "The server's SM2 signing key (an encrypted key file); default <data_dir>/server_key.json. Created by "
            "`yibao server init`, or on first use when environment is 'dev'."
        ),
    )
    server_key_passphrase: SecretStr = Field(
        default=SecretStr(DEV_SERVER_KEY_PLACEHOLDER),
        description="Passphrase of the server key file; the placeholder default is refused in prod.",
    )
    account_policy: PasswordPolicy = Field(
        default_factory=PasswordPolicy,
        description=(
            "Operator password and login-session policy (docs/accounts.md), as JSON in the environment, e.g. "
            "YIBAO_SERVER_ACCOUNT_POLICY='{\"min_length\": 12}'. The defaults follow 等保 2.0."
        ),
    )
    bootstrap_admin_token: SecretStr | None = Field(
        default=None,
        description=(
            "An admin bearer token accepted besides those in the database (demos, tests). Leave unset in "
            "production; create tokens with `yibao server admin-token create`."
        ),
    )
    public_url: str | None = Field(
        default=None,
        max_length=512,
        description="Base URL devices use for the HTTPS API (written into config bundles); default: the request's.",
    )
    device_mqtt_host: str | None = Field(
        default=None, description="Broker host as devices should reach it (config bundles); default mqtt_host."
    )
    device_mqtt_port: int | None = Field(
        default=None, ge=1, le=65535, description="Broker port as devices should reach it; default mqtt_port."
    )
    device_mqtt_tls: bool = Field(default=False, description="Devices connect to the broker over TLS.")
    config_version: str = Field(
        default="1", min_length=1, max_length=64, description="Written into every config bundle."
    )
    session_lifetime_s: int = Field(
        default=86400, ge=60, le=30 * 86400, description="Lifetime of a session key the server grants."
    )
    session_rotate_after_s: int = Field(
        default=43200, ge=30, le=30 * 86400, description="Devices ask for a new session key after this."
    )
    uplink_security: Literal["optional", "required"] | None = Field(
        default=None,
        description=(
            "'required': every uplink must be a secure frame. 'optional': plaintext envelopes are still accepted "
            "from devices that are not enrolled (enrolled devices must always use frames). Default: optional in "
            "dev, required in prod (optional is refused in prod)."
        ),
    )
    uplink_max_age_s: float = Field(
        default=600.0, gt=0, le=7 * 86400, description="A frame sealed longer ago than this is refused as stale."
    )
    security_cache_ttl_s: float = Field(
        default=2.0,
        gt=0,
        le=5.0,
        description="How long ingest trusts a cached device state or session key (revocation bites within it).",
    )
    mqtt_username: str | None = Field(default=None, max_length=128, description="This server's broker user name.")
    mqtt_password: SecretStr | None = Field(default=None, description="This server's broker password.")
    broker_admin_username: str | None = Field(
        default=None,
        max_length=128,
        description=(
            "A dynamic-security admin of the broker. With it, device broker users and their ACLs are managed on "
            "enrolment, rotation, reset and revocation; without it, broker management is 'not managed' (dev)."
        ),
    )
    broker_admin_password: SecretStr | None = Field(default=None, description="Password of broker_admin_username.")
    national_platform: NationalPlatformSettings | None = Field(
        default=None,
        description=(
            "How this server reaches the national medical-insurance platform for the citizen queries the terminals "
            "relay (docs/national-platform.md), as JSON in the environment, e.g. YIBAO_SERVER_NATIONAL_PLATFORM="
            '\'{"base_url": "https://…", "paasid": …}\'. Unset: the relay answers 503 (not configured).'
        ),
    )
    national_platform_key_file: Path | None = Field(
        default=None,
        description="The designated institution's SM2 signing key for the platform (an encrypted key file, mode 0600).",
    )
    national_platform_key_passphrase: SecretStr | None = Field(
        default=None, description="Passphrase of national_platform_key_file; placeholders are refused in prod."
    )
    http_process_index: int = Field(
        default=0,
        ge=0,
        le=32,
        description=(
            "Set by the server itself, never by hand: 0 in the main process, i + 1 in HTTP worker i. Processes that "
            "call the national platform for one institution take distinct msgid sequences by it."
        ),
    )
    national_query_ref_ttl_s: int = Field(
        default=600,
        ge=30,
        le=3600,
        description="How long a person_info answer's query_ref lets the same terminal ask that person's records.",
    )
    pharmacist_close_hour: int = Field(
        default=24,
        ge=1,
        le=24,
        description=(
            "Local hour (display_timezone) at which the server closes an attendance session the terminal left open "
            "(reason 'server_closed'); 24 = midnight. Terminals close theirs at their own [pharmacists] close_hour."
        ),
    )

    @field_validator("database_url")
    @classmethod
    def _database_url_parses(cls, value: str) -> str:
        try:
            make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from exc
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix_is_plain(cls, value: str) -> str:
        if any(ch in value for ch in "+#\x00") or value.startswith(("/", "$")) or value.endswith("/"):
            raise ValueError("topic prefix must not contain wildcards, start with '/' or '$', or end with '/'")
        return value

    @field_validator("display_timezone")
    @classmethod
    def _timezone_exists(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _no_placeholder_secret_in_prod(self) -> ServerSettings:
        if self.environment == "prod" and self.secret_key_is_placeholder:
            raise ValueError(
                "secret_key is a placeholder or shorter than "
                f"{MIN_PROD_SECRET_LENGTH} characters; set YIBAO_SERVER_SECRET_KEY to a random value in prod "
                '(for example: python -c "import secrets; print(secrets.token_urlsafe(32))")'
            )
        if self.environment == "prod" and _is_placeholder(self.server_key_passphrase):
            raise ValueError(
                "server_key_passphrase is a placeholder or shorter than "
                f"{MIN_PROD_SECRET_LENGTH} characters; set YIBAO_SERVER_SERVER_KEY_PASSPHRASE in prod"
            )
        if self.environment == "prod" and self.uplink_security == "optional":
            raise ValueError("uplink_security 'optional' is refused in prod: every uplink must be a secure frame")
        if (self.broker_admin_username is None) != (self.broker_admin_password is None):
            raise ValueError("set both broker_admin_username and broker_admin_password, or neither")
        if self.national_platform is not None and (
            self.national_platform_key_file is None or self.national_platform_key_passphrase is None
        ):
            raise ValueError("national_platform needs national_platform_key_file and national_platform_key_passphrase")
        if self.environment == "prod" and self.national_platform is not None:
            if self.national_platform_key_passphrase is not None and _is_placeholder(
                self.national_platform_key_passphrase
            ):
                raise ValueError("national_platform_key_passphrase is a placeholder or too short; refused in prod")
            if _is_placeholder(self.national_platform.paas_secret):
                raise ValueError("national_platform.paas_secret is a placeholder or too short; refused in prod")
        return self

    @property
    def effective_uplink_security(self) -> Literal["optional", "required"]:
        if self.uplink_security is not None:
            return self.uplink_security
        return "optional" if self.environment == "dev" else "required"

    @property
    def server_key_path(self) -> Path:
        return self.server_key_file if self.server_key_file is not None else self.data_dir / "server_key.json"

    @property
    def broker_managed(self) -> bool:
        return self.broker_admin_username is not None

    @property
    def secret_key_is_placeholder(self) -> bool:
        return _is_placeholder(self.secret_key)


def _is_placeholder(secret: SecretStr) -> bool:
    raw = secret.get_secret_value().strip()
    return raw.lower() in PLACEHOLDER_SECRETS or len(raw) < MIN_PROD_SECRET_LENGTH
