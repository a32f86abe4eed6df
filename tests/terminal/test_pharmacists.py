"""Pharmacists at the terminal on the real face models: enrolment against the ID-card photo (人证比对) with consent,
sign-in / sign-out by face 1:N, the closing hour, re-verification, purges — signed records in a real outbox."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import JsonValue, SecretStr
from sqlalchemy import select

from drivers.camera import Frame
from drivers.card_reader import NoCardError
from drivers.idcard import IdCardData
from hardware_sim import SimulatedPeripheral
from hardware_sim.camera_sim import SimulatedCamera, load_rgb
from hardware_sim.idcard_sim import synthetic_card
from models.dlib_convert import build_dlib_resnet
from models.face import FaceEngine, engine_from_store
from models.liveness import LivenessChecker
from models.manifest import ModelStore
from models.types import RgbImage
from protocol import AuditEvent, CommandKind, CommandOutcome, DeviceCommand, Envelope, SignedRecord, Topics
from protocol.evidence import sign_device_record, verify_device_record
from protocol.gm.sm2 import SM2PrivateKey
from protocol.payloads import PeripheralKind, PeripheralStatus, SignedRecordKind
from protocol.pharmacist import SignOutReason, parse_enrolment, parse_sign_in, parse_sign_out
from protocol.secure import SessionKey
from sync_server import binding
from sync_server.app import create_app
from sync_server.commands import wire_command
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.migrate import upgrade
from sync_server.db.models import Device, Institution, InstitutionKind, IssuedCommand
from sync_server.identity import create_server_key
from sync_server.pharmacists import record_pharmacist_sessions
from sync_server.settings import ServerSettings
from sync_server.store import store_envelopes
from terminal.binding import BindingStore, binding_handlers
from terminal.config import PharmacistsConfig, parse_terminal_config
from terminal.devices import DeviceStartupError, open_devices
from terminal.errors import ConfigError
from terminal.face_templates import TemplateStore
from terminal.outbox import Outbox
from terminal.pharmacists import (
    ClosingHourWorker,
    Consent,
    EnrolmentOutcome,
    OnDuty,
    PharmacistCommands,
    PharmacistDesk,
    PharmacistError,
    PharmacistStore,
    SessionKeys,
    TemplateState,
)
from terminal.review import SignedInPharmacist
from terminal.runtime import build_runtime
from terminal.server_api import ServerApi
from terminal.verification import FaceOutcome, FaceVerifier, Prompt
from tests.face_data import faces_dir, person_photos
from tests.sync_server.conftest import TEST_ADMIN_TOKEN, serving
from tests.sync_server.signed_requests import Enrolled, enrol_with_session, make_his_client, signed
from tests.terminal.conftest import DEVICE_ID, FakeClock, outbox_config, terminal_raw_config
from tests.terminal.fakes import ScriptedLink
from tests.terminal.test_devices import config_with

KEY = bytes(range(16))
INSTITUTION = "H32058300001"
# 2026-01-05 09:30 UTC = 17:30 in Shanghai: a pharmacy's afternoon shift
START = dt.datetime(2026, 1, 5, 9, 30, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> FaceEngine:
    models_dir = tmp_path_factory.mktemp("models")
    build_dlib_resnet(ModelStore(models_dir).manifest("dlib_resnet_v1"), models_dir)
    return engine_from_store(ModelStore(models_dir, operator_dir=None))


def photo(name: str) -> Path:
    return next(p for photos in person_photos().values() for p in photos if p.stem == name)


class PacedCamera:
    """The simulated camera at 15 frames per second of fake time; `show` puts another person in front of it."""

    def __init__(self, engine: FaceEngine, clock: FakeClock, name: str) -> None:
        self.engine = engine
        self.clock = clock
        self.inner = self._camera(name)

    def _camera(self, name: str) -> SimulatedCamera:
        camera = SimulatedCamera([photo(name)], self.engine.detector, seed=3)
        camera.open()
        return camera

    def show(self, name: str) -> None:
        self.inner.close()
        self.inner = self._camera(name)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def kind(self) -> PeripheralKind:
        return self.inner.kind

    def open(self) -> None:
        self.inner.open()

    def close(self) -> None:
        self.inner.close()

    def status(self) -> PeripheralStatus:
        return self.inner.status()

    def read(self) -> Frame:
        self.clock.advance(1 / 15)
        return self.inner.read()


class CardReader:
    """The ID-card reader with one card on it (or none)."""

    def __init__(self, card: IdCardData | None) -> None:
        self.card = card
        self.reads = 0

    def read_card(self, timeout_s: float = 5.0) -> IdCardData:
        self.reads += 1
        if self.card is None:
            raise NoCardError("no card on the reader")
        return self.card


class PhotoDecoder:
    """Stands in for the vendor's WLT decoder: maps a card's opaque photo bytes to a real face photo."""

    def __init__(self) -> None:
        self.photos: dict[bytes, Path] = {}

    def card_with(self, seed: int, face: str, *, id_number: str | None = None) -> IdCardData:
        card = synthetic_card(seed)
        if id_number is not None:
            card = dataclasses.replace(card, id_number=id_number)
        self.photos[card.photo_wlt] = photo(face)
        return card

    def __call__(self, wlt: bytes) -> RgbImage:
        if wlt not in self.photos:
            raise ValueError("not a photo this decoder knows")
        return load_rgb(self.photos[wlt])


def mask(number: str) -> str:
    """The server's mask of a 证件号码 (sync_server.masking.mask_id_number)."""
    return number[:3] + "*" * (len(number) - 5) + number[-2:]


class Kiosk:
    """A desk on real parts: camera simulator, face engine, sealed gallery, pharmacist store, real outbox."""

    def __init__(
        self,
        engine: FaceEngine,
        tmp_path: Path,
        *,
        face: str = "obama_a",
        clock: FakeClock | None = None,
        device_id: str = DEVICE_ID,
        key: SM2PrivateKey | None = None,
        api: ServerApi | None = None,
        keys: SessionKeys | None = None,
        **config: Any,
    ) -> None:
        self.clock = clock or FakeClock(START)
        self.device_id = device_id
        self.camera = PacedCamera(engine, self.clock, face)
        self.gallery = TemplateStore(
            tmp_path / "pharmacist_gallery.sqlite3", KEY, model_sha256=engine.embedder.model_sha256
        )
        self.events: list[AuditEvent] = []

        def prompt(p: Prompt) -> None:
            if p.challenge is not None:
                self.camera.inner.perform(p.challenge)

        self.verifier = FaceVerifier(
            self.camera,
            engine,
            LivenessChecker(),
            self.gallery,
            self.clock,
            rng=random.Random(7),
            prompt=prompt,
            record=self.events.append,
        )
        self.outbox = Outbox.open(
            outbox_config(tmp_path / "outbox.sqlite3"),
            device_id=device_id,
            boot_id=uuid.uuid4(),
            clock=self.clock,
            jitter=lambda: 0.0,
        )
        self.key = key or SM2PrivateKey.generate()
        self.bound: str | None = INSTITUTION
        self.config = PharmacistsConfig(store=tmp_path / "pharmacists.sqlite3", **config)
        self.desk = PharmacistDesk(
            self.config,
            PharmacistStore(self.config.store),
            self.verifier,
            self.clock,
            device_id=device_id,
            institution=lambda: self.bound,
            record_signed=self.record_signed,
            record_audit=self.events.append,
            api=api,
            keys=keys,
        )
        self.decoder = PhotoDecoder()

    def record_signed(self, kind: SignedRecordKind, record: dict[str, JsonValue]) -> Envelope:
        payload = sign_device_record(self.key, device_id=self.device_id, key_epoch=1, record_type=kind, record=record)
        return self.outbox.enqueue(payload)

    def signed(self) -> list[SignedRecord]:
        """The signed records queued since the last call, each verified against the device key."""
        out = []
        claimed = self.outbox.claim()
        for record in claimed:
            payload = record.envelope.payload
            if isinstance(payload, SignedRecord):
                verify_device_record(payload, device_id=self.device_id, device_key=self.key.public_key)
                out.append(payload)
        self.outbox.mark_sent([c.seq for c in claimed])  # the next call sees only what came after
        return out

    def envelopes(self) -> list[Envelope]:
        """Every envelope queued since the last call (as the uplink would send them)."""
        claimed = self.outbox.claim()
        self.outbox.mark_sent([c.seq for c in claimed])
        return [c.envelope for c in claimed]

    def on_roster(self, code: str, card: IdCardData) -> None:
        self.desk.store.put_member(code, "张**", mask(card.id_number))

    def enrol(self, code: str, card: IdCardData | None, face: str) -> Any:
        self.camera.show(face)
        return self.desk.enrol(
            code,
            card_reader=CardReader(card),
            decode_photo=self.decoder,
            consent=Consent(self.config.consent_version, self.clock.now()),
        )

    def close(self) -> None:
        self.desk.close()
        self.outbox.close()


@pytest.fixture
def kiosk(engine: FaceEngine, tmp_path: Path) -> Any:
    k = Kiosk(engine, tmp_path, reverify_every_min=30)
    yield k
    k.close()


def test_enrolment_matches_the_live_face_to_the_id_card_photo_and_signs_a_record_without_personal_data(
    kiosk: Kiosk,
) -> None:
    card = kiosk.decoder.card_with(1, "obama_c")
    kiosk.on_roster("YS0001", card)
    result = kiosk.enrol("YS0001", card, "obama_a")
    assert result.outcome is EnrolmentOutcome.ENROLLED, result
    assert result.id_photo_similarity is not None
    assert result.id_photo_similarity >= kiosk.verifier.engine.threshold
    assert result.decision is not None
    assert result.decision.liveness is not None
    assert result.decision.liveness.live
    assert not result.uploaded  # no server API here: the upload waits for the next sync
    assert kiosk.gallery.subjects() == {"YS0001": kiosk.gallery.model_sha256}
    member = kiosk.desk.store.member("YS0001")
    assert member is not None
    assert member.template is TemplateState.PENDING_UPLOAD
    assert [c.version for c in kiosk.desk.store.consents("YS0001")] == [kiosk.config.consent_version]

    [signed] = kiosk.signed()
    assert signed.record_type is SignedRecordKind.PHARMACIST_ENROLMENT
    record = parse_enrolment(dict(signed.record))
    assert record.pharmacist_code == "YS0001"
    assert record.institution_code == INSTITUTION
    assert record.id_photo_similarity == pytest.approx(result.id_photo_similarity, abs=1e-4)
    assert record.consent_version == kiosk.config.consent_version
    assert record.liveness is not None
    assert record.liveness.value == "live"
    wire = json.dumps(signed.record, ensure_ascii=False)
    assert card.name not in wire
    assert card.id_number not in wire
    assert card.id_number[6:14] not in wire  # not even the birth date part
    assert "[" not in wire  # no vector


def test_enrolment_with_another_persons_id_photo_leaves_no_template_and_no_record(kiosk: Kiosk) -> None:
    card = kiosk.decoder.card_with(2, "biden_a")
    kiosk.on_roster("YS0002", card)
    result = kiosk.enrol("YS0002", card, "obama_a")
    assert result.outcome is EnrolmentOutcome.ID_PHOTO_MISMATCH, result
    assert result.id_photo_similarity is not None
    assert result.id_photo_similarity < kiosk.verifier.engine.threshold
    assert kiosk.gallery.subjects() == {}
    assert kiosk.signed() == []
    failure = kiosk.events[-1]
    assert failure.category == "pharmacist"
    assert failure.detail["reason"] == "id_photo_mismatch"


def test_someone_elses_card_no_card_and_no_consent_stop_before_the_camera(kiosk: Kiosk) -> None:
    mine = kiosk.decoder.card_with(3, "obama_c")
    kiosk.on_roster("YS0003", mine)
    other = kiosk.decoder.card_with(4, "obama_c")
    assert kiosk.enrol("YS0003", other, "obama_a").outcome is EnrolmentOutcome.CARD_NOT_THE_PHARMACISTS
    assert kiosk.enrol("YS0003", None, "obama_a").outcome is EnrolmentOutcome.CARD_UNREADABLE
    with pytest.raises(PharmacistError, match="consent"):
        kiosk.desk.enrol("YS0003", card_reader=CardReader(mine), decode_photo=kiosk.decoder, consent=None)
    with pytest.raises(PharmacistError, match="roster"):
        kiosk.enrol("NOBODY", mine, "obama_a")
    kiosk.bound = None
    with pytest.raises(PharmacistError, match="not bound"):
        kiosk.enrol("YS0003", mine, "obama_a")
    assert kiosk.gallery.subjects() == {}
    assert kiosk.signed() == []


def _enrolled(kiosk: Kiosk) -> None:
    """Two pharmacists enrolled: YS0001 (obama) and YS0002 (rose)."""
    for seed, code, id_face, live_face in ((1, "YS0001", "obama_c", "obama_a"), (5, "YS0002", "rose_b", "rose_a")):
        card = kiosk.decoder.card_with(seed, id_face)
        kiosk.on_roster(code, card)
        assert kiosk.enrol(code, card, live_face).enrolled
    kiosk.signed()


def test_sign_in_and_out_by_face_are_signed_records_and_queryable(kiosk: Kiosk) -> None:
    _enrolled(kiosk)
    kiosk.camera.show("rose_b")
    signed_in = kiosk.desk.sign_in()
    assert signed_in.ok, signed_in
    assert signed_in.session is not None
    assert signed_in.session.code == "YS0002"
    again = kiosk.desk.sign_in()
    assert again.detail == "already_signed_in"
    assert again.session == signed_in.session

    kiosk.clock.advance(3600)
    kiosk.camera.show("rose_b")
    signed_out = kiosk.desk.sign_out()
    assert signed_out.ok, signed_out
    assert signed_out.session is not None
    assert signed_out.session.reason is SignOutReason.SIGNED_OUT

    kiosk.camera.show("obama_b")
    assert kiosk.desk.sign_out().detail == "not_signed_in"

    first, second = kiosk.signed()
    sign_in = parse_sign_in(dict(first.record))
    sign_out = parse_sign_out(dict(second.record))
    assert first.record_type is SignedRecordKind.SIGN_IN
    assert second.record_type is SignedRecordKind.SIGN_OUT
    assert sign_in.session_id == sign_out.session_id == signed_in.session.session_id
    assert sign_in.pharmacist_code == "YS0002"
    assert sign_in.face_similarity is not None
    assert sign_in.face_similarity >= sign_in.face_threshold
    assert sign_out.reason is SignOutReason.SIGNED_OUT
    assert sign_out.face is not None
    assert sign_out.signed_out_at - sign_out.signed_in_at >= dt.timedelta(hours=1)

    [record] = kiosk.desk.records("YS0002")
    assert record.session_id == sign_in.session_id
    assert record.signed_out_at == sign_out.signed_out_at
    assert kiosk.desk.records("YS0001") == []


def test_on_duty_names_the_pharmacist_signed_in_for_the_prescription_review(kiosk: Kiosk) -> None:
    _enrolled(kiosk)
    on_duty: SignedInPharmacist = OnDuty(kiosk.desk)  # what terminal.review asks for
    assert on_duty.current() is None
    kiosk.camera.show("obama_b")
    assert kiosk.desk.sign_in().ok
    kiosk.clock.advance(60)
    kiosk.camera.show("rose_b")
    assert kiosk.desk.sign_in().ok
    current = on_duty.current()
    assert current is not None
    code, template = current
    assert code == "YS0002"  # the most recent sign-in
    assert template.shape == (128,)
    kiosk.camera.show("rose_b")
    assert kiosk.desk.sign_out().ok
    current = on_duty.current()
    assert current is not None
    assert current[0] == "YS0001"
    kiosk.desk.purge("YS0001")  # left: their template is gone, so they cannot confirm reviews any more
    assert on_duty.current() is None


def test_a_stranger_cannot_sign_in(kiosk: Kiosk) -> None:
    _enrolled(kiosk)
    kiosk.camera.show("biden_b")
    result = kiosk.desk.sign_in()
    assert not result.ok
    assert result.decision.outcome is FaceOutcome.NO_MATCH
    assert kiosk.signed() == []


def test_an_open_session_closes_at_the_configured_hour(kiosk: Kiosk) -> None:
    _enrolled(kiosk)
    kiosk.camera.show("obama_b")
    session = kiosk.desk.sign_in().session
    assert session is not None
    kiosk.clock.set_wall(dt.datetime(2026, 1, 5, 13, 59, tzinfo=dt.UTC))  # 21:59 in Shanghai
    assert kiosk.desk.close_overdue() == []
    kiosk.clock.set_wall(dt.datetime(2026, 1, 5, 15, 0, tzinfo=dt.UTC))  # 23:00: closed at 22:00
    [closed] = kiosk.desk.close_overdue()
    assert closed.session_id == session.session_id
    assert closed.reason is SignOutReason.AUTO_CLOSED
    assert closed.signed_out_at == dt.datetime(2026, 1, 5, 14, 0, tzinfo=dt.UTC)
    assert kiosk.desk.close_overdue() == []  # once
    records = kiosk.signed()
    sign_out = parse_sign_out(dict(records[-1].record))
    assert sign_out.reason is SignOutReason.AUTO_CLOSED
    assert sign_out.face is None
    assert sign_out.signed_out_at == closed.signed_out_at


def test_the_closing_hour_thread_closes_sessions_while_the_kiosk_is_idle(kiosk: Kiosk) -> None:
    _enrolled(kiosk)
    kiosk.camera.show("rose_b")
    assert kiosk.desk.sign_in().ok
    worker = ClosingHourWorker(kiosk.desk, every_s=0.05)
    worker.start()
    try:
        time.sleep(0.2)
        assert kiosk.desk.store.open_sessions() != []  # not yet 22:00 in Shanghai
        kiosk.clock.set_wall(dt.datetime(2026, 1, 5, 14, 30, tzinfo=dt.UTC))
        wait_for(lambda: kiosk.desk.store.open_sessions() == [], "the closing hour")
    finally:
        worker.stop()
    [_sign_in, sign_out] = kiosk.signed()
    assert parse_sign_out(dict(sign_out.record)).reason is SignOutReason.AUTO_CLOSED


def test_reverification_keeps_the_session_for_the_pharmacist_and_closes_it_for_anyone_else(kiosk: Kiosk) -> None:
    _enrolled(kiosk)
    kiosk.camera.show("obama_b")
    session = kiosk.desk.sign_in().session
    assert session is not None
    assert kiosk.desk.reverification_due() == []
    kiosk.clock.advance(31 * 60)
    [due] = kiosk.desk.reverification_due()
    assert due.session_id == session.session_id

    kiosk.camera.show("obama_b")
    kept = kiosk.desk.reverify("YS0001")
    assert kept.ok, kept
    assert kiosk.desk.reverification_due() == []
    assert kiosk.events[-1].action == "pharmacist.reverified"

    kiosk.clock.advance(31 * 60)
    kiosk.camera.show("biden_b")
    failed = kiosk.desk.reverify("YS0001")
    assert failed.detail == "reverification_failed"
    assert failed.session is not None
    assert failed.session.reason is SignOutReason.REVERIFICATION_FAILED
    assert kiosk.desk.store.open_session("YS0001") is None
    sign_out = parse_sign_out(dict(kiosk.signed()[-1].record))
    assert sign_out.reason is SignOutReason.REVERIFICATION_FAILED
    assert sign_out.face is not None
    assert sign_out.face.face_decision.value == "no_match"


def test_reverification_is_off_unless_configured(engine: FaceEngine, tmp_path: Path) -> None:
    kiosk = Kiosk(engine, tmp_path)
    try:
        _enrolled(kiosk)
        kiosk.camera.show("obama_b")
        assert kiosk.desk.sign_in().ok
        kiosk.clock.advance(8 * 3600)
        assert kiosk.desk.reverification_due() == []
    finally:
        kiosk.close()


def _command(kind: CommandKind, **args: Any) -> DeviceCommand:
    now = START
    return DeviceCommand(
        command_id=uuid.uuid4(),
        device_id=DEVICE_ID,
        kind=kind,
        issued_at=now,
        expires_at=now + dt.timedelta(days=1),
        args=args,
    )


def test_template_purge_and_unbind_remove_templates(kiosk: Kiosk, tmp_path: Path) -> None:
    _enrolled(kiosk)
    commands = PharmacistCommands()
    handlers = commands.handlers()
    purge = _command(CommandKind.TEMPLATE_PURGE, pharmacist_code="YS0001", reason="pharmacist_left")
    assert handlers[CommandKind.TEMPLATE_PURGE](purge).outcome is CommandOutcome.APPLIED  # no desk: nothing to do
    commands.attach(kiosk.desk)
    done = handlers[CommandKind.TEMPLATE_PURGE](purge)
    assert done.outcome is CommandOutcome.APPLIED
    assert done.detail == "1 template(s) purged"
    assert set(kiosk.gallery.subjects()) == {"YS0002"}
    assert set(kiosk.desk.roster()) == {"YS0002"}
    assert handlers[CommandKind.TEMPLATE_PURGE](purge).detail == "0 template(s) purged"  # idempotent

    notice = _command(CommandKind.ROSTER_UPDATE, institution_code=INSTITUTION, reason="his_sync")
    assert handlers[CommandKind.ROSTER_UPDATE](notice).outcome is CommandOutcome.APPLIED
    assert commands.sync_requested.is_set()

    binding = binding_handlers(BindingStore(tmp_path / "binding.json"), kiosk.clock.now, on_unbind=commands.purge_all)
    unbound = binding[CommandKind.UNBIND](_command(CommandKind.UNBIND, reason="moved to another pharmacy"))
    assert unbound.outcome is CommandOutcome.APPLIED
    assert "1 face template(s) purged" in unbound.detail
    assert kiosk.gallery.subjects() == {}
    assert kiosk.desk.roster() == {}


# ---------------------------------------------------------------- with the real server over signed HTTP


@dataclass(frozen=True)
class Keys:
    """`SessionKeys` over one enrolled device's session key."""

    session: SessionKey

    def current(self) -> SessionKey | None:
        return self.session

    def key_for(self, key_id: object) -> SessionKey | None:
        return self.session if key_id == self.session.key_id else None


def _key_of(device: Enrolled) -> Callable[[], SessionKey | None]:
    return lambda: device.session


def test_enrolment_on_one_terminal_lets_the_pharmacist_sign_in_on_another_of_the_same_pharmacy(
    engine: FaceEngine, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'server.sqlite3'}"
    upgrade(db_url)
    db = create_db_engine(db_url)
    clock = FakeClock(START)
    settings = ServerSettings(
        database_url=db_url,
        data_dir=tmp_path / "server",
        secret_key=SecretStr("s" * 48),
        bootstrap_admin_token=SecretStr(TEST_ADMIN_TOKEN),
    )
    create_server_key(settings, iterations=1000)
    with session_factory(db, write_intent=True).begin() as session:
        data = binding.InstitutionData(name="昆山示例药房", kind=InstitutionKind.PHARMACY, region_code="320583")
        binding.upsert_institution(session, INSTITUTION, data, now=START)
    app = create_app(settings, engine=db, clock=clock, start_ingest=False)
    kiosks: list[Kiosk] = []
    apis: list[ServerApi] = []
    try:
        with serving(app) as client:
            his = make_his_client(client, INSTITUTION)
            enrolled = [enrol_with_session(client, clock, name) for name in ("kiosk-ks-1", "kiosk-ks-2")]
            with session_factory(db, write_intent=True).begin() as session:
                inst_id = session.scalars(select(Institution.id).where(Institution.code == INSTITUTION)).one()
                for device in enrolled:
                    row = session.get(Device, device.device_id)
                    assert row is not None
                    row.institution_id = inst_id
            for n, device in enumerate(enrolled):
                api = ServerApi(str(client.base_url), device.device_id, _key_of(device), clock)
                apis.append(api)
                kiosks.append(
                    Kiosk(
                        engine,
                        tmp_path / f"t{n}",
                        clock=clock,
                        device_id=device.device_id,
                        key=device.identity,
                        api=api,
                        keys=Keys(device.session),
                    )
                )
            first, second = kiosks
            card = first.decoder.card_with(11, "obama_c")
            body = {"pharmacists": [{"dr_code": "YS0001", "dr_name": card.name, "certno": card.id_number}]}
            assert signed(client, his, "PUT", "/his/v1/pharmacists", clock=clock, json_body=body).status_code == 200

            assert first.desk.sync_roster() == 1
            member = first.desk.roster()["YS0001"]
            assert member.template is TemplateState.NONE
            assert member.id_number_masked is not None
            assert card.id_number not in member.id_number_masked
            result = first.enrol("YS0001", card, "obama_a")
            assert result.enrolled, result
            assert result.uploaded
            assert first.desk.roster()["YS0001"].template is TemplateState.SYNCED

            # the other terminal of the pharmacy gets the template and recognises the pharmacist
            assert second.gallery.subjects() == {}
            assert second.desk.sync_roster() == 1
            assert set(second.gallery.subjects()) == {"YS0001"}
            second.camera.show("obama_b")
            signed_in = second.desk.sign_in()
            assert signed_in.ok, signed_in

            # its signed records reach the server's attendance (what ingest does with them in its transaction)
            envelopes = second.envelopes() + first.envelopes()
            with session_factory(db, write_intent=True).begin() as session:
                store_envelopes(session, envelopes, received_at=clock.now())
                done = record_pharmacist_sessions(session, envelopes, now=clock.now())
            assert (done.opened, done.enrolments, done.refused) == (1, 1, 0)
            page = second.desk.server_records("YS0001")
            assert [i.session_id for i in page.items] == [signed_in.session.session_id if signed_in.session else None]

            # the pharmacist leaves: the server tells both terminals to purge; carrying it out empties the gallery
            body["pharmacists"][0]["resign_date"] = "2026-01-05"
            assert signed(client, his, "PUT", "/his/v1/pharmacists", clock=clock, json_body=body).status_code == 200
            with session_factory(db)() as session:
                purges = list(session.scalars(select(IssuedCommand).where(IssuedCommand.kind == "template_purge")))
            assert sorted(p.device_id for p in purges) == ["kiosk-ks-1", "kiosk-ks-2"]
            commands = PharmacistCommands()
            commands.attach(second.desk)
            [mine] = [p for p in purges if p.device_id == "kiosk-ks-2"]
            assert commands.handlers()[CommandKind.TEMPLATE_PURGE](wire_command(mine)).outcome is CommandOutcome.APPLIED
            assert second.gallery.subjects() == {}
            assert first.desk.sync_roster() == 0  # the roster no longer lists them: the first terminal forgets too
            assert first.gallery.subjects() == {}
    finally:
        for kiosk in kiosks:
            kiosk.close()
        for api in apis:
            api.close()
        db.dispose()


def test_the_pharmacists_section_is_checked_and_its_paths_follow_the_config_file(tmp_path: Path) -> None:
    raw = terminal_raw_config(tmp_path)
    raw["pharmacists"] = {"close_hour": 24, "reverify_every_min": 60}
    config = parse_terminal_config(raw, source="t.toml", base_dir=tmp_path)
    assert config.pharmacists is not None
    assert config.pharmacists.gallery == tmp_path / "pharmacist_gallery.sqlite3"
    assert config.pharmacists.store == tmp_path / "pharmacists.sqlite3"
    assert parse_terminal_config(terminal_raw_config(tmp_path), source="t.toml").pharmacists is None
    for bad, word in (
        ({"close_hour": 0}, "close_hour"),
        ({"timezone": "Mars/Olympus"}, "time zone"),
        ({"reverify_every_min": 1}, "reverify_every_min"),
        ({"closing": 22}, "closing"),
    ):
        raw["pharmacists"] = bad
        with pytest.raises(ConfigError, match=word):
            parse_terminal_config(raw, source="t.toml")


def test_the_runtime_builds_the_desk_on_its_own_gallery_and_carries_out_purge_commands(tmp_path: Path) -> None:
    video = faces_dir() / "video" / "short_clip.mp4"
    toml = (
        '[face]\ngallery = "gallery.sqlite3"\nwindow_s = 3.0\n'
        f'[devices.camera]\nbackend = "opencv"\nrgb = "{video}"\nsimulated_peer = true\n'
        "[pharmacists]\nclose_hour = 23\n"
    )
    config = config_with(tmp_path, toml)
    clock = FakeClock(START)
    devices = open_devices(config.devices, stand_in=SimulatedPeripheral)
    runtime = build_runtime(config, devices, clock, link=ScriptedLink(clock), template_key=bytes(range(16)))
    try:
        desk = runtime.pharmacists
        assert desk is not None
        assert runtime.face is not None
        assert desk.templates.path == tmp_path / "pharmacist_gallery.sqlite3"
        assert desk.verifier.engine is runtime.face.engine  # one set of models
        assert runtime.roster_sync is None  # no enrolled identity, no device API: nothing to sync from
        assert runtime.pharmacist_commands.desk is desk
        assert runtime.closing_hour is not None
        vector = np.random.default_rng(1).standard_normal(128).astype(np.float32)
        for code in ("YS0001", "YS0002"):
            desk.store.put_member(code, "王**", None)
            desk.templates.enrol(code, vector)
        runtime.start()
        downlink = runtime.sync.downlink
        assert downlink is not None
        topic = Topics(prefix=config.mqtt.topic_prefix).downlink(config.device_id)
        purge = _command(CommandKind.TEMPLATE_PURGE, pharmacist_code="YS0001", reason="pharmacist_left")
        downlink.offer(topic, purge.model_copy(update={"device_id": config.device_id}).to_bytes())
        wait_for(lambda: set(desk.templates.subjects()) == {"YS0002"}, "the purge")
        unbind = _command(CommandKind.UNBIND, reason="moved")
        downlink.offer(topic, unbind.model_copy(update={"device_id": config.device_id}).to_bytes())
        wait_for(lambda: desk.templates.subjects() == {}, "the unbind purge")
        assert desk.roster() == {}
        assert runtime.face.templates.subjects() == {}  # the citizens' gallery is another file, untouched
    finally:
        runtime.stop()


def wait_for(predicate: Any, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_the_pharmacists_section_without_face_verification_stops_start_up(tmp_path: Path) -> None:
    config = config_with(tmp_path, "[pharmacists]\n")
    clock = FakeClock(START)
    with pytest.raises(DeviceStartupError, match=r"\[pharmacists\] needs \[face\]"):
        build_runtime(config, [], clock, link=ScriptedLink(clock), template_key=bytes(range(16)))
