"""The terminal's configuration: a typed model that fails closed, loaded from one TOML file.

Owns the shape of `terminal.toml`, its `schema_version` and the ordered migrations that bring an older file up to
the current shape. Every field is typed strictly (a quoted "1883" is not a port), every table forbids unknown keys, and
any problem raises `ConfigError` naming the file and the offending field(s), so a terminal never starts on a guess.
What identifies the terminal and where it connects (`device_id`, `config_version`, broker host and port, outbox path)
is required; tuning knobs have the documented defaults below.

With an `[identity]` table (an enrolled device, docs/identity.md), the server-signed config bundle decides the
device id, config version and broker host/port/user/topic prefix: the caller loads the identity and passes its
`overlay`, which fills those keys; a value in the file that contradicts the bundle is refused, never silently
replaced. The section is additive, so the schema stays at version 1 (software without it refuses the unknown table).

The `[devices]` table chooses each kiosk peripheral's backend by a `backend` discriminator ("simulated": the
status-only stand-in the composition root supplies; "serial": the real driver on `port`), and `[evoucher]` chooses
the national e-voucher platform adapter ("none" or "http"). Both are optional and additive with defaults that keep
the behaviour of files written before them (all devices simulated, no e-voucher platform), so the schema stays at
version 1 here too. Opening what they name (ports, the SS-card layout file) is `terminal.devices`' job, not this
module's. `[pos_api]` (optional, disabled by default, also additive) configures the local API the pharmacy POS calls
(`terminal.pos_api`); its client secrets stay in 0600 files the table names, pinned by their SM3 digest.

It must never read environment variables or other files behind the caller's back, never fill a missing required
field with a default that changes behaviour silently, and never hold secrets (keys and the broker password live
sealed in the identity directory, `terminal.identity`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drivers.qr_scanner import QrScannerConfig
from protocol import DeviceId
from terminal.errors import ConfigError

logger = logging.getLogger(__name__)

CURRENT_SCHEMA_VERSION: Final = 1
"""Shape of the config file this code understands; bump it together with a new entry in `MIGRATIONS`."""

RawConfig = dict[str, Any]
Migration = Callable[[RawConfig], RawConfig]

MIGRATIONS: Final[Mapping[int, Migration]] = {}
"""`from_version -> function` turning a raw config of `from_version` into one of `from_version + 1`.

Applied in ascending order until the file reaches `CURRENT_SCHEMA_VERSION`; the loader stamps the new version after
each step, so a migration only reshapes keys. Empty while version 1 is the only version ever shipped."""

_VersionString = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]*$")]
_TopicPrefix = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")]


def installed_software_version() -> str:
    """Version of the installed `yibao` distribution, or "0.0.0" when running from an uninstalled tree."""
    try:
        return importlib.metadata.version("yibao")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class _Strict(BaseModel):
    # strict: TOML already gives typed values, so coercing "30" into 30 would only hide a mistake in the file.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class MqttConfig(_Strict):
    """How the terminal reaches the MQTT broker in front of the sync server."""

    host: str = Field(min_length=1, max_length=253, description="Broker host name or IP address.")
    port: int = Field(ge=1, le=65535, description="Broker TCP port.")
    keepalive_s: int = Field(
        default=30,
        ge=5,
        le=3600,
        description="MQTT keep-alive in seconds; the broker fires our last will after 1.5x this.",
    )
    topic_prefix: _TopicPrefix = Field(
        default="yibao/v1", description="Topic prefix shared with the server, e.g. 'yibao/v1'."
    )
    reconnect_min_s: float = Field(
        default=0.5,
        gt=0,
        le=3600,
        description="First reconnect delay after losing the broker; paho schedules whole seconds, so it rounds up.",
    )
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600, description="Cap of the doubling reconnect delay.")
    username: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Broker user name (an enrolled device's, from its bundle); the password is sealed elsewhere.",
    )

    @model_validator(mode="after")
    def _delays_ordered(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self


class OutboxConfig(_Strict):
    """The local SQLite outbox every record passes through before it is synced."""

    path: Annotated[Path, Field(strict=False)] = Field(
        description="SQLite file of the outbox; a relative path is taken relative to the config file's folder."
    )
    max_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=128 * 1024,
        le=64 * 1024**3,
        description="Disk bound of the outbox database; SQLite refuses to grow past it (alarm 'outbox_full').",
    )
    high_water_ratio: float = Field(
        default=0.8,
        gt=0,
        lt=1,
        description="Fraction of the space records may fill (max_bytes less a small bookkeeping reserve) above "
        "which the 'outbox_high_water' alarm is raised.",
    )
    disk_reserve_bytes: int = Field(
        default=1024 * 1024,
        ge=0,
        le=1024**3,
        description="A ballast file of this size kept next to the outbox; when the disk fills up (whatever filled "
        "it), it is deleted so that delivery bookkeeping can go on and acknowledged records can be pruned. 0: none.",
    )
    batch_size: int = Field(
        default=200,
        ge=1,
        le=1000,
        description="Records claimed and published per round; also the MQTT in-flight window.",
    )
    publish_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A record without PUBACK after this many seconds is released for retry.",
    )
    retry_initial_s: float = Field(
        default=1.0, gt=0, le=3600, description="Back-off after the first failed delivery attempt."
    )
    retry_max_s: float = Field(
        default=300.0, gt=0, le=86400, description="Cap of the exponential back-off between attempts."
    )
    sent_retention_s: float = Field(
        default=86400.0,
        ge=0,
        le=90 * 86400,
        description="Records the server acknowledged as stored are kept this long for diagnosis, then pruned.",
    )
    server_ack_timeout_s: float = Field(
        default=120.0,
        gt=0,
        le=86400,
        description="A record the broker acknowledged (PUBACK) but the server has not acknowledged as stored within "
        "this many seconds is published again; the server deduplicates.",
    )

    @model_validator(mode="after")
    def _retry_ordered(self) -> OutboxConfig:
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be >= retry_initial_s")
        return self


class HeartbeatConfig(_Strict):
    """Periodic health record sent through the outbox."""

    interval_s: float = Field(default=30.0, gt=0, le=3600, description="Seconds between heartbeats.")


class IdentityConfig(_Strict):
    """Where an enrolled device keeps its identity (sealed key, pinned server key, signed bundle, sealed secrets)."""

    dir: Annotated[Path, Field(strict=False)] = Field(
        default=Path("identity"),
        description="Identity directory (mode 0700); a relative path is taken relative to the config file's folder.",
    )
    passphrase_file: Annotated[Path | None, Field(strict=False)] = Field(
        default=None,
        description="File whose first line is the key passphrase (mode 0600); without it the passphrase comes from "
        "YIBAO_DEVICE_KEY_PASSPHRASE.",
    )


# ---------------------------------------------------------------- [devices]

_PortPath = Annotated[
    str,
    Field(
        min_length=1,
        max_length=255,
        pattern=r"^[^\x00-\x1f]+$",
        description="Serial port the device is on, e.g. '/dev/ttyUSB-idcard' (a udev symlink) or '/dev/ttyACM0'.",
    ),
]
_Baudrate = Annotated[int, Field(ge=1200, le=4_000_000)]


class SimulatedDeviceConfig(_Strict):
    """The status-only stand-in: the device is reported (simulated=True, ok) but nothing can be read from it."""

    backend: Literal["simulated"] = Field(description="'simulated': a status-only stand-in, no real I/O.")


class _SerialDevice(_Strict):
    port: _PortPath
    simulated_peer: bool = Field(
        default=False,
        description="True when the other end of the port is one of our pty simulators (demo, test rig): the real "
        "driver runs, but heartbeats report the device as simulated so upstream never mistakes it for hardware.",
    )


class SerialIdCardReaderConfig(_SerialDevice):
    """The 2nd-generation ID-card reader (SAM module) on a serial port, driven by `drivers.idcard.IdCardReader`."""

    backend: Literal["serial"] = Field(description="'serial': the real SAM-module driver on `port`.")
    baudrate: _Baudrate = Field(default=115200, description="Serial speed (SAM modules ship at 115200 8N1).")
    photo_decoder: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        description="'package.module:function' of the reader vendor's WLT photo decoder (1024 WLT bytes → an RGB "
        "image as a numpy array), installed with the vendor's licensed library. Needed for 人证比对 (the "
        "pharmacist's face enrolment, the head's binding application); without it the kiosk says those checks "
        "are not possible here. Imported at start: a missing one stops start-up.",
    )


class SerialSsCardReaderConfig(_SerialDevice):
    """The social-security-card reader on a serial port, driven by `drivers.sscard.SocialSecurityCardReader`."""

    backend: Literal["serial"] = Field(description="'serial': the real reader driver on `port`.")
    layout: Annotated[Path | None, Field(strict=False)] = Field(
        default=None,
        description="JSON file holding the vendor's `SsCardLayout` (frame variant and card field layout); a relative "
        "path is taken relative to the config file's folder. Absent: the built-in MOHRSS default layout.",
    )
    baudrate: _Baudrate | None = Field(
        default=None, description="Serial speed; absent: the layout's `frame.baudrate` (115200 in the default)."
    )


class SerialQrScannerConfig(_SerialDevice, QrScannerConfig):
    """A QR scanner module in serial mode, driven by `drivers.qr_scanner.QrScanner`; the scanner's framing fields
    (suffix, prefix_hex, trigger_hex, encoding, baudrate, ...) are those of `QrScannerConfig`, in this same table."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    backend: Literal["serial"] = Field(description="'serial': the real scanner driver on `port`.")

    def scanner_config(self) -> QrScannerConfig:
        """The driver's own config: this table less backend, port and simulated_peer."""
        return QrScannerConfig.model_validate(self.model_dump(include=set(QrScannerConfig.model_fields)))


def _simulated() -> SimulatedDeviceConfig:
    return SimulatedDeviceConfig(backend="simulated")


IdCardReaderBackend = Annotated[SimulatedDeviceConfig | SerialIdCardReaderConfig, Field(discriminator="backend")]
SsCardReaderBackend = Annotated[SimulatedDeviceConfig | SerialSsCardReaderConfig, Field(discriminator="backend")]
QrScannerBackend = Annotated[SimulatedDeviceConfig | SerialQrScannerConfig, Field(discriminator="backend")]
_CameraSource = Annotated[
    int | str,
    Field(
        description="A V4L2 device index (0), a device path ('/dev/video0', a udev symlink) or, for a test rig, a "
        "video file; OpenCV opens it."
    ),
]


class OpenCvCameraConfig(_Strict):
    """The face camera through OpenCV (`drivers.camera.OpenCvCamera`): an RGB device and, on binocular "3D" kiosk
    cameras, an IR device and a depth device. Liveness uses every channel that is configured; with neither IR nor
    depth the randomized active challenge is required."""

    backend: Literal["opencv"] = Field(description="'opencv': the real OpenCV camera driver.")
    rgb: _CameraSource
    ir: _CameraSource | None = Field(default=None, description="The IR (NIR) device, when the camera has one.")
    depth: _CameraSource | None = Field(default=None, description="The depth device (16-bit millimetres), if any.")
    width: int = Field(default=640, ge=160, le=3840, description="Requested frame width (pixels).")
    height: int = Field(default=480, ge=120, le=2160, description="Requested frame height (pixels).")
    read_timeout_s: float = Field(default=2.0, gt=0, le=30, description="A read with no frame by then is a fault.")
    simulated_peer: bool = Field(
        default=False,
        description="True when the sources are recordings or a simulator rather than a camera (demo, test rig): "
        "the real driver runs, but heartbeats report the camera as simulated.",
    )


CameraBackend = Annotated[SimulatedDeviceConfig | OpenCvCameraConfig, Field(discriminator="backend")]


class DevicesConfig(_Strict):
    """Which backend drives each kiosk peripheral. Every entry defaults to the status-only stand-in."""

    id_card_reader: IdCardReaderBackend = Field(
        default_factory=_simulated, description="2nd-generation resident ID-card reader (heartbeat name 'idcard0')."
    )
    ss_card_reader: SsCardReaderBackend = Field(
        default_factory=_simulated, description="Social-security-card reader (heartbeat name 'sscard0')."
    )
    qr_scanner: QrScannerBackend = Field(
        default_factory=_simulated, description="Serial QR scanner for 医保码 e-vouchers (heartbeat name 'qr0')."
    )
    camera: CameraBackend = Field(
        default_factory=_simulated,
        description="Face camera (heartbeat name 'camera0'): 'simulated' (status only) or 'opencv'.",
    )


# ---------------------------------------------------------------- [evoucher]


class EVoucherConfig(_Strict):
    """How the kiosk reaches the national e-voucher (医保码) platform; docs/evoucher.md has the offline policy."""

    platform: Literal["none", "http"] = Field(
        default="none",
        description="'none': no e-voucher path (the kiosk offers the card paths only); 'http': the HTTP adapter "
        "(`terminal.evoucher_http.HttpEVoucherPlatform`) against `base_url`.",
    )
    base_url: str | None = Field(
        default=None,
        min_length=8,
        max_length=512,
        pattern=r"^https?://[^\s]+$",
        description="Platform address for 'http', e.g. 'https://evoucher.example.gov.cn'; must be absent for 'none'.",
    )
    timeout_s: float = Field(
        default=3.0,
        gt=0,
        le=60,
        description="One deadline per platform call; past it the call is refused as offline (never retried).",
    )
    org_code: str | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        pattern=r"^[0-9A-Za-z]+$",
        description="The designated institution's code (定点机构编码) sent with every call; required for 'http'.",
    )

    @model_validator(mode="after")
    def _platform_settings(self) -> EVoucherConfig:
        if self.platform == "http" and (self.base_url is None or self.org_code is None):
            raise ValueError("platform 'http' needs base_url and org_code")
        if self.platform == "none" and (self.base_url is not None or self.org_code is not None):
            raise ValueError("base_url/org_code given but platform is 'none'; set platform = 'http' or remove them")
        return self


# ---------------------------------------------------------------- [face]


class FaceConfig(_Strict):
    """Face verification at the kiosk (`terminal.verification.FaceVerifier`): needs `[devices.camera]` backend
    'opencv' and an enrolled identity (templates are sealed with the device's template key). Models come from the
    models dir (`$YIBAO_MODELS_DIR`, docs/models.md)."""

    gallery: Annotated[Path, Field(strict=False)] = Field(
        default=Path("face_gallery.sqlite3"),
        description="The sealed template gallery (SQLite); a relative path is taken relative to the config file.",
    )
    window_s: float = Field(
        default=15.0, gt=1, le=60, description="Longest verification attempt; its frames are wiped when it ends."
    )
    always_challenge: bool = Field(
        default=False,
        description="Ask a randomized turn/nod even when the camera has IR or depth (it is always asked without).",
    )
    challenge_steps: int = Field(default=1, ge=1, le=3, description="Moves per challenge.")
    challenge_window_s: float = Field(default=5.0, gt=1, le=20, description="Time allowed for each move.")


# ---------------------------------------------------------------- [pharmacists]


class PharmacistsConfig(_Strict):
    """Pharmacist enrolment and sign-in/out at this terminal (`terminal.pharmacists`, docs/pharmacists.md): needs
    `[face]` (the same camera, models and liveness policy) and an enrolled identity (records are signed)."""

    gallery: Annotated[Path, Field(strict=False)] = Field(
        default=Path("pharmacist_gallery.sqlite3"),
        description="The pharmacists' sealed face templates (SQLite); relative paths are relative to the config.",
    )
    store: Annotated[Path, Field(strict=False)] = Field(
        default=Path("pharmacists.sqlite3"),
        description="Roster, consents and attendance sessions (SQLite); relative to the config file when relative.",
    )
    close_hour: int = Field(
        default=22,
        ge=1,
        le=24,
        description="Local hour at which open sessions are closed (sign-out reason 'auto_closed'); 24 = midnight.",
    )
    timezone: str = Field(default="Asia/Shanghai", description="IANA time zone of close_hour.")
    reverify_every_min: int | None = Field(
        default=None,
        ge=5,
        le=720,
        description="Re-verify a signed-in pharmacist's face this often (minutes); absent: never.",
    )
    consent_version: str = Field(
        default="2026-01",
        min_length=1,
        max_length=32,
        description="Version of the face-enrolment consent text the kiosk shows; recorded with each enrolment.",
    )

    @field_validator("timezone")
    @classmethod
    def _timezone_exists(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value


# ---------------------------------------------------------------- [pos_api]


class PosApiClientConfig(_Strict):
    """One pharmacy POS (收银/HIS client) allowed to call the local POS API (docs/pos-api.md).

    The HMAC key itself is not in this file (the config never holds secrets): it lives in `secret_file` (mode 0600,
    one line of at least 32 characters); the file pins its SM3 digest so a swapped or truncated key file is refused
    at start instead of failing every request."""

    client_id: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Sent as X-POS-Client."
    )
    secret_file: Annotated[Path, Field(strict=False)] = Field(
        description="File holding the shared secret (mode 0600); a relative path is taken relative to the config."
    )
    secret_sm3: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="SM3 digest (hex) of the secret, checked when the API starts."
    )


class PosApiConfig(_Strict):
    """The local HTTP API the pharmacy POS calls to have the kiosk verify a buyer (`terminal.pos_api`)."""

    enabled: bool = Field(default=False, description="Start the POS API with the terminal.")
    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        max_length=253,
        pattern=r"^[0-9A-Za-z.:_-]+$",
        description="Address to bind: 127.0.0.1 when the POS runs on the kiosk, the kiosk's LAN address otherwise.",
    )
    port: int = Field(default=18443, ge=1, le=65535, description="TCP port to bind.")
    timestamp_window_s: float = Field(
        default=60.0, gt=0, le=600, description="A request whose X-POS-Timestamp is further from now is refused."
    )
    state: Annotated[Path, Field(strict=False)] = Field(
        default=Path("pos_api.sqlite3"),
        description="SQLite file of transaction-code sequence and used nonces; relative to the config file.",
    )
    clients: list[PosApiClientConfig] = Field(default_factory=list, max_length=64, description="Allowed POS clients.")

    @model_validator(mode="after")
    def _clients_known(self) -> PosApiConfig:
        ids = [c.client_id for c in self.clients]
        if len(ids) != len(set(ids)):
            raise ValueError("client_id values must be unique")
        if self.enabled and not self.clients:
            raise ValueError("enabled = true needs at least one [[pos_api.clients]] entry")
        return self


class KioskConfig(_Strict):
    """The kiosk screen (`ui/`, docs/kiosk.md)."""

    admin_password_hash: str | None = Field(
        default=None,
        pattern=r"^\$argon2(id|i|d)\$",
        max_length=512,
        description="argon2 hash (PHC string) of the maintenance screen's password, never the password itself: "
        "python -c \"from argon2 import PasswordHasher as H; print(H().hash('…'))\". Absent: the "
        "YIBAO_KIOSK_ADMIN_HASH environment variable, else the maintenance screen cannot be opened on the kiosk.",
    )


class TerminalConfig(_Strict):
    """Everything a terminal needs to start: identity, versions, broker, outbox bounds, heartbeat, devices and the
    e-voucher platform."""

    schema_version: Literal[1] = Field(description="Shape of this file; older shapes are migrated on load.")
    config_version: _VersionString = Field(description="Version of this configuration bundle, reported upstream.")
    device_id: DeviceId
    software_version: _VersionString = Field(
        default_factory=installed_software_version,
        description="Terminal software version reported in heartbeats; defaults to the installed package version.",
    )
    mqtt: MqttConfig = Field(description="MQTT broker connection.")
    outbox: OutboxConfig = Field(description="Local outbox.")
    heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig, description="Heartbeat timer.")
    identity: IdentityConfig | None = Field(
        default=None, description="Enrolled device: identity directory; the signed bundle then decides id and broker."
    )
    devices: DevicesConfig = Field(
        default_factory=DevicesConfig, description="Peripheral backends; absent: every device simulated."
    )
    face: FaceConfig | None = Field(
        default=None, description="Face verification; absent: the kiosk offers no face path."
    )
    evoucher: EVoucherConfig = Field(
        default_factory=EVoucherConfig, description="E-voucher platform adapter; absent: none."
    )
    pos_api: PosApiConfig = Field(
        default_factory=PosApiConfig, description="Local API for the pharmacy POS; absent: disabled."
    )
    pharmacists: PharmacistsConfig | None = Field(
        default=None, description="Pharmacist enrolment and sign-in/out; absent: not offered on this terminal."
    )
    kiosk: KioskConfig = Field(default_factory=KioskConfig, description="The kiosk screen.")


def migrate(raw: RawConfig, *, source: str, migrations: Mapping[int, Migration] = MIGRATIONS) -> RawConfig:
    """Bring a raw config dict up to `CURRENT_SCHEMA_VERSION`, one registered step at a time.

    A version newer than this code, a non-integer version or a gap in the registry is refused: guessing what a newer
    file means is how a terminal ends up syncing to the wrong place.
    """
    version = raw.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError(f"{source}: schema_version: must be an integer (current is {CURRENT_SCHEMA_VERSION})")
    if version > CURRENT_SCHEMA_VERSION:
        raise ConfigError(
            f"{source}: schema_version: {version} is newer than this software understands "
            f"({CURRENT_SCHEMA_VERSION}); upgrade the terminal software first"
        )
    while version < CURRENT_SCHEMA_VERSION:
        step = migrations.get(version)
        if step is None:
            raise ConfigError(f"{source}: schema_version: no migration registered from version {version}")
        try:
            raw = step(dict(raw))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: schema_version: migration from version {version} failed: {exc}") from exc
        version += 1
        raw["schema_version"] = version
        logger.info("config %s migrated to schema version %d", source, version)
    return raw


def _describe(exc: ValidationError) -> str:
    # Only locations and messages: the input values are left out so a typo'd secret never reaches a log.
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


Overlay = Callable[[IdentityConfig], Mapping[str, Any]]
"""Given the file's (path-resolved) `[identity]` table: the values the signed bundle decides."""


def _merge_overlay(raw: RawConfig, overlay: Mapping[str, Any], *, source: str, where: str = "") -> RawConfig:
    merged = dict(raw)
    for key, value in overlay.items():
        name = f"{where}{key}"
        if isinstance(value, Mapping):
            current = merged.get(key, {})
            if not isinstance(current, dict):
                raise ConfigError(f"{source}: {name}: must be a table")
            merged[key] = _merge_overlay(current, value, source=source, where=f"{name}.")
        elif key in merged and merged[key] != value:
            raise ConfigError(
                f"{source}: {name}: the file says {merged[key]!r} but the signed identity bundle says {value!r}; "
                "remove the key from the file (the bundle decides it)"
            )
        else:
            merged[key] = value
    return merged


def identity_section(raw: RawConfig, *, source: str, base_dir: Path | None = None) -> IdentityConfig | None:
    """The `[identity]` table alone (paths resolved against `base_dir`), or None for a device without one."""
    table = raw.get("identity")
    if table is None:
        return None
    try:
        section = IdentityConfig.model_validate(table)
    except ValidationError as exc:
        raise ConfigError(f"{source}: identity.{_describe(exc)}") from exc
    if base_dir is not None:
        update: dict[str, Path] = {}
        if not section.dir.is_absolute():
            update["dir"] = base_dir / section.dir
        if section.passphrase_file is not None and not section.passphrase_file.is_absolute():
            update["passphrase_file"] = base_dir / section.passphrase_file
        section = section.model_copy(update=update)
    return section


def parse_terminal_config(
    raw: RawConfig,
    *,
    source: str,
    base_dir: Path | None = None,
    migrations: Mapping[int, Migration] = MIGRATIONS,
    overlay: Overlay | None = None,
) -> TerminalConfig:
    """Validate an already-parsed config dict (after migration); `source` names it in errors. With an `[identity]`
    table, `overlay` supplies what the signed bundle decides (without it such a file is refused)."""
    raw = migrate(raw, source=source, migrations=migrations)
    identity = identity_section(raw, source=source, base_dir=base_dir)
    if identity is not None:
        if overlay is None:
            raise ConfigError(f"{source}: identity: this config needs its identity loaded (use `yibao terminal run`)")
        raw = _merge_overlay(raw, overlay(identity), source=source)
        raw["identity"] = identity.model_dump()
    try:
        config = TerminalConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from exc
    if base_dir is not None and not config.outbox.path.is_absolute():
        outbox = config.outbox.model_copy(update={"path": base_dir / config.outbox.path})
        config = config.model_copy(update={"outbox": outbox})
    ss_reader = config.devices.ss_card_reader
    if (
        base_dir is not None
        and isinstance(ss_reader, SerialSsCardReaderConfig)
        and ss_reader.layout is not None
        and not ss_reader.layout.is_absolute()
    ):
        devices = config.devices.model_copy(
            update={"ss_card_reader": ss_reader.model_copy(update={"layout": base_dir / ss_reader.layout})}
        )
        config = config.model_copy(update={"devices": devices})
    if base_dir is not None and config.face is not None and not config.face.gallery.is_absolute():
        face = config.face.model_copy(update={"gallery": base_dir / config.face.gallery})
        config = config.model_copy(update={"face": face})
    if base_dir is not None and config.pharmacists is not None:
        ph = config.pharmacists
        paths = {
            name: path if path.is_absolute() else base_dir / path
            for name, path in (("gallery", ph.gallery), ("store", ph.store))
        }
        config = config.model_copy(update={"pharmacists": ph.model_copy(update=paths)})
    if base_dir is not None:
        pos = config.pos_api
        clients = [
            c if c.secret_file.is_absolute() else c.model_copy(update={"secret_file": base_dir / c.secret_file})
            for c in pos.clients
        ]
        state = pos.state if pos.state.is_absolute() else base_dir / pos.state
        config = config.model_copy(update={"pos_api": pos.model_copy(update={"clients": clients, "state": state})})
    return config


def load_terminal_config(
    path: Path | str, *, migrations: Mapping[int, Migration] = MIGRATIONS, overlay: Overlay | None = None
) -> TerminalConfig:
    """Read, migrate and validate the TOML config at `path`; any problem raises `ConfigError`."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_terminal_config(raw, source=str(path), base_dir=path.parent, migrations=migrations, overlay=overlay)
