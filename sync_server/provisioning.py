"""Device life cycle on the server: register, enrol, rotate, reset, revoke, and session grants (docs/identity.md).

Owns the state machine (unprovisioned → registered → enrolled → revoked; reset returns to registered), single-use
claim tokens (marked used by a conditional UPDATE in the transaction that stores the key, so two concurrent enrolments
cannot both succeed), identity keys by epoch (retired keys are kept to verify old signed records; epochs keep rising
across resets), session keys sealed at rest, and recording refusals in `security_events`.

Functions work inside the caller's transaction and never commit; they raise `ProvisioningRefusedError` with the HTTP
status and the text to show. They must never log or store a token, a password or key material in clear.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from protocol.enrolment import (
    BundleMqtt,
    BundleSession,
    ConfigBundle,
    EnrolRequest,
    RotateRequest,
    SignedBundle,
    check_enrol_proof,
    check_rotate_request,
    claim_token_digest,
    sign_bundle,
)
from protocol.gm.errors import InvalidSignatureError, KeyFormatError
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey
from protocol.secure import MAX_CLOCK_SKEW, HandshakeError, SessionGrant, SessionRequest, grant_session
from sync_server.db.models import (
    AdminToken,
    ClaimToken,
    Device,
    DeviceKey,
    DeviceSession,
    Institution,
    LinkStateColumn,
    RegistrationState,
    SecurityEvent,
)
from sync_server.errors import ServerError
from sync_server.identity import ServerIdentity, new_token, token_digest
from sync_server.settings import ServerSettings

logger = logging.getLogger(__name__)

CLAIM_REFUSED = "claim token invalid, expired or already used"
"""One message for all three, so a guesser learns nothing."""


class ProvisioningRefusedError(ServerError):
    """A provisioning request that is refused; `status` is the HTTP status, `kind` the security-event kind if the
    refusal is one to record."""

    def __init__(self, status: int, detail: str, *, kind: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Claim:
    device_id: str
    state: RegistrationState
    claim_token: str
    claim_expires_at: datetime


def _device_or_404(session: Session, device_id: str, *, lock: bool = False) -> Device:
    stmt = select(Device).where(Device.device_id == device_id)
    if lock:
        stmt = stmt.with_for_update()
    device = session.scalar(stmt)
    if device is None:
        raise ProvisioningRefusedError(404, f"device {device_id!r} is not known to this server")
    return device


def resolve_institution(session: Session, ref: int | str | None) -> int | None:
    """An institution by database id (int) or by its 医保 code (str); 422 when unknown."""
    if ref is None:
        return None
    if isinstance(ref, int):
        found = session.get(Institution, ref)
    else:
        found = session.scalar(select(Institution).where(Institution.code == ref))
    if found is None:
        raise ProvisioningRefusedError(422, f"institution {ref!r} is not known to this server")
    return found.id


def _issue_claim(session: Session, device: Device, *, ttl_s: int, now: datetime, created_by: str) -> Claim:
    # Any earlier unused token of this device stops working: only the newest claim is valid.
    session.execute(
        update(ClaimToken)
        .where(ClaimToken.device_id == device.device_id, ClaimToken.used_at.is_(None), ClaimToken.expires_at > now)
        .values(expires_at=now)
    )
    token = new_token()
    expires_at = now + timedelta(seconds=ttl_s)
    session.add(
        ClaimToken(
            sha256=claim_token_digest(token),
            device_id=device.device_id,
            created_at=now,
            expires_at=expires_at,
            created_by=created_by[:64],
        )
    )
    return Claim(device.device_id, device.registration, token, expires_at)


def register_device(
    session: Session,
    *,
    device_id: str,
    institution_id: int | None,
    hardware_id: str | None,
    claim_ttl_s: int,
    now: datetime,
    created_by: str,
) -> Claim:
    """A new device in state 'registered' with a fresh claim token. A device that only exists because its plaintext
    traffic auto-registered it ('unprovisioned') is taken over; any other existing device is a 409."""
    device = session.get(Device, device_id)
    if device is not None and device.registration is not RegistrationState.UNPROVISIONED:
        raise ProvisioningRefusedError(
            409, f"device {device_id!r} already exists ({device.registration.value}); reset it to re-provision"
        )
    if device is None:
        device = Device(
            device_id=device_id,
            registration=RegistrationState.REGISTERED,
            link_state=LinkStateColumn.OFFLINE,
            online=False,
            first_seen_at=now,
            last_seq=0,
            acked_through_seq=0,
            created_at=now,
        )
        session.add(device)
    device.registration = RegistrationState.REGISTERED
    if institution_id is not None:
        device.institution_id = institution_id
    device.expected_hardware_id = hardware_id
    session.flush()
    return _issue_claim(session, device, ttl_s=claim_ttl_s, now=now, created_by=created_by)


def _end_sessions(session: Session, device_id: str, now: datetime) -> None:
    session.execute(
        update(DeviceSession)
        .where(DeviceSession.device_id == device_id, DeviceSession.revoked_at.is_(None))
        .values(revoked_at=now)
    )


def _end_claims(session: Session, device_id: str, now: datetime) -> None:
    session.execute(
        update(ClaimToken)
        .where(ClaimToken.device_id == device_id, ClaimToken.used_at.is_(None), ClaimToken.expires_at > now)
        .values(expires_at=now)
    )


def reset_device(
    session: Session, device_id: str, *, reason: str, claim_ttl_s: int, now: datetime, created_by: str
) -> Claim:
    """Back to 'registered': keys retired (kept), sessions revoked, hardware binding cleared, a new claim token."""
    device = _device_or_404(session, device_id, lock=True)
    session.execute(
        update(DeviceKey).where(DeviceKey.device_id == device_id, DeviceKey.retired_at.is_(None)).values(retired_at=now)
    )
    _end_sessions(session, device_id, now)
    device.registration = RegistrationState.REGISTERED
    device.hardware_id = None
    device.key_epoch = None
    device.revoked_at = None
    device.state_reason = reason[:200]
    session.flush()
    return _issue_claim(session, device, ttl_s=claim_ttl_s, now=now, created_by=created_by)


def revoke_device(session: Session, device_id: str, *, reason: str, now: datetime) -> Device:
    """State 'revoked' (idempotent): sessions revoked, unused claim tokens void. The identity key stays (not retired)
    so its signed records remain verifiable; ingest refuses everything of a revoked device."""
    device = _device_or_404(session, device_id, lock=True)
    _end_sessions(session, device_id, now)
    _end_claims(session, device_id, now)
    if device.registration is not RegistrationState.REVOKED:
        device.registration = RegistrationState.REVOKED
        device.revoked_at = now
        device.state_reason = reason[:200]
    return device


@dataclass(frozen=True, slots=True)
class Enrolled:
    device: Device
    key: SM2PublicKey
    key_epoch: int


def enrol_device(session: Session, request: EnrolRequest, *, now: datetime) -> Enrolled:
    """Check the claim token and the proof, bind the hardware, store the key as the next epoch and mark the token
    used — all in the caller's transaction."""
    token = session.scalar(select(ClaimToken).where(ClaimToken.sha256 == claim_token_digest(request.claim_token)))
    if token is None or token.device_id != request.device_id or token.used_at is not None or token.expires_at <= now:
        raise ProvisioningRefusedError(401, CLAIM_REFUSED, kind="enrol_refused")
    device = _device_or_404(session, request.device_id, lock=True)
    if device.registration is RegistrationState.ENROLLED:
        raise ProvisioningRefusedError(409, f"device {device.device_id!r} is already enrolled; an admin must reset it")
    if device.registration is RegistrationState.REVOKED:
        raise ProvisioningRefusedError(409, f"device {device.device_id!r} is revoked; an admin must reset it")
    if device.expected_hardware_id is not None and device.expected_hardware_id != request.hardware_id:
        raise ProvisioningRefusedError(409, "this device was registered for other hardware", kind="enrol_refused")
    other = session.scalar(
        select(Device.device_id).where(Device.hardware_id == request.hardware_id, Device.device_id != device.device_id)
    )
    if other is not None:
        raise ProvisioningRefusedError(409, "this hardware is enrolled as another device; an admin must reset that one")
    try:
        key = check_enrol_proof(request)
    except (InvalidSignatureError, KeyFormatError) as exc:
        raise ProvisioningRefusedError(
            400, f"proof of possession does not verify: {exc}", kind="enrol_refused"
        ) from exc
    used = session.execute(
        update(ClaimToken).where(ClaimToken.id == token.id, ClaimToken.used_at.is_(None)).values(used_at=now)
    )
    if getattr(used, "rowcount", 0) != 1:
        raise ProvisioningRefusedError(401, CLAIM_REFUSED, kind="enrol_refused")
    epoch = _next_epoch(session, device.device_id)
    session.add(
        DeviceKey(
            device_id=device.device_id,
            key_epoch=epoch,
            public_key=key.hex(),
            fingerprint=key.fingerprint(),
            created_at=now,
        )
    )
    device.registration = RegistrationState.ENROLLED
    device.hardware_id = request.hardware_id
    device.key_epoch = epoch
    device.enrolled_at = now
    device.revoked_at = None
    device.state_reason = None
    session.flush()
    return Enrolled(device, key, epoch)


def _next_epoch(session: Session, device_id: str) -> int:
    highest = session.scalar(select(func.max(DeviceKey.key_epoch)).where(DeviceKey.device_id == device_id))
    return (highest or 0) + 1


def current_key(session: Session, device_id: str, epoch: int | None) -> DeviceKey | None:
    if epoch is None:
        return None
    return session.scalar(
        select(DeviceKey).where(
            DeviceKey.device_id == device_id, DeviceKey.key_epoch == epoch, DeviceKey.retired_at.is_(None)
        )
    )


def _require_enrolled(session: Session, device_id: str, *, lock: bool = False) -> Device:
    device = session.scalar(
        select(Device).where(Device.device_id == device_id).with_for_update()
        if lock
        else select(Device).where(Device.device_id == device_id)
    )
    if device is None or device.registration is not RegistrationState.ENROLLED:
        state = "unknown" if device is None else device.registration.value
        raise ProvisioningRefusedError(
            403, f"device {device_id!r} is not enrolled (state {state})", kind="not_enrolled"
        )
    return device


def rotate_device_key(session: Session, request: RotateRequest, *, now: datetime) -> Enrolled:
    """A new identity key (epoch + 1) signed by the current one; the old key is retired (kept)."""
    device = _require_enrolled(session, request.device_id, lock=True)
    row = current_key(session, device.device_id, device.key_epoch)
    if row is None or request.key_epoch != device.key_epoch:
        raise ProvisioningRefusedError(409, "key_epoch is not the device's current key epoch", kind="rotate_refused")
    if abs(now - request.requested_at) > MAX_CLOCK_SKEW:
        raise ProvisioningRefusedError(401, "rotation request is stale or dated in the future", kind="rotate_refused")
    try:
        new_key = check_rotate_request(request, SM2PublicKey.from_hex(row.public_key))
    except (InvalidSignatureError, KeyFormatError) as exc:
        raise ProvisioningRefusedError(401, str(exc), kind="bad_signature") from exc
    if new_key.hex() == row.public_key:
        raise ProvisioningRefusedError(400, "the new key is the current key")
    row.retired_at = now
    epoch = _next_epoch(session, device.device_id)
    session.add(
        DeviceKey(
            device_id=device.device_id,
            key_epoch=epoch,
            public_key=new_key.hex(),
            fingerprint=new_key.fingerprint(),
            created_at=now,
        )
    )
    device.key_epoch = epoch
    session.flush()
    return Enrolled(device, new_key, epoch)


def grant_device_session(
    session: Session,
    request: SessionRequest,
    *,
    identity: ServerIdentity,
    lifetime: timedelta,
    now: datetime,
) -> SessionGrant:
    """Check the handshake (device enrolled, signed by its current key, fresh, nonce unused) and store the sealed
    session key."""
    device = _require_enrolled(session, request.device_id)
    row = current_key(session, device.device_id, request.key_epoch)
    if row is None:
        raise ProvisioningRefusedError(
            401, "key_epoch does not name the device's current identity key", kind="bad_signature"
        )
    try:
        grant, key = grant_session(
            request,
            device_key=SM2PublicKey.from_hex(row.public_key),
            server_key=identity.private_key(),
            now=now,
            lifetime=lifetime,
        )
    except HandshakeError as exc:
        raise ProvisioningRefusedError(401, str(exc), kind="bad_signature") from exc
    if session.scalar(select(DeviceSession.key_id).where(DeviceSession.request_nonce == request.nonce)) is not None:
        raise ProvisioningRefusedError(409, "session request nonce was already used", kind="nonce_reused")
    try:
        with session.begin_nested():
            session.add(
                DeviceSession(
                    key_id=key.key_id,
                    device_id=device.device_id,
                    key_epoch=request.key_epoch,
                    sealed_key=identity.seal_session_key(key.key_id, key.key),
                    request_nonce=request.nonce,
                    issued_at=key.issued_at,
                    expires_at=key.expires_at,
                )
            )
    except IntegrityError as exc:
        raise ProvisioningRefusedError(409, "session request nonce was already used", kind="nonce_reused") from exc
    return grant


def make_bundle(
    settings: ServerSettings,
    server_key: SM2PrivateKey,
    *,
    device: Device,
    device_key: SM2PublicKey,
    key_epoch: int,
    institution_code: str | None,
    server_url: str,
    now: datetime,
    seq_floor: int = 0,
) -> SignedBundle:
    bundle = ConfigBundle(
        device_id=device.device_id,
        key_epoch=key_epoch,
        device_public_key=device_key.hex(),
        issued_at=now,
        config_version=settings.config_version,
        server_url=settings.public_url or server_url,
        server_public_key=server_key.public_key.hex(),
        mqtt=BundleMqtt(
            host=settings.device_mqtt_host or settings.mqtt_host,
            port=settings.device_mqtt_port or settings.mqtt_port,
            username=device.device_id,
            topic_prefix=settings.topic_prefix,
            tls=settings.device_mqtt_tls,
        ),
        session=BundleSession(lifetime_s=settings.session_lifetime_s, rotate_after_s=settings.session_rotate_after_s),
        institution_id=institution_code,
        seq_floor=seq_floor,
    )
    return sign_bundle(server_key, bundle)


def record_security_event(
    session: Session,
    *,
    at: datetime,
    device_id: str | None,
    kind: str,
    detail: str,
    topic: str | None = None,
    count: int = 1,
) -> None:
    session.add(
        SecurityEvent(
            at=at,
            device_id=(device_id or None) and device_id[:64],
            kind=kind,
            detail=detail[:300],
            topic=topic[:200] if topic else None,
            count=count,
        )
    )


def create_admin_token(session: Session, *, name: str, now: datetime) -> str:
    """A new admin bearer token (returned once; only its SHA-256 is stored)."""
    token = new_token()
    session.add(AdminToken(sha256=token_digest(token), name=name[:64], created_at=now))
    return token
