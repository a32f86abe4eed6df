"""`/api/v1/devices/{id}/commands` and `/api/v1/commands/{command_id}`: issue a command to a device and follow it.

Owns request validation for commands (the kind's closed argument model, the TTL bound), queuing (a row in
`device_commands` in state `queued`, then a wake-up of the dispatcher, which publishes it) and the read views. The
state machine itself lives in `sync_server.commands`.

Authentication: an admin bearer token (the app mounts this router behind `require_admin`); every issued command is
recorded in the server's audit chain with the admin token's name. It must never publish to MQTT itself,
never change a command's state after queuing it, and never accept arguments the kind's model refuses.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from protocol import CommandKind, ContractError, parse_command_args
from sync_server.api.deps import AdminDep, ClockDep, RuntimeDep, SessionDep, SettingsDep, WriterSessionDep
from sync_server.api.devices import DeviceIdPath, get_device_or_404
from sync_server.api.schemas import CommandIn, CommandOut, CommandPage, ErrorOut, UnprocessableOut
from sync_server.commands import issue_command
from sync_server.db.models import IssuedCommand

router = APIRouter(prefix="/api/v1", tags=["commands"])

BINDING_KINDS = frozenset({CommandKind.UNBIND, CommandKind.BINDING_DECISION})

MAX_PAGE = 500


@router.post(
    "/devices/{device_id}/commands",
    response_model=CommandOut,
    status_code=status.HTTP_201_CREATED,
    responses={404: {"model": ErrorOut}, 422: {"model": UnprocessableOut}},
)
def create_command(
    device_id: DeviceIdPath,
    body: CommandIn,
    session: WriterSessionDep,
    settings: SettingsDep,
    clock: ClockDep,
    runtime: RuntimeDep,
    admin: AdminDep,
) -> CommandOut:
    """Queue a command for a known device; it is published at once if the server's broker session is up, and again
    when the device comes back online, until it is answered or expires."""
    if body.ttl_s > settings.command_max_ttl_s:
        raise HTTPException(
            status_code=422, detail=f"ttl_s must be at most {settings.command_max_ttl_s:g} s on this server"
        )
    if body.kind in BINDING_KINDS:
        # The binding routes write the history row with the command; issued bare, the terminal and the server's
        # record of the device's institution would disagree (docs/binding.md).
        raise HTTPException(status_code=422, detail=f"{body.kind.value} is issued by the binding routes only")
    try:
        parse_command_args(body.kind, body.args)
    except ContractError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    with session.begin():
        get_device_or_404(session, device_id)
        row = issue_command(
            session, device_id=device_id, kind=body.kind, args=body.args, ttl_s=body.ttl_s, now=clock.now()
        )
        out = CommandOut.of(row)
    runtime.audit.record(
        "command.issued", device_id=device_id, command_id=str(out.command_id), kind=body.kind, admin=admin
    )
    if runtime.dispatcher is not None:
        runtime.dispatcher.wake()
    return out


@router.get("/devices/{device_id}/commands", response_model=CommandPage, responses={404: {"model": ErrorOut}})
def list_commands(
    device_id: DeviceIdPath,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> CommandPage:
    """A device's commands, newest first."""
    get_device_or_404(session, device_id)
    return command_page(session, device_id, limit=limit, offset=offset)


def command_page(session: Session, device_id: str, *, limit: int, offset: int = 0) -> CommandPage:
    total = session.scalar(select(func.count()).select_from(IssuedCommand).where(IssuedCommand.device_id == device_id))
    rows = session.scalars(
        select(IssuedCommand)
        .where(IssuedCommand.device_id == device_id)
        .order_by(IssuedCommand.issued_at.desc(), IssuedCommand.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return CommandPage(items=[CommandOut.of(row) for row in rows], total=total or 0)


@router.get("/commands/{command_id}", response_model=CommandOut, responses={404: {"model": ErrorOut}})
def get_command(command_id: uuid.UUID, session: SessionDep) -> CommandOut:
    row = session.scalar(select(IssuedCommand).where(IssuedCommand.command_id == command_id))
    if row is None:
        raise HTTPException(status_code=404, detail=f"command {command_id} is not known to this server")
    return CommandOut.of(row)
