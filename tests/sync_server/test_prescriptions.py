"""Prescriptions on the server, on SQLite and PostgreSQL: registration is idempotent by (institution, 医保处方编号) and
notifies the institution's bound terminals; the ingest hook stores a review decision signed with a real device key
only from a terminal bound to the prescription's institution, for the content registered, once (a second decision is
refused and counted, never applied); settlement needs an approval and is idempotent; names are stored masked."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from protocol import CommandKind, Envelope, PayloadType, SignedRecord, SignedRecordKind
from protocol.drug_rules import RuleAction, RuleKind
from protocol.evidence import sign_device_record, verify_device_record
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey
from protocol.prescription import FaceConfirmation, FindingShown, Prescription, ReviewDecisionRecord, ReviewOutcome
from sync_server import prescriptions
from sync_server.db.engine import session_factory
from sync_server.db.models import (
    Device,
    DeviceKey,
    Institution,
    InstitutionKind,
    IssuedCommand,
    PrescriptionLineRow,
    PrescriptionReview,
    PrescriptionRow,
    PrescriptionState,
)
from sync_server.store import register_devices, store_envelopes
from tests.prescription_samples import DOCTOR_NAME, LIQUORICE, prescription_body
from tests.sync_server.conftest import BOOT, T0

CODE = "H31011500042"
OTHER_CODE = "H32010200007"
KIOSK = "kiosk-rx-1"
KIOSK_2 = "kiosk-rx-2"
OTHER_KIOSK = "kiosk-rx-9"
UNBOUND_KIOSK = "kiosk-rx-0"
PHARMACIST = "YS3101150007"


class Pharmacy:
    """Two institutions, their terminals (each with an enrolled SM2 key) and the ingest of signed decisions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.keys = {d: SM2PrivateKey.generate() for d in (KIOSK, KIOSK_2, OTHER_KIOSK, UNBOUND_KIOSK)}
        self.seq: dict[str, int] = {}
        with self.writer() as session:
            ours = Institution(
                code=CODE, name="示例大药房", kind=InstitutionKind.PHARMACY, region_code="310115", created_at=T0
            )
            theirs = Institution(
                code=OTHER_CODE, name="南京示例药房", kind=InstitutionKind.PHARMACY, region_code="320102", created_at=T0
            )
            session.add_all([ours, theirs])
            session.flush()
            self.institution_id, self.other_institution_id = ours.id, theirs.id
            register_devices(session, set(self.keys), now=T0)
            for device_id, key in self.keys.items():
                session.add(
                    DeviceKey(
                        device_id=device_id,
                        key_epoch=1,
                        public_key=key.public_key.hex(),
                        fingerprint=key.public_key.fingerprint(),
                        created_at=T0,
                    )
                )
            for device_id, institution_id in ((KIOSK, ours.id), (KIOSK_2, ours.id), (OTHER_KIOSK, theirs.id)):
                device = session.get(Device, device_id)
                assert device is not None
                device.institution_id = institution_id

    def writer(self) -> Any:
        return session_factory(self.engine, write_intent=True).begin()

    def register(self, body: dict[str, Any], institution_id: int | None = None) -> prescriptions.Registered:
        with self.writer() as session:
            done = prescriptions.register(
                session,
                Prescription.model_validate(body),
                institution_id=self.institution_id if institution_id is None else institution_id,
                client="his:test",
                now=T0,
            )
            session.expunge_all()
            return done

    def decision(
        self, row_id: int, digest: str, outcome: ReviewOutcome = ReviewOutcome.APPROVED, **kw: Any
    ) -> dict[str, Any]:
        values: dict[str, Any] = {
            "rx_no": "RX20260301001",
            "institution_code": CODE,
            "prescription_id": row_id,
            "content_digest": digest,
            "pharmacist_code": PHARMACIST,
            "decision": outcome,
            "reasons": [] if outcome is ReviewOutcome.APPROVED else ["剂量超限"],
            "rule_set_version": 3,
            "findings": [
                FindingShown(
                    rule_id="FFGC-1",
                    rule_kind=RuleKind.MAX_QUANTITY_PER_PURCHASE,
                    action=RuleAction.WARN,
                    drug_codes=[LIQUORICE],
                    limit=2,
                    observed=3,
                    acknowledged=True,
                )
            ],
            "face": FaceConfirmation(
                decision="accepted",
                method="face_1to1",
                similarity=0.83,
                threshold=0.6,
                live=True,
                liveness_method="challenge",
                template_hash="ab" * 16,
                model_sha256="0" * 16,
            ),
            "reviewed_at": T0 + timedelta(minutes=5),
        }
        values.update(kw)
        return ReviewDecisionRecord(**values).to_record()

    def signed(self, record: dict[str, Any], device_id: str = KIOSK, key: SM2PrivateKey | None = None) -> Envelope:
        payload = sign_device_record(
            key or self.keys[device_id],
            device_id=device_id,
            key_epoch=1,
            record_type=SignedRecordKind.REVIEW_DECISION,
            record=record,
        )
        self.seq[device_id] = self.seq.get(device_id, 0) + 1
        return Envelope(
            device_id=device_id,
            seq=self.seq[device_id],
            message_id=uuid.uuid4(),
            device_time=T0,
            boot_id=BOOT,
            monotonic_ns=self.seq[device_id],
            payload_type=PayloadType.SIGNED_RECORD,
            payload=payload,
        )

    def ingest(self, *envelopes: Envelope) -> tuple[int, int]:
        """What ingest's transaction does with a batch: store the envelopes, then the review hook."""
        with self.writer() as session:
            store_envelopes(session, list(envelopes), received_at=T0)
            done = prescriptions.record_review_decisions(session, list(envelopes), now=T0)
        return done.created, done.refused

    def row(self, row_id: int) -> PrescriptionRow:
        with session_factory(self.engine)() as session:
            row = session.get(PrescriptionRow, row_id)
            assert row is not None
            session.expunge(row)
            return row

    def all(self, model: Any) -> list[Any]:
        with session_factory(self.engine)() as session:
            rows = list(session.scalars(select(model).order_by(model.id)))
            session.expunge_all()
            return rows

    def settle(self, settlement_id: str, rx_no: str = "RX20260301001") -> tuple[PrescriptionRow, bool]:
        with self.writer() as session:
            row, first = prescriptions.settle(
                session, institution_id=self.institution_id, rx_no=rx_no, settlement_id=settlement_id, now=T0
            )
            session.expunge(row)
            return row, first


@pytest.fixture
def pharmacy(engine: Engine) -> Pharmacy:
    return Pharmacy(engine)


def test_registration_is_idempotent_masks_the_prescriber_and_notifies_the_bound_terminals(pharmacy: Pharmacy) -> None:
    done = pharmacy.register(prescription_body())
    assert done.created
    assert sorted(c.device_id for c in done.notices) == [KIOSK, KIOSK_2]  # not the other institution's, not unbound
    commands = pharmacy.all(IssuedCommand)
    assert {c.kind for c in commands} == {CommandKind.PRESCRIPTIONS_PENDING.value}
    assert commands[0].args == {"prescription_id": done.row.id, "rx_no": "RX20260301001"}

    row = pharmacy.row(done.row.id)
    assert (row.status, row.patient_ref, row.refused_decisions) == (PrescriptionState.PENDING, "his-pt-000981", 0)
    assert row.body["prescriber_name"] == "王**"
    assert DOCTOR_NAME not in str(row.body)
    assert [ln.drug_code for ln in pharmacy.all(PrescriptionLineRow)][1] == LIQUORICE

    again = pharmacy.register(prescription_body())
    assert (again.created, again.row.id, again.notices) == (False, done.row.id, ())
    with pytest.raises(prescriptions.PrescriptionConflictError):
        pharmacy.register(prescription_body(patient_age_years=30))
    # the same number at another institution is another prescription
    elsewhere = pharmacy.register(prescription_body(), institution_id=pharmacy.other_institution_id)
    assert elsewhere.created
    assert [c.device_id for c in elsewhere.notices] == [OTHER_KIOSK]
    assert len(pharmacy.all(PrescriptionRow)) == 2


def test_a_signed_decision_from_a_bound_terminal_is_the_review_and_settlement_follows(pharmacy: Pharmacy) -> None:
    done = pharmacy.register(prescription_body())
    with pytest.raises(prescriptions.PrescriptionConflictError, match="pending"):
        pharmacy.settle("JS-0001")
    envelope = pharmacy.signed(pharmacy.decision(done.row.id, done.row.content_digest))
    assert pharmacy.ingest(envelope) == (1, 0)
    assert pharmacy.ingest(envelope) == (0, 0)  # redelivery: already stored, not a second decision

    row = pharmacy.row(done.row.id)
    assert (row.status, row.reviewed_at) == (PrescriptionState.APPROVED, T0 + timedelta(minutes=5))
    [review] = pharmacy.all(PrescriptionReview)
    assert (review.device_id, review.pharmacist_code, review.decision) == (KIOSK, PHARMACIST, "approved")
    assert (review.face_decision, review.face_similarity, review.rule_set_version) == ("accepted", 0.83, 3)
    assert review.findings[0]["acknowledged"] is True
    # the stored record and signature verify again later with the device's public key
    again = SignedRecord(
        record_type=SignedRecordKind.REVIEW_DECISION, record=review.record, key_epoch=1, signature=review.signature
    )
    verify_device_record(
        again, device_id=KIOSK, device_key=SM2PublicKey.from_hex(pharmacy.keys[KIOSK].public_key.hex())
    )

    settled, first = pharmacy.settle("JS-0001")
    assert (settled.status, settled.settlement_id, first) == (PrescriptionState.SETTLED, "JS-0001", True)
    assert pharmacy.settle("JS-0001")[1] is False  # idempotent
    with pytest.raises(prescriptions.PrescriptionConflictError, match="another settlement"):
        pharmacy.settle("JS-0002")
    with pytest.raises(prescriptions.PrescriptionNotFoundError):
        pharmacy.settle("JS-0001", rx_no="RX-UNKNOWN")


def test_forged_misplaced_stale_and_second_decisions_are_refused(pharmacy: Pharmacy) -> None:
    done = pharmacy.register(prescription_body())
    pid, digest = done.row.id, done.row.content_digest
    record = pharmacy.decision(pid, digest)
    forged = pharmacy.signed(record, key=SM2PrivateKey.generate())
    other_institution = pharmacy.signed(record, device_id=OTHER_KIOSK)
    unbound = pharmacy.signed(record, device_id=UNBOUND_KIOSK)
    wrong_content = pharmacy.signed(pharmacy.decision(pid, "0" * 64))
    wrong_id = pharmacy.signed(pharmacy.decision(pid + 100, digest))
    unknown_rx = pharmacy.signed(pharmacy.decision(pid, digest, rx_no="RX-NOT-HERE"))
    tampered_record = dict(record, pharmacist_code="YS-SOMEONE")
    tampered = pharmacy.signed(record)
    assert isinstance(tampered.payload, SignedRecord)
    tampered = tampered.model_copy(update={"payload": tampered.payload.model_copy(update={"record": tampered_record})})
    unaccepted = dict(record, face=dict(record["face"], decision="no_match"))  # a tampered terminal, still signed
    assert pharmacy.ingest(
        forged, other_institution, unbound, wrong_content, wrong_id, unknown_rx, tampered, pharmacy.signed(unaccepted)
    ) == (0, 8)
    assert pharmacy.row(pid).status is PrescriptionState.PENDING
    assert pharmacy.all(PrescriptionReview) == []

    # the first valid decision wins; a second one (another terminal, another verdict) is refused and counted
    rejected = pharmacy.signed(pharmacy.decision(pid, digest, ReviewOutcome.REJECTED), device_id=KIOSK_2)
    approved = pharmacy.signed(record)
    assert pharmacy.ingest(rejected, approved) == (1, 1)
    row = pharmacy.row(pid)
    assert (row.status, row.refused_decisions) == (PrescriptionState.REJECTED, 1)
    [review] = pharmacy.all(PrescriptionReview)
    assert (review.device_id, review.decision) == (KIOSK_2, "rejected")
    with pytest.raises(prescriptions.PrescriptionConflictError, match="rejected"):
        pharmacy.settle("JS-0001")
