"""Canonical JSON and SM2 signatures over records (evidence such as review decisions, checkpoints, ACLs).

Owns the byte form a record is signed or MACed in: UTF-8 JSON with keys sorted, no insignificant whitespace, no
NaN or infinity, string keys only. Two peers that agree on a record's value agree on these bytes. This module
must never sign anything but canonical bytes, and never put the signature inside the signed bytes.
"""

from __future__ import annotations

import json
from typing import Any

from protocol.gm import sm2
from protocol.gm.errors import CanonicalFormError, InvalidSignatureError
from protocol.gm.sm2 import DEFAULT_USER_ID, SM2PrivateKey, SM2PublicKey


def _check_keys(obj: Any) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise CanonicalFormError(f"canonical JSON needs string keys, got {type(key).__name__}")
            _check_keys(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _check_keys(value)


def canonical_json(obj: Any) -> bytes:
    """The canonical bytes of a JSON-able value (dict, list, str, int, float, bool, None)."""
    _check_keys(obj)  # json.dumps would silently turn 1 and "1" into the same key
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CanonicalFormError(f"not canonical-JSON-able: {exc}") from exc
    return text.encode("utf-8")


def sign_record(private_key: SM2PrivateKey, record: Any, *, user_id: bytes = DEFAULT_USER_ID) -> str:
    """SM2 signature (hex of the 64-byte `r || s`) over `canonical_json(record)`."""
    return sm2.sign(private_key, canonical_json(record), user_id=user_id).hex()


def verify_record(
    public_key: SM2PublicKey, record: Any, signature_hex: str, *, user_id: bytes = DEFAULT_USER_ID
) -> None:
    """Raise `InvalidSignatureError` unless `signature_hex` signs exactly this record's canonical form."""
    try:
        signature = bytes.fromhex(signature_hex)
    except ValueError as exc:
        raise InvalidSignatureError("signature is not hex") from exc
    sm2.verify(public_key, canonical_json(record), signature, user_id=user_id)
