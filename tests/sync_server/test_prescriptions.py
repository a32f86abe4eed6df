"""Prescriptions on the server, on SQLite and PostgreSQL: registration is idempotent by (institution, 医保处方编号) and
notifies the institution's bound terminals; the ingest hook stores a review decision signed with a real device key
only from a terminal bound to the prescription's institution, for the content registered, once (a second decision is
refused and counted, never applied); settlement needs an approval and is idempotent; names are stored masked."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import JsonValue
from sqlalchemy import Engine, create_engine, select, text

from protocol import CommandKind, Envelope, PayloadType, SignedRecord, SignedRecordKind
from protocol.drug_rules import Evaluation, Proposal, RuleAction, RuleKind
from protocol.evidence import sign_device_record, verify_device_record
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey
from protocol.prescription import (
    FaceConfirmation,
    FindingShown,
    HistoryUse,
    Prescription,
    ReviewDecisionRecord,
    ReviewOutcome,
)
from sync_server import prescriptions
from sync_server.accounts import Role
from sync_server.app import create_app
from sync_server.db.async_pg import APPLICATION_NAME, POOL_MAX
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
from sync_server.settings import ServerSettings
from sync_server.store import register_devices, store_envelopes
from terminal.review import PENDING_PATH, REVIEWED_PATH, PrescriptionInbox, ReviewDesk, refresh_inbox
from terminal.server_api import ServerApi
from terminal.verification import FaceDecision, FaceOutcome
from tests.prescription_samples import DOCTOR_NAME, LIQUORICE, prescription_body
from tests.sync_server.conftest import BOOT, T0, FakeClock, Publisher, serving
from tests.sync_server.signed_requests import DeviceSigner, enrol_with_session, make_his_client, signed
from tests.sync_server.test_accounts import login, make_account
from tests.sync_server.test_ingest import make_settings, publish_all, running, settled
from yibao.broker import MosquittoBroker

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
            "purchase_history": HistoryUse.NOT_IDENTIFIED,
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
        return self.envelope_of(device_id, payload)

    def envelope_of(self, device_id: str, payload: SignedRecord) -> Envelope:
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

    def settle(self, settlement_id: str, rx_no: str = "RX20260301001") -> tuple[prescriptions.HisView, bool]:
        with self.writer() as session:
            return prescriptions.settle(
                session, institution_id=self.institution_id, rx_no=rx_no, settlement_id=settlement_id, now=T0
            )


@pytest.fixture
def pharmacy(engine: Engine) -> Pharmacy:
    return Pharmacy(engine)


def test_registration_is_idempotent_masks_the_prescriber_and_notifies_the_bound_terminals(pharmacy: Pharmacy) -> None:
    done = pharmacy.register(prescription_body())
    assert done.created
    assert sorted(done.notices) == [KIOSK, KIOSK_2]  # not the other institution's, not unbound
    commands = pharmacy.all(IssuedCommand)
    assert {c.kind for c in commands} == {CommandKind.PRESCRIPTIONS_PENDING.value}
    assert commands[0].args == {"prescription_id": done.view.id, "rx_no": "RX20260301001"}

    row = pharmacy.row(done.view.id)
    assert (row.status, row.patient_ref, row.refused_decisions) == (PrescriptionState.PENDING, "his-pt-000981", 0)
    assert row.body["prescriber_name"] == "王**"
    assert DOCTOR_NAME not in str(row.body)
    assert [ln.drug_code for ln in pharmacy.all(PrescriptionLineRow)][1] == LIQUORICE

    again = pharmacy.register(prescription_body())
    assert (again.created, again.view.id, again.notices) == (False, done.view.id, ())
    with pytest.raises(prescriptions.PrescriptionConflictError):
        pharmacy.register(prescription_body(patient_age_years=30))
    # the same number at another institution is another prescription
    elsewhere = pharmacy.register(prescription_body(), institution_id=pharmacy.other_institution_id)
    assert elsewhere.created
    assert list(elsewhere.notices) == [OTHER_KIOSK]
    assert len(pharmacy.all(PrescriptionRow)) == 2


def test_a_signed_decision_from_a_bound_terminal_is_the_review_and_settlement_follows(pharmacy: Pharmacy) -> None:
    done = pharmacy.register(prescription_body())
    with pytest.raises(prescriptions.PrescriptionConflictError, match="pending"):
        pharmacy.settle("JS-0001")
    envelope = pharmacy.signed(pharmacy.decision(done.view.id, done.view.content_digest))
    assert pharmacy.ingest(envelope) == (1, 0)
    assert pharmacy.ingest(envelope) == (0, 0)  # redelivery: already stored, not a second decision

    row = pharmacy.row(done.view.id)
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
    pid, digest = done.view.id, done.view.content_digest
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


def test_the_real_ingest_worker_stores_a_published_decision_once(
    pharmacy: Pharmacy, broker: MosquittoBroker, publisher: Publisher, engine: Engine, db_url: str
) -> None:
    done = pharmacy.register(prescription_body())
    good = pharmacy.signed(pharmacy.decision(done.view.id, done.view.content_digest))
    forged = pharmacy.signed(pharmacy.decision(done.view.id, done.view.content_digest), key=SM2PrivateKey.generate())
    second = pharmacy.signed(
        pharmacy.decision(done.view.id, done.view.content_digest, ReviewOutcome.REJECTED), device_id=KIOSK_2
    )
    with running(make_settings(broker, db_url), engine) as worker:
        publish_all(publisher, [good, forged, good])  # the good one redelivered
        settled(worker, received=3)
        publish_all(publisher, [second])
        settled(worker, received=4)
    [review] = pharmacy.all(PrescriptionReview)
    assert (review.message_id, review.decision) == (good.message_id, "approved")
    row = pharmacy.row(done.view.id)
    assert (row.status, row.refused_decisions) == (PrescriptionState.APPROVED, 1)


# ------------------------------------------------------------------------------------------------ over real HTTP


class Served:
    """The app over real HTTP with the pharmacy's data, HIS clients of both institutions and a clock shared by the
    signers and the server."""

    def __init__(self, client: httpx.Client, clock: FakeClock, pharmacy: Pharmacy) -> None:
        self.client = client
        self.clock = clock
        self.pharmacy = pharmacy
        self.his = make_his_client(client, CODE)
        self.other_his = make_his_client(client, OTHER_CODE)

    def his_call(self, method: str, target: str, body: Any = None, *, other: bool = False) -> httpx.Response:
        signer = self.other_his if other else self.his
        return signed(self.client, signer, method, target, clock=self.clock, json_body=body)


@pytest.fixture
def served(engine: Engine, db_url: str, pharmacy: Pharmacy, tmp_path: Path) -> Iterator[Served]:
    clock = FakeClock(T0)
    settings = ServerSettings(database_url=db_url, data_dir=tmp_path / "server-data")
    app = create_app(settings, engine=engine, start_ingest=False, clock=clock)
    with serving(app) as client:
        yield Served(client, clock, pharmacy)


def test_his_registers_queries_and_settles_only_an_approved_prescription(served: Served) -> None:
    body = prescription_body()
    created = served.his_call("POST", "/his/v1/prescriptions", body)
    assert created.status_code == 201, created.text
    result = created.json()
    assert (result["status"], result["may_settle"], result["review"]) == ("pending", False, None)
    assert result["institution_code"] == CODE
    replay = served.his_call("POST", "/his/v1/prescriptions", body)
    assert (replay.status_code, replay.json()) == (200, result)  # the same body: the same result, nothing new
    changed = served.his_call("POST", "/his/v1/prescriptions", prescription_body(patient_age_years=30))
    assert changed.status_code == 409
    bad = served.his_call("POST", "/his/v1/prescriptions", prescription_body(patient_ref="310115196001011234"))
    assert bad.status_code == 422
    assert "310115196001011234" not in bad.text
    assert bad.json()["detail"][0]["loc"] == ["body", "patient_ref"]
    assert served.his_call("POST", "/his/v1/prescriptions", prescription_body(unknown_field=1)).status_code == 422
    # unsigned, or signed by nobody: refused before the handler
    assert served.client.post("/his/v1/prescriptions", json=body, headers={"Authorization": ""}).status_code == 401

    target = "/his/v1/prescriptions/RX20260301001"
    assert served.his_call("GET", target).json()["status"] == "pending"
    settle = served.his_call("POST", f"{target}/settlement", {"settlement_id": "JS-0001"})
    assert settle.status_code == 409  # F-07: no settlement before an approval
    # another institution's HIS client cannot see or settle it
    assert served.his_call("GET", target, other=True).status_code == 404
    assert served.his_call("POST", f"{target}/settlement", {"settlement_id": "JS-1"}, other=True).status_code == 404

    [row] = served.pharmacy.all(PrescriptionRow)
    assert served.pharmacy.ingest(served.pharmacy.signed(served.pharmacy.decision(row.id, row.content_digest))) == (
        1,
        0,
    )
    approved = served.his_call("GET", target).json()
    assert (approved["status"], approved["may_settle"]) == ("approved", True)
    review = approved["review"]
    assert (review["decision"], review["pharmacist_code"], review["face_decision"]) == (
        "approved",
        PHARMACIST,
        "accepted",
    )
    assert review["findings"][0]["rule_id"] == "FFGC-1"
    assert review["purchase_history"] == "not_identified"  # what the period rules counted, from the signed record

    done = served.his_call("POST", f"{target}/settlement", {"settlement_id": "JS-0001"})
    assert done.status_code == 200, done.text
    assert (done.json()["status"], done.json()["settlement_id"]) == ("settled", "JS-0001")
    again = served.his_call("POST", f"{target}/settlement", {"settlement_id": "JS-0001"})
    assert (again.status_code, again.json()) == (200, done.json())
    assert served.his_call("POST", f"{target}/settlement", {"settlement_id": "JS-0002"}).status_code == 409
    assert served.his_call("GET", "/his/v1/prescriptions/RX-NONE").status_code == 404


@pytest.mark.parametrize("db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_his_reads_on_the_event_loop_survive_a_database_restart_and_refuse_replays(served: Served, db_url: str) -> None:
    """On PostgreSQL the nonce and HIS's reads run on the async pool (sync_server.db.async_pg; SQLite keeps the sync
    path): connections the database dropped fail one use each with a clear 503, then the pool reconnects; a replay
    is refused there too."""
    assert served.his_call("POST", "/his/v1/prescriptions", prescription_body()).status_code == 201
    target = "/his/v1/prescriptions/RX20260301001"
    first = served.his_call("GET", target)
    assert first.status_code == 200
    admin = create_engine(db_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:  # what a database restart does to every connection of the pool
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name AND datname = current_database()"
                ),
                {"name": APPLICATION_NAME},
            )
    finally:
        admin.dispose()
    # each pooled connection that was dropped fails one use (no pre-ping: a round trip per request), then is replaced
    answers = [served.his_call("GET", target) for _ in range(POOL_MAX + 2)]
    statuses = [a.status_code for a in answers]
    assert statuses[-2:] == [200, 200], [a.text for a in answers]
    assert set(statuses) == {200, 503}  # at least one use met a dropped connection
    assert statuses == sorted(statuses, reverse=True)  # the failures come first, then it recovers for good
    assert all("unavailable" in a.json()["detail"] for a in answers if a.status_code == 503)
    assert answers[-1].json() == first.json()
    # a captured request sent again: refused, even on the loop's path
    headers = served.his.headers("GET", target, b"", now=served.clock.now().timestamp())
    assert served.client.get(target, headers=headers).status_code == 200
    again = served.client.get(target, headers=headers)
    assert (again.status_code, again.json()["detail"]["code"]) == (401, "replayed_nonce")


def test_concurrent_registrations_of_one_number_store_it_once(served: Served) -> None:
    """HIS retrying in parallel (a lost answer, two tills): one 201, the rest 200 with the same result, one row."""
    body = prescription_body()
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _n: served.his_call("POST", "/his/v1/prescriptions", body), range(6)))
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 200, 200, 201], [a.text for a in answers]
    assert len({json.dumps(a.json(), sort_keys=True) for a in answers}) == 1
    assert len(served.pharmacy.all(PrescriptionRow)) == 1
    assert len(served.pharmacy.all(IssuedCommand)) == 2  # one notice per bound terminal, not per request


def test_a_terminal_fetches_its_pending_list_reviews_and_his_sees_the_result(
    served: Served, engine: Engine, tmp_path: Path
) -> None:
    """Terminal to server to HIS: the terminal's own client fetches over signed HTTP, the review desk signs with the
    enrolled identity key, ingest stores the decision, HIS settles."""
    kiosk = enrol_with_session(served.client, served.clock, "kiosk-rx-http")
    with session_factory(engine, write_intent=True).begin() as session:
        device = session.get(Device, kiosk.device_id)
        assert device is not None
        device.institution_id = served.pharmacy.institution_id
    assert served.his_call("POST", "/his/v1/prescriptions", prescription_body()).status_code == 201
    assert served.his_call("POST", "/his/v1/prescriptions", prescription_body(rx_no="RX2")).status_code == 201
    other = prescription_body(rx_no="RX-THEIRS")
    assert served.his_call("POST", "/his/v1/prescriptions", other, other=True).status_code == 201
    with session_factory(engine)() as session:
        notices = session.scalars(select(IssuedCommand.device_id).where(IssuedCommand.device_id == kiosk.device_id))
        assert len(list(notices)) == 2

    api = ServerApi(str(served.client.base_url), kiosk.device_id, lambda: kiosk.session, served.clock)
    inbox = PrescriptionInbox.open(tmp_path / "terminal" / "prescriptions.db")
    try:
        refreshed = refresh_inbox(inbox, api, now=served.clock.now())
        assert (refreshed.added, refreshed.total_on_server) == (2, 2)  # not the other institution's
        assert [i.prescription.rx_no for i in inbox.pending()] == ["RX20260301001", "RX2"]
        assert inbox.pending()[0].prescription.prescriber_name == "王**"

        def record_signed(kind: SignedRecordKind, record: dict[str, JsonValue]) -> Envelope:
            return served.pharmacy.envelope_of(
                kiosk.device_id,
                sign_device_record(
                    kiosk.identity, device_id=kiosk.device_id, key_epoch=1, record_type=kind, record=record
                ),
            )

        desk = ReviewDesk(inbox, NoRules(), Signed(), AcceptingFace(), record_signed, served.clock)
        review = desk.open(inbox.pending()[0].prescription_id)
        result = desk.decide(review, ReviewOutcome.APPROVED, [])
        assert result.envelope is not None
        assert served.pharmacy.ingest(result.envelope) == (1, 0)
        assert [i.prescription.rx_no for i in refresh_and_list(inbox, api, served.clock)] == ["RX2"]
        # the pharmacy's other terminal lists the review as made on the first (P-03)
        other_kiosk = enrol_with_session(served.client, served.clock, "kiosk-rx-http-2")
        with session_factory(engine, write_intent=True).begin() as session:
            device = session.get(Device, other_kiosk.device_id)
            assert device is not None
            device.institution_id = served.pharmacy.institution_id
        other_api = ServerApi(
            str(served.client.base_url), other_kiosk.device_id, lambda: other_kiosk.session, served.clock
        )
        other_inbox = PrescriptionInbox.open(tmp_path / "other" / "prescriptions.db")
        try:
            seen = refresh_inbox(other_inbox, other_api, now=served.clock.now())
            assert (seen.pending, seen.reviewed_elsewhere) == (1, 1)
            [elsewhere] = other_inbox.reviewed()
            assert (elsewhere.prescription.rx_no, elsewhere.decision) == ("RX20260301001", "approved")
            assert (elsewhere.reviewed_on, elsewhere.message_id) == (kiosk.device_id, None)
            assert elsewhere.prescription.prescriber_name == "王**"
        finally:
            other_inbox.close()
            other_api.close()
    finally:
        inbox.close()
        api.close()
    status_ = served.his_call("GET", "/his/v1/prescriptions/RX20260301001").json()
    assert (status_["status"], status_["review"]["device_id"]) == ("approved", kiosk.device_id)
    # an unbound terminal gets no list
    with session_factory(engine, write_intent=True).begin() as session:
        device = session.get(Device, kiosk.device_id)
        assert device is not None
        device.institution_id = None
    unbound = signed(
        served.client, DeviceSigner(kiosk.device_id, kiosk.session), "GET", PENDING_PATH, clock=served.clock
    )
    assert unbound.status_code == 409
    unbound = signed(
        served.client, DeviceSigner(kiosk.device_id, kiosk.session), "GET", REVIEWED_PATH, clock=served.clock
    )
    assert unbound.status_code == 409


def refresh_and_list(inbox: PrescriptionInbox, api: ServerApi, clock: FakeClock) -> list[Any]:
    refresh_inbox(inbox, api, now=clock.now())
    return inbox.pending()


class NoRules:
    """A terminal holding no catalogue and no rules yet (the review still works; nothing to warn about)."""

    rule_set = None

    def drug(self, code: str) -> None:
        return None

    def evaluate(self, proposal: Proposal) -> Evaluation:
        return Evaluation()


class Signed:
    def current(self) -> tuple[str, Any]:
        return PHARMACIST, np.ones(128, dtype=np.float32)


class AcceptingFace:
    """The face check as accepted (the real models run in tests/terminal/test_review.py)."""

    def verify_template(self, reference: Any, *, subject_ref: str | None = None) -> FaceDecision:
        return FaceDecision(
            outcome=FaceOutcome.ACCEPTED,
            method="face_1to1",
            subject_ref=subject_ref,
            similarity=0.82,
            threshold=0.6,
            liveness=None,
            quality_issues=(),
            model_sha256="0" * 64,
            template_hash="cd" * 16,
            frames=4,
            duration_ms=700.0,
        )


def test_operators_see_their_own_scope_masked(served: Served, engine: Engine) -> None:
    assert served.his_call("POST", "/his/v1/prescriptions", prescription_body()).status_code == 201
    assert (
        served.his_call("POST", "/his/v1/prescriptions", prescription_body(rx_no="RX-NJ"), other=True).status_code
        == 201
    )
    make_account(engine, "rx-regulator-sh", Role.REGULATOR, region_prefix="3101")
    make_account(engine, "rx-regulator-js", Role.REGULATOR, region_prefix="3201")
    make_account(engine, "rx-pharmacist", Role.PHARMACIST, institution_id=served.pharmacy.institution_id)
    make_account(engine, "rx-head-nj", Role.INSTITUTION_HEAD, institution_id=served.pharmacy.other_institution_id)

    def listed(username: str, **params: str) -> dict[str, Any]:
        resp = served.client.get("/api/v1/prescriptions", params=params, headers=login(served.client, username))
        assert resp.status_code == 200, resp.text
        page: dict[str, Any] = resp.json()
        return page

    shanghai = listed("rx-regulator-sh")
    assert [i["rx_no"] for i in shanghai["items"]] == ["RX20260301001"]
    assert shanghai["items"][0]["patient_ref"] == "his-pt-000981"
    assert [i["rx_no"] for i in listed("rx-regulator-js")["items"]] == ["RX-NJ"]
    assert listed("rx-regulator-sh", institution_code=OTHER_CODE)["total"] == 0  # a filter never widens the scope
    assert listed("rx-regulator-js", institution_code=OTHER_CODE)["total"] == 1
    assert [i["rx_no"] for i in listed("rx-head-nj")["items"]] == ["RX-NJ"]
    assert listed("rx-pharmacist", status="pending")["total"] == 1
    assert listed("rx-pharmacist", status="approved")["total"] == 0
    assert listed("rx-pharmacist", since=(T0 + timedelta(seconds=1)).isoformat())["total"] == 0
    assert listed("rx-pharmacist", until=(T0 + timedelta(seconds=1)).isoformat(), limit="1")["total"] == 1

    pid = shanghai["items"][0]["id"]
    detail = served.client.get(f"/api/v1/prescriptions/{pid}", headers=login(served.client, "rx-pharmacist"))
    assert detail.status_code == 200, detail.text
    assert detail.json()["prescription"]["prescriber_name"] == "王**"
    assert detail.json()["prescription"]["patient_masked"] == "李*"
    assert DOCTOR_NAME not in detail.text
    hidden = served.client.get(f"/api/v1/prescriptions/{pid}", headers=login(served.client, "rx-head-nj"))
    assert hidden.status_code == 404
    assert (
        served.client.get(f"/api/v1/prescriptions/{pid}", headers=login(served.client, "rx-regulator-js")).status_code
        == 404
    )
