"""The terminal config fails closed: every problem is a ConfigError naming the file and the field."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from terminal.config import (
    CURRENT_SCHEMA_VERSION,
    MIGRATIONS,
    RawConfig,
    TerminalConfig,
    installed_software_version,
    load_terminal_config,
)
from terminal.errors import ConfigError
from tests.terminal.conftest import terminal_raw_config, to_toml

DEMO_FILE = """\
schema_version = 1
config_version = "demo-1"
device_id = "SIM-0001"          # pattern as protocol.DeviceId
software_version = "0.1.0"
[mqtt]
host = "127.0.0.1"
port = 1883
keepalive_s = 30
topic_prefix = "yibao/v1"
reconnect_min_s = 0.5
reconnect_max_s = 30
[outbox]
path = "/var/lib/yibao/outbox.sqlite3"
max_bytes = 268435456           # disk bound
high_water_ratio = 0.8          # alarm 'outbox_high_water' above this
batch_size = 200
publish_timeout_s = 30          # no PUBACK within this -> row released for retry
retry_initial_s = 1.0
retry_max_s = 300.0
sent_retention_s = 86400        # server-acknowledged rows kept this long, then pruned
[heartbeat]
interval_s = 30
"""


def write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "terminal.toml"
    path.write_text(to_toml(raw), encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_terminal_config(path)
    return str(info.value)


def test_the_documented_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "terminal.toml"
    path.write_text(DEMO_FILE, encoding="utf-8")
    config = load_terminal_config(path)
    assert config.schema_version == CURRENT_SCHEMA_VERSION
    assert config.device_id == "SIM-0001"
    assert config.mqtt.port == 1883
    assert config.mqtt.reconnect_max_s == 30.0
    assert config.outbox.path == Path("/var/lib/yibao/outbox.sqlite3")
    assert config.outbox.max_bytes == 268435456
    assert config.heartbeat.interval_s == 30.0


def test_minimal_file_takes_documented_defaults(tmp_path: Path) -> None:
    path = tmp_path / "terminal.toml"
    path.write_text(
        'schema_version = 1\nconfig_version = "sim-1"\ndevice_id = "SIM-0002"\n'
        '[mqtt]\nhost = "127.0.0.1"\nport = 1884\n[outbox]\npath = "outbox.sqlite3"\n',
        encoding="utf-8",
    )
    config = load_terminal_config(path)
    assert config.software_version == installed_software_version()
    assert config.mqtt.topic_prefix == "yibao/v1"
    assert config.outbox.batch_size == 200
    assert config.heartbeat.interval_s == 30.0
    # A relative outbox path is anchored at the config file, not at whatever the working directory is.
    assert config.outbox.path == tmp_path / "outbox.sqlite3"


def test_every_field_is_described() -> None:
    def models_in(annotation: Any) -> list[type[Any]]:
        # A table, or each table of a `backend`-discriminated union / an optional table.
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    def undescribed(model: type[Any], where: str) -> list[str]:
        missing = []
        for name, info in model.model_fields.items():
            if not info.description:
                missing.append(f"{where}{name}")
            for table in models_in(info.annotation):
                missing += undescribed(table, f"{where}{name}.")
        return missing

    assert undescribed(TerminalConfig, "") == []
    assert "devices.qr_scanner.suffix" not in undescribed(TerminalConfig, "")  # the recursion reaches the unions
    assert len(models_in(TerminalConfig.model_fields["devices"].annotation)) == 1


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda raw: raw["mqtt"].update(colour="blue"), "mqtt.colour"),
        (lambda raw: raw.update(unknown_top_level=1), "unknown_top_level"),
        (lambda raw: raw["mqtt"].update(port="1883"), "mqtt.port"),
        (lambda raw: raw["outbox"].update(batch_size=2.5), "outbox.batch_size"),
        (lambda raw: raw["outbox"].update(high_water_ratio=1.5), "outbox.high_water_ratio"),
        (lambda raw: raw["mqtt"].pop("host"), "mqtt.host"),
        (lambda raw: raw.pop("device_id"), "device_id"),
        (lambda raw: raw["outbox"].pop("path"), "outbox.path"),
        (lambda raw: raw.update(device_id="bad id!"), "device_id"),
        (lambda raw: raw.update(device_id="ab"), "device_id"),
        (lambda raw: raw["outbox"].update(max_bytes=1024), "outbox.max_bytes"),
        (lambda raw: raw["mqtt"].update(topic_prefix="yibao/#"), "mqtt.topic_prefix"),
        (lambda raw: raw.update(kiosk={"admin_password_hash": "hunter2hunter2"}), "kiosk.admin_password_hash"),
    ],
    ids=[
        "unknown-key",
        "unknown-top-level-key",
        "port-as-string",
        "float-batch",
        "ratio-out-of-range",
        "missing-host",
        "missing-device-id",
        "missing-outbox-path",
        "bad-device-id",
        "short-device-id",
        "tiny-outbox",
        "wildcard-prefix",
        "a-password-not-its-hash",
    ],
)
def test_invalid_files_name_the_file_and_field(tmp_path: Path, mutate: Any, field: str) -> None:
    raw = terminal_raw_config(tmp_path)
    mutate(raw)
    path = write(tmp_path, raw)
    message = load_error(path)
    assert str(path) in message
    assert field in message


def test_cross_field_rule_is_reported(tmp_path: Path) -> None:
    raw = terminal_raw_config(tmp_path, outbox={"retry_initial_s": 10.0, "retry_max_s": 5.0})
    message = load_error(write(tmp_path, raw))
    assert "outbox" in message
    assert "retry_max_s" in message


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    raw = terminal_raw_config(tmp_path)
    raw["schema_version"] = CURRENT_SCHEMA_VERSION + 1
    message = load_error(write(tmp_path, raw))
    assert "schema_version" in message
    assert "newer" in message


@pytest.mark.parametrize("version", ['"1"', "true", "1.0"])
def test_non_integer_schema_version_is_refused(tmp_path: Path, version: str) -> None:
    path = tmp_path / "terminal.toml"
    path.write_text(DEMO_FILE.replace("schema_version = 1", f"schema_version = {version}"), encoding="utf-8")
    assert "schema_version" in load_error(path)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    assert "not found" in load_error(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("schema_version = \n", encoding="utf-8")
    message = load_error(broken)
    assert str(broken) in message
    assert "TOML" in message


def test_migrations_apply_in_order_up_to_current(tmp_path: Path) -> None:
    applied: list[int] = []

    def from_minus_one(raw: RawConfig) -> RawConfig:
        applied.append(-1)
        raw["device_id"] = raw.pop("terminal_id")  # an old name for the same thing
        return raw

    def from_zero(raw: RawConfig) -> RawConfig:
        applied.append(0)
        assert "device_id" in raw, "migrations must run in order"
        raw["mqtt"]["keepalive_s"] = raw["mqtt"].pop("keepalive")
        return raw

    raw = terminal_raw_config(tmp_path)
    raw["schema_version"] = -1
    raw["terminal_id"] = raw.pop("device_id")
    raw["mqtt"]["keepalive"] = raw["mqtt"].pop("keepalive_s")
    path = write(tmp_path, raw)

    # Registered out of order on purpose: the loader walks versions, not dict order.
    config = load_terminal_config(path, migrations={0: from_zero, -1: from_minus_one})
    assert applied == [-1, 0]
    assert config.schema_version == CURRENT_SCHEMA_VERSION
    assert config.device_id == "SIM-0001"
    assert config.mqtt.keepalive_s == 5


def test_gap_in_migrations_is_refused(tmp_path: Path) -> None:
    raw = terminal_raw_config(tmp_path)
    raw["schema_version"] = -1
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError, match="no migration registered from version -1"):
        load_terminal_config(path, migrations={0: lambda r: r})


def test_failing_migration_is_a_config_error(tmp_path: Path) -> None:
    raw = terminal_raw_config(tmp_path)
    raw["schema_version"] = 0
    path = write(tmp_path, raw)

    def broken(raw: RawConfig) -> RawConfig:
        raise KeyError("old_field")

    with pytest.raises(ConfigError, match="migration from version 0 failed"):
        load_terminal_config(path, migrations={0: broken})


def test_shipped_registry_reaches_current_version() -> None:
    assert all(v < CURRENT_SCHEMA_VERSION for v in MIGRATIONS)


DEVICES_FILE = """\
schema_version = 1
config_version = "kiosk-7"
device_id = "SIM-0007"
[mqtt]
host = "127.0.0.1"
port = 1883
[outbox]
path = "outbox.sqlite3"

[devices.id_card_reader]
backend = "serial"
port = "/dev/ttyUSB-idcard"       # udev symlink
baudrate = 115200

[devices.ss_card_reader]
backend = "serial"
port = "/dev/ttyUSB-sscard"
layout = "layouts/vendor-x.json"   # relative to this file's folder

[devices.qr_scanner]
backend = "serial"
port = "/dev/ttyACM-qr"
simulated_peer = true
suffix = "crlf"
prefix_hex = "02"
baudrate = 9600

[devices.camera]
backend = "simulated"

[evoucher]
platform = "http"
base_url = "https://evoucher.example.gov.cn"
timeout_s = 2.5
org_code = "H32058300001"
"""


def test_devices_and_evoucher_tables_load(tmp_path: Path) -> None:
    from terminal.config import SerialIdCardReaderConfig, SerialQrScannerConfig, SerialSsCardReaderConfig

    path = tmp_path / "terminal.toml"
    path.write_text(DEVICES_FILE, encoding="utf-8")
    config = load_terminal_config(path)
    assert config.schema_version == 1
    devices = config.devices
    id_reader, ss_reader, scanner = devices.id_card_reader, devices.ss_card_reader, devices.qr_scanner
    assert isinstance(id_reader, SerialIdCardReaderConfig)
    assert (id_reader.port, id_reader.baudrate, id_reader.simulated_peer) == ("/dev/ttyUSB-idcard", 115200, False)
    assert isinstance(ss_reader, SerialSsCardReaderConfig)
    assert ss_reader.layout == tmp_path / "layouts" / "vendor-x.json"
    assert ss_reader.baudrate is None
    assert isinstance(scanner, SerialQrScannerConfig)
    assert scanner.simulated_peer is True
    framing = scanner.scanner_config()
    assert (framing.suffix, framing.prefix, framing.baudrate) == ("crlf", b"\x02", 9600)
    assert config.devices.camera.backend == "simulated"
    assert config.evoucher.platform == "http"
    assert (config.evoucher.base_url, config.evoucher.timeout_s) == ("https://evoucher.example.gov.cn", 2.5)
    assert config.evoucher.org_code == "H32058300001"


def test_without_the_tables_every_device_is_simulated_and_no_platform(tmp_path: Path) -> None:
    config = load_terminal_config(write(tmp_path, terminal_raw_config(tmp_path)))
    assert {name: entry.backend for name, entry in config.devices} == {
        "id_card_reader": "simulated",
        "ss_card_reader": "simulated",
        "qr_scanner": "simulated",
        "camera": "simulated",
    }
    assert config.evoucher.platform == "none"


SERIAL_QR = {"backend": "serial", "port": "/dev/ttyACM0"}


@pytest.mark.parametrize(
    ("table", "value", "field"),
    [
        ("devices", {"printer": {"backend": "simulated"}}, "devices.printer"),
        ("devices", {"qr_scanner": {**SERIAL_QR, "colour": "blue"}}, "devices.qr_scanner.serial.colour"),
        ("devices", {"qr_scanner": {"backend": "usb-hid"}}, "devices.qr_scanner"),
        ("devices", {"qr_scanner": {"port": "/dev/ttyACM0"}}, "devices.qr_scanner"),
        ("devices", {"qr_scanner": {"backend": "serial"}}, "devices.qr_scanner.serial.port"),
        ("devices", {"qr_scanner": {**SERIAL_QR, "baudrate": "9600"}}, "devices.qr_scanner.serial.baudrate"),
        ("devices", {"qr_scanner": {**SERIAL_QR, "suffix": "tab"}}, "devices.qr_scanner.serial.suffix"),
        ("devices", {"qr_scanner": {**SERIAL_QR, "prefix_hex": "zz"}}, "devices.qr_scanner.serial.prefix_hex"),
        ("devices", {"id_card_reader": {**SERIAL_QR, "simulated_peer": "yes"}}, "id_card_reader.serial.simulated_peer"),
        ("devices", {"id_card_reader": {**SERIAL_QR, "baudrate": 12}}, "devices.id_card_reader.serial.baudrate"),
        ("devices", {"id_card_reader": {"backend": "serial", "port": ""}}, "devices.id_card_reader.serial.port"),
        ("devices", {"ss_card_reader": {**SERIAL_QR, "layout": 5}}, "devices.ss_card_reader.serial.layout"),
        ("devices", {"camera": {"backend": "usb"}}, "devices.camera"),
        ("devices", {"camera": {"backend": "opencv"}}, "devices.camera.opencv.rgb"),
        ("devices", {"camera": {"backend": "opencv", "rgb": 0, "width": 10}}, "devices.camera.opencv.width"),
        ("devices", {"camera": {"backend": "simulated", "index": 0}}, "devices.camera.simulated.index"),
        ("devices", "serial", "devices"),
        ("evoucher", {"platform": "sdk"}, "evoucher.platform"),
        ("evoucher", {"platform": "http", "org_code": "H1"}, "platform 'http' needs base_url and org_code"),
        ("evoucher", {"platform": "none", "base_url": "http://x.example"}, "platform is 'none'"),
        ("evoucher", {"platform": "http", "base_url": "ftp://x.example", "org_code": "H1"}, "evoucher.base_url"),
        ("evoucher", {"platform": "http", "base_url": "http://x.example", "org_code": 7}, "evoucher.org_code"),
        ("evoucher", {"timeout_s": "3"}, "evoucher.timeout_s"),
        ("evoucher", {"retries": 3}, "evoucher.retries"),
    ],
)
def test_bad_devices_and_evoucher_tables_fail_closed(tmp_path: Path, table: str, value: Any, field: str) -> None:
    raw = terminal_raw_config(tmp_path)
    raw.pop(table, None)
    path = tmp_path / "terminal.toml"
    # Top-level keys come before any table header, so the inline value goes first.
    path.write_text(f"{table} = {_inline(value)}\n" + to_toml(raw), encoding="utf-8")
    message = load_error(path)
    assert str(path) in message
    assert field in message


def _inline(value: Any) -> str:
    """A TOML inline value (tables included), enough for these cases."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


POS_CLIENT = {"client_id": "his-01", "secret_file": "his-01.secret", "secret_sm3": "a" * 64}


def _write_with_pos_api(tmp_path: Path, raw: dict[str, Any], pos_api: dict[str, Any]) -> Path:
    # The conftest writer knows no arrays of tables ([[pos_api.clients]]); tomli-w writes that part.
    path = write(tmp_path, raw)
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n" + tomli_w.dumps({"pos_api": pos_api}))
    return path


def test_pos_api_table_loads_with_paths_anchored(tmp_path: Path) -> None:
    raw = terminal_raw_config(tmp_path)
    table = {"enabled": True, "host": "192.168.1.20", "port": 18500, "clients": [POS_CLIENT]}
    config = load_terminal_config(_write_with_pos_api(tmp_path, raw, table))
    pos = config.pos_api
    assert (pos.enabled, pos.host, pos.port, pos.timestamp_window_s) == (True, "192.168.1.20", 18500, 60.0)
    assert pos.clients[0].secret_file == tmp_path / "his-01.secret"
    assert pos.state == tmp_path / "pos_api.sqlite3"


def test_without_the_pos_api_table_it_is_disabled_on_localhost(tmp_path: Path) -> None:
    config = load_terminal_config(write(tmp_path, terminal_raw_config(tmp_path)))
    assert (config.pos_api.enabled, config.pos_api.host, config.pos_api.clients) == (False, "127.0.0.1", [])


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"enabled": True}, "needs at least one [[pos_api.clients]]"),
        ({"port": 0}, "pos_api.port"),
        ({"port": "18443"}, "pos_api.port"),
        ({"timestamp_window_s": 3600}, "pos_api.timestamp_window_s"),
        ({"clients": [{**POS_CLIENT, "secret": "inline"}]}, "pos_api.clients.0.secret"),
        ({"clients": [{**POS_CLIENT, "secret_sm3": "xyz"}]}, "pos_api.clients.0.secret_sm3"),
        ({"clients": [{**POS_CLIENT, "client_id": "his 01"}]}, "pos_api.clients.0.client_id"),
        ({"clients": [POS_CLIENT, POS_CLIENT]}, "client_id values must be unique"),
    ],
)
def test_bad_pos_api_tables_fail_closed(tmp_path: Path, value: dict[str, Any], field: str) -> None:
    raw = terminal_raw_config(tmp_path)
    path = _write_with_pos_api(tmp_path, raw, value)
    message = load_error(path)
    assert str(path) in message
    assert field in message
