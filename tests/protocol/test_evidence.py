"""Signed records: verifiable by the device's key, bound to the device, the epoch and the content."""

from __future__ import annotations

import pytest

from protocol.envelope import decode_envelope
from protocol.evidence import sign_device_record, verify_device_record
from protocol.gm.errors import InvalidSignatureError
from protocol.gm.sm2 import SM2PrivateKey
from protocol.payloads import SignedRecord, SignedRecordKind
from tests.protocol.test_envelope import envelope as make_envelope


@pytest.fixture(scope="module")
def key() -> SM2PrivateKey:
    return SM2PrivateKey.generate()


def decision(key: SM2PrivateKey) -> SignedRecord:
    return sign_device_record(
        key,
        device_id="SIM-0001",
        key_epoch=2,
        record_type=SignedRecordKind.REVIEW_DECISION,
        record={"prescription": "RX-1", "decision": "approved", "pharmacist": "PH-7", "lines": [1, 2]},
    )


def test_signed_record_survives_the_wire_and_verifies(key: SM2PrivateKey) -> None:
    payload = decision(key)
    wire = make_envelope(payload=payload).to_bytes()
    back = decode_envelope(wire).payload
    assert isinstance(back, SignedRecord)
    verify_device_record(back, device_id="SIM-0001", device_key=key.public_key)


@pytest.mark.parametrize(
    "change",
    [
        {"record": {"prescription": "RX-1", "decision": "rejected", "pharmacist": "PH-7", "lines": [1, 2]}},
        {"key_epoch": 3},
        {"record_type": SignedRecordKind.SIGN_IN},
    ],
)
def test_any_change_breaks_the_signature(key: SM2PrivateKey, change: dict[str, object]) -> None:
    forged = decision(key).model_copy(update=change)
    with pytest.raises(InvalidSignatureError):
        verify_device_record(forged, device_id="SIM-0001", device_key=key.public_key)


def test_record_of_another_device_or_key_is_refused(key: SM2PrivateKey) -> None:
    payload = decision(key)
    with pytest.raises(InvalidSignatureError):
        verify_device_record(payload, device_id="SIM-0002", device_key=key.public_key)
    with pytest.raises(InvalidSignatureError):
        verify_device_record(payload, device_id="SIM-0001", device_key=SM2PrivateKey.generate().public_key)
