"""Verifying a terminal's signed record again where the server acts on it (binding applications, review decisions,
pharmacist attendance and enrolment, POS verifications).

Ingest's message security already checked the frame; each domain hook checks the record's SM2 signature once more
against the device's enrolled identity key of the record's epoch (retired keys included), in the caller's
transaction, so that nothing unsigned, forged or signed by another device ever becomes a business row. It owns
that check only and must never log a record's contents.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from protocol import ContractError, Envelope
from protocol.evidence import verify_device_record
from protocol.gm.errors import CryptoError
from protocol.gm.sm2 import SM2PublicKey
from protocol.payloads import SignedRecord
from sync_server.db.models import DeviceKey


def device_key(session: Session, device_id: str, epoch: int) -> SM2PublicKey | None:
    """The device's enrolled identity key of `epoch`, or None."""
    text = session.scalar(
        select(DeviceKey.public_key).where(DeviceKey.device_id == device_id, DeviceKey.key_epoch == epoch)
    )
    return None if text is None else SM2PublicKey.from_hex(text)


def verify_signed_record(session: Session, envelope: Envelope, payload: SignedRecord) -> None:
    """`ContractError` unless `payload` is signed by the envelope's device with its key of the record's epoch."""
    key = device_key(session, envelope.device_id, payload.key_epoch)
    if key is None:
        raise ContractError(f"no enrolled key of epoch {payload.key_epoch}")
    try:
        verify_device_record(payload, device_id=envelope.device_id, device_key=key)
    except CryptoError as exc:
        raise ContractError("signature does not verify") from exc
