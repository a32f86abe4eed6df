"""The staff side of the simulated kiosk (`yibao.kiosk_sim`): a pharmacy the terminal can be bound to, one
pharmacist on its roster with a face template and months of attendance (and one without a template, whose ID card
is in the reader, for the face enrolment; re-verification every hour), pending prescriptions with a drug-quantity
warning, the platform's binding decisions — and the handles the staff screen tour pulls on (`StaffTourRig`).

This is a composition root (it may choose simulators and a signing key); everything personal in it is synthetic.
The simulated terminal has no enrolled device identity, so records are signed with a key made here (the real
terminal signs with its enrolled SM2 identity key through `TerminalRuntime.record_signed`).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from zoneinfo import ZoneInfo

from pydantic import JsonValue

from hardware_sim.camera_sim import SimulatedCamera, load_rgb
from hardware_sim.idcard_sim import synthetic_card
from models.types import RgbImage
from protocol import CommandKind, DeviceCommand, Envelope, SignedRecordKind
from protocol.catalogue import CatalogueKind, DrugEntry
from protocol.drug_rules import DrugRuleSet, DrugSelector, MaxQuantityPerPurchase, RuleAction
from protocol.evidence import sign_device_record
from protocol.gm.sm2 import SM2PrivateKey
from protocol.pharmacist import SignOutReason
from protocol.prescription import PendingPrescription, PendingPrescriptions, Prescription, prescription_digest
from terminal.binding import BindingDecisionHandler, BindingState, BindingStatus, BindingStore
from terminal.config import PharmacistsConfig
from terminal.pharmacists import LocalSession, OnDuty, PharmacistDesk, TemplateState, open_desk
from terminal.review import ReviewDesk
from terminal.runtime import TerminalRuntime
from ui.staff_services import RuntimeBinding, RuntimeEnrolment
from ui.viewmodels.models import KioskModels

logger = logging.getLogger(__name__)

INSTITUTION_CODE: Final = "H32058300017"
INSTITUTION_NAME: Final = "昆山示例大药房（模拟）"
CONTACT: Final = "昆山市医保中心 信息科 0512-00000000"
PHARMACIST_CODE: Final = "YS3205830001"
PHARMACIST_MASKED: Final = "王**"
PAST_DAYS: Final = 40
"""Days of past attendance, so the records list has many pages."""
RX_PER_ROUND: Final = 5
HEAD_PHOTO: Final = "obama/obama_a.jpg"
"""The institution head's ID-card photo (the person the simulated camera shows)."""
# pharmacist face enrolment and re-verification
ENROL_CODE: Final = "YS3205830002"
"""A pharmacist on the roster without a face template: the enrolment screens' subject. Their ID card is the
simulated reader's card (`synthetic_card(0)`), whose photo is the simulated camera's person (`HEAD_PHOTO`)."""
REVERIFY_EVERY_MIN: Final = 60


@dataclass
class StaffSim:
    """The staff parts of one simulated kiosk and the `StaffTourRig` handles."""

    runtime: TerminalRuntime
    desk: PharmacistDesk
    key: SM2PrivateKey
    faces_dir: Path
    drugs: tuple[DrugEntry, ...]
    camera: SimulatedCamera | None = None
    institution_code: str = INSTITUTION_CODE
    pharmacist_code: str = PHARMACIST_CODE
    _round: int = 0
    _application: int = 0
    signed: list[SignedRecordKind] = field(default_factory=list)

    def record_signed(self, kind: SignedRecordKind, record: dict[str, JsonValue]) -> Envelope:
        """What `TerminalRuntime.record_signed` does with an enrolled identity: sign, then queue in the outbox."""
        payload = sign_device_record(
            self.key, device_id=self.runtime.config.device_id, key_epoch=1, record_type=kind, record=record
        )
        self.signed.append(kind)
        return self.runtime.outbox.enqueue(payload)

    def decode_photo(self, wlt: bytes) -> RgbImage:
        """The reader vendor's WLT decoder, simulated: the synthetic card's photo is the head's face photo."""
        if wlt != synthetic_card(0).photo_wlt:
            raise ValueError("not a photo this decoder knows")
        return load_rgb(self.faces_dir / HEAD_PHOTO)

    @property
    def binding(self) -> BindingStore:
        store = self.runtime.binding
        if store is None:
            raise RuntimeError("the simulated runtime has no binding store")
        return store

    # ------------------------------------------------------------------ StaffTourRig

    def reset(self) -> None:
        """A fresh morning: the terminal unbound (with whom to contact), nobody signed in, new prescriptions."""
        self.binding.save(
            BindingStatus(BindingState.UNBOUND, reason="新终端，尚未绑定药店", contact=CONTACT, updated_at=_now(self))
        )
        now = self.runtime.clock.now()
        for session in self.desk.store.open_sessions():
            self.desk.store.close_session(session.session_id, now, SignOutReason.SIGNED_OUT)
        # pharmacist face enrolment and re-verification: the enrolment's subject has no template again
        self.desk.templates.remove(ENROL_CODE)
        self.desk.store.set_template_state(ENROL_CODE, TemplateState.NONE)
        self._round += 1
        self._prescriptions(self._round)

    def decide_binding(self, *, approved: bool, reason: str) -> None:
        """The device admin decides the last application; the `binding_decision` command reaches the terminal."""
        self._application += 1
        args: dict[str, str | int | float | bool | None] = {
            "application_id": self._application,
            "approved": approved,
            "reason": reason,
        }
        if approved:
            args |= {"institution_code": INSTITUTION_CODE, "institution_name": INSTITUTION_NAME}
        args["contact"] = CONTACT
        now = self.runtime.clock.now()
        command = DeviceCommand(
            command_id=uuid.uuid4(),
            device_id=self.runtime.config.device_id,
            kind=CommandKind.BINDING_DECISION,
            issued_at=now,
            expires_at=now + dt.timedelta(days=7),
            args=args,
        )
        BindingDecisionHandler(self.binding, self.runtime.clock.now)(command)

    def face_forward(self) -> None:
        """The next person steps up facing the camera (not still turned from the last liveness challenge)."""
        if self.camera is not None:
            self.camera.perform(None)

    def on_duty(self) -> str | None:
        current = OnDuty(self.desk).current()
        return None if current is None else current[0]

    # pharmacist face enrolment and re-verification
    @property
    def enrol_code(self) -> str:
        return ENROL_CODE

    def enrolled(self, code: str) -> tuple[bool, str]:
        """Whether `code` has a face template here, and when their last recorded consent was given ('' if never)."""
        consents = self.desk.store.consents(code)
        return code in self.desk.templates.subjects(), consents[-1].agreed_at.isoformat() if consents else ""

    def make_reverification_due(self) -> None:
        """Time passes: the pharmacist on duty was last verified one interval ago (their face check is due)."""
        interval = dt.timedelta(minutes=self.desk.config.reverify_every_min or REVERIFY_EVERY_MIN)
        back = self.runtime.clock.now() - interval - dt.timedelta(seconds=1)
        for session in self.desk.store.open_sessions():
            self.desk.store.verified(session.session_id, back)

    # ------------------------------------------------------------------ set-up

    def _prescriptions(self, round_no: int) -> None:
        inbox = self.runtime.prescriptions
        if inbox is None:
            raise RuntimeError("the simulated runtime has no prescription inbox")
        now = self.runtime.clock.now()
        items = [self._pending(round_no * 100 + i, i, now) for i in range(RX_PER_ROUND)]
        inbox.replace_pending(
            PendingPrescriptions(institution_code=INSTITUTION_CODE, items=items, total=len(items)), now=now
        )

    def _pending(self, prescription_id: int, index: int, now: dt.datetime) -> PendingPrescription:
        warned, other = self.drugs[0], self.drugs[1]
        at = now - dt.timedelta(minutes=20 * (RX_PER_ROUND - index))
        lines: list[dict[str, object]] = [
            {
                "line_no": 1,
                "drug_code": warned.code,
                "drug_name": warned.name,
                "generic_name": warned.generic_name,
                "specification": warned.specification,
                "quantity": 3 if index == 0 else 1,
                "unit": warned.unit,
                "dosage": "口服 一次1片 一日3次",
                "days_supply": 7,
            },
            {
                "line_no": 2,
                "drug_code": other.code,
                "drug_name": other.name,
                "generic_name": other.generic_name,
                "specification": other.specification,
                "quantity": 1,
                "unit": other.unit,
                "dosage": "外用 一日2次",
                "days_supply": 5,
            },
        ]
        if index == 0:
            lines.append(
                {
                    "line_no": 3,
                    "drug_code": other.code,
                    "drug_name": other.name,
                    "generic_name": other.generic_name,
                    "specification": other.specification,
                    "quantity": 2,
                    "unit": other.unit,
                    "dosage": "口服 一次2片 一日2次",
                    "days_supply": 10,
                }
            )
        prescription = Prescription.model_validate(
            {
                "rx_no": f"RX2026{prescription_id:08d}",
                "prescribing_institution_code": "H32058300001",
                "prescribing_institution_name": "昆山示例社区卫生服务中心",
                "department_code": "A03",
                "department_name": "内科",
                "prescriber_code": "D320583000123",
                "prescriber_name": "陈**",
                "prescribed_at": at.isoformat(),
                "patient_ref": f"his-pt-{prescription_id:06d}",
                "patient_masked": ("李*", "张*华", "刘*", "赵*明", "孙*")[index % 5],
                "patient_age_years": 67 - index * 7,
                "patient_sex": "2" if index % 2 == 0 else "1",
                "diagnosis_codes": ["J20.900"],
                "lines": lines,
            }
        )
        return PendingPrescription(
            prescription_id=prescription_id,
            institution_code=INSTITUTION_CODE,
            registered_at=at,
            content_digest=prescription_digest(prescription),
            prescription=prescription,
        )


def _now(sim: StaffSim) -> str:
    return sim.runtime.clock.now().isoformat()


def add_staff(
    runtime: TerminalRuntime, workdir: Path, faces_dir: Path, needle: str, camera: SimulatedCamera | None
) -> StaffSim:
    """Build the pharmacist desk, the review desk and the pharmacy's data on a simulated runtime that has face
    verification (`runtime.face`) and a catalogue (`runtime.catalogue`)."""
    face, catalogue, inbox = runtime.face, runtime.catalogue, runtime.prescriptions
    if face is None or catalogue is None or inbox is None:
        raise RuntimeError("the staff screens need the simulated face pipeline, catalogue and inbox")
    key = SM2PrivateKey.generate()
    config = PharmacistsConfig(
        gallery=workdir / "pharmacist_gallery.sqlite3",
        store=workdir / "pharmacists.sqlite3",
        reverify_every_min=REVERIFY_EVERY_MIN,  # pharmacist face enrolment and re-verification
    )
    binding = runtime.binding

    def institution() -> str | None:
        status = binding.load() if binding is not None else None
        return status.institution_code if status is not None and status.state is BindingState.BOUND else None

    holder: list[StaffSim] = []
    desk = open_desk(
        config,
        face,
        secrets.token_bytes(16),
        runtime.clock,
        device_id=runtime.config.device_id,
        institution=institution,
        record_signed=lambda kind, record: holder[0].record_signed(kind, record),
        record_audit=lambda event: runtime.record_audits([event]),
    )
    hits = catalogue.search(needle, CatalogueKind.DRUG, limit=20).hits
    entries = [catalogue.get(h.kind, h.code) for h in hits]
    drugs = tuple(e for e in entries if isinstance(e, DrugEntry))
    if len(drugs) < 2:
        raise RuntimeError("the simulated catalogue has too few drugs for the prescriptions")
    sim = StaffSim(runtime, desk, key, faces_dir, drugs, camera)
    holder.append(sim)
    runtime.pharmacists = desk
    runtime.review = ReviewDesk(
        inbox,
        catalogue,
        OnDuty(desk),
        desk.verifier,
        sim.record_signed,
        runtime.clock,
    )
    # The pharmacy's drug rule: at most 2 sale units of the first drug per purchase (a warning at review).
    rule = MaxQuantityPerPurchase(
        rule_id="SIM-QTY-1",
        title=drugs[0].generic_name[:64],
        title_en="quantity-controlled drug",
        drugs=DrugSelector(generic_names=[drugs[0].generic_name]),
        action=RuleAction.WARN,
        max_quantity=2,
    )
    catalogue.apply_rule_set(DrugRuleSet.build(1, [rule], runtime.clock.now()))
    _pharmacist(sim)
    sim.reset()
    return sim


def _pharmacist(sim: StaffSim) -> None:
    """One pharmacist on the roster whose face template is the simulated camera's person (the enrolment itself is
    the terminal's own test subject, tests/terminal/test_pharmacists.py), with `PAST_DAYS` of attendance."""
    desk, face = sim.desk, sim.runtime.face
    if face is None:
        raise RuntimeError("no face pipeline")
    desk.store.put_member(PHARMACIST_CODE, PHARMACIST_MASKED, "320*************12")
    gallery = face.templates.load_gallery()
    if not gallery.ids:
        raise RuntimeError("the simulated camera's person has no template to copy")
    desk.templates.enrol(PHARMACIST_CODE, gallery.templates[0])
    desk.store.set_template_state(PHARMACIST_CODE, TemplateState.SYNCED)
    # pharmacist face enrolment and re-verification: a second pharmacist, not enrolled, whose ID card is the reader's
    card = synthetic_card(0).masked()
    desk.store.put_member(ENROL_CODE, card["name"], card["id_number"])
    tz = ZoneInfo(desk.config.timezone)
    today = sim.runtime.clock.now().astimezone(tz).date()
    for back in range(PAST_DAYS, 0, -1):
        day = today - dt.timedelta(days=back)
        signed_in = dt.datetime.combine(day, dt.time(8, 30 + back % 20), tzinfo=tz).astimezone(dt.UTC)
        session = LocalSession(uuid.uuid4(), PHARMACIST_CODE, INSTITUTION_CODE, signed_in, None, None, signed_in)
        desk.store.add_session(session)
        if back % 7 == 3:
            end, reason = dt.datetime.combine(day, dt.time(22, 0), tzinfo=tz), SignOutReason.AUTO_CLOSED
        else:
            end, reason = dt.datetime.combine(day, dt.time(17, 45 + back % 10), tzinfo=tz), SignOutReason.SIGNED_OUT
        desk.store.close_session(session.session_id, end.astimezone(dt.UTC), reason)


def attach_staff(models: KioskModels, sim: StaffSim | None) -> None:
    """Point the staff ports at the simulated signing key and WLT decoder (the kiosk's own defaults are the
    enrolled identity's `record_signed` and no decoder)."""
    staff = models.staff
    if sim is None or staff is None:
        return
    port = staff.binding.port
    if isinstance(port, RuntimeBinding):
        port.record_signed = sim.record_signed
        port.decode_photo = sim.decode_photo
    # pharmacist face enrolment and re-verification
    enrolment = staff.enrolment.port
    if isinstance(enrolment, RuntimeEnrolment):
        enrolment.decode_photo = sim.decode_photo


def regenerate_staff_screens(out_dir: Path, *, faces_dir: Path, workdir: Path) -> dict[str, object]:
    """The staff screens only: a simulated kiosk, the staff tour (`ui.kiosk.tour_staff`) in both modes, one PNG per
    screen and mode in `out_dir`; returns the tour's report (under a private Xvfb when there is no display)."""
    import os

    from ui.xvfb import start_xvfb

    xvfb = None
    if not os.environ.get("DISPLAY"):
        xvfb = start_xvfb()
        os.environ["DISPLAY"] = xvfb.display  # this process only: Kivy reads it when it opens the window
    try:
        from ui.kiosk import env

        env.prepare(fullscreen=False, home=workdir / "kivy")
        from ui.kiosk.run import kiosk_models
        from ui.kiosk.tour_staff import run_staff_tour
        from ui.voice import RecordingSpeaker
        from yibao.kiosk_sim import start_simulated_kiosk

        kiosk = start_simulated_kiosk(workdir, faces_dir)
        try:
            speaker = RecordingSpeaker()
            models = kiosk_models(kiosk.runtime, speaker=speaker, admin_hash=kiosk.admin_hash)
            attach_staff(models, kiosk.staff)
            report = run_staff_tour(models, kiosk, out_dir).as_json()
            report["spoken"] = list(speaker.phrases)
            report["secrets_shown"] = sorted(
                {s for shot in report["shots"] for text in shot["texts"] for s in kiosk.secrets if s in text}
            )
            report["signed"] = [str(kind) for kind in (kiosk.staff.signed if kiosk.staff is not None else [])]
            return report
        finally:
            kiosk.close()
    finally:
        if xvfb is not None:
            xvfb.stop()


if __name__ == "__main__":  # python -m yibao.kiosk_sim_staff OUT_DIR FACES_DIR WORKDIR REPORT_JSON (the Xvfb tests)
    import json
    import sys

    logging.basicConfig(level=logging.INFO)
    out, faces, work, report_path = (Path(a) for a in sys.argv[1:5])
    result = regenerate_staff_screens(out, faces_dir=faces, workdir=work)
    report_path.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
