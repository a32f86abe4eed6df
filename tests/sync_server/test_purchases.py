"""Purchases and proxy purchase on the server, on SQLite and PostgreSQL (docs/purchases.md).

The rules in process (`sync_server.purchases` inside real transactions, the ingest hook fed real SM2-signed
`pos_verification` records): a purchase registered before or after its verification is linked either way; the
same settlement again is idempotent and a different body conflicts; forged, unenrolled and replayed records never
become rows; a verification that does not back the purchase is a mismatch with a reason; relationships are
registered once, conflict on other terms, end idempotently, and notify the institution's terminals once; nothing
stored holds a name or an ID number. Then the same over real HTTP with signed HIS requests, device requests and
operator accounts (isolation between institutions, masking, the region/institution scope of the lists)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select, text

from protocol import CommandKind, Envelope, PayloadType, SignedRecord, SignedRecordKind
from protocol.evidence import sign_device_record
from protocol.gm.sm2 import SM2PrivateKey
from protocol.purchase import (
    AgentKind,
    PosVerificationRecord,
    ProxyEvidence,
    VerificationMethod,
    VerificationOutcome,
    parse_purchase_history,
    person_ref,
)
from protocol.request_signing import sign_request, signing_string
from sync_server import purchases
from sync_server.accounts import Role
from sync_server.app import create_app
from sync_server.db.engine import session_factory
from sync_server.db.models import (
    Device,
    DeviceKey,
    Institution,
    InstitutionKind,
    IssuedCommand,
    PosVerification,
    ProxyRelation,
    Purchase,
    PurchaseLine,
    PurchaseTraceCode,
    PurchaseVerificationState,
)
from sync_server.identity import create_server_key
from sync_server.purchases import ProxyRelationshipIn, PurchaseIn
from sync_server.settings import ServerSettings
from sync_server.store import register_devices, store_envelopes
from terminal.proxy import ProxyRelationshipSync, SqliteProxyRegistry
from terminal.server_api import ServerApi
from tests.sync_server.conftest import BOOT, INSTITUTION_CODE, T0, FakeClock, seed_fleet, serving
from tests.sync_server.signed_requests import (
    DeviceSigner,
    Enrolled,
    HisSigner,
    enrol_with_session,
    make_his_client,
    signed,
)
from tests.sync_server.test_accounts import audit_events, login, make_account

DEVICE = "kiosk-p01"
OTHER_DEVICE = "kiosk-p02"
CODE_A = "H31011500101"
CODE_B = "H32010200202"
BUYER_ID = "11010519491231002X"
BUYER_NAME = "王小明"
AGENT_ID = "110105198001010016"
AGENT_NAME = "李四光"
BUYER_REF = person_ref("01", BUYER_ID)
AGENT_REF = person_ref("01", AGENT_ID)


def _valid_id(body17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return body17 + "10X98765432"[sum(int(d) * w for d, w in zip(body17, weights, strict=True)) % 11]


assert _valid_id(BUYER_ID[:17]) == BUYER_ID
assert _valid_id(AGENT_ID[:17]) == AGENT_ID


@dataclass
class World:
    engine: Engine
    key: SM2PrivateKey
    institution_a: int
    institution_b: int
    seq: int = 0

    def session(self) -> Any:
        return session_factory(self.engine, write_intent=True).begin()

    def signed(
        self, record: PosVerificationRecord, *, key: SM2PrivateKey | None = None, device: str = DEVICE
    ) -> Envelope:
        self.seq += 1
        payload = sign_device_record(
            key or self.key,
            device_id=device,
            key_epoch=1,
            record_type=SignedRecordKind.POS_VERIFICATION,
            record=record.to_record(),
        )
        return Envelope(
            device_id=device,
            seq=self.seq,
            message_id=uuid.uuid4(),
            device_time=T0,
            boot_id=BOOT,
            monotonic_ns=self.seq,
            payload_type=PayloadType.SIGNED_RECORD,
            payload=payload,
        )

    def ingest(self, *envelopes: Envelope) -> purchases.VerificationsRecorded:
        """What ingest's transaction does with a batch: store the envelopes, then the hook."""
        with self.session() as session:
            store_envelopes(session, list(envelopes), received_at=T0)
            return purchases.record_pos_verifications(session, list(envelopes), now=T0)

    def register(self, body: dict[str, Any], institution_id: int | None = None) -> purchases.Registered:
        with self.session() as session:
            done = purchases.register_purchase(
                session,
                institution_id or self.institution_a,
                PurchaseIn.model_validate(body),
                his_client="his:a",
                now=T0 + timedelta(minutes=5),
            )
            session.expunge_all()
            return done

    def purchase(self, settlement_no: str, institution_id: int | None = None) -> purchases.PurchaseView:
        with session_factory(self.engine)() as session:
            row, _ = purchases.purchase_of(session, institution_id or self.institution_a, settlement_no)
            return row


@pytest.fixture
def world(engine: Engine) -> World:
    key = SM2PrivateKey.generate()
    with session_factory(engine, write_intent=True).begin() as session:
        a = Institution(
            code=CODE_A, name="浦东示例药房", kind=InstitutionKind.PHARMACY, region_code="310115", created_at=T0
        )
        b = Institution(
            code=CODE_B, name="南京示例药房", kind=InstitutionKind.PHARMACY, region_code="320102", created_at=T0
        )
        session.add_all([a, b])
        session.flush()
        register_devices(session, {DEVICE, OTHER_DEVICE}, now=T0)
        session.flush()
        for device, inst in ((DEVICE, a), (OTHER_DEVICE, b)):
            row = session.get(Device, device)
            assert row is not None
            row.institution_id = inst.id
            session.add(
                DeviceKey(
                    device_id=device,
                    key_epoch=1,
                    public_key=key.public_key.hex(),
                    fingerprint=key.public_key.fingerprint(),
                    created_at=T0,
                )
            )
        ids = (a.id, b.id)
    return World(engine, key, *ids)


def verification(
    code: str | None = "KIOSK-P0120260301160000" + "0001",
    *,
    buyer: str = BUYER_REF,
    agent: str | None = None,
    kind: AgentKind = AgentKind.FACE,
    relationship_id: str | None = None,
    outcome: VerificationOutcome = VerificationOutcome.VERIFIED,
) -> PosVerificationRecord:
    proxy = None
    if agent is not None:
        proxy = ProxyEvidence(
            beneficiary_ref=buyer,
            agent_kind=kind,
            agent_ref=agent,
            agent_masked_id="1101**********0016" if kind is AgentKind.MANUAL else None,
            agent_cert_type="01" if kind is AgentKind.MANUAL else None,
            relationship_id=relationship_id,
        )
    return PosVerificationRecord(
        verification_id=uuid.uuid4().hex,
        client_id="his-01",
        transaction_code=code if outcome is VerificationOutcome.VERIFIED else None,
        method=VerificationMethod.EVOUCHER if agent else VerificationMethod.ID_CARD_FACE,
        check="evoucher+agent_face_1toN" if agent else "id_card+face_1to1",
        outcome=outcome,
        reason=None if outcome is VerificationOutcome.VERIFIED else "face_no_match",
        buyer_ref=buyer,
        buyer_masked_id="1101**********002X",
        buyer_cert_type="01",
        insuplc_admdvs="310115",
        proxy=proxy,
        verified_at=T0,
    )


TX = "KIOSK-P01202603011600000001"


def purchase_body(
    settlement_no: str = "SETL-0001",
    transaction_code: str = TX,
    *,
    agent: dict[str, Any] | None = None,
    relationship_id: str | None = None,
    trace: tuple[str, ...] = ("81234567890123456789", "81234567890123456790"),
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "settlement_no": settlement_no,
        "transaction_code": transaction_code,
        "settled_at": (T0 + timedelta(minutes=3)).isoformat(),
        "buyer": {"psn_cert_type": "01", "certno": BUYER_ID, "psn_name": BUYER_NAME},
        "lines": [
            {
                "med_list_codg": "XJ01CAA040A001010100534",
                "drug_name": "阿莫西林胶囊",
                "cnt": 2,
                "amount_fen": 2560,
                "trace_codes": list(trace),
            },
            {"med_list_codg": "ZA01AAA0001010100001", "cnt": 1, "amount_fen": 1800, "trace_codes": []},
        ],
    }
    if agent is not None:
        body["proxy"] = {"agent": agent, **({"relationship_id": relationship_id} if relationship_id else {})}
    return body


# ---------------------------------------------------------------------------------------------------- the rules


def test_the_plain_views_hold_the_columns_they_stand_for() -> None:
    """HIS's answers are built from plain dataclasses read by Core statements: a column added to the tables must be
    added to them too (or it would be missing from what HIS reads back)."""
    purchase_columns = [c.key for c in Purchase.__table__.columns]
    assert [f.name for f in fields(purchases.PurchaseView) if f.name != "lines"] == purchase_columns
    line_columns = {c.key for c in PurchaseLine.__table__.columns} - {"id"}
    assert {f.name for f in fields(purchases.PurchaseLineView)} == line_columns
    assert {f.name for f in fields(purchases.LinkedVerification)} <= {c.key for c in PosVerification.__table__.columns}


def test_verification_first_then_purchase_is_linked(world: World) -> None:
    done = world.ingest(world.signed(verification(TX)))
    assert (done.created, done.refused, done.linked) == (1, 0, 0)
    registered = world.register(purchase_body())
    assert registered.created
    row = world.purchase("SETL-0001")
    assert row.verification_state is PurchaseVerificationState.LINKED
    assert row.total_amount_fen == 2560 + 1800
    assert row.buyer_ref == BUYER_REF


def test_purchase_first_is_pending_then_linked_when_the_terminal_comes_back(world: World) -> None:
    world.register(purchase_body())
    assert world.purchase("SETL-0001").verification_state is PurchaseVerificationState.PENDING
    envelope = world.signed(verification(TX))
    done = world.ingest(envelope)
    assert (done.created, done.linked) == (1, 1)
    assert world.purchase("SETL-0001").verification_state is PurchaseVerificationState.LINKED
    # the terminal re-sends the same envelope (no ack seen): stored once, nothing changes
    again = world.ingest(envelope)
    assert (again.created, again.refused, again.linked) == (0, 0, 0)


def test_same_settlement_is_idempotent_and_a_different_body_conflicts(world: World) -> None:
    assert world.register(purchase_body()).created
    assert not world.register(purchase_body()).created
    changed = purchase_body(trace=("81234567890123456789",))
    with pytest.raises(purchases.PurchaseConflictError):
        world.register(changed)
    # the same settlement number at another institution is another purchase
    assert world.register(purchase_body(), world.institution_b).created
    with session_factory(world.engine)() as session:
        assert len(list(session.scalars(select(Purchase.id).where(Purchase.settlement_no == "SETL-0001")))) == 2


def test_concurrent_registrations_of_one_settlement_store_it_once(world: World) -> None:
    """HIS retrying in parallel (a lost answer, two tills): the INSERT … ON CONFLICT keeps one row and one set of
    lines and traceability codes; every other request answers with the stored purchase, none fails."""
    with ThreadPoolExecutor(max_workers=6) as pool:
        done = list(pool.map(lambda _n: world.register(purchase_body()), range(6)))
    assert sorted(d.created for d in done) == [False] * 5 + [True]
    assert len({d.purchase.id for d in done}) == 1
    with session_factory(world.engine)() as session:
        assert session.scalar(select(func.count()).select_from(Purchase)) == 1
        assert session.scalar(select(func.count()).select_from(PurchaseTraceCode)) == 2
    changed = purchase_body(trace=("81234567890123456789",))
    with ThreadPoolExecutor(max_workers=3) as pool:
        errors = list(pool.map(lambda _n: _conflict_of(world, changed), range(3)))
    assert errors == [True, True, True]


def _conflict_of(world: World, body: dict[str, Any]) -> bool:
    try:
        world.register(body)
    except purchases.PurchaseConflictError:
        return True
    return False


def test_forged_unenrolled_and_replayed_records_never_become_rows(world: World) -> None:
    forged = world.signed(verification(TX), key=SM2PrivateKey.generate())
    first = world.signed(verification(TX))
    replay = world.signed(verification(TX))  # same transaction code, a new message: refused
    done = world.ingest(forged, first, replay)
    assert (done.created, done.refused) == (1, 2)
    tampered = world.signed(verification("KIOSK-P01202603011600000002"))
    assert isinstance(tampered.payload, SignedRecord)
    record = dict(tampered.payload.record)
    record["buyer_ref"] = AGENT_REF
    bad = tampered.model_copy(update={"payload": tampered.payload.model_copy(update={"record": record})})
    assert world.ingest(bad).refused == 1
    with session_factory(world.engine)() as session:
        assert [v.transaction_code for v in session.scalars(select(PosVerification))] == [TX]


@pytest.mark.parametrize(
    ("record", "note"),
    [
        (verification(TX, buyer=AGENT_REF), "buyer_differs"),
        (verification(TX, agent=AGENT_REF), "proxy_differs"),
    ],
)
def test_a_verification_that_does_not_back_the_purchase_is_a_mismatch(
    world: World, record: PosVerificationRecord, note: str
) -> None:
    world.register(purchase_body())
    world.ingest(world.signed(record))
    row = world.purchase("SETL-0001")
    assert (row.verification_state, row.verification_note) == (PurchaseVerificationState.MISMATCH, note)


def test_a_verification_of_another_institutions_terminal_is_a_mismatch(world: World) -> None:
    world.ingest(world.signed(verification(TX), device=OTHER_DEVICE))
    world.register(purchase_body())
    row = world.purchase("SETL-0001")
    assert (row.verification_state, row.verification_note) == (PurchaseVerificationState.MISMATCH, "other_institution")


def test_one_verification_cannot_back_two_settlements(world: World) -> None:
    world.ingest(world.signed(verification(TX)))
    world.register(purchase_body("SETL-0001"))
    world.register(purchase_body("SETL-0002", trace=("81234567890123450000",)))
    assert world.purchase("SETL-0001").verification_state is PurchaseVerificationState.LINKED
    second = world.purchase("SETL-0002")
    assert (second.verification_state, second.verification_note) == (
        PurchaseVerificationState.MISMATCH,
        "code_reused",
    )


def test_a_traceability_code_sold_again_is_flagged_on_the_later_purchase(world: World) -> None:
    world.register(purchase_body("SETL-0001", trace=("81234567890123456789", "81234567890123456790")))
    world.register(purchase_body("SETL-0002", trace=("81234567890123456790", "81234567890123459999")))
    world.register(purchase_body("SETL-0003", trace=("81234567890123450000",)), world.institution_b)
    world.register(purchase_body("SETL-0004", trace=("81234567890123459999",)), world.institution_b)
    assert world.purchase("SETL-0001").reused_trace_codes == []
    assert world.purchase("SETL-0002").reused_trace_codes == ["81234567890123456790"]
    assert world.purchase("SETL-0003", world.institution_b).reused_trace_codes == []
    # across institutions too: the same package cannot be sold by two pharmacies
    assert world.purchase("SETL-0004", world.institution_b).reused_trace_codes == ["81234567890123459999"]
    # the idempotent repeat of the first registration does not flag it against itself
    assert not world.register(purchase_body("SETL-0001")).created
    assert world.purchase("SETL-0001").reused_trace_codes == []


def _relationship(**change: Any) -> ProxyRelationshipIn:
    body = {
        "beneficiary": {"certno": BUYER_ID, "psn_name": BUYER_NAME},
        "agent": {"certno": AGENT_ID, "psn_name": AGENT_NAME},
        "relation": "child",
        "valid_until": (T0 + timedelta(days=365)).isoformat(),
        **change,
    }
    return ProxyRelationshipIn.model_validate(body)


def test_proxy_relationships_register_notify_end_and_back_a_proxy_purchase(world: World) -> None:
    with world.session() as session:
        change = purchases.register_relationship(
            session, world.institution_a, _relationship(), his_client="his:a", now=T0
        )
        assert change.changed
        assert [c.device_id for c in change.notices] == [DEVICE]  # the institution's terminals only
        relationship_id = change.relationship.id
        same = purchases.register_relationship(session, world.institution_a, _relationship(), his_client="h", now=T0)
        assert (same.changed, same.relationship.id, same.notices) == (False, relationship_id, [])
        with pytest.raises(purchases.PurchaseConflictError):
            purchases.register_relationship(
                session, world.institution_a, _relationship(relation="spouse"), his_client="h", now=T0
            )
        rows, total = purchases.active_relationships(session, world.institution_a, now=T0, limit=10, offset=0)
        assert (total, [(r.beneficiary_ref, r.agent_ref) for r in rows]) == (1, [(BUYER_REF, AGENT_REF)])
        assert purchases.active_relationships(session, world.institution_b, now=T0, limit=10, offset=0)[1] == 0

    # the proxy purchase: the kiosk matched the agent's face against this relationship
    world.ingest(world.signed(verification(TX, agent=AGENT_REF, relationship_id=str(relationship_id))))
    agent = {"kind": "face", "person_ref": AGENT_REF}
    world.register(purchase_body(agent=agent))
    row = world.purchase("SETL-0001")
    assert (row.verification_state, row.relationship_id, row.agent_kind) == (
        PurchaseVerificationState.LINKED,
        relationship_id,
        "face",
    )

    with world.session() as session:
        # a second change while the first notice is still on its way adds no second notice
        ended = purchases.end_relationship(session, world.institution_a, relationship_id, his_client="h", now=T0)
        assert ended.changed
        assert ended.notices == []
        assert not purchases.end_relationship(
            session, world.institution_a, relationship_id, his_client="h", now=T0
        ).changed
        with pytest.raises(purchases.PurchaseNotFoundError):
            purchases.end_relationship(session, world.institution_b, relationship_id, his_client="h", now=T0)
        assert purchases.active_relationships(session, world.institution_a, now=T0, limit=10, offset=0)[1] == 0
        kinds = [c.kind for c in session.scalars(select(IssuedCommand))]
        assert kinds == [CommandKind.PROXY_RELATIONSHIPS.value]
    with pytest.raises(purchases.PurchaseInvalidError):
        world.register(purchase_body("SETL-0009", agent=agent, relationship_id="424242"))


def test_manual_agent_is_stored_masked(world: World) -> None:
    agent = {"kind": "manual", "psn_cert_type": "01", "certno": AGENT_ID, "psn_name": AGENT_NAME}
    world.register(purchase_body(agent=agent))
    row = world.purchase("SETL-0001")
    assert (row.agent_ref, row.agent_kind, row.relationship_id) == (AGENT_REF, "manual", None)
    assert row.agent_masked_id == "110*************16"
    assert row.agent_masked_name == "李**"


@pytest.mark.parametrize(
    "change",
    [
        {"buyer": {"certno": "110105194912310021"}},  # wrong check digit
        {"buyer": {"psn_cert_type": "01"}},  # neither certno nor person_ref
        {"buyer": {"certno": BUYER_ID, "person_ref": AGENT_REF}},  # a ref that is not the number's
        {"lines": []},
        {"proxy": {"agent": {"kind": "manual", "person_ref": AGENT_REF}}},  # manual needs number and name
        {"proxy": {"agent": {"kind": "face", "certno": BUYER_ID}}},  # the agent is the buyer
    ],
)
def test_invalid_bodies_are_refused_without_echoing_the_number(change: dict[str, Any]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as raised:
        PurchaseIn.model_validate({**purchase_body(), **change})
    assert BUYER_ID not in str(raised.value.errors(include_input=False))


def test_nothing_stored_holds_a_name_or_an_id_number(world: World) -> None:
    with world.session() as session:
        purchases.register_relationship(session, world.institution_a, _relationship(), his_client="h", now=T0)
    world.register(purchase_body(agent={"kind": "manual", "certno": AGENT_ID, "psn_name": AGENT_NAME}))
    world.ingest(world.signed(verification(TX, agent=AGENT_REF, kind=AgentKind.MANUAL)))
    with world.engine.connect() as conn:
        for table in ("purchases", "purchase_lines", "proxy_relationships", "pos_verifications", "events"):
            dump = str(conn.execute(text(f"SELECT * FROM {table}")).fetchall())  # noqa: S608 - fixed names
            for secret in (BUYER_ID, AGENT_ID, BUYER_NAME, AGENT_NAME):
                assert secret not in dump, (table, "personal data stored")


# ---------------------------------------------------------------------------------------------------- over HTTP


@dataclass
class Served:
    client: httpx.Client
    clock: FakeClock
    engine: Engine
    his_a: HisSigner
    his_b: HisSigner
    device: Enrolled
    data_dir: Path


@pytest.fixture
def served(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[Served]:
    seed_fleet(engine)  # INSTITUTION_CODE in 310115
    with session_factory(engine, write_intent=True).begin() as session:
        session.add(
            Institution(
                code=CODE_B, name="南京示例药房", kind=InstitutionKind.PHARMACY, region_code="320102", created_at=T0
            )
        )
        session.flush()
        a = session.scalar(select(Institution.id).where(Institution.code == INSTITUTION_CODE))
    make_account(engine, "head-a", Role.INSTITUTION_HEAD, institution_id=a)
    make_account(engine, "reg-sh", Role.REGULATOR, region_prefix="3101")
    make_account(engine, "reg-js", Role.REGULATOR, region_prefix="3201")
    make_account(engine, "cashier-a", Role.CASHIER, institution_id=a)
    settings = ServerSettings(database_url=db_url, data_dir=tmp_path)
    create_server_key(settings, iterations=1000)
    clock = FakeClock(T0)
    app = create_app(settings, engine=engine, clock=clock, start_ingest=False)
    with serving(app) as client:
        his_a = make_his_client(client, INSTITUTION_CODE)
        his_b = make_his_client(client, CODE_B)
        device = enrol_with_session(client, clock, "kiosk-pos-1")
        with session_factory(engine, write_intent=True).begin() as session:
            row = session.get(Device, "kiosk-pos-1")
            assert row is not None
            row.institution_id = a
        yield Served(client, clock, engine, his_a, his_b, device, tmp_path)


def _ingest_signed(served: Served, record: PosVerificationRecord) -> purchases.VerificationsRecorded:
    payload = sign_device_record(
        served.device.identity,
        device_id=served.device.device_id,
        key_epoch=1,
        record_type=SignedRecordKind.POS_VERIFICATION,
        record=record.to_record(),
    )
    envelope = Envelope(
        device_id=served.device.device_id,
        seq=1,
        message_id=uuid.uuid4(),
        device_time=T0,
        boot_id=BOOT,
        monotonic_ns=1,
        payload_type=PayloadType.SIGNED_RECORD,
        payload=payload,
    )
    with session_factory(served.engine, write_intent=True).begin() as session:
        store_envelopes(session, [envelope], received_at=T0)
        return purchases.record_pos_verifications(session, [envelope], now=T0)


def test_his_registers_a_purchase_idempotently_and_sees_only_its_own(served: Served) -> None:
    client, clock = served.client, served.clock
    body = purchase_body()
    created = signed(client, served.his_a, "POST", "/his/v1/purchases", clock=clock, json_body=body)
    assert created.status_code == 201, created.text
    out = created.json()
    assert out["verification"] == "pending"
    assert out["buyer"] == {
        "person_ref": BUYER_REF,
        "psn_cert_type": "01",
        "certno_masked": "110*************2X",
        "psn_name_masked": "王**",
    }
    assert [line["trace_codes"] for line in out["lines"]] == [list(body["lines"][0]["trace_codes"]), []]
    again = signed(client, served.his_a, "POST", "/his/v1/purchases", clock=clock, json_body=body)
    assert (again.status_code, again.json()["id"]) == (200, out["id"])
    changed = {**body, "lines": body["lines"][:1]}
    conflict = signed(client, served.his_a, "POST", "/his/v1/purchases", clock=clock, json_body=changed)
    assert conflict.status_code == 409
    assert "different content" in conflict.json()["detail"]

    got = signed(client, served.his_a, "GET", "/his/v1/purchases/SETL-0001", clock=clock)
    assert (got.status_code, got.json()) == (200, out)
    assert signed(client, served.his_b, "GET", "/his/v1/purchases/SETL-0001", clock=clock).status_code == 404
    # the other institution's same settlement number is its own purchase
    other = signed(client, served.his_b, "POST", "/his/v1/purchases", clock=clock, json_body=body)
    assert (other.status_code, other.json()["institution_code"]) == (201, CODE_B)

    bad = signed(client, served.his_a, "POST", "/his/v1/purchases", clock=clock, json_body={**body, "lines": []})
    assert bad.status_code == 422
    wrong_number = {**body, "buyer": {"certno": BUYER_ID[:-1] + "1", "psn_name": BUYER_NAME}}
    bad = signed(client, served.his_a, "POST", "/his/v1/purchases", clock=clock, json_body=wrong_number)
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"][:2] == ["body", "buyer"]
    assert BUYER_ID[:-1] not in bad.text  # the rejected input is not echoed
    assert BUYER_NAME not in bad.text
    unknown_rel = purchase_body("SETL-0002", agent={"kind": "face", "person_ref": AGENT_REF}, relationship_id="77")
    bad = signed(client, served.his_a, "POST", "/his/v1/purchases", clock=clock, json_body=unknown_rel)
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "proxy", "relationship_id"]
    events = [e["type"] for e in audit_events(served.data_dir)]
    assert events.count("purchase.registered") == 2


def test_the_kiosks_record_links_the_pending_purchase_and_the_lists_are_scoped_and_masked(served: Served) -> None:
    client, clock = served.client, served.clock
    body = purchase_body(agent={"kind": "manual", "certno": AGENT_ID, "psn_name": AGENT_NAME})
    assert signed(client, served.his_a, "POST", "/his/v1/purchases", clock=clock, json_body=body).status_code == 201
    done = _ingest_signed(served, verification(TX, agent=AGENT_REF, kind=AgentKind.MANUAL))
    assert (done.created, done.linked) == (1, 1)
    got = signed(client, served.his_a, "GET", "/his/v1/purchases/SETL-0001", clock=clock).json()
    assert got["verification"] == "linked"
    assert got["verification_detail"]["device_id"] == "kiosk-pos-1"
    assert got["agent"]["kind"] == "manual"

    head = login(client, "head-a")
    listed = client.get("/api/v1/purchases", headers=head).json()
    assert [p["settlement_no"] for p in listed["items"]] == ["SETL-0001"]
    verifications = client.get("/api/v1/verifications", headers=head).json()
    assert verifications["total"] == 1
    assert verifications["items"][0]["transaction_code"] == TX
    assert verifications["items"][0]["agent_masked_id"] == "1101**********0016"
    regulator = login(client, "reg-sh")
    assert client.get("/api/v1/purchases", headers=regulator).json()["total"] == 1
    assert client.get("/api/v1/verifications", headers=regulator).json()["total"] == 1
    elsewhere = login(client, "reg-js")
    assert client.get("/api/v1/purchases", headers=elsewhere).json() == {"items": [], "total": 0}
    assert client.get("/api/v1/verifications", headers=elsewhere).json() == {"items": [], "total": 0}
    assert client.get("/api/v1/purchases", headers=login(client, "cashier-a")).status_code == 403
    filtered = client.get("/api/v1/purchases", headers=regulator, params={"verification": "pending"}).json()
    assert filtered["total"] == 0
    page = client.get("/api/v1/purchases", headers=regulator, params={"limit": 1, "offset": 1}).json()
    assert (page["total"], page["items"]) == (1, [])
    everything = client.get("/api/v1/purchases", headers=regulator).text
    everything += client.get("/api/v1/verifications", headers=regulator).text
    for secret in (BUYER_ID, AGENT_ID, BUYER_NAME, AGENT_NAME):
        assert secret not in everything


def test_a_purchase_registered_after_its_verification_is_linked_and_answered_alike_by_post_and_get(
    served: Served,
) -> None:
    """On PostgreSQL the registration runs on the async pool and the read too: both answers must match what the
    rules store (linked, reused codes), as on SQLite's sync path."""
    client, clock = served.client, served.clock
    assert _ingest_signed(served, verification(TX)).created == 1
    created = signed(client, served.his_a, "POST", "/his/v1/purchases", clock=clock, json_body=purchase_body())
    assert created.status_code == 201, created.text
    first = created.json()
    assert (first["verification"], first["verification_note"], first["reused_trace_codes"]) == ("linked", None, [])
    assert first["verification_detail"]["device_id"] == "kiosk-pos-1"
    assert first["settled_at"] == (T0 + timedelta(minutes=3)).isoformat().replace("+00:00", "Z")
    got = signed(client, served.his_a, "GET", "/his/v1/purchases/SETL-0001", clock=clock)
    assert got.json() == first

    # the same transaction code and one of the same packages again: registered, flagged, linked to nothing new
    again = purchase_body("SETL-0002", trace=("81234567890123456790", "81234567890123456791"))
    second = signed(client, served.his_a, "POST", "/his/v1/purchases", clock=clock, json_body=again)
    assert second.status_code == 201, second.text
    out = second.json()
    assert (out["verification"], out["verification_note"]) == ("mismatch", "code_reused")
    assert out["reused_trace_codes"] == ["81234567890123456790"]
    assert signed(client, served.his_a, "GET", "/his/v1/purchases/SETL-0002", clock=clock).json() == out
    replayed = signed(client, served.his_a, "POST", "/his/v1/purchases", clock=clock, json_body=again)
    assert (replayed.status_code, replayed.json()) == (200, out)


def test_relationships_reach_the_institutions_terminal_over_the_device_api(served: Served) -> None:
    client, clock = served.client, served.clock
    body = {
        "beneficiary": {"certno": BUYER_ID, "psn_name": BUYER_NAME},
        "agent": {"certno": AGENT_ID, "psn_name": AGENT_NAME},
        "relation": ProxyRelation.CHILD.value,
    }
    created = signed(client, served.his_a, "POST", "/his/v1/proxy-relationships", clock=clock, json_body=body)
    assert created.status_code == 201, created.text
    rel = created.json()
    assert rel["beneficiary"]["certno_masked"] == "110*************2X"
    again = signed(client, served.his_a, "POST", "/his/v1/proxy-relationships", clock=clock, json_body=body)
    assert (again.status_code, again.json()["relationship_id"]) == (200, rel["relationship_id"])
    other_terms = {**body, "relation": "spouse"}
    conflict = signed(client, served.his_a, "POST", "/his/v1/proxy-relationships", clock=clock, json_body=other_terms)
    assert conflict.status_code == 409
    with session_factory(served.engine)() as session:
        notices = list(session.scalars(select(IssuedCommand).where(IssuedCommand.kind == "proxy_relationships")))
        assert sorted(n.device_id for n in notices) == ["kiosk-001", "kiosk-pos-1"]  # both of institution A

    # the terminal's own client fetches and stores the set
    device = served.device
    api = ServerApi(str(client.base_url), device.device_id, lambda: device.session, clock)
    registry = SqliteProxyRegistry()
    try:
        sync = ProxyRelationshipSync(registry, api)
        assert sync.sync() == 1
        found = registry.agents_of(BUYER_REF, T0)
        assert [(r.agent_ref, r.relationship_id) for r in found] == [(AGENT_REF, rel["relationship_id"])]

        path = f"/his/v1/proxy-relationships/{rel['relationship_id']}"
        assert signed(client, served.his_b, "DELETE", path, clock=clock).status_code == 404
        ended = signed(client, served.his_a, "DELETE", path, clock=clock)
        assert ended.status_code == 200
        assert ended.json()["ended_at"] is not None
        assert signed(client, served.his_a, "DELETE", path, clock=clock).status_code == 200  # idempotent
        assert sync.sync() == 0
        assert registry.agents_of(BUYER_REF, T0) == []
    finally:
        registry.close()
        api.close()
    missing = signed(client, served.his_a, "DELETE", "/his/v1/proxy-relationships/424242", clock=clock)
    assert missing.status_code == 404


def test_a_terminal_looks_back_on_a_buyers_purchases_at_every_institution(served: Served) -> None:
    client, clock = served.client, served.clock
    first = {**purchase_body("SETL-0001"), "settled_at": (T0 - timedelta(days=20)).isoformat()}
    later = {
        **purchase_body("SETL-0002", "KIOSK-P01202603011600000002"),
        "settled_at": (T0 - timedelta(days=1)).isoformat(),
    }
    for his, body in ((served.his_a, first), (served.his_b, later)):
        assert signed(client, his, "POST", "/his/v1/purchases", clock=clock, json_body=body).status_code == 201
    someone_else = {**purchase_body("SETL-0003", "KIOSK-P01202603011600000003"), "buyer": {"certno": AGENT_ID}}
    assert (
        signed(client, served.his_a, "POST", "/his/v1/purchases", clock=clock, json_body=someone_else).status_code
        == 201
    )
    device = DeviceSigner(served.device.device_id, served.device.session)
    path = f"/device/v1/purchase-history?person_ref={BUYER_REF}&days=30"
    answer = signed(client, device, "GET", path, clock=clock)
    assert answer.status_code == 200, answer.text
    history = parse_purchase_history(answer.json())
    assert history.complete
    # newest first, both institutions' purchases, nobody else's; codes, quantities and times only
    assert [(line.med_list_codg, line.quantity) for line in history.lines] == [
        ("XJ01CAA040A001010100534", 2.0),
        ("ZA01AAA0001010100001", 1.0),
    ] * 2
    assert history.lines[0].settled_at > history.lines[2].settled_at
    for secret in (BUYER_ID, BUYER_NAME, "王"):
        assert secret not in answer.text
    lookups = [e for e in audit_events(served.data_dir) if e["type"] == "purchase_history.read"]
    assert [(e["device_id"], e["person_ref"], e["lines"]) for e in lookups] == [("kiosk-pos-1", BUYER_REF, 4)]
    # a shorter window leaves the older purchase out; a malformed reference or window is refused
    recent = signed(client, device, "GET", path.replace("days=30", "days=10"), clock=clock).json()
    assert len(recent["lines"]) == 2
    bad_ref = signed(client, device, "GET", "/device/v1/purchase-history?person_ref=" + BUYER_ID, clock=clock)
    assert bad_ref.status_code == 422
    assert BUYER_ID not in bad_ref.text
    too_long = f"/device/v1/purchase-history?person_ref={BUYER_REF}&days=400"
    assert signed(client, device, "GET", too_long, clock=clock).status_code == 422
    # HIS clients and operators do not reach it
    assert signed(client, served.his_a, "GET", path, clock=clock).status_code == 401


def test_the_documented_his_signature_example() -> None:
    """docs/his-integration.md's worked example is what `protocol.request_signing` computes (and what the server
    checks), and the Python snippet there signs the same way."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "his-integration.md").read_text(encoding="utf-8")
    key = bytes.fromhex("5f1c0a9e7b3d2f4a6c8e0b1d3f5a7c9e2b4d6f8a0c1e3a5b7d9f1b3d5f7a9c0e")
    ts, nonce = "1772352180", "q1w2e3r4t5y6u7i8o9p0a1s2"
    body = b'{"beneficiary":{"certno":"11010519491231002X"},"agent":{"certno":"110105198001010016"},"relation":"child"}'
    assert body.decode() in doc
    assert hashlib.sha256(body).hexdigest() in doc
    assert signing_string("POST", "/his/v1/proxy-relationships", ts, nonce, body).decode() in doc
    assert sign_request(key, "POST", "/his/v1/proxy-relationships", ts, nonce, body) in doc
    assert sign_request(key, "GET", "/his/v1/purchases/SETL-20260301-000001", ts, nonce, b"") in doc
