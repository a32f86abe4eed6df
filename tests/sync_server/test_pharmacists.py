"""Pharmacists on the server, on SQLite and PostgreSQL: the HIS base-info sync stores masked data only and tells the
bound terminals; a template reaches only the terminals of the pharmacist's institution, sealed under each one's
session key; a pharmacist who leaves loses the template and terminals are told to purge; an unbound terminal gets
nothing; signed sign-in/out records become sessions (forged, foreign and unknown ones do not); open sessions close
at the closing hour; attendance queries are scoped (regulator region, head, the pharmacist) and masked."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray
from pydantic import SecretStr
from sqlalchemy import Engine, select

from protocol import CommandKind, Envelope, PayloadType, SignedRecordKind
from protocol.evidence import sign_device_record
from protocol.gm import sm4
from protocol.gm.sm2 import SM2PrivateKey
from protocol.pharmacist import (
    AttendancePage,
    Roster,
    SignOutReason,
    TemplateDirection,
    TemplateUpload,
    open_template,
    seal_template,
    template_aad,
)
from sync_server import binding, pharmacists
from sync_server.accounts import Role
from sync_server.app import create_app
from sync_server.db.engine import session_factory
from sync_server.db.models import (
    Device,
    DeviceKey,
    Institution,
    InstitutionKind,
    IssuedCommand,
    Pharmacist,
    PharmacistSession,
    PharmacistStatus,
    PharmacistTemplate,
)
from sync_server.identity import create_server_key
from sync_server.settings import ServerSettings
from sync_server.store import register_devices, store_envelopes
from tests.sync_server.conftest import BOOT, T0, FakeClock, Publisher, serving
from tests.sync_server.signed_requests import (
    DeviceSigner,
    Enrolled,
    HisSigner,
    enrol_with_session,
    make_his_client,
    signed,
)
from tests.sync_server.test_accounts import login, make_account
from tests.sync_server.test_ingest import make_settings, publish_all, running, settled
from yibao.broker import MosquittoBroker

SECRET = "test-secret-" + "x" * 40
MODEL = "ab" * 32
A, B = "H32058300001", "H31011500002"
A1, A2, B1 = "kiosk-a1", "kiosk-a2", "kiosk-b1"
ID_WANG = "320583199001011234"
ID_LI = "32058319850505432X"
SHANGHAI = ZoneInfo("Asia/Shanghai")


def _vector(seed: int) -> NDArray[np.float32]:
    v = np.random.default_rng(seed).standard_normal(128).astype(np.float32)
    return v / np.linalg.norm(v)


def _his(code: str, name: str, id_number: str, **extra: Any) -> pharmacists.PharmacistData:
    return pharmacists.PharmacistData(
        code=code,
        name=name,
        id_number=id_number,
        cert_type="01",
        practising_cert_no=f"CERT{code}",
        practising_type="2",
        practising_region="320583",
        **extra,
    )


class World:
    """Two institutions (A in Kunshan, B in Shanghai), terminals A1 and A2 bound to A and B1 bound to B, each with
    an enrolled SM2 key and a session key."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seal = pharmacists.TemplateSeal(SECRET)
        self.keys = {d: SM2PrivateKey.generate() for d in (A1, A2, B1)}
        self.session_keys = {d: (uuid.uuid4(), sm4.generate_key()) for d in (A1, A2, B1)}
        self.seq = 0
        with self.begin() as session:
            inst = {}
            for code, region in ((A, "320583"), (B, "310115")):
                data = binding.InstitutionData(name=f"药房{code}", kind=InstitutionKind.PHARMACY, region_code=region)
                inst[code], _ = binding.upsert_institution(session, code, data, now=T0)
            register_devices(session, {A1, A2, B1}, now=T0)
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
                device = session.get(Device, device_id)
                assert device is not None
                device.institution_id = inst[B if device_id == B1 else A].id
        with self.begin() as session:
            self.inst_id = {
                c: session.scalars(select(Institution.id).where(Institution.code == c)).one() for c in (A, B)
            }

    def begin(self) -> Any:
        return session_factory(self.engine, write_intent=True).begin()

    def sync(self, code: str, *items: pharmacists.PharmacistData) -> pharmacists.SyncResult:
        with self.begin() as session:
            institution = session.scalars(select(Institution).where(Institution.code == code)).one()
            return pharmacists.sync_pharmacists(session, institution, list(items), seal=self.seal, now=T0)

    def upload(self, device_id: str, code: str, vector: NDArray[np.float32], **overrides: Any) -> TemplateUpload:
        key_id, key = self.session_keys[device_id]
        aad = template_aad(TemplateDirection.UPLOAD, device_id, code, MODEL)
        values: dict[str, Any] = {
            "key_id": key_id,
            "sealed": seal_template(key, vector, aad),
            "model_sha256": MODEL,
            "dims": 128,
            "consent_version": "2026-01",
            "consent_at": T0,
            "id_photo_similarity": 0.95,
        }
        values.update(overrides)
        return TemplateUpload(**values)

    def store(self, device_id: str, code: str, upload: TemplateUpload) -> list[IssuedCommand]:
        key_id, key = self.session_keys[device_id]
        with self.begin() as session:
            _row, commands = pharmacists.store_template(
                session,
                device_id=device_id,
                key_id=key_id,
                session_key=key,
                code=code,
                upload=upload,
                seal=self.seal,
                now=T0,
            )
            return commands

    def roster(self, device_id: str) -> list[pharmacists.RosterEntry]:
        key_id, key = self.session_keys[device_id]
        with self.begin() as session:
            _inst, entries = pharmacists.roster(
                session, device_id=device_id, key_id=key_id, session_key=key, seal=self.seal
            )
            return entries

    def commands(self) -> list[tuple[str, str, dict[str, Any]]]:
        with session_factory(self.engine)() as session:
            rows = session.scalars(select(IssuedCommand).order_by(IssuedCommand.issued_at, IssuedCommand.device_id))
            return [(r.device_id, r.kind, r.args) for r in rows]

    def clear_commands(self) -> None:
        with self.begin() as session:
            for row in session.scalars(select(IssuedCommand)):
                session.delete(row)

    def envelope(
        self, device_id: str, kind: SignedRecordKind, record: dict[str, Any], key: SM2PrivateKey | None = None
    ) -> Envelope:
        self.seq += 1
        payload = sign_device_record(
            key or self.keys[device_id], device_id=device_id, key_epoch=1, record_type=kind, record=record
        )
        return Envelope(
            device_id=device_id,
            seq=self.seq,
            message_id=uuid.uuid4(),
            device_time=T0,
            boot_id=BOOT,
            monotonic_ns=self.seq,
            payload_type=PayloadType.SIGNED_RECORD,
            payload=payload,
        )

    def ingest(self, *envelopes: Envelope) -> pharmacists.SessionsRecorded:
        with self.begin() as session:
            store_envelopes(session, list(envelopes), received_at=T0)
            return pharmacists.record_pharmacist_sessions(session, list(envelopes), now=T0)

    def sessions(self) -> list[PharmacistSession]:
        with session_factory(self.engine)() as session:
            return list(session.scalars(select(PharmacistSession).order_by(PharmacistSession.signed_in_at)))


@pytest.fixture
def world(engine: Engine) -> World:
    return World(engine)


def test_the_his_sync_stores_masked_data_only_and_notifies_the_bound_terminals(world: World) -> None:
    result = world.sync(A, _his("YS0001", "王小明", ID_WANG), _his("YS0002", "李四", ID_LI, multi_site=True))
    assert (result.created, result.updated, result.left) == (2, 0, 0)
    with session_factory(world.engine)() as session:
        rows = list(session.scalars(select(Pharmacist).order_by(Pharmacist.code)))
        dumped = json.dumps([{c.name: str(getattr(r, c.name)) for c in Pharmacist.__table__.columns} for r in rows])
    assert [(r.code, r.name_masked, r.id_number_masked) for r in rows] == [
        ("YS0001", "王**", "320*************34"),
        ("YS0002", "李*", "320*************2X"),
    ]
    assert "王小明" not in dumped
    assert ID_WANG not in dumped
    assert ID_LI not in dumped
    assert rows[0].id_number_ref == world.seal.id_number_ref(ID_WANG)
    assert rows[0].practising_cert_no == "CERTYS0001"
    assert rows[1].multi_site is True
    # the bound terminals of A are told to fetch the roster; B's terminal hears nothing
    assert sorted((d, k) for d, k, _ in world.commands()) == [(A1, "roster_update"), (A2, "roster_update")]
    assert world.commands()[0][2] == {"institution_code": A, "reason": "his_sync"}

    again = world.sync(A, _his("YS0001", "王小明", ID_WANG))
    assert (again.created, again.updated) == (0, 1)
    with pytest.raises(pharmacists.PharmacistInputError, match="twice"):
        world.sync(A, _his("YS0003", "赵六", ID_LI), _his("YS0003", "赵六", ID_LI))


def test_a_template_reaches_only_the_terminals_of_the_pharmacists_institution_sealed_for_each(world: World) -> None:
    world.sync(A, _his("YS0001", "王小明", ID_WANG), _his("YS0002", "李四", ID_LI))
    world.sync(B, _his("SH0001", "周五", "310115198001011111"))
    world.clear_commands()
    vector = _vector(1)
    notices = world.store(A1, "YS0001", world.upload(A1, "YS0001", vector))
    assert [(c.device_id, c.kind) for c in notices] == [(A2, "roster_update")]  # not the enrolling one, not B's

    with session_factory(world.engine)() as session:
        [stored] = session.scalars(select(PharmacistTemplate))
        assert vector.astype("<f4").tobytes() not in stored.sealed  # sealed at rest
        assert (stored.enrolled_device_id, stored.consent_version) == (A1, "2026-01")
        assert stored.id_photo_similarity == pytest.approx(0.95)

    entries = {e.code: e for e in world.roster(A2)}
    assert set(entries) == {"YS0001", "YS0002"}
    sealed = entries["YS0001"].template
    assert sealed is not None
    assert entries["YS0002"].template is None
    assert entries["YS0001"].name_masked == "王**"
    key_id, key = world.session_keys[A2]
    assert sealed.key_id == key_id
    aad = template_aad(TemplateDirection.DOWNLOAD, A2, "YS0001", MODEL)
    opened = open_template(key, sealed.sealed, aad, sealed.dims)
    assert np.allclose(opened, vector, atol=1e-6)
    # A1's key does not open A2's copy, nor does A2's copy open as another pharmacist's
    with pytest.raises(Exception, match="does not open"):
        open_template(world.session_keys[A1][1], sealed.sealed, aad, sealed.dims)
    with pytest.raises(Exception, match="does not open"):
        open_template(key, sealed.sealed, template_aad(TemplateDirection.DOWNLOAD, A2, "YS0002", MODEL), 128)

    # B's terminal never sees A's pharmacists, and cannot upload for them
    assert [e.code for e in world.roster(B1)] == ["SH0001"]
    with pytest.raises(pharmacists.PharmacistNotFoundError):
        world.store(B1, "YS0001", world.upload(B1, "YS0001", vector))


def test_bad_uploads_are_refused_and_change_nothing(world: World) -> None:
    world.sync(A, _his("YS0001", "王小明", ID_WANG))
    good = world.upload(A1, "YS0001", _vector(2))
    with pytest.raises(pharmacists.PharmacistConflictError, match="another session key"):
        world.store(A1, "YS0001", good.model_copy(update={"key_id": uuid.uuid4()}))
    with pytest.raises(pharmacists.PharmacistInputError, match="does not open"):
        # sealed by A1, sent by A2 naming its own key: another key and another device id in the aad
        world.store(A2, "YS0001", good.model_copy(update={"key_id": world.session_keys[A2][0]}))
    with pytest.raises(pharmacists.PharmacistInputError, match="does not open"):
        world.store(A1, "YS0001", good.model_copy(update={"model_sha256": "cd" * 32}))
    with pytest.raises(pharmacists.PharmacistInputError, match="base64"):
        world.store(A1, "YS0001", good.model_copy(update={"sealed": "not base64!"}))
    zero = world.upload(A1, "YS0001", np.zeros(128, dtype=np.float32) + 1e-3)
    world.store(A1, "YS0001", zero)  # a tiny but valid vector is accepted (normalised)
    with pytest.raises(pharmacists.PharmacistNotFoundError):
        world.store(A1, "NOBODY", world.upload(A1, "NOBODY", _vector(3)))


def test_a_pharmacist_who_leaves_loses_the_template_and_every_bound_terminal_is_told_to_purge(world: World) -> None:
    world.sync(A, _his("YS0001", "王小明", ID_WANG), _his("YS0002", "李四", ID_LI))
    world.store(A1, "YS0001", world.upload(A1, "YS0001", _vector(4)))
    world.clear_commands()
    result = world.sync(A, _his("YS0001", "王小明", ID_WANG, left_on=dt.date(2026, 1, 4)))
    assert (result.left, result.templates_deleted) == (1, 1)
    purges = [(d, a) for d, k, a in world.commands() if k == CommandKind.TEMPLATE_PURGE.value]
    assert sorted(purges, key=lambda p: p[0]) == [
        (A1, {"pharmacist_code": "YS0001", "reason": "pharmacist_left"}),
        (A2, {"pharmacist_code": "YS0001", "reason": "pharmacist_left"}),
    ]
    with session_factory(world.engine)() as session:
        assert list(session.scalars(select(PharmacistTemplate))) == []
        left = session.scalars(select(Pharmacist).where(Pharmacist.code == "YS0001")).one()
        assert (left.status, left.left_on) == (PharmacistStatus.LEFT, "2026-01-04")
    assert [e.code for e in world.roster(A2)] == ["YS0002"]
    with pytest.raises(pharmacists.PharmacistConflictError, match="left"):
        world.store(A1, "YS0001", world.upload(A1, "YS0001", _vector(4)))
    # told once: the HIS sending the same status again does not purge again
    world.clear_commands()
    world.sync(A, _his("YS0001", "王小明", ID_WANG, valid=False))
    assert [k for _, k, _ in world.commands()] == ["roster_update", "roster_update"]


def test_an_unbound_terminal_gets_no_roster_and_its_unbind_command_is_queued(world: World) -> None:
    world.sync(A, _his("YS0001", "王小明", ID_WANG))
    world.store(A1, "YS0001", world.upload(A1, "YS0001", _vector(5)))
    with world.begin() as session:
        binding.unbind(session, A2, actor="ops", reason="moved", contact=None, now=T0)
    with pytest.raises(pharmacists.PharmacistConflictError, match="not bound"):
        world.roster(A2)
    with pytest.raises(pharmacists.PharmacistConflictError, match="not bound"):
        world.store(A2, "YS0001", world.upload(A2, "YS0001", _vector(5)))
    assert (A2, "unbind") in [(d, k) for d, k, _ in world.commands()]
    assert [e.code for e in world.roster(A1)] == ["YS0001"]


def _face(similarity: float | None = 0.97) -> dict[str, Any]:
    return {
        "face_similarity": similarity,
        "face_threshold": 0.93,
        "face_decision": "accepted",
        "liveness": "live",
        "liveness_method": "ir+depth+texture",
        "template_hash": "ab" * 16,
        "model_sha256": MODEL,
    }


def _sign_in(code: str, session_id: uuid.UUID, at: dt.datetime, institution: str = A) -> dict[str, Any]:
    return {
        **_face(),
        "pharmacist_code": code,
        "institution_code": institution,
        "session_id": str(session_id),
        "signed_in_at": at.isoformat(),
    }


def _sign_out(code: str, session_id: uuid.UUID, at_in: dt.datetime, at_out: dt.datetime) -> dict[str, Any]:
    return {
        "pharmacist_code": code,
        "institution_code": A,
        "session_id": str(session_id),
        "signed_in_at": at_in.isoformat(),
        "signed_out_at": at_out.isoformat(),
        "reason": "signed_out",
        "face": _face(0.95),
    }


def test_signed_records_become_sessions_once_and_forged_or_foreign_ones_do_not(world: World) -> None:
    world.sync(A, _his("YS0001", "王小明", ID_WANG))
    world.sync(B, _his("SH0001", "周五", "310115198001011111"))
    sid = uuid.uuid4()
    start = T0
    sign_in = world.envelope(A1, SignedRecordKind.SIGN_IN, _sign_in("YS0001", sid, start))
    assert world.ingest(sign_in).opened == 1
    assert world.ingest(sign_in.model_copy(update={"message_id": uuid.uuid4(), "seq": 99})).opened == 0
    out_at = start + dt.timedelta(hours=8)
    sign_out = world.envelope(A2, SignedRecordKind.SIGN_OUT, _sign_out("YS0001", sid, start, out_at))
    assert world.ingest(sign_out).closed == 1
    [row] = world.sessions()
    assert (row.device_id, row.signed_out_at, row.closed_reason) == (A1, out_at, "signed_out")
    assert row.sign_in_similarity == pytest.approx(0.97)
    assert row.sign_out_similarity == pytest.approx(0.95)

    refused = world.ingest(
        # forged: signed by a key that is not A1's
        world.envelope(A1, SignedRecordKind.SIGN_IN, _sign_in("YS0001", uuid.uuid4(), start), SM2PrivateKey.generate()),
        # B's terminal naming A's pharmacist at A: never bound to A
        world.envelope(B1, SignedRecordKind.SIGN_IN, _sign_in("YS0001", uuid.uuid4(), start)),
        # a code not on A's roster
        world.envelope(A1, SignedRecordKind.SIGN_IN, _sign_in("NOBODY", uuid.uuid4(), start)),
        # malformed: a field the contract does not know
        world.envelope(A1, SignedRecordKind.SIGN_IN, {**_sign_in("YS0001", uuid.uuid4(), start), "name": "王小明"}),
    )
    assert (refused.opened, refused.refused) == (0, 4)
    assert len(world.sessions()) == 1

    # a sign-out whose sign-in never arrived still records the session from its own times
    lone = uuid.uuid4()
    world.ingest(world.envelope(A1, SignedRecordKind.SIGN_OUT, _sign_out("YS0001", lone, start, out_at)))
    assert {s.session_id for s in world.sessions()} == {sid, lone}


def test_open_sessions_close_at_the_servers_closing_hour_and_the_terminals_word_wins(world: World) -> None:
    world.sync(A, _his("YS0001", "王小明", ID_WANG))
    morning = dt.datetime(2026, 1, 5, 1, 0, tzinfo=dt.UTC)  # 09:00 in Shanghai
    sid = uuid.uuid4()
    world.ingest(world.envelope(A1, SignedRecordKind.SIGN_IN, _sign_in("YS0001", sid, morning)))
    with world.begin() as session:
        late_evening = dt.datetime(2026, 1, 5, 15, 59, tzinfo=dt.UTC)  # 23:59
        assert pharmacists.close_overdue_sessions(session, now=late_evening, close_hour=24, tz=SHANGHAI) == 0
        next_day = dt.datetime(2026, 1, 5, 16, 30, tzinfo=dt.UTC)  # 00:30 the next day
        assert pharmacists.close_overdue_sessions(session, now=next_day, close_hour=24, tz=SHANGHAI) == 1
    [row] = world.sessions()
    assert row.closed_reason == SignOutReason.SERVER_CLOSED.value
    assert row.signed_out_at == dt.datetime(2026, 1, 5, 16, 0, tzinfo=dt.UTC)  # midnight in Shanghai
    # the terminal's own sign-out arrives later: it replaces the server's guess
    out_at = dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.UTC)
    world.ingest(world.envelope(A1, SignedRecordKind.SIGN_OUT, _sign_out("YS0001", sid, morning, out_at)))
    [row] = world.sessions()
    assert (row.signed_out_at, row.closed_reason) == (out_at, "signed_out")


@pytest.fixture
def api(world: World, engine: Engine, db_url: str) -> Iterator[httpx.Client]:
    settings = ServerSettings(database_url=db_url, secret_key=SecretStr(SECRET))
    app = create_app(
        settings, engine=engine, start_ingest=False, clock=FakeClock(dt.datetime(2026, 1, 6, tzinfo=dt.UTC))
    )
    with serving(app, admin=False) as client:
        yield client


def test_attendance_queries_are_scoped_and_masked(world: World, api: httpx.Client) -> None:
    world.sync(A, _his("YS0001", "王小明", ID_WANG), _his("YS0002", "李四", ID_LI))
    world.sync(B, _his("SH0001", "周五", "310115198001011111"))
    start = dt.datetime(2026, 1, 5, 1, 0, tzinfo=dt.UTC)
    for device, code, institution in ((A1, "YS0001", A), (A2, "YS0002", A), (B1, "SH0001", B)):
        world.ingest(world.envelope(device, SignedRecordKind.SIGN_IN, _sign_in(code, uuid.uuid4(), start, institution)))
    a_id, b_id = world.inst_id[A], world.inst_id[B]
    make_account(world.engine, "reg-ks", Role.REGULATOR, region_prefix="3205")
    make_account(world.engine, "reg-sh", Role.REGULATOR, region_prefix="31")
    make_account(world.engine, "head-a", Role.INSTITUTION_HEAD, institution_id=a_id)
    make_account(world.engine, "wang", Role.PHARMACIST, institution_id=a_id, id_number=ID_WANG)
    make_account(world.engine, "ph-b", Role.PHARMACIST, institution_id=b_id)
    make_account(world.engine, "cashier", Role.CASHIER, institution_id=a_id)

    def codes(user: str, **params: Any) -> list[str]:
        response = api.get("/api/v1/pharmacist-sessions", headers=login(api, user), params=params)
        assert response.status_code == 200, response.text
        return sorted(item["pharmacist_code"] for item in response.json()["items"])

    assert codes("reg-sh") == ["SH0001"]
    assert codes("reg-ks") == ["YS0001", "YS0002"]
    assert codes("reg-ks", institution=B) == []  # another region's institution stays invisible
    assert codes("reg-ks", institution=A, pharmacist="YS0001") == ["YS0001"]
    assert codes("head-a") == ["YS0001", "YS0002"]
    assert codes("head-a", pharmacist="YS0002") == ["YS0002"]
    assert codes("wang") == ["YS0001"]

    page = api.get("/api/v1/pharmacist-sessions", headers=login(api, "reg-ks")).json()
    wire = json.dumps(page, ensure_ascii=False)
    assert "王小明" not in wire
    assert ID_WANG not in wire
    assert {item["pharmacist_masked"] for item in page["items"]} == {"王**", "李*"}
    # the clock of the app is the next day: the sessions left open were closed at midnight before the answer
    assert {item["closed_reason"] for item in page["items"]} == {"server_closed"}

    assert api.get("/api/v1/pharmacist-sessions", headers=login(api, "ph-b")).status_code == 409  # not linked
    assert api.get("/api/v1/pharmacist-sessions", headers=login(api, "cashier")).status_code == 403
    assert api.get("/api/v1/pharmacist-sessions").status_code == 401
    head = login(api, "head-a")
    for bad in ({"limit": 0}, {"pharmacist": "a b"}, {"since": "yesterday"}):
        assert api.get("/api/v1/pharmacist-sessions", headers=head, params=bad).status_code == 422


# ---------------------------------------------------------------- over real HTTP with signed requests


@dataclass
class Stack:
    client: httpx.Client
    clock: FakeClock
    engine: Engine
    his_a: HisSigner
    his_b: HisSigner
    devices: dict[str, Enrolled]

    def device(self, name: str) -> DeviceSigner:
        enrolled = self.devices[name]
        return DeviceSigner(enrolled.device_id, enrolled.session)

    def commands(self) -> list[tuple[str, str, dict[str, Any]]]:
        with session_factory(self.engine)() as session:
            rows = session.scalars(select(IssuedCommand).order_by(IssuedCommand.issued_at, IssuedCommand.device_id))
            return [(r.device_id, r.kind, r.args) for r in rows if r.kind != "binding_decision"]


@pytest.fixture
def stack(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[Stack]:
    with session_factory(engine, write_intent=True).begin() as session:
        for code, region in ((A, "320583"), (B, "310115")):
            data = binding.InstitutionData(name=f"药房{code}", kind=InstitutionKind.PHARMACY, region_code=region)
            binding.upsert_institution(session, code, data, now=T0)
    settings = ServerSettings(database_url=db_url, data_dir=tmp_path, secret_key=SecretStr(SECRET))
    create_server_key(settings, iterations=1000)
    clock = FakeClock(T0)
    app = create_app(settings, engine=engine, clock=clock, start_ingest=False)
    with serving(app) as client:
        his_a, his_b = make_his_client(client, A), make_his_client(client, B)
        devices = {name: enrol_with_session(client, clock, name) for name in (A1, A2, B1)}
        with session_factory(engine, write_intent=True).begin() as session:
            ids = {c: session.scalars(select(Institution.id).where(Institution.code == c)).one() for c in (A, B)}
            for name in (A1, A2, B1):
                device = session.get(Device, name)
                assert device is not None
                device.institution_id = ids[B if name == B1 else A]
        yield Stack(client, clock, engine, his_a, his_b, devices)


def _his_body(*people: tuple[str, str, str], **extra: Any) -> dict[str, Any]:
    return {
        "pharmacists": [
            {"dr_code": code, "dr_name": name, "certno": certno, "psn_cert_type": "01", "prac_regn": "320583", **extra}
            for code, name, certno in people
        ]
    }


def test_the_his_syncs_its_own_institution_over_signed_http_and_bad_input_changes_nothing(stack: Stack) -> None:
    c, clock = stack.client, stack.clock
    resp = signed(
        c,
        stack.his_a,
        "PUT",
        "/his/v1/pharmacists",
        clock=clock,
        json_body=_his_body(("YS0001", "王小明", ID_WANG), ("YS0002", "李四", ID_LI)),
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "institution_code": A,
        "created": 2,
        "updated": 0,
        "left": 0,
        "templates_deleted": 0,
        "commands": 2,
    }
    # B's HIS client writes B's roster, never A's (the institution comes from the signature, not the body)
    resp = signed(
        c,
        stack.his_b,
        "PUT",
        "/his/v1/pharmacists",
        clock=clock,
        json_body=_his_body(("YS0001", "周五", "310115198001011111")),
    )
    assert resp.status_code == 200
    assert resp.json()["institution_code"] == B

    bad_bodies = [
        _his_body(("YS0009", "赵六", ID_LI), phone="13812345678"),  # minimum necessary: not accepted
        _his_body(("YS0009", "赵六", ID_LI), prac_regn="3205"),
        _his_body(("YS 09", "赵六", ID_LI)),
        _his_body(("YS0009", "赵六", ID_LI), ("YS0009", "赵六", ID_LI)),  # listed twice
        {"pharmacists": []},
        {"pharmacists": [{"dr_code": "YS0009"}]},
        [],
    ]
    for body in bad_bodies:
        resp = signed(c, stack.his_a, "PUT", "/his/v1/pharmacists", clock=clock, json_body=body)
        assert resp.status_code == 422, (body, resp.text)
    unsigned = c.put("/his/v1/pharmacists", json=_his_body(("YS0009", "赵六", ID_LI)), headers={"Authorization": ""})
    assert unsigned.status_code == 401
    with session_factory(stack.engine)() as session:
        codes = sorted(session.scalars(select(Pharmacist.code).where(Pharmacist.code == "YS0009")))
        assert codes == []
        dumped = json.dumps([r.name_masked + str(r.id_number_masked) for r in session.scalars(select(Pharmacist))])
    assert "王小明" not in dumped
    assert ID_WANG not in dumped
    # a terminal cannot call the HIS route, a HIS client cannot call the device API
    assert (
        signed(
            c, stack.device(A1), "PUT", "/his/v1/pharmacists", clock=clock, json_body={}, headers={"Authorization": ""}
        ).status_code
        == 401
    )
    assert signed(c, stack.his_a, "GET", "/device/v1/pharmacists", clock=clock).status_code == 401


def test_terminals_exchange_templates_only_within_their_institution_and_purge_on_leave(stack: Stack) -> None:
    c, clock = stack.client, stack.clock
    body = _his_body(("YS0001", "王小明", ID_WANG), ("YS0002", "李四", ID_LI))
    assert signed(c, stack.his_a, "PUT", "/his/v1/pharmacists", clock=clock, json_body=body).status_code == 200
    a1, a2, b1 = stack.devices[A1], stack.devices[A2], stack.devices[B1]
    vector = _vector(7)

    def upload(device: Enrolled, code: str) -> TemplateUpload:
        aad = template_aad(TemplateDirection.UPLOAD, device.device_id, code, MODEL)
        return TemplateUpload(
            key_id=device.session.key_id,
            sealed=seal_template(device.session.key, vector, aad),
            model_sha256=MODEL,
            dims=128,
            consent_version="2026-01",
            consent_at=T0,
            id_photo_similarity=0.96,
        )

    path = "/device/v1/pharmacists/YS0001/template"
    resp = signed(
        c, stack.device(A1), "POST", path, clock=clock, json_body=upload(a1, "YS0001").model_dump(mode="json")
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["notified_devices"] == 1
    # B's terminal cannot enrol A's pharmacist; a template sealed for another device does not open
    resp = signed(
        c, stack.device(B1), "POST", path, clock=clock, json_body=upload(b1, "YS0001").model_dump(mode="json")
    )
    assert resp.status_code == 404
    stolen = upload(a1, "YS0001").model_copy(update={"key_id": a2.session.key_id}).model_dump(mode="json")
    assert signed(c, stack.device(A2), "POST", path, clock=clock, json_body=stolen).status_code == 422
    garbage = {**upload(a1, "YS0001").model_dump(mode="json"), "dims": 0}
    assert signed(c, stack.device(A1), "POST", path, clock=clock, json_body=garbage).status_code == 422

    roster = Roster.model_validate(signed(c, stack.device(A2), "GET", "/device/v1/pharmacists", clock=clock).json())
    assert roster.institution_code == A
    entries = {e.code: e for e in roster.pharmacists}
    assert (entries["YS0001"].name_masked, entries["YS0001"].id_number_masked) == ("王**", "320*************34")
    sealed = entries["YS0001"].template
    assert sealed is not None
    assert entries["YS0002"].template is None
    aad = template_aad(TemplateDirection.DOWNLOAD, A2, "YS0001", MODEL)
    assert np.allclose(open_template(a2.session.key, sealed.sealed, aad, 128), vector, atol=1e-6)
    roster_b = signed(c, stack.device(B1), "GET", "/device/v1/pharmacists", clock=clock).json()
    assert roster_b == {"institution_code": B, "pharmacists": []}
    assert "王小明" not in json.dumps(roster.model_dump(mode="json"), ensure_ascii=False)

    # the pharmacist leaves: template gone, both of A's terminals told to purge
    left = _his_body(("YS0001", "王小明", ID_WANG), resign_date="2026-02-28")
    resp = signed(c, stack.his_a, "PUT", "/his/v1/pharmacists", clock=clock, json_body=left)
    assert resp.json()["left"] == 1
    assert resp.json()["templates_deleted"] == 1
    purges = sorted(d for d, k, a in stack.commands() if k == "template_purge" and a["pharmacist_code"] == "YS0001")
    assert purges == [A1, A2]
    roster = Roster.model_validate(signed(c, stack.device(A2), "GET", "/device/v1/pharmacists", clock=clock).json())
    assert [e.code for e in roster.pharmacists] == ["YS0002"]

    # unbinding a terminal: it gets no roster any more, and its unbind command is queued (it purges on carrying it out)
    resp = c.post(f"/api/v1/devices/{A2}/unbind", json={"reason": "moved"})
    assert resp.status_code == 200, resp.text
    assert signed(c, stack.device(A2), "GET", "/device/v1/pharmacists", clock=clock).status_code == 409
    assert signed(c, stack.device(A2), "GET", "/device/v1/pharmacist-sessions", clock=clock).status_code == 409
    assert (A2, "unbind") in [(d, k) for d, k, _ in stack.commands()]


def test_a_terminal_reads_its_institutions_attendance(stack: Stack, engine: Engine) -> None:
    c, clock = stack.client, stack.clock
    assert (
        signed(
            c,
            stack.his_a,
            "PUT",
            "/his/v1/pharmacists",
            clock=clock,
            json_body=_his_body(("YS0001", "王小明", ID_WANG), ("YS0002", "李四", ID_LI)),
        ).status_code
        == 200
    )
    world = World.__new__(World)
    world.engine, world.keys, world.seq = engine, {A1: stack.devices[A1].identity}, 100
    start = T0 - dt.timedelta(hours=2)
    for code in ("YS0001", "YS0002"):
        world.ingest(world.envelope(A1, SignedRecordKind.SIGN_IN, _sign_in(code, uuid.uuid4(), start)))
    page = AttendancePage.model_validate(
        signed(c, stack.device(A2), "GET", "/device/v1/pharmacist-sessions?pharmacist=YS0002", clock=clock).json()
    )
    assert [(i.pharmacist_code, i.device_id, i.pharmacist_masked) for i in page.items] == [("YS0002", A1, "李*")]
    assert signed(c, stack.device(B1), "GET", "/device/v1/pharmacist-sessions", clock=clock).json()["total"] == 0
    bad = signed(c, stack.device(A2), "GET", "/device/v1/pharmacist-sessions?limit=0", clock=clock)
    assert bad.status_code == 422


def test_the_real_ingest_worker_turns_published_attendance_records_into_sessions(
    world: World, broker: MosquittoBroker, publisher: Publisher, db_url: str
) -> None:
    world.sync(A, _his("YS0001", "王小明", ID_WANG))
    sid = uuid.uuid4()
    start = T0
    sign_in = world.envelope(A1, SignedRecordKind.SIGN_IN, _sign_in("YS0001", sid, start))
    forged = world.envelope(
        A1, SignedRecordKind.SIGN_IN, _sign_in("YS0001", uuid.uuid4(), start), SM2PrivateKey.generate()
    )
    sign_out = world.envelope(
        A1, SignedRecordKind.SIGN_OUT, _sign_out("YS0001", sid, start, start + dt.timedelta(hours=4))
    )
    with running(make_settings(broker, db_url), world.engine) as worker:
        publish_all(publisher, [sign_in, forged, sign_in, sign_out])  # the sign-in redelivered
        settled(worker, received=4)
    [row] = world.sessions()
    assert (row.session_id, row.closed_reason, row.sign_in_message_id) == (sid, "signed_out", sign_in.message_id)
