"""`/api/v1/provisioning/…`, `/api/v1/devices/{id}/sessions` and `/api/v1/server-identity`: device identity over HTTP.

Admin routes (bearer admin token): register, reset, revoke, list and show devices. Device routes (no admin token;
the device proves itself): enrol (claim token + proof of possession), rotate (signature by the current key) and the
session handshake (signature by the current key). Every refusal of a device route that docs/identity.md names is
recorded in `security_events` (in its own transaction, so the refused request's rollback does not take it along)
and in the server's audit chain, as is every admin action. Broker users follow the device: created inside the
enrolment transaction (a broker failure rolls the enrolment back, the token stays usable), password changed on
rotation, deleted after a revoke or reset commits. The domain rules live in `sync_server.provisioning`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from protocol.enrolment import EnrolRequest, EnrolResponse, Fingerprint, HardwareId, RotateRequest
from protocol.secure import PublicKeyHex, SessionGrant, SessionRequest
from sync_server.api.deps import AdminDep, ClockDep, RuntimeDep, SessionDep, require_admin
from sync_server.api.devices import DEVICE_ID_PATTERN, DeviceIdPath
from sync_server.api.schemas import ErrorOut
from sync_server.broker_admin import BrokerAdminError
from sync_server.db.models import Device, DeviceKey, Event, RegistrationState
from sync_server.identity import new_broker_password
from sync_server.provisioning import (
    Claim,
    Enrolled,
    ProvisioningRefusedError,
    enrol_device,
    grant_device_session,
    make_bundle,
    record_security_event,
    register_device,
    reset_device,
    resolve_institution,
    revoke_device,
    rotate_device_key,
)
from sync_server.runtime import ServerRuntime
from sync_server.store import is_online

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["provisioning"])
MAX_PAGE = 1000


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class RegisterIn(_In):
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    institution_id: int | str | None = Field(
        default=None, description="The institution: its database id, or its 医保 code (定点机构编码)."
    )
    hardware_id: HardwareId | None = Field(default=None, description="Only this hardware may enrol, if given.")
    claim_ttl_s: int = Field(default=86400, ge=60, le=30 * 86400, description="Lifetime of the claim token.")


class ReasonIn(_In):
    reason: str = Field(min_length=1, max_length=200)
    claim_ttl_s: int = Field(default=86400, ge=60, le=30 * 86400, description="Reset only: claim token lifetime.")


class ClaimOut(_Out):
    device_id: str
    state: RegistrationState
    claim_token: str = Field(description="Shown once; the server keeps only its SHA-256.")
    claim_expires_at: datetime
    server_fingerprint: Fingerprint


class RevokeOut(_Out):
    device_id: str
    state: Literal["revoked"]
    revoked_at: datetime
    broker: str = Field(description="What happened on the broker: 'deleted', 'not managed' or 'failed: …'.")


class ServerIdentityOut(_Out):
    public_key: PublicKeyHex
    fingerprint: Fingerprint


class ProvisionedDeviceOut(_Out):
    device_id: str
    state: RegistrationState
    key_epoch: int | None
    fingerprint: str | None = Field(description="Fingerprint of the current identity key.")
    hardware_id: str | None
    expected_hardware_id: str | None
    institution_code: str | None
    enrolled_at: datetime | None
    revoked_at: datetime | None
    state_reason: str | None
    last_seen: datetime | None
    online: bool


class ProvisionedDeviceList(_Out):
    items: list[ProvisionedDeviceOut]
    total: int


# ---------------------------------------------------------------------------------------------------- helpers


def _http(exc: ProvisioningRefusedError) -> HTTPException:
    return HTTPException(status_code=exc.status, detail=exc.detail)


def _record_refusal(runtime: ServerRuntime, exc: ProvisioningRefusedError, *, device_id: str, route: str) -> None:
    if exc.kind is None:
        return
    now = runtime.clock.now()
    with runtime.writer_sessions.begin() as session:
        record_security_event(session, at=now, device_id=device_id, kind=exc.kind, detail=f"{route}: {exc.detail}")
    runtime.audit.record("security.refused", device_id=device_id, kind=exc.kind, route=route, detail=exc.detail)
    logger.warning("refused %s for device %s: %s", route, device_id, exc.detail)


def _claim_out(runtime: ServerRuntime, claim: Claim) -> ClaimOut:
    return ClaimOut(
        device_id=claim.device_id,
        state=claim.state,
        claim_token=claim.claim_token,
        claim_expires_at=claim.claim_expires_at,
        server_fingerprint=runtime.identity.public_key().fingerprint(),
    )


def _server_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _enrol_response(
    runtime: ServerRuntime, session: Session, enrolled: Enrolled, *, server_url: str, password: str
) -> EnrolResponse:
    device = enrolled.device
    code = device.institution.code if device.institution is not None else None
    bundle = make_bundle(
        runtime.settings,
        runtime.identity.private_key(),
        device=device,
        device_key=enrolled.key,
        key_epoch=enrolled.key_epoch,
        institution_code=code,
        server_url=server_url,
        now=runtime.clock.now(),
        seq_floor=session.scalar(select(func.max(Event.seq)).where(Event.device_id == device.device_id)) or 0,
    )
    return EnrolResponse(bundle=bundle, broker_password=password)


def _device_out(session: Session, device: Device, now: datetime) -> ProvisionedDeviceOut:
    fingerprint = None
    if device.key_epoch is not None:
        fingerprint = session.scalar(
            select(DeviceKey.fingerprint).where(
                DeviceKey.device_id == device.device_id, DeviceKey.key_epoch == device.key_epoch
            )
        )
    return ProvisionedDeviceOut(
        device_id=device.device_id,
        state=device.registration,
        key_epoch=device.key_epoch,
        fingerprint=fingerprint,
        hardware_id=device.hardware_id,
        expected_hardware_id=device.expected_hardware_id,
        institution_code=device.institution.code if device.institution is not None else None,
        enrolled_at=device.enrolled_at,
        revoked_at=device.revoked_at,
        state_reason=device.state_reason,
        last_seen=device.last_seen_at,
        online=is_online(device.link_state, device.heartbeat_expires_at, now),
    )


def _remove_from_broker(runtime: ServerRuntime, device_id: str) -> str:
    try:
        return runtime.broker_admin.remove_device(device_id)
    except BrokerAdminError as exc:
        logger.error("could not delete broker user of %s: %s", device_id, exc)
        return f"failed: {exc}"


# ---------------------------------------------------------------------------------------------------- open


@router.get("/server-identity", response_model=ServerIdentityOut)
def server_identity(runtime: RuntimeDep) -> ServerIdentityOut:
    """The server's SM2 public key; devices pin it (the enrol code carries its fingerprint)."""
    key = runtime.identity.public_key()
    return ServerIdentityOut(public_key=key.hex(), fingerprint=key.fingerprint())


# ---------------------------------------------------------------------------------------------------- admin

_ADMIN = [Depends(require_admin)]
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut},
    404: {"model": ErrorOut},
    409: {"model": ErrorOut},
}


@router.post("/provisioning/devices", response_model=ClaimOut, status_code=status.HTTP_201_CREATED, responses=_ERRORS)
def register(body: RegisterIn, runtime: RuntimeDep, admin: AdminDep) -> ClaimOut:
    """Register a device and issue its one-time claim token (shown once)."""
    now = runtime.clock.now()
    try:
        with runtime.writer_sessions.begin() as session:
            institution = resolve_institution(session, body.institution_id)
            claim = register_device(
                session,
                device_id=body.device_id,
                institution_id=institution,
                hardware_id=body.hardware_id,
                claim_ttl_s=body.claim_ttl_s,
                now=now,
                created_by=admin,
            )
    except ProvisioningRefusedError as exc:
        raise _http(exc) from exc
    runtime.audit.record("device.registered", device_id=body.device_id, admin=admin)
    return _claim_out(runtime, claim)


@router.post("/provisioning/devices/{device_id}/reset", response_model=ClaimOut, responses=_ERRORS)
def reset(device_id: DeviceIdPath, body: ReasonIn, runtime: RuntimeDep, admin: AdminDep) -> ClaimOut:
    """Back to 'registered' with a new claim token: keys retired, sessions revoked, broker user deleted."""
    try:
        with runtime.writer_sessions.begin() as session:
            claim = reset_device(
                session,
                device_id,
                reason=body.reason,
                claim_ttl_s=body.claim_ttl_s,
                now=runtime.clock.now(),
                created_by=admin,
            )
    except ProvisioningRefusedError as exc:
        raise _http(exc) from exc
    runtime.security.forget_device(device_id)
    broker = _remove_from_broker(runtime, device_id)
    runtime.audit.record("device.reset", device_id=device_id, admin=admin, reason=body.reason, broker=broker)
    return _claim_out(runtime, claim)


@router.post("/provisioning/devices/{device_id}/revoke", response_model=RevokeOut, responses=_ERRORS)
def revoke(device_id: DeviceIdPath, body: ReasonIn, runtime: RuntimeDep, admin: AdminDep) -> RevokeOut:
    """Revoke at once: ingest refuses the device within its key-cache TTL; its broker user is deleted (kicked)."""
    try:
        with runtime.writer_sessions.begin() as session:
            device = revoke_device(session, device_id, reason=body.reason, now=runtime.clock.now())
            revoked_at = device.revoked_at
    except ProvisioningRefusedError as exc:
        raise _http(exc) from exc
    runtime.security.forget_device(device_id)
    broker = _remove_from_broker(runtime, device_id)
    runtime.audit.record("device.revoked", device_id=device_id, admin=admin, reason=body.reason, broker=broker)
    logger.warning("device %s revoked by %s; broker: %s", device_id, admin, broker)
    return RevokeOut(device_id=device_id, state="revoked", revoked_at=revoked_at or runtime.clock.now(), broker=broker)


@router.get("/provisioning/devices", response_model=ProvisionedDeviceList, dependencies=_ADMIN)
def list_provisioned(
    session: SessionDep,
    clock: ClockDep,
    state: RegistrationState | None = None,
    limit: int = 500,
    offset: int = 0,
) -> ProvisionedDeviceList:
    limit = max(1, min(limit, MAX_PAGE))
    conditions = [Device.registration == state] if state is not None else []
    total = session.scalar(select(func.count()).select_from(Device).where(*conditions)) or 0
    rows = session.scalars(
        select(Device)
        .options(selectinload(Device.institution))
        .where(*conditions)
        .order_by(Device.device_id)
        .limit(limit)
        .offset(max(0, offset))
    )
    now = clock.now()
    return ProvisionedDeviceList(items=[_device_out(session, d, now) for d in rows], total=total)


@router.get(
    "/provisioning/devices/{device_id}",
    response_model=ProvisionedDeviceOut,
    dependencies=_ADMIN,
    responses={404: {"model": ErrorOut}},
)
def show_provisioned(device_id: DeviceIdPath, session: SessionDep, clock: ClockDep) -> ProvisionedDeviceOut:
    device = session.scalar(
        select(Device).options(selectinload(Device.institution)).where(Device.device_id == device_id)
    )
    if device is None:
        raise HTTPException(status_code=404, detail=f"device {device_id!r} is not known to this server")
    return _device_out(session, device, clock.now())


# ---------------------------------------------------------------------------------------------------- device

_DEVICE_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorOut},
    401: {"model": ErrorOut},
    403: {"model": ErrorOut},
    409: {"model": ErrorOut},
    503: {"model": ErrorOut},
}


@router.post("/provisioning/enrol", response_model=EnrolResponse, responses=_DEVICE_ERRORS)
def enrol(body: EnrolRequest, request: Request, runtime: RuntimeDep) -> EnrolResponse:
    """Enrol with a claim token and a proof of possession of the new key; answers the signed config bundle and the
    broker password (secret). Token use, key and broker user commit together or not at all."""
    password = new_broker_password()
    try:
        with runtime.writer_sessions.begin() as session:
            enrolled = enrol_device(session, body, now=runtime.clock.now())
            response = _enrol_response(runtime, session, enrolled, server_url=_server_url(request), password=password)
            try:
                broker = runtime.broker_admin.add_device(body.device_id, password)
            except BrokerAdminError as exc:
                logger.error("enrolment of %s rolled back: %s", body.device_id, exc)
                raise HTTPException(status_code=503, detail="the broker could not create the device's user") from exc
    except ProvisioningRefusedError as exc:
        _record_refusal(runtime, exc, device_id=body.device_id, route="enrol")
        raise _http(exc) from exc
    runtime.security.forget_device(body.device_id)
    runtime.audit.record(
        "device.enrolled",
        device_id=body.device_id,
        key_epoch=enrolled.key_epoch,
        fingerprint=enrolled.key.fingerprint(),
        hardware_id=body.hardware_id,
        broker=broker,
    )
    logger.info("device %s enrolled (key epoch %d, broker %s)", body.device_id, enrolled.key_epoch, broker)
    return response


@router.post("/provisioning/devices/{device_id}/rotate", response_model=EnrolResponse, responses=_DEVICE_ERRORS)
def rotate(device_id: DeviceIdPath, body: RotateRequest, request: Request, runtime: RuntimeDep) -> EnrolResponse:
    """A new identity key (epoch + 1) signed by the current and the new key; new bundle and broker password."""
    if body.device_id != device_id:
        raise HTTPException(status_code=400, detail="the device id in the path and in the request differ")
    password = new_broker_password()
    try:
        with runtime.writer_sessions.begin() as session:
            enrolled = rotate_device_key(session, body, now=runtime.clock.now())
            response = _enrol_response(runtime, session, enrolled, server_url=_server_url(request), password=password)
            try:
                broker = runtime.broker_admin.set_password(device_id, password)
            except BrokerAdminError as exc:
                logger.error("key rotation of %s rolled back: %s", device_id, exc)
                raise HTTPException(
                    status_code=503, detail="the broker could not change the device's password"
                ) from exc
    except ProvisioningRefusedError as exc:
        _record_refusal(runtime, exc, device_id=device_id, route="rotate")
        raise _http(exc) from exc
    runtime.security.forget_device(device_id)
    runtime.audit.record(
        "device.rotated",
        device_id=device_id,
        key_epoch=enrolled.key_epoch,
        fingerprint=enrolled.key.fingerprint(),
        broker=broker,
    )
    return response


@router.post("/devices/{device_id}/sessions", response_model=SessionGrant, responses=_DEVICE_ERRORS)
def open_session(device_id: DeviceIdPath, body: SessionRequest, runtime: RuntimeDep) -> SessionGrant:
    """The session handshake: a request signed by the device's current identity key → a grant signed by the
    server; both sides derive the session key (never sent)."""
    if body.device_id != device_id:
        raise HTTPException(status_code=400, detail="the device id in the path and in the request differ")
    try:
        with runtime.writer_sessions.begin() as session:
            grant = grant_device_session(
                session,
                body,
                identity=runtime.identity,
                lifetime=timedelta(seconds=runtime.settings.session_lifetime_s),
                now=runtime.clock.now(),
            )
    except ProvisioningRefusedError as exc:
        _record_refusal(runtime, exc, device_id=device_id, route="session")
        raise _http(exc) from exc
    return grant
