"""Prescription review on the terminal: the inbox holds what the server serves and keeps local decisions, a notice
wakes the refresher, a malformed answer changes nothing; the review needs a signed-in pharmacist, evaluates the held
drug rules (warnings acknowledged before approving, a block refuses approval), is confirmed by the pharmacist's face
with the real models and photos (another face or a printed photo records nothing), and puts a real SM2-signed
`review_decision` into the outbox without names or templates, offline."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import JsonValue

from hardware_sim.camera_sim import Presentation
from models.face import FaceEngine
from models.types import Embedding
from protocol import CommandKind, DeviceCommand, Envelope, SignedRecord, SignedRecordKind
from protocol.catalogue import CatalogueKind, CatalogueSnapshot, ChargeCategory, DispensingClass, DrugEntry
from protocol.drug_rules import (
    DrugRuleSet,
    DrugSelector,
    HistoryLine,
    MaxQuantityPerPeriod,
    MaxQuantityPerPurchase,
    RuleAction,
)
from protocol.evidence import sign_device_record, verify_device_record
from protocol.gm.sm2 import SM2PrivateKey
from protocol.prescription import (
    HistoryUse,
    PendingPrescription,
    PendingPrescriptions,
    ReviewedPrescription,
    ReviewedPrescriptions,
    ReviewOutcome,
    parse_review_decision,
)
from protocol.purchase import person_ref
from terminal.catalogue import CatalogueStore
from terminal.outbox import Outbox
from terminal.review import (
    PENDING_PATH,
    REVIEWED_PATH,
    InboxRefresher,
    InboxState,
    PrescriptionInbox,
    ReviewDesk,
    ReviewError,
    open_inbox,
    refresh_inbox,
    review_handlers,
)
from terminal.session import ServerRefusedError
from terminal.verification import FaceDecision, FaceOutcome
from tests.prescription_samples import AMOXICILLIN, LIQUORICE, PRESCRIBED_AT, pending
from tests.terminal.conftest import DEVICE_ID, FakeClock, open_outbox, wait_until
from tests.terminal.test_verification import Rig, engine, photo

__all__ = ["engine"]  # the module-scoped face engine fixture, shared with test_verification

T0 = PRESCRIBED_AT + timedelta(minutes=30)
INSTITUTION = "H31011500042"
PHARMACIST = "YS3101150007"


def _drug(code: str, name: str, unit: str, price_fen: int) -> DrugEntry:
    return DrugEntry(
        code=code,
        name=name,
        generic_name=name,
        dosage_form="片剂",
        specification="规格",
        package="盒",
        unit=unit,
        manufacturer="测试制药有限公司",
        approval_number="国药准字H20000001",
        category=ChargeCategory.CLASS_A,
        dispensing=DispensingClass.RX,
        price_fen=price_fen,
    )


def _rule(action: RuleAction) -> MaxQuantityPerPurchase:
    return MaxQuantityPerPurchase(
        rule_id="FFGC-1",
        title="复方甘草片",
        title_en="compound liquorice tablets",
        drugs=DrugSelector(generic_names=["复方甘草片"]),
        action=action,
        max_quantity=2,
    )


@pytest.fixture
def catalogue(tmp_path: Path) -> Iterator[CatalogueStore]:
    with CatalogueStore.open(tmp_path / "catalogue.db") as store:
        drugs = [_drug(AMOXICILLIN, "阿莫西林胶囊", "盒", 1250), _drug(LIQUORICE, "复方甘草片", "瓶", 800)]
        store.apply_snapshot(CatalogueSnapshot.build(CatalogueKind.DRUG, 1, drugs, T0))
        store.apply_rule_set(DrugRuleSet.build(3, [_rule(RuleAction.WARN)], T0))
        yield store


@pytest.fixture
def inbox(tmp_path: Path) -> Iterator[PrescriptionInbox]:
    box = open_inbox(tmp_path / "outbox.db")
    try:
        yield box
    finally:
        box.close()


def _served(*items: Any, total: int | None = None) -> PendingPrescriptions:
    return PendingPrescriptions(
        institution_code=INSTITUTION, items=list(items), total=len(items) if total is None else total
    )


class Server:
    """The pending and reviewed endpoints as a plain object: serves `document` and `reviewed` (none by default) and
    counts the calls (a `PendingSource`)."""

    def __init__(
        self,
        document: PendingPrescriptions | dict[str, Any],
        reviewed: ReviewedPrescriptions | dict[str, Any] | None = None,
    ) -> None:
        self.document = document
        code = document.institution_code if isinstance(document, PendingPrescriptions) else INSTITUTION
        self.reviewed = reviewed or ReviewedPrescriptions(
            institution_code=code, since=T0 - timedelta(days=30), items=[], total=0
        )
        self.calls: list[str] = []
        self.called = threading.Event()

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        self.calls.append(path)
        self.called.set()
        doc = self.document if path == PENDING_PATH else self.reviewed
        return doc if isinstance(doc, dict) else json.loads(doc.model_dump_json())


def reviewed_elsewhere(
    item: PendingPrescription, decision: ReviewOutcome = ReviewOutcome.APPROVED, *, device: str = "kiosk-other"
) -> ReviewedPrescription:
    return ReviewedPrescription(
        **item.model_dump(),
        decision=decision,
        reviewed_at=T0 + timedelta(minutes=5),
        pharmacist_code="Y310115000123",
        device_id=device,
    )


def _reviewed(*items: ReviewedPrescription) -> ReviewedPrescriptions:
    return ReviewedPrescriptions(
        institution_code=INSTITUTION, since=T0 - timedelta(days=30), items=list(items), total=len(items)
    )


def test_the_inbox_holds_what_the_server_serves_and_keeps_decisions_made_here(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    box = open_inbox(tmp_path / "outbox.db")
    assert (tmp_path / "prescriptions.db").exists()
    first = refresh_inbox(box, Server(_served(pending(1), pending(2, rx_no="RX2"))), now=clock.now())
    assert (first.added, first.removed, first.pending) == (2, 0, 2)
    box.mark_decided(1, ReviewOutcome.APPROVED, decided_at=T0, message_id="m-1")
    # the server still lists 1 (the decision is queued offline) and no longer lists 2 (decided elsewhere)
    again = refresh_inbox(box, Server(_served(pending(1), pending(3, rx_no="RX3"))), now=clock.now())
    assert (again.added, again.removed, again.pending) == (1, 1, 1)
    box.close()

    reopened = open_inbox(tmp_path / "outbox.db")
    try:
        assert [i.prescription.rx_no for i in reopened.pending()] == ["RX3"]
        [reviewed] = reopened.reviewed()
        assert (reviewed.state, reviewed.decision, reviewed.message_id) == (InboxState.REVIEWED, "approved", "m-1")
        # a capped page (total above what is served) does not drop newer prescriptions it could not list
        refresh_inbox(reopened, Server(_served(pending(1), total=5)), now=clock.now())
        assert [i.prescription_id for i in reopened.pending()] == [3]
        # moved to another institution: the old one's pending prescriptions go, reviewed ones stay viewable
        moved = PendingPrescriptions(institution_code="H31011509999", items=[pending(9, "H31011509999")], total=1)
        refresh_inbox(reopened, Server(moved), now=clock.now())
        assert [i.prescription_id for i in reopened.pending()] == [9]
        assert [i.prescription_id for i in reopened.reviewed()] == [1]
        # reviewed rows are kept 30 days, then pruned
        refresh_inbox(reopened, Server(_served()), now=T0 + timedelta(days=31))
        assert reopened.reviewed() == []
        assert reopened.pending() == []
    finally:
        reopened.close()


def test_reviews_made_on_the_pharmacys_other_terminals_are_listed_as_reviewed(tmp_path: Path) -> None:
    box = open_inbox(tmp_path / "outbox.db")
    try:
        refresh_inbox(box, Server(_served(pending(1), pending(2, rx_no="RX2"), pending(3, rx_no="RX3"))), now=T0)
        box.mark_decided(3, ReviewOutcome.REJECTED, decided_at=T0, message_id="m-3")
        # 2 was decided on another terminal (the server no longer lists it as pending); 4 this inbox never held;
        # 3 was decided here and the server now confirms where and by whom
        served = _reviewed(
            reviewed_elsewhere(pending(2, rx_no="RX2")),
            reviewed_elsewhere(pending(4, rx_no="RX4"), ReviewOutcome.RETURNED),
            reviewed_elsewhere(pending(3, rx_no="RX3"), ReviewOutcome.REJECTED, device=DEVICE_ID),
        )
        result = refresh_inbox(box, Server(_served(pending(1)), served), now=T0 + timedelta(minutes=10))
        assert (result.pending, result.reviewed_elsewhere) == (1, 2)
        assert [i.prescription_id for i in box.pending()] == [1]
        by_id = {i.prescription_id: i for i in box.reviewed()}
        assert sorted(by_id) == [2, 3, 4]
        assert (by_id[2].decision, by_id[2].reviewed_on, by_id[2].message_id) == ("approved", "kiosk-other", None)
        assert by_id[4].decision == "returned"
        assert by_id[4].prescription.prescriber_name == "王**"
        assert (by_id[3].decision, by_id[3].message_id, by_id[3].reviewed_on) == ("rejected", "m-3", DEVICE_ID)
        assert by_id[3].pharmacist_code == "Y310115000123"
        # another refresh adds nothing twice
        again = refresh_inbox(box, Server(_served(pending(1)), served), now=T0 + timedelta(minutes=20))
        assert again.reviewed_elsewhere == 0
        assert len(box.reviewed()) == 3
        # reviews older than the keeping time are not taken in
        late = refresh_inbox(
            box, Server(_served(), _reviewed(reviewed_elsewhere(pending(5, rx_no="RX5")))), now=T0 + timedelta(days=40)
        )
        assert (late.reviewed_elsewhere, box.reviewed()) == (0, [])
    finally:
        box.close()


def test_an_inbox_file_from_before_the_reviewed_list_is_upgraded_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "prescriptions.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE prescription (prescription_id INTEGER PRIMARY KEY, rx_no TEXT NOT NULL, institution TEXT NOT "
        "NULL, body TEXT NOT NULL, fetched_at TEXT NOT NULL, decision TEXT, decided_at TEXT, message_id TEXT) STRICT"
    )
    old.execute(
        "INSERT INTO prescription VALUES (1, 'RX1', ?, ?, ?, 'approved', ?, 'm-1')",
        (INSTITUTION, pending(1).model_dump_json(), T0.isoformat(), T0.isoformat()),
    )
    old.commit()
    old.close()
    box = PrescriptionInbox.open(path)
    try:
        [kept] = box.reviewed()
        assert (kept.prescription_id, kept.message_id, kept.reviewed_on) == (1, "m-1", None)
        refresh_inbox(box, Server(_served(), _reviewed(reviewed_elsewhere(pending(2, rx_no="RX2")))), now=T0)
        assert sorted(i.prescription_id for i in box.reviewed()) == [1, 2]
    finally:
        box.close()


def test_a_malformed_answer_changes_nothing(inbox: PrescriptionInbox) -> None:
    refresh_inbox(inbox, Server(_served(pending(1))), now=T0)
    tampered = json.loads(_served(pending(2, rx_no="RX2")).model_dump_json())
    tampered["items"][0]["prescription"]["lines"][0]["quantity"] = 99  # no longer matches its content digest
    with pytest.raises(ReviewError, match="content_digest"):
        refresh_inbox(inbox, Server(tampered), now=T0)
    with pytest.raises(ReviewError):
        refresh_inbox(inbox, Server({"type": "pending_prescriptions", "items": "nope"}), now=T0)
    assert [i.prescription_id for i in inbox.pending()] == [1]


def test_a_notice_wakes_the_refresher_which_fetches_the_pending_list(inbox: PrescriptionInbox) -> None:
    server = Server(_served(pending(7, rx_no="RX7")))
    refresher = InboxRefresher(inbox, server, FakeClock(T0), poll_s=3600)
    handler = review_handlers(refresher)[CommandKind.PRESCRIPTIONS_PENDING]
    refresher.start()
    try:
        assert wait_until(lambda: len(inbox.pending()) == 1)  # refreshed at start
        assert server.calls == [PENDING_PATH, REVIEWED_PATH]
        server.document = _served(pending(7, rx_no="RX7"), pending(8, rx_no="RX8"))
        command = DeviceCommand(
            command_id=uuid.uuid4(),
            device_id=DEVICE_ID,
            kind=CommandKind.PRESCRIPTIONS_PENDING,
            issued_at=T0,
            expires_at=T0 + timedelta(hours=1),
            args={"prescription_id": 8, "rx_no": "RX8"},
        )
        assert handler(command).outcome == "applied"
        assert wait_until(lambda: len(inbox.pending()) == 2)
    finally:
        refresher.stop()


class FlakyServer(Server):
    """Fails the first `failures` calls (no session key yet, server away), then serves."""

    def __init__(self, document: PendingPrescriptions, failures: int) -> None:
        super().__init__(document)
        self.failures = failures

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        if self.failures > 0:
            self.failures -= 1
            self.calls.append(path)
            raise ReviewError("server away")
        return super().get_json(path, params)


def test_a_failed_refresh_is_retried_soon_and_logged_once(
    inbox: PrescriptionInbox, caplog: pytest.LogCaptureFixture
) -> None:
    server = FlakyServer(_served(pending(5, rx_no="RX5")), failures=3)
    refresher = InboxRefresher(inbox, server, FakeClock(T0), poll_s=3600, retry_s=0.05)
    with caplog.at_level("INFO", logger="terminal.review"):
        refresher.start()
        try:
            assert wait_until(lambda: len(inbox.pending()) == 1)
        finally:
            refresher.stop()
    assert server.calls == [PENDING_PATH] * 4 + [REVIEWED_PATH]  # three failures, then both lists
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["prescription inbox refresh failed: ReviewError", "prescription inbox refresh works again"]


class InstitutionServer(Server):
    """The real server's pending endpoint as an unbound terminal meets it: 409 (no institution) until `bound`."""

    def __init__(self, document: PendingPrescriptions, bound: threading.Event) -> None:
        super().__init__(document)
        self.bound = bound

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        if not self.bound.is_set():
            self.calls.append(path)
            raise ServerRefusedError(
                f"server refused GET {path} (409): this terminal is not bound to an institution", status=409
            )
        return super().get_json(path, params)


def test_an_unbound_terminal_does_not_ask_nor_warn_and_fetches_once_bound(
    inbox: PrescriptionInbox, caplog: pytest.LogCaptureFixture
) -> None:
    bound = threading.Event()
    server = InstitutionServer(_served(pending(5, rx_no="RX5")), bound)
    refresher = InboxRefresher(inbox, server, FakeClock(T0), poll_s=3600, retry_s=0.05, bound=bound.is_set)
    with caplog.at_level("DEBUG", logger="terminal.review"):
        refresher.start()
        try:
            time.sleep(0.4)  # several retry periods while unbound (the demo's terminal at start)
            assert server.calls == []
            bound.set()  # the binding decision arrived: fetched at the next retry, not the 1-hour poll
            assert wait_until(lambda: len(inbox.pending()) == 1)
        finally:
            refresher.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    unbound = [r for r in caplog.records if "not bound" in r.getMessage()]
    assert [r.levelno for r in unbound] == [logging.DEBUG]  # said once, quietly, not at every retry
    assert server.calls == [PENDING_PATH, REVIEWED_PATH]


def test_a_refusal_while_the_terminal_believes_it_is_bound_is_still_a_warning(
    inbox: PrescriptionInbox, caplog: pytest.LogCaptureFixture
) -> None:
    # The server says "not bound" while the terminal's status says bound (an unbind whose notice has not come yet)
    server = InstitutionServer(_served(pending(5, rx_no="RX5")), threading.Event())
    refresher = InboxRefresher(inbox, server, FakeClock(T0), poll_s=3600, retry_s=0.05, bound=lambda: True)
    with caplog.at_level("INFO", logger="terminal.review"):
        refresher.start()
        try:
            assert wait_until(lambda: len(server.calls) >= 2)
        finally:
            refresher.stop()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "prescription inbox refresh failed: ServerRefusedError")
    ]


# ------------------------------------------------------------------------------------------------- the review


class Pharmacist:
    """The `SignedInPharmacist` seam: who is signed in (None: nobody)."""

    def __init__(self, signed_in: tuple[str, Embedding] | None) -> None:
        self.signed_in = signed_in

    def current(self) -> tuple[str, Embedding] | None:
        return self.signed_in


class Kiosk:
    """The parts a review touches: the inbox, the held rules, the outbox and the device's signing key."""

    def __init__(self, tmp_path: Path, catalogue: CatalogueStore, inbox: PrescriptionInbox) -> None:
        self.clock = FakeClock(T0)
        self.key = SM2PrivateKey.generate()
        self.outbox: Outbox = open_outbox(tmp_path / "outbox.db", self.clock)
        self.catalogue = catalogue
        self.inbox = inbox
        refresh_inbox(inbox, Server(_served(pending(1), pending(2, rx_no="RX2"))), now=T0)

    def record_signed(self, kind: SignedRecordKind, record: dict[str, JsonValue]) -> Envelope:
        """What `TerminalRuntime.record_signed` does: sign with the identity key, enqueue in the outbox."""
        payload = sign_device_record(self.key, device_id=DEVICE_ID, key_epoch=1, record_type=kind, record=record)
        return self.outbox.enqueue(payload)

    def desk(self, pharmacist: Pharmacist, face: Any) -> ReviewDesk:
        return ReviewDesk(self.inbox, self.catalogue, pharmacist, face, self.record_signed, self.clock)

    def queued(self) -> list[SignedRecord]:
        return [c.envelope.payload for c in self.outbox.claim(50) if isinstance(c.envelope.payload, SignedRecord)]


@pytest.fixture
def kiosk(tmp_path: Path, catalogue: CatalogueStore, inbox: PrescriptionInbox) -> Iterator[Kiosk]:
    k = Kiosk(tmp_path, catalogue, inbox)
    try:
        yield k
    finally:
        k.outbox.close()


def _enrolled(engine: FaceEngine, tmp_path: Path) -> Embedding:
    rig = Rig(engine, tmp_path, photo("obama_a"))
    assert rig.verifier.enrol(PHARMACIST).accepted
    gallery = rig.templates.load_gallery()
    template: Embedding = np.asarray(gallery.templates[gallery.ids.index(PHARMACIST)], dtype=np.float32)
    return template


def _no_face(reference: Embedding, *, subject_ref: str | None = None) -> FaceDecision:
    raise AssertionError("the face check must not run when the decision is refused beforehand")


class NoFace:
    verify_template = staticmethod(_no_face)


def test_a_review_needs_a_signed_in_pharmacist(kiosk: Kiosk) -> None:
    with pytest.raises(ReviewError, match="signed in"):
        kiosk.desk(Pharmacist(None), NoFace()).open(1)
    with pytest.raises(ReviewError, match="not in this terminal's inbox"):
        kiosk.desk(Pharmacist(("YS1", _dummy())), NoFace()).open(99)


def _dummy() -> Embedding:
    return np.ones(128, dtype=np.float32)


def test_warnings_are_acknowledged_then_the_face_confirms_and_the_signed_decision_is_queued(
    kiosk: Kiosk, engine: FaceEngine, tmp_path: Path
) -> None:
    template = _enrolled(engine, tmp_path)
    pharmacist = Pharmacist((PHARMACIST, template))
    face = Rig(engine, tmp_path, photo("obama_b"))
    desk = kiosk.desk(pharmacist, face.verifier)

    session = desk.open(1)
    assert session.rule_set_version == 3
    [finding] = session.findings  # 3 bottles of 复方甘草片 > 2 per purchase (P-05/P-06)
    assert (finding.rule_id, finding.action, finding.observed, finding.limit) == ("FFGC-1", "warn", 3, 2)
    assert finding.drug_codes == (LIQUORICE,)
    assert [f.rule_id for f in session.unacknowledged] == ["FFGC-1"]
    with pytest.raises(ReviewError, match="acknowledged"):
        desk.decide(session, ReviewOutcome.APPROVED, [])
    assert face.events == []  # refused before any face attempt
    session.acknowledge("FFGC-1")
    assert session.can_approve

    # another pharmacist signing in meanwhile cannot finish this review
    pharmacist.signed_in = ("YS-OTHER", template)
    with pytest.raises(ReviewError, match="not the one"):
        desk.decide(session, ReviewOutcome.APPROVED, [])
    pharmacist.signed_in = (PHARMACIST, template)

    result = desk.decide(session, ReviewOutcome.APPROVED, ["用量已与患者确认"])
    assert result.recorded, result.face
    assert result.face.outcome is FaceOutcome.ACCEPTED
    assert result.face.liveness is not None
    assert result.face.liveness.live

    # offline: the decision waits in the outbox, signed by the device
    assert kiosk.outbox.stats().depth >= 1
    [payload] = kiosk.queued()
    assert payload.record_type is SignedRecordKind.REVIEW_DECISION
    verify_device_record(payload, device_id=DEVICE_ID, device_key=kiosk.key.public_key)
    record = parse_review_decision(dict(payload.record))
    assert (record.rx_no, record.institution_code, record.prescription_id) == ("RX20260301001", INSTITUTION, 1)
    assert (record.pharmacist_code, record.decision, record.rule_set_version) == (PHARMACIST, "approved", 3)
    assert record.content_digest == pending(1).content_digest
    [shown] = record.findings
    assert (shown.rule_id, shown.acknowledged, shown.observed) == ("FFGC-1", True, 3)
    assert record.purchase_history is HistoryUse.NOT_IDENTIFIED  # the sample prescription names no patient
    assert record.face.decision == "accepted"
    assert record.face.similarity is not None
    assert record.face.similarity >= record.face.threshold
    assert record.face.live is True
    assert record.face.template_hash == result.face.template_hash
    wire = json.dumps(payload.model_dump(mode="json"), ensure_ascii=False)
    assert "李" not in wire  # no patient name, not even masked: the decision names the prescription only
    assert "王" not in wire
    assert "[" not in json.dumps(record.face.model_dump())  # no vectors

    # the prescription is reviewed here now and cannot be decided twice on this terminal
    assert [i.prescription_id for i in kiosk.inbox.pending()] == [2]
    with pytest.raises(ReviewError, match="reviewed already"):
        desk.open(1)
    with pytest.raises(ReviewError, match="no longer pending"):
        desk.decide(session, ReviewOutcome.APPROVED, [])


def test_another_face_or_a_printed_photo_records_nothing(kiosk: Kiosk, engine: FaceEngine, tmp_path: Path) -> None:
    template = _enrolled(engine, tmp_path)
    pharmacist = Pharmacist((PHARMACIST, template))
    impostor = Rig(engine, tmp_path, photo("biden_b"))
    session = kiosk.desk(pharmacist, impostor.verifier).open(2)
    session.acknowledge_all()
    result = kiosk.desk(pharmacist, impostor.verifier).decide(session, ReviewOutcome.APPROVED, [])
    assert (result.recorded, result.face.outcome) == (False, FaceOutcome.NO_MATCH)

    printed = Rig(engine, tmp_path, photo("obama_b"), presentation=Presentation.PRINT)
    result = kiosk.desk(pharmacist, printed.verifier).decide(session, ReviewOutcome.APPROVED, [])
    assert (result.recorded, result.face.outcome) == (False, FaceOutcome.LIVENESS_FAILED)

    assert kiosk.queued() == []
    assert [i.prescription_id for i in kiosk.inbox.pending()] == [1, 2]


def test_a_blocking_rule_refuses_approval_and_a_rejection_needs_a_reason(
    kiosk: Kiosk, engine: FaceEngine, tmp_path: Path
) -> None:
    kiosk.catalogue.apply_rule_set(DrugRuleSet.build(4, [_rule(RuleAction.BLOCK)], T0))
    template = _enrolled(engine, tmp_path)
    pharmacist = Pharmacist((PHARMACIST, template))
    refused = kiosk.desk(pharmacist, NoFace())
    session = refused.open(1)
    assert session.blocked
    session.acknowledge_all()
    with pytest.raises(ReviewError, match="blocks"):
        refused.decide(session, ReviewOutcome.APPROVED, [])
    with pytest.raises(ReviewError, match="reason"):
        refused.decide(session, ReviewOutcome.REJECTED, [])

    face = Rig(engine, tmp_path, photo("obama_b"))
    result = kiosk.desk(pharmacist, face.verifier).decide(session, ReviewOutcome.REJECTED, ["超出单次限量"])
    assert result.recorded
    [payload] = kiosk.queued()
    record = parse_review_decision(dict(payload.record))
    assert (record.decision, record.reasons, record.rule_set_version) == ("rejected", ["超出单次限量"], 4)
    [shown] = record.findings
    assert (shown.action, shown.acknowledged) == ("block", False)
    assert [i.decision for i in kiosk.inbox.reviewed()] == ["rejected"]


def test_the_runtime_keeps_its_inbox_beside_the_outbox(tmp_path: Path) -> None:
    from terminal.config import parse_terminal_config
    from terminal.runtime import build_runtime
    from tests.terminal.conftest import terminal_raw_config
    from tests.terminal.fakes import ScriptedLink

    config = parse_terminal_config(terminal_raw_config(tmp_path), source="test.toml", base_dir=tmp_path)
    clock = FakeClock(T0)
    runtime = build_runtime(config, [], clock, link=ScriptedLink(clock))
    try:
        assert runtime.prescriptions is not None
        assert runtime.prescriptions.pending() == []
        assert config.outbox.path.with_name("prescriptions.db").exists()
        assert runtime.prescription_refresher is None  # not enrolled: no device API to refresh from
    finally:
        runtime.stop()


# ---------------------------------------------------------------------------------------------------- period rules


class Lookback:
    """The platform's purchase lookback as `ServerPurchaseHistory` answers it: lines per person_ref, or None (the
    server away)."""

    def __init__(self, lines: dict[str, tuple[HistoryLine, ...]] | None) -> None:
        self.known = lines
        self.asked: list[str] = []

    def lines(self, person_ref: str, *, at: Any) -> tuple[HistoryLine, ...] | None:
        self.asked.append(person_ref)
        return None if self.known is None else self.known.get(person_ref, ())


PATIENT = person_ref("01", "110101195307150025")


def test_period_rules_count_the_patients_earlier_purchases_when_the_prescription_names_the_patient(
    tmp_path: Path,
) -> None:
    """HIS names the patient by `patient_person_ref`; the review asks the platform's lookback and the 30-day limit
    (3 boxes of amoxicillin) counts the 2 boxes bought 10 days ago elsewhere with the 2 prescribed now."""
    period = MaxQuantityPerPeriod(
        rule_id="AMX-30D",
        title="阿莫西林30天限量",
        title_en="amoxicillin per 30 days",
        drugs=DrugSelector(generic_names=["阿莫西林胶囊"]),
        action=RuleAction.WARN,
        period_days=30,
        max_quantity=3,
    )
    earlier = HistoryLine("server:7", T0 - timedelta(days=10), AMOXICILLIN, "阿莫西林胶囊", 2)
    with CatalogueStore.open(tmp_path / "catalogue.db") as store:
        drugs = [_drug(AMOXICILLIN, "阿莫西林胶囊", "盒", 1250), _drug(LIQUORICE, "复方甘草片", "瓶", 800)]
        store.apply_snapshot(CatalogueSnapshot.build(CatalogueKind.DRUG, 1, drugs, T0))
        store.apply_rule_set(DrugRuleSet.build(4, [period], T0))
        box = open_inbox(tmp_path / "outbox.db")
        try:
            named = pending(1, patient_person_ref=PATIENT)
            anonymous = pending(2, rx_no="RX2")
            refresh_inbox(box, Server(_served(named, anonymous)), now=T0)
            pharmacist = Pharmacist((PHARMACIST, _dummy()))

            def desk(history: Lookback | None) -> ReviewDesk:
                return ReviewDesk(box, store, pharmacist, NoFace(), _no_record, FakeClock(T0), history=history)

            lookback = Lookback({PATIENT: (earlier,)})
            session = desk(lookback).open(1)
            assert session.history is HistoryUse.SERVER
            [finding] = session.findings
            assert (finding.rule_id, finding.observed, finding.limit) == ("AMX-30D", 4, 3)
            assert lookback.asked == [PATIENT]
            # no patient_person_ref: this prescription only (2 ≤ 3), and nobody is looked up
            unnamed = desk(lookback).open(2)
            assert (unnamed.history, unnamed.findings) == (HistoryUse.NOT_IDENTIFIED, ())
            assert lookback.asked == [PATIENT]
            # the lookback failing (or no server): this prescription only, and the session says so
            away = desk(Lookback(None)).open(1)
            assert (away.history, away.findings) == (HistoryUse.UNAVAILABLE, ())
            assert desk(None).open(1).history is HistoryUse.UNAVAILABLE
        finally:
            box.close()


def _no_record(kind: SignedRecordKind, record: dict[str, JsonValue]) -> Envelope:
    raise AssertionError("opening a review records nothing")


def test_a_patient_person_ref_must_be_a_reference_never_a_number() -> None:
    with pytest.raises(ValueError, match="pattern"):
        pending(1, patient_person_ref="110101195307150025")
