"""`yibao provision`: device administration for device admins.

Owns the admin commands (`register`, `reset`, `revoke`, `list`, `show`), their output and their exit codes. Progress
goes to stderr, results to stdout; `--json` prints exactly one JSON object. It talks to the server over HTTP only
and never imports server or terminal code; the device-side commands (`enrol`, `rotate`) need the device's key store
(`terminal.identity`) and are added to this group by the `yibao` composition root (docs/identity.md explains why).
It must never print a private key, a broker password or the admin token.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, NoReturn

import typer

from protocol.enrolment import EnrolCode
from protocol.envelope import ContractError
from provisioning.client import EXIT_USAGE, ProvisioningError, ServerClient

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 2 usage (bad option, bad enrol code, missing token); 3 refused by the server (token "
    "invalid/expired/used, already enrolled, revoked, not found, not authorised); 4 network (server unreachable); "
    "5 local key/bundle problem (wrong passphrase, bundle signature fails, server key not the pinned one)."
)

app = typer.Typer(
    help="Device administration and enrolment against the sync server. " + EXIT_CODES_HELP,
    no_args_is_help=True,
)

ServerOpt = Annotated[
    str, typer.Option("--server", envvar="YIBAO_SERVER_URL", help="Base URL of the sync server.", show_default=True)
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="YIBAO_ADMIN_TOKEN", help="Admin bearer token (`yibao server admin-token create`)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
DEFAULT_SERVER = "http://127.0.0.1:8000"


def progress(message: str) -> None:
    typer.echo(message, err=True)


def fail(message: str, code: int) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def emit(result: dict[str, Any], *, as_json: bool, text: str) -> None:
    print(json.dumps(result, ensure_ascii=False) if as_json else text)


def _need_token(token: str | None) -> str:
    if not token:
        fail("an admin token is needed: --token or YIBAO_ADMIN_TOKEN", EXIT_USAGE)
    return token


def enrol_code_for(answer: dict[str, Any], server_url: str) -> str:
    """The `YB1:…` code a device admin carries to the device (server URL, device id, claim token, fingerprint)."""
    try:
        return EnrolCode(
            server_url=server_url,
            device_id=answer["device_id"],
            claim_token=answer["claim_token"],
            server_fingerprint=answer["server_fingerprint"],
        ).encode()
    except (KeyError, ValueError) as exc:
        raise ProvisioningError(f"the server's answer does not make an enrolment code: {exc}") from exc


def _claim_result(answer: dict[str, Any], server_url: str, *, as_json: bool) -> None:
    code = enrol_code_for(answer, server_url)
    result = {
        "device_id": answer["device_id"],
        "state": answer.get("state"),
        "claim_expires_at": answer.get("claim_expires_at"),
        "server_fingerprint": answer.get("server_fingerprint"),
        "enrol_code": code,
    }
    progress(
        f"device {answer['device_id']} is {answer.get('state')}; the enrol code below is single-use and expires at "
        f"{answer.get('claim_expires_at')}. On the device: yibao provision enrol CODE --identity-dir DIR"
    )
    emit(result, as_json=as_json, text=code)


@app.command("register")
def register(
    device_id: Annotated[str, typer.Argument(help="The new device's id, e.g. KS-0001.")],
    institution_id: Annotated[str | None, typer.Option(help="Institution the device belongs to.")] = None,
    hardware_id: Annotated[str | None, typer.Option(help="Expected hardware id (board serial), if known.")] = None,
    claim_ttl_s: Annotated[int | None, typer.Option(min=60, help="Claim token lifetime, seconds.")] = None,
    public_url: Annotated[
        str | None, typer.Option(help="Server URL the DEVICE uses, if not the same as --server.")
    ] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a device and print its one-time enrol code (YB1:…). See the exit codes in `yibao provision -h`."""
    admin_token = _need_token(token)
    progress(f"registering {device_id} at {server} …")
    try:
        with ServerClient(server, token=admin_token) as client:
            answer = client.register(
                device_id, institution_id=institution_id, hardware_id=hardware_id, claim_ttl_s=claim_ttl_s
            )
        _claim_result(answer, public_url or server, as_json=as_json)
    except ProvisioningError as exc:
        fail(str(exc), exc.exit_code)


@app.command("reset")
def reset(
    device_id: Annotated[str, typer.Argument(help="The device to reset (its keys are retired).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the server's audit log).")],
    public_url: Annotated[str | None, typer.Option(help="Server URL the DEVICE uses, if not --server.")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Return a device to 'registered' (keys retired) and print a new enrol code for re-enrolment."""
    admin_token = _need_token(token)
    progress(f"resetting {device_id} …")
    try:
        with ServerClient(server, token=admin_token) as client:
            answer = client.reset(device_id, reason=reason)
        _claim_result(answer, public_url or server, as_json=as_json)
    except ProvisioningError as exc:
        fail(str(exc), exc.exit_code)


@app.command("revoke")
def revoke(
    device_id: Annotated[str, typer.Argument(help="The device to cut off.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the server's audit log).")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a device: broker access removed at once, sessions revoked, its frames refused."""
    admin_token = _need_token(token)
    progress(f"revoking {device_id} …")
    try:
        with ServerClient(server, token=admin_token) as client:
            answer = client.revoke(device_id, reason=reason)
    except ProvisioningError as exc:
        fail(str(exc), exc.exit_code)
    emit(answer, as_json=as_json, text=f"{device_id}: {answer.get('state')} at {answer.get('revoked_at')}")


def _age(device: dict[str, Any]) -> str:
    hb = device.get("heartbeat") or {}
    depth = hb.get("outbox_depth")
    return "-" if depth is None else str(depth)


@app.command("list")
def list_devices(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List every device the server knows, with its online state and last heartbeat."""
    try:
        with ServerClient(server, token=token) as client:
            devices = client.list_devices()
    except ProvisioningError as exc:
        fail(str(exc), exc.exit_code)
    if as_json:
        print(json.dumps({"items": devices}, ensure_ascii=False))
        return
    if not devices:
        print("no devices")
        return
    header = f"{'DEVICE':<20} {'STATE':<8} {'LAST HEARTBEAT':<27} {'VERSION':<10} {'OUTBOX':>6}"
    print(header)
    for d in devices:
        state = "online" if d.get("online") else "offline"
        print(
            f"{d['device_id']:<20} {state:<8} {d.get('last_heartbeat_at') or '-':<27} "
            f"{d.get('software_version') or '-':<10} {_age(d):>6}"
        )


@app.command("show")
def show_device(
    device_id: Annotated[str, typer.Argument(help="The device id, e.g. SIM-0001.")],
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one device in full: registration, link state, versions, outbox backlog, peripherals; with a token also
    its provisioning record (state, key epoch)."""
    try:
        with ServerClient(server, token=token) as client:
            device = client.get_device(device_id)
            if token:
                device["provisioning"] = client.provisioning_device(device_id)
    except ProvisioningError as exc:
        fail(str(exc), exc.exit_code)
    if as_json:
        print(json.dumps(device, ensure_ascii=False))
        return
    for key, value in device.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for hk, hv in value.items():
                print(f"  {hk}: {json.dumps(hv, ensure_ascii=False)}")
        else:
            print(f"{key}: {value if value is not None else '-'}")


def decode_code(text: str) -> EnrolCode:
    """The enrol code, or exit 2 with what is wrong with it."""
    try:
        return EnrolCode.decode(text)
    except ContractError as exc:
        fail(str(exc), EXIT_USAGE)
