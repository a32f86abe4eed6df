"""Machine callers over HTTP: HIS client administration and the two "who am I" checks.

Routes (policies in `sync_server.authz`): `POST /api/v1/his-clients` (device_admin creates a HIS client of an
institution; the secret is in this one answer only), `GET /api/v1/his-clients`, `POST
/api/v1/his-clients/{client_id}/revoke` (device_admin); `GET /his/v1/ping` (a HIS client checks its signing: who
it is and for which institution) and `GET /device/v1/whoami` (a terminal checks its device-API signing: its id,
institution and key id).

Creation and revocation are audited after the commit; a revocation is enforced by this process at once and by
every other process within `sync_server.signed_requests.CACHE_TTL_S`. It must never log or echo a secret except in
the creation answer.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from sync_server import signed_requests
from sync_server.api.deps import (
    AdminDep,
    ClockDep,
    DeviceCallerDep,
    HisCallDep,
    RuntimeDep,
    SessionDep,
    WriterSessionDep,
)
from sync_server.api.schemas import ErrorOut, model_response
from sync_server.db.models import Institution

router = APIRouter(tags=["machine clients"])

ClientIdPath = Annotated[str, Path(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HisClientIn(_In):
    institution_code: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")
    label: str = Field(min_length=1, max_length=100, description="Vendor / system name, for people.")


class HisClientOut(_Out):
    client_id: str
    institution_code: str
    label: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None

    @classmethod
    def of(cls, view: signed_requests.HisClientView) -> HisClientOut:
        return cls(
            client_id=view.client_id,
            institution_code=view.institution_code,
            label=view.label,
            created_at=view.created_at,
            created_by=view.created_by,
            revoked_at=view.revoked_at,
        )


class HisClientCreated(HisClientOut):
    secret: str = Field(description="HMAC-SM3 key, 64 hex characters. Shown once: store it in the HIS's vault.")


class HisClientList(_Out):
    items: list[HisClientOut]


class HisPingOut(_Out):
    client_id: str
    institution_code: str
    server_time: datetime


class DeviceWhoamiOut(_Out):
    device_id: str
    key_id: uuid.UUID
    institution_code: str | None
    server_time: datetime


@router.post(
    "/api/v1/his-clients",
    response_model=HisClientCreated,
    status_code=status.HTTP_201_CREATED,
    responses={404: {"model": ErrorOut}},
)
def create_his_client(
    body: HisClientIn, session: WriterSessionDep, runtime: RuntimeDep, clock: ClockDep, admin: AdminDep
) -> HisClientCreated:
    """Create a HIS client of an institution. The answer carries its secret; the server never shows it again."""
    try:
        with session.begin():
            view, secret = signed_requests.create_his_client(
                session,
                runtime.identity,
                institution_code=body.institution_code,
                label=body.label,
                actor=admin,
                now=clock.now(),
            )
    except signed_requests.UnknownInstitutionError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    runtime.audit.record("his_client.created", client_id=view.client_id, institution=view.institution_code, admin=admin)
    return HisClientCreated(**HisClientOut.of(view).model_dump(), secret=secret)


@router.get("/api/v1/his-clients", response_model=HisClientList)
def list_his_clients(session: SessionDep, _admin: AdminDep) -> HisClientList:
    return HisClientList(items=[HisClientOut.of(v) for v in signed_requests.list_his_clients(session)])


@router.post(
    "/api/v1/his-clients/{client_id}/revoke", response_model=HisClientOut, responses={404: {"model": ErrorOut}}
)
def revoke_his_client(
    client_id: ClientIdPath, session: WriterSessionDep, runtime: RuntimeDep, clock: ClockDep, admin: AdminDep
) -> HisClientOut:
    """Revoke a HIS client: its signatures stop verifying (here at once, in other server processes within 5 s)."""
    try:
        with session.begin():
            view = signed_requests.revoke_his_client(session, client_id, now=clock.now())
    except signed_requests.UnknownHisClientError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    runtime.requests.forget_his_client(client_id)
    runtime.audit.record("his_client.revoked", client_id=client_id, admin=admin)
    return HisClientOut.of(view)


@router.get("/his/v1/ping", response_model=HisPingOut)
async def his_ping(his: HisCallDep) -> Response:
    """Check the request signing: answers who the signature says you are, for which institution, and the server's
    time (a 401 `stale_timestamp` means your clock is off by more than 60 s)."""
    out = HisPingOut(client_id=his.client_id, institution_code=his.institution_code, server_time=his.now())
    return model_response(out)


@router.get("/device/v1/whoami", response_model=DeviceWhoamiOut)
def device_whoami(caller: DeviceCallerDep, session: SessionDep, clock: ClockDep) -> DeviceWhoamiOut:
    """Check the device-API signing: the device, the session key it signed with, and its institution."""
    code = (
        session.scalar(select(Institution.code).where(Institution.id == caller.institution_id))
        if caller.institution_id is not None
        else None
    )
    return DeviceWhoamiOut(
        device_id=caller.device_id, key_id=caller.key_id, institution_code=code, server_time=clock.now()
    )
