"""`yibao provision`: device administration for device admins.

Prints human-readable tables by default and one JSON document with `--json` for scripts. Enrolment, keys,
rotation and revocation arrive with device identity (SM2); today an admin can list and inspect devices.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from provisioning.client import ProvisioningError, ServerClient

app = typer.Typer(help="Device administration against the sync server (talks HTTP only).", no_args_is_help=True)

ServerOpt = Annotated[
    str, typer.Option("--server", envvar="YIBAO_SERVER_URL", help="Base URL of the sync server.", show_default=True)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")]


def _fail(exc: ProvisioningError) -> typer.Exit:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    return typer.Exit(2)


def _age(device: dict[str, Any]) -> str:
    hb = device.get("heartbeat") or {}
    depth = hb.get("outbox_depth")
    return "-" if depth is None else str(depth)


@app.command("list")
def list_devices(server: ServerOpt = "http://127.0.0.1:8000", as_json: JsonOpt = False) -> None:
    """List every device the server knows, with its online state and last heartbeat."""
    try:
        with ServerClient(server) as client:
            devices = client.list_devices()
    except ProvisioningError as exc:
        raise _fail(exc) from exc
    if as_json:
        print(json.dumps(devices, ensure_ascii=False))
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
    server: ServerOpt = "http://127.0.0.1:8000",
    as_json: JsonOpt = False,
) -> None:
    """Show one device in full: registration, link state, versions, outbox backlog, peripherals."""
    try:
        with ServerClient(server) as client:
            device = client.get_device(device_id)
    except ProvisioningError as exc:
        raise _fail(exc) from exc
    if as_json:
        print(json.dumps(device, ensure_ascii=False))
        return
    for key, value in device.items():
        if key == "heartbeat" and isinstance(value, dict):
            print("heartbeat:")
            for hk, hv in value.items():
                print(f"  {hk}: {json.dumps(hv, ensure_ascii=False)}")
        else:
            print(f"{key}: {value if value is not None else '-'}")
