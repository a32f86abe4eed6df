"""Device binding with approval, end to end in process on SQLite and PostgreSQL: a terminal's signed application is
stored by the ingest hook as pending, a device admin approves it over real HTTP (reason mandatory), the device is
bound, the history row and the `binding_decision` command are written, and the terminal's command applier carries
the command out once and shows 'bound'. Also: reject, unbind, forged and unsigned applications, double decisions,
institution upsert storing masked data only, and the public bindings page without personal data."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from protocol import CommandKind, Envelope, PayloadType, SignedRecord, SignedRecordKind
from protocol.binding import ApplicantVerification
from protocol.evidence import sign_device_record
from protocol.gm.sm2 import SM2PrivateKey
from sync_server.accounts import Role
from sync_server.app import create_app
from sync_server.binding import record_binding_applications
from sync_server.commands import wire_command
from sync_server.db.engine import session_factory
from sync_server.db.models import (
    BindingApplication,
    Device,
    DeviceBindingHistory,
    DeviceKey,
    Institution,
    IssuedCommand,
)
from sync_server.settings import ServerSettings
from sync_server.store import register_devices, store_envelopes
from terminal.binding import BindingState, BindingStore, binding_application_record, binding_handlers
from terminal.commands import CommandApplier, Disposition, TerminalFacts, default_handlers
from terminal.verification import FaceDecision, FaceOutcome
from tests.sync_server.conftest import BOOT, T0, FakeClock, Publisher, serving
from tests.sync_server.test_accounts import audit_events, login, make_account
from tests.sync_server.test_ingest import make_settings, publish_all, running, settled
from tests.terminal.conftest import DEVICE_ID, open_outbox
from tests.terminal.conftest import FakeClock as TerminalClock
from yibao.broker import MosquittoBroker

CODE = "H31011500042"
OTHER_CODE = "H31011500043"
HEAD_NAME = "张三丰"
HEAD_PHONE = "13812345678"


def _decision(outcome: FaceOutcome = FaceOutcome.ACCEPTED) -> FaceDecision:
    return FaceDecision(
        outcome=outcome,
        method="face_1to1",
        subject_ref="head-7f3a",
        similarity=0.81,
        threshold=0.6,
        liveness=None,
        quality_issues=(),
        model_sha256="0" * 64,
        template_hash="ab" * 16,
        frames=5,
        duration_ms=900.0,
    )


def _record(code: str = CODE, outcome: FaceOutcome = FaceOutcome.ACCEPTED) -> dict[str, Any]:
    record = binding_application_record(
        _decision(),
        verification=ApplicantVerification.FACE_YIBAO_CODE,
        institution_code=code,
        applicant_masked="张**",
        reason="新设备安装",
        applied_at=T0,
    )
    if outcome is not FaceOutcome.ACCEPTED:
        record["face_decision"] = outcome.value  # a tampered terminal; still signed by the device
    return record


class Fleet:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.key = SM2PrivateKey.generate()
        self.seq = 0
        with session_factory(engine, write_intent=True).begin() as session:
            register_devices(session, {DEVICE_ID}, now=T0)
            session.add(
                DeviceKey(
                    device_id=DEVICE_ID,
                    key_epoch=1,
                    public_key=self.key.public_key.hex(),
                    fingerprint=self.key.public_key.fingerprint(),
                    created_at=T0,
                )
            )

    def envelope(self, payload: SignedRecord) -> Envelope:
        self.seq += 1
        return Envelope(
            device_id=DEVICE_ID,
            seq=self.seq,
            message_id=uuid.uuid4(),
            device_time=T0,
            boot_id=BOOT,
            monotonic_ns=self.seq,
            payload_type=PayloadType.SIGNED_RECORD,
            payload=payload,
        )

    def signed(self, record: dict[str, Any], key: SM2PrivateKey | None = None) -> Envelope:
        payload = sign_device_record(
            key or self.key,
            device_id=DEVICE_ID,
            key_epoch=1,
            record_type=SignedRecordKind.BINDING_APPLICATION,
            record=record,
        )
        return self.envelope(payload)

    def ingest(self, *envelopes: Envelope) -> tuple[int, int]:
        """What ingest's transaction does with a batch: store the envelopes, then the binding hook."""
        with session_factory(self.engine, write_intent=True).begin() as session:
            store_envelopes(session, list(envelopes), received_at=T0)
            done = record_binding_applications(session, list(envelopes), now=T0)
        return done.created, done.refused

    def rows(self, model: Any) -> list[Any]:
        with session_factory(self.engine)() as session:
            return list(session.scalars(select(model).order_by(model.id)))


@pytest.fixture
def fleet(engine: Engine) -> Fleet:
    return Fleet(engine)


@pytest.fixture
def client(engine: Engine, db_url: str) -> Iterator[httpx.Client]:
    app = create_app(ServerSettings(database_url=db_url), engine=engine, start_ingest=False, clock=FakeClock(T0))
    with serving(app) as c:
        yield c


def _put_institution(client: httpx.Client, code: str = CODE) -> dict[str, Any]:
    body = {
        "name": "浦东新区示例大药房",
        "kind": "pharmacy",
        "region_code": "310115",
        "address": "上海市浦东新区示例路1号",
        "head_name": HEAD_NAME,
        "contact_phone": HEAD_PHONE,
        "source": "national_platform",
    }
    response = client.put(f"/api/v1/institutions/{code}", json=body)
    assert response.status_code == 200, response.text
    out: dict[str, Any] = response.json()
    return out


def test_an_approved_application_binds_the_device_and_the_terminal_shows_it(
    fleet: Fleet, client: httpx.Client, tmp_path: Path
) -> None:
    institution = _put_institution(client)
    assert (institution["head_masked"], institution["contact_masked"]) == ("张**", "138****5678")
    assert fleet.ingest(fleet.signed(_record())) == (1, 0)

    pending = client.get("/api/v1/binding-applications", params={"status": "pending"}).json()
    assert pending["total"] == 1
    [application] = pending["items"]
    assert (application["device_id"], application["institution_code"]) == (DEVICE_ID, CODE)
    assert application["verification"] == "face_yibao_code"
    app_id = application["id"]

    # a reason is mandatory
    assert client.post(f"/api/v1/binding-applications/{app_id}/approve", json={}).status_code == 422
    assert client.post(f"/api/v1/binding-applications/{app_id}/approve", json={"reason": ""}).status_code == 422

    decided = client.post(
        f"/api/v1/binding-applications/{app_id}/approve", json={"reason": "资料齐全", "contact": "12393"}
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == "approved"
    # deciding twice is a conflict, not a second binding
    again = client.post(f"/api/v1/binding-applications/{app_id}/approve", json={"reason": "again"})
    assert again.status_code == 409
    assert client.post(f"/api/v1/binding-applications/{app_id}/reject", json={"reason": "x"}).status_code == 409

    with session_factory(fleet.engine)() as session:
        bound = session.get(Device, DEVICE_ID)
        inst = session.scalar(select(Institution).where(Institution.code == CODE))
        assert bound is not None
        assert inst is not None
        assert bound.institution_id == inst.id
    [history] = fleet.rows(DeviceBindingHistory)
    assert (history.action, history.to_institution_id, history.reason) == ("bind", inst.id, "资料齐全")
    assert history.actor
    assert history.application_id == app_id
    [command] = fleet.rows(IssuedCommand)
    assert command.kind == CommandKind.BINDING_DECISION.value
    assert command.args == {
        "application_id": app_id,
        "approved": True,
        "institution_code": CODE,
        "institution_name": "浦东新区示例大药房",
        "reason": "资料齐全",
        "contact": "12393",
    }
    assert command.command_id == history.command_id

    listed = client.get("/api/v1/binding-history", params={"device_id": DEVICE_ID}).json()
    assert [(h["action"], h["to_institution_code"]) for h in listed["items"]] == [("bind", CODE)]

    # the terminal carries it out once per command id
    store = BindingStore(tmp_path / "binding.json")
    assert store.load().state is BindingState.UNBOUND
    clock = TerminalClock(T0 + timedelta(seconds=5))
    with open_outbox(tmp_path / "outbox.sqlite3", clock) as outbox:
        handlers = default_handlers(
            outbox, TerminalFacts("1.0.0", "c1"), clock, extra=binding_handlers(store, clock.now)
        )
        applier = CommandApplier(outbox, device_id=DEVICE_ID, clock=clock, handlers=handlers)
        wire = wire_command(command)
        assert applier.apply(wire) is Disposition.ANSWERED
        status = store.load()
        assert (status.state, status.institution_code, status.contact) == (BindingState.BOUND, CODE, "12393")
        assert applier.apply(wire) is Disposition.REDELIVERED


def test_a_rejected_application_leaves_the_device_unbound_and_tells_the_terminal_why(
    fleet: Fleet, client: httpx.Client, tmp_path: Path
) -> None:
    _put_institution(client)
    fleet.ingest(fleet.signed(_record()))
    [row] = fleet.rows(BindingApplication)
    response = client.post(f"/api/v1/binding-applications/{row.id}/reject", json={"reason": "非本机构负责人"})
    assert response.status_code == 200
    assert response.json()["status"] == "rejected"
    assert fleet.rows(DeviceBindingHistory) == []
    [command] = fleet.rows(IssuedCommand)
    assert (command.args["approved"], command.args["reason"]) == (False, "非本机构负责人")
    store = BindingStore(tmp_path / "binding.json")
    handler = binding_handlers(store, lambda: T0)[CommandKind.BINDING_DECISION]
    handler(wire_command(command))
    assert (store.load().state, store.load().reason) == (BindingState.UNBOUND, "非本机构负责人")
    assert client.get("/api/v1/binding-applications", params={"status": "pending"}).json()["total"] == 0


def test_approving_one_application_supersedes_the_others_and_moving_needs_an_unbind_first(
    fleet: Fleet, client: httpx.Client, tmp_path: Path
) -> None:
    _put_institution(client)
    _put_institution(client, OTHER_CODE)
    fleet.ingest(fleet.signed(_record()), fleet.signed(_record(OTHER_CODE)))
    first, second = fleet.rows(BindingApplication)
    assert client.post(f"/api/v1/binding-applications/{first.id}/approve", json={"reason": "ok"}).status_code == 200
    first, second = fleet.rows(BindingApplication)
    assert second.status.value == "superseded"

    # a new application while bound cannot be approved until the device is unbound
    fleet.ingest(fleet.signed(_record(OTHER_CODE)))
    third = fleet.rows(BindingApplication)[-1]
    blocked = client.post(f"/api/v1/binding-applications/{third.id}/approve", json={"reason": "move"})
    assert blocked.status_code == 409
    assert "unbind" in blocked.json()["detail"]

    assert client.post(f"/api/v1/devices/{DEVICE_ID}/unbind", json={}).status_code == 422
    unbound = client.post(f"/api/v1/devices/{DEVICE_ID}/unbind", json={"reason": "门店搬迁"})
    assert unbound.status_code == 200, unbound.text
    assert unbound.json()["history"]["from_institution_code"] == CODE
    assert client.post(f"/api/v1/devices/{DEVICE_ID}/unbind", json={"reason": "again"}).status_code == 409
    unbind_cmd = fleet.rows(IssuedCommand)[-1]
    assert (unbind_cmd.kind, unbind_cmd.args["reason"]) == ("unbind", "门店搬迁")
    store = BindingStore(tmp_path / "binding.json")
    binding_handlers(store, lambda: T0)[CommandKind.UNBIND](wire_command(unbind_cmd))
    assert store.load().state is BindingState.UNBOUND

    moved = client.post(f"/api/v1/binding-applications/{third.id}/approve", json={"reason": "move"})
    assert moved.status_code == 200
    history = client.get("/api/v1/binding-history").json()["items"]
    assert [(h["action"], h["from_institution_code"], h["to_institution_code"]) for h in history] == [
        ("bind", None, OTHER_CODE),
        ("unbind", CODE, None),
        ("bind", None, CODE),
    ]


def test_forged_unsigned_and_unaccepted_applications_never_become_pending(fleet: Fleet, client: httpx.Client) -> None:
    forged = fleet.signed(_record(), key=SM2PrivateKey.generate())
    good = fleet.signed(_record())
    tampered_payload = good.payload
    assert isinstance(tampered_payload, SignedRecord)
    changed = fleet.envelope(
        tampered_payload.model_copy(update={"record": {**tampered_payload.record, "institution_code": OTHER_CODE}})
    )
    unsigned = fleet.envelope(
        SignedRecord(
            record_type=SignedRecordKind.BINDING_APPLICATION, record=_record(), key_epoch=2, signature="0" * 128
        )
    )
    no_face = fleet.signed(_record(outcome=FaceOutcome.NO_MATCH))
    assert fleet.ingest(forged, changed, unsigned, no_face) == (0, 4)
    assert fleet.rows(BindingApplication) == []
    # the good one, delivered twice, becomes one application
    assert fleet.ingest(good) == (1, 0)
    assert fleet.ingest(good) == (0, 0)
    assert client.get("/api/v1/binding-applications").json()["total"] == 1


def test_applying_needs_an_accepted_face_decision() -> None:
    from terminal.binding import BindingError

    with pytest.raises(BindingError):
        binding_application_record(
            _decision(FaceOutcome.NO_MATCH),
            verification=ApplicantVerification.FACE_ID_CARD,
            institution_code=CODE,
            applicant_masked=None,
            reason="r",
            applied_at=T0,
        )


def test_unknown_application_or_institution_and_the_page_shows_no_personal_data(
    fleet: Fleet, client: httpx.Client
) -> None:
    assert client.post("/api/v1/binding-applications/999/approve", json={"reason": "x"}).status_code == 404
    fleet.ingest(fleet.signed(_record()))
    [row] = fleet.rows(BindingApplication)
    no_inst = client.post(f"/api/v1/binding-applications/{row.id}/approve", json={"reason": "x"})
    assert no_inst.status_code == 409
    assert CODE in no_inst.json()["detail"]
    _put_institution(client)
    page = client.get("/bindings")
    assert page.status_code == 200
    assert f'id="application-{row.id}"' in page.text
    assert "张**" in page.text
    assert HEAD_NAME not in page.text
    assert HEAD_PHONE not in page.text
    with session_factory(fleet.engine)() as session:
        inst = session.scalar(select(Institution).where(Institution.code == CODE))
        assert inst is not None
        assert HEAD_NAME not in (inst.head_masked or "")
        assert HEAD_PHONE not in (inst.contact_masked or "")


def test_the_real_ingest_worker_turns_a_published_application_into_one_pending_row(
    fleet: Fleet, broker: MosquittoBroker, publisher: Publisher, engine: Engine, db_url: str
) -> None:
    good = fleet.signed(_record())
    forged = fleet.signed(_record(), key=SM2PrivateKey.generate())
    with running(make_settings(broker, db_url), engine) as worker:
        publish_all(publisher, [good, forged, good])  # the good one redelivered
        settled(worker, received=3)
    [row] = fleet.rows(BindingApplication)
    assert (row.message_id, row.status.value, row.institution_code) == (good.message_id, "pending", CODE)


def test_regulators_see_their_region_only_and_decisions_are_audited(
    fleet: Fleet, client: httpx.Client, tmp_path: Path
) -> None:
    _put_institution(client)
    fleet.ingest(fleet.signed(_record()))
    [row] = fleet.rows(BindingApplication)
    assert client.post(f"/api/v1/binding-applications/{row.id}/approve", json={"reason": "ok"}).status_code == 200
    make_account(fleet.engine, "reg-sh", Role.REGULATOR, region_prefix="3101")
    make_account(fleet.engine, "reg-js", Role.REGULATOR, region_prefix="3201")
    for username, expected in (("reg-sh", 1), ("reg-js", 0)):
        headers = login(client, username)
        apps = client.get("/api/v1/binding-applications", headers=headers)
        history = client.get("/api/v1/binding-history", headers=headers)
        assert (apps.json()["total"], history.json()["total"]) == (expected, expected), username
        denied = client.post(f"/api/v1/devices/{DEVICE_ID}/unbind", json={"reason": "x"}, headers=headers)
        assert denied.status_code == 403
    events = audit_events(tmp_path / "server-data")
    approved = [e for e in events if e["type"] == "binding.approved"]
    assert len(approved) == 1, [e["type"] for e in events]
    assert approved[0]["reason"] == "ok"


def test_binding_commands_cannot_be_issued_bare(fleet: Fleet, client: httpx.Client) -> None:
    for kind in ("unbind", "binding_decision"):
        body = {"kind": kind, "args": {"reason": "x"}}
        response = client.post(f"/api/v1/devices/{DEVICE_ID}/commands", json=body)
        assert response.status_code == 422
        assert "binding routes" in response.json()["detail"]
    assert fleet.rows(IssuedCommand) == []
