"""Non-repudiable records: what the device's SM2 signature covers, and how to make and check one.

The signed bytes are `canonical_json({"purpose", "device_id", "key_epoch", "record_type", "record"})`: the device id
and key epoch are inside the signature, so a record cannot be replayed as another device's, and the purpose string
keeps these signatures apart from every other SM2 signature the device makes (session requests, key rotation).
This module owns that form; it must never sign anything else.
"""

from __future__ import annotations

from typing import Any

from pydantic import JsonValue

from protocol.gm.records import sign_record, verify_record
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey
from protocol.payloads import SignedRecord, SignedRecordKind

RECORD_PURPOSE = "yibao-record-v1"


def signed_form(
    device_id: str, key_epoch: int, record_type: SignedRecordKind, record: dict[str, Any]
) -> dict[str, Any]:
    return {
        "purpose": RECORD_PURPOSE,
        "device_id": device_id,
        "key_epoch": key_epoch,
        "record_type": record_type.value,
        "record": record,
    }


def sign_device_record(
    identity_key: SM2PrivateKey,
    *,
    device_id: str,
    key_epoch: int,
    record_type: SignedRecordKind,
    record: dict[str, JsonValue],
) -> SignedRecord:
    """The payload to enqueue: `record` signed by the device's identity key of `key_epoch`."""
    signature = sign_record(identity_key, signed_form(device_id, key_epoch, record_type, record))
    return SignedRecord(record_type=record_type, record=record, key_epoch=key_epoch, signature=signature)


def verify_device_record(payload: SignedRecord, *, device_id: str, device_key: SM2PublicKey) -> None:
    """Raise `InvalidSignatureError` unless `device_key` (the device's key of `payload.key_epoch`) signed it."""
    form = signed_form(device_id, payload.key_epoch, payload.record_type, payload.record)
    verify_record(device_key, form, payload.signature)
