"""The simulated town of `yibao sim day` (yibao/sim_day.py has the story): institutions, their kiosks (the real
terminal core on simulated peripherals), their HIS systems, pharmacists and citizens, and the reconciliation.

Owns building and stopping the kiosks and the people, and the steps of the day. Everything it does goes through the
interfaces a real party would use: the admin API (device admin, regulator), signed `/his/v1` calls (HIS), the kiosk's
POS API over HTTP (the pharmacy POS), the terminal core's flows (what the kiosk screens call: binding application,
pharmacist enrolment and sign-in, prescription review) and the simulators' physical actions (a card placed on the
reader, a code shown to the scanner, a person in front of the camera). It reads the server's database read-only, at
the end, for the reconciliation. Never imported by production code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from drivers.idcard import IdCardData
from hardware_sim.camera_sim import SimulatedCamera, load_rgb
from hardware_sim.evoucher import Insured, synthetic_insured
from hardware_sim.fleet import enrol_fleet
from hardware_sim.idcard_sim import synthetic_card
from hardware_sim.kiosk_rig import KioskSimulatorRig, start_kiosk_simulators
from hardware_sim.peripherals import SimulatedPeripheral
from models.types import RgbImage
from protocol.binding import ApplicantVerification
from protocol.gm.sm3 import sm3_digest
from protocol.prescription import HistoryUse, ReviewOutcome
from protocol.purchase import person_ref
from protocol.request_signing import signed_headers
from terminal.binding import BindingState, apply_for_binding, binding_application_record
from terminal.config import load_terminal_config
from terminal.devices import open_devices, open_evoucher_platform
from terminal.identity import SecurityLog
from terminal.pharmacists import Consent
from terminal.pos_api import attach_pos_api
from terminal.runtime import TerminalRuntime, build_runtime
from terminal.session import TerminalSecurity
from yibao.sim_day import REGION, HisClient, Ledger, SimDayOptions, SimError, wait_for

logger = logging.getLogger(__name__)

DRUGS = (
    ("XJ01CAA040A001010100534", "阿莫西林胶囊", "0.25g", "24粒/盒", "盒", 2560, "胶囊剂", "rx"),
    ("XR05DAF123A001010100001", "复方甘草片", "100片", "100片/瓶", "瓶", 1200, "片剂", "otc_a"),
    ("XA10BAA021A001010100112", "盐酸二甲双胍片", "0.5g", "60片/盒", "盒", 1850, "片剂", "rx"),
    ("XC08CAA001A001010100077", "硝苯地平缓释片", "20mg", "30片/盒", "盒", 2290, "片剂", "rx"),
)
"""The town pharmacy's shelf: (医保药品编码, name, specification, package, unit, price in fen, form, dispensing)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PhotoDecoder:
    """Stands in for the ID-card reader vendor's WLT photo decoder: the town's cards carry opaque photo bytes, which
    this maps to the person's real photo (what the vendor library would return)."""

    def __init__(self) -> None:
        self.photos: dict[bytes, Path] = {}

    def card_for(self, seed: int, photo: Path) -> IdCardData:
        card = synthetic_card(seed)
        self.photos[card.photo_wlt] = photo
        return card

    def __call__(self, wlt: bytes) -> RgbImage:
        if wlt not in self.photos:
            raise ValueError("not a photo this decoder knows")
        return load_rgb(self.photos[wlt])


@dataclass
class Person:
    """Someone of the town: a face (a real photo), an ID card, and a role."""

    photo: Path
    card: IdCardData
    code: str = ""
    """A pharmacist's HIS code (医保药师代码)."""


@dataclass
class Kiosk:
    institution_code: str
    device_id: str
    rig: KioskSimulatorRig
    camera: SimulatedCamera
    runtime: TerminalRuntime
    pos_url: str
    pos_client: str
    pos_secret: bytes
    head: Person
    pharmacists: list[Person] = field(default_factory=list)

    def show(self, person: Person) -> None:
        """`person` steps in front of the camera."""
        self.camera.present_person([person.photo])

    def pos(self, http: httpx.Client, method: str, target: str, body: Any = None) -> httpx.Response:
        content = b"" if body is None else json.dumps(body, ensure_ascii=False).encode()
        path = target.split("?", 1)[0]
        headers = signed_headers(POS_PREFIX, self.pos_client, self.pos_secret, method, path, content, now=time.time())
        if body is not None:
            headers["Content-Type"] = "application/json"
        return http.request(method, f"{self.pos_url}{target}", content=content, headers=headers)


POS_PREFIX = "X-POS-"


def prescription_body(
    rx_no: str, *, drug: int, patient_ref: str, patient_age_years: int, patient_person_ref: str | None
) -> dict[str, Any]:
    """A HIS prescription registration (`POST /his/v1/prescriptions`) of one line of the town's `drug`-th drug,
    prescribed an hour ago at the town's hospital."""
    code, name, spec, _package, unit, _price, _form, _dispensing = DRUGS[drug % len(DRUGS)]
    return {
        "rx_no": rx_no,
        "prescribing_institution_code": "H32058300100",
        "prescribing_institution_name": "昆山市示例人民医院",
        "department_code": "A03",
        "department_name": "内科",
        "prescriber_code": "D320583000123",
        "prescriber_name": "周医生",
        "prescribed_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
        "source": "1",
        "channel": "2",
        "patient_ref": patient_ref,
        "patient_masked": "李*",
        "patient_person_ref": patient_person_ref,
        "patient_age_years": patient_age_years,
        "patient_sex": "2",
        "diagnosis_codes": ["J20.900"],
        "lines": [
            {
                "line_no": 1,
                "drug_code": code,
                "drug_name": name,
                "specification": spec,
                "quantity": 1,
                "unit": unit,
                "dosage": "口服 遵医嘱",
                "days_supply": 7,
            }
        ],
    }


class Town:
    """The town for one day. Use `Town.open(...)` as a context manager: it stops every kiosk and simulator."""

    def __init__(self, options: SimDayOptions, workdir: Path, server: Any, broker: Any, rng: random.Random) -> None:
        self.options = options
        self.workdir = workdir
        self.server = server
        self.broker = broker
        self.rng = rng
        self.admin = httpx.Client(base_url=server.base_url, headers=server.admin_headers, timeout=30.0)
        self.http = httpx.Client(base_url=server.base_url, timeout=30.0)
        self.pos_http = httpx.Client(timeout=60.0)
        self.decoder = PhotoDecoder()
        self.kiosks: list[Kiosk] = []
        self.his: dict[str, HisClient] = {}
        self.ledger = Ledger()
        self.started_at = datetime.now(UTC) - timedelta(seconds=1)
        self._photos = _photos(options.faces_dir)
        self._seed = 1000
        self._face_detector: Any = None

    # ------------------------------------------------------------------ set-up

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, options: SimDayOptions, workdir: Path, server: Any, broker: Any, rng: random.Random
    ) -> Iterator[Town]:
        town = cls(options, workdir, server, broker, rng)
        try:
            town._build()
            yield town
        finally:
            town.close()

    def _detector(self) -> Any:
        """One face detector for every simulated camera (it places the synthetic IR and depth on the face)."""
        if self._face_detector is None:
            from yibao.pad_harness import make_detector

            self._face_detector = make_detector("mtcnn")
        return self._face_detector

    def _person(self, photo: Path) -> Person:
        self._seed += 1
        return Person(photo=photo, card=self.decoder.card_for(self._seed, photo))

    def _build(self) -> None:
        self._publish_catalogue()
        codes = [f"P{REGION}{i:05d}" for i in range(self.options.institutions)]
        for i, code in enumerate(codes):
            self.admin.put(
                f"/api/v1/institutions/{code}",
                json={"name": f"昆山示例药房{i + 1}号", "kind": "pharmacy", "region_code": REGION},
            ).raise_for_status()
            made = self.admin.post("/api/v1/his-clients", json={"institution_code": code, "label": f"HIS {i + 1}"})
            made.raise_for_status()
            answer = made.json()
            self.his[code] = HisClient(self.http, answer["client_id"], bytes.fromhex(answer["secret"]), code)
        device_ids = [f"KS-{i + 1:03d}" for i in range(len(codes))]
        enrolment = enrol_fleet(
            self.server.base_url, self.server.admin_token, device_ids, workers=2, workdir=self.workdir / "ids"
        )
        for code, device_id in zip(codes, device_ids, strict=True):
            self.kiosks.append(self._kiosk(code, device_id, enrolment.sessions[device_id]))

    def _publish_catalogue(self) -> None:
        """The regulator's drug catalogue and quantity rules, published before the kiosks start (they sync them)."""
        entries = [
            {
                "kind": "drug",
                "code": code,
                "name": name,
                "generic_name": name,
                "dosage_form": form,
                "specification": spec,
                "package": package,
                "unit": unit,
                "manufacturer": "昆山示例制药有限公司",
                "approval_number": f"国药准字H{20000000 + i}",
                "category": "甲",
                "dispensing": dispensing,
                "price_fen": price,
            }
            for i, (code, name, spec, package, unit, price, form, dispensing) in enumerate(DRUGS)
        ]
        resp = self.admin.post("/api/v1/catalogues/drug/versions", json={"entries": entries})
        if resp.status_code >= 400:
            raise SimError(f"publishing the drug catalogue failed: {resp.status_code} {resp.text[:200]}")

    def _kiosk(self, institution_code: str, device_id: str, sessions: Any) -> Kiosk:

        directory = self.workdir / device_id
        directory.mkdir(parents=True, exist_ok=True)
        rig = start_kiosk_simulators(directory / "dev", seed=len(self.kiosks) + 1)
        pos_secret = secrets.token_hex(32).encode()
        secret_file = directory / "pos.secret"
        secret_file.write_bytes(pos_secret + b"\n")
        secret_file.chmod(0o600)
        pos_port = _free_port()
        toml = f"""schema_version = 1
config_version = "sim-day-1"
device_id = "{device_id}"

[mqtt]
host = "{self.broker.host}"
port = {self.broker.port}
username = "{sessions.identity.bundle.mqtt.username}"

[outbox]
path = "{directory / "outbox.sqlite3"}"
disk_reserve_bytes = 0

[heartbeat]
interval_s = 5

[face]
gallery = "{directory / "gallery.sqlite3"}"

[pharmacists]
store = "{directory / "pharmacists.sqlite3"}"

[pos_api]
enabled = true
host = "127.0.0.1"
port = {pos_port}
state = "{directory / "pos_state.sqlite3"}"

[[pos_api.clients]]
client_id = "pos-{device_id.lower()}"
secret_file = "{secret_file}"
secret_sm3 = "{sm3_digest(pos_secret).hex()}"
{rig.terminal_toml()}"""
        config_path = directory / "terminal.toml"
        config_path.write_text(toml, encoding="utf-8")
        config = load_terminal_config(config_path)
        devices = open_devices(config.devices, stand_in=SimulatedPeripheral)
        head = self._person(self._photos[0])
        camera = SimulatedCamera([head.photo], self._detector(), seed=len(self.kiosks) + 7)
        camera.open()
        reported = [p for p in devices.peripherals if p.name != camera.name] + [camera]
        devices = dataclasses.replace(devices, camera=camera, peripherals=reported)
        security = TerminalSecurity(sessions.identity, sessions, SecurityLog(None))
        runtime = build_runtime(
            config,
            devices,
            security=security,
            evoucher_platform=open_evoucher_platform(config.evoucher),
            template_key=secrets.token_bytes(16),
        )

        def prompt(p: Any) -> None:
            if p.challenge is not None:
                camera.perform(p.challenge)

        for verifier in (runtime.face, None if runtime.pharmacists is None else runtime.pharmacists.verifier):
            if verifier is not None:
                verifier.prompt = prompt
        attach_pos_api(runtime)
        runtime.start()
        return Kiosk(
            institution_code=institution_code,
            device_id=device_id,
            rig=rig,
            camera=camera,
            runtime=runtime,
            pos_url=f"http://127.0.0.1:{pos_port}",
            pos_client=f"pos-{device_id.lower()}",
            pos_secret=pos_secret,
            head=head,
        )

    def close(self) -> None:
        for kiosk in self.kiosks:
            with contextlib.suppress(Exception):
                kiosk.runtime.stop()
            with contextlib.suppress(Exception):
                kiosk.rig.stop()
        for client in (self.admin, self.http, self.pos_http):
            client.close()

    # ------------------------------------------------------------------ morning

    def morning(self) -> None:
        for kiosk in self.kiosks:
            self._bind(kiosk)
        for kiosk in self.kiosks:
            self._pharmacists(kiosk)

    def _bind(self, kiosk: Kiosk) -> None:
        """The head applies at the kiosk (face + ID card), the device admin approves, the decision comes back."""
        runtime = kiosk.runtime
        face = runtime.face
        if face is None or runtime.binding is None:
            raise SimError("the kiosk has no face verification or binding store")
        kiosk.show(kiosk.head)
        decision = face.enrol(f"head-{kiosk.institution_code}")
        record = binding_application_record(
            decision,
            verification=ApplicantVerification.FACE_ID_CARD,
            institution_code=kiosk.institution_code,
            applicant_masked=kiosk.head.card.name[0] + "*" * (len(kiosk.head.card.name) - 1),
            reason="新装机 / new terminal",
            applied_at=runtime.clock.now(),
        )
        apply_for_binding(runtime.record_signed, runtime.binding, record, now=runtime.clock.now())

        def pending() -> list[dict[str, Any]]:
            items = self.admin.get("/api/v1/binding-applications", params={"status": "pending"}).json()["items"]
            return [a for a in items if a["device_id"] == kiosk.device_id]

        wait_for(lambda: bool(pending()), f"{kiosk.device_id}'s binding application at the server")
        application = pending()[0]
        self.admin.post(
            f"/api/v1/binding-applications/{application['id']}/approve", json={"reason": "核验通过 / checked"}
        ).raise_for_status()
        binding = runtime.binding
        wait_for(lambda: binding.load().state is BindingState.BOUND, f"{kiosk.device_id} to be bound")

    def _pharmacists(self, kiosk: Kiosk) -> None:
        desk = kiosk.runtime.pharmacists
        if desk is None:
            raise SimError("the kiosk has no pharmacist desk")
        # Each pharmacy's pharmacists are different people (different faces); pharmacies do not share galleries.
        people = [
            self._person(self._photos[1 + n % (len(self._photos) - 1)])
            for n in range(self.options.pharmacists_per_institution)
        ]
        for n, person in enumerate(people):
            person.code = f"Y{kiosk.institution_code[-6:]}{n + 1:03d}"
        body = {
            "pharmacists": [
                {
                    "dr_code": p.code,
                    "dr_id": f"his-{p.code}",
                    "dr_name": p.card.name,
                    "psn_cert_type": "01",
                    "certno": p.card.id_number,
                    "dr_prac_cert_no": f"ZY{p.code}",
                    "prac_regn": REGION,
                    "mul_prac_flag": "0",
                }
                for p in people
            ]
        }
        resp = self.his[kiosk.institution_code].call("PUT", "/his/v1/pharmacists", body)
        if resp.status_code >= 400:
            raise SimError(f"HIS pharmacist sync failed: {resp.status_code} {resp.text[:300]}")
        desk.sync_roster()  # what the roster_update notice triggers; called here so the morning does not wait for it
        if len(desk.roster()) < len(people):
            raise SimError(f"{kiosk.device_id} has {len(desk.roster())} pharmacists on its roster, not {len(people)}")
        for person in people:
            kiosk.rig.id_card.place(person.card)
            kiosk.show(person)
            result = desk.enrol(
                person.code,
                card_reader=_Reader(kiosk),
                decode_photo=self.decoder,
                consent=Consent(desk.config.consent_version, kiosk.runtime.clock.now()),
            )
            if not result.enrolled:
                why = None if result.decision is None else result.decision.audit_detail()
                raise SimError(f"pharmacist enrolment failed at {kiosk.device_id}: {result.outcome} {why}")
            signed_in = desk.sign_in()
            if not signed_in.ok:
                raise SimError(f"pharmacist sign-in failed at {kiosk.device_id}: {signed_in.detail}")
            self.ledger.sign_ins += 1
        kiosk.pharmacists = people

    # ------------------------------------------------------------------ the day

    def day(self) -> None:
        citizens = synthetic_insured(self.options.purchases_per_institution * len(self.kiosks), seed=self.options.seed)
        per = self.options.purchases_per_institution
        for i, kiosk in enumerate(self.kiosks):
            self._prescriptions(kiosk, citizens[i * per : (i + 1) * per])
        for i, kiosk in enumerate(self.kiosks):
            self._purchases(kiosk, citizens[i * per : (i + 1) * per])

    def _prescriptions(self, kiosk: Kiosk, patients: Sequence[Insured]) -> None:
        """HIS registers the morning's prescriptions; those of the town's citizens name them by `person_ref`, so
        the review's period rules ask the platform for their earlier purchases."""
        his = self.his[kiosk.institution_code]
        for n in range(self.options.prescriptions_per_institution):
            rx_no = f"RX{kiosk.institution_code[-5:]}{n + 1:05d}"
            body = prescription_body(
                rx_no,
                drug=n,
                patient_ref=f"pt-{kiosk.institution_code[-4:]}-{n:04d}",
                patient_age_years=60 + n,
                patient_person_ref=person_ref("01", patients[n].id_number) if n < len(patients) else None,
            )
            resp = his.call("POST", "/his/v1/prescriptions", body)
            if resp.status_code != 201:
                raise SimError(f"registering {rx_no} failed: {resp.status_code} {resp.text[:300]}")
            his.registered_rx.append(rx_no)
        runtime = kiosk.runtime
        inbox, refresher = runtime.prescriptions, runtime.prescription_refresher
        review = runtime.review
        if inbox is None or refresher is None or review is None:
            raise SimError("the kiosk has no prescription inbox or review desk")

        def received() -> bool:
            refresher.refresh()  # what the prescriptions_pending notice triggers
            return len(inbox.pending()) >= self.options.prescriptions_per_institution

        wait_for(received, f"{kiosk.device_id} to receive its prescriptions", every_s=0.5)
        pharmacist = kiosk.pharmacists[-1]  # on duty: the one who signed in last (terminal.pharmacists.OnDuty)
        for n, item in enumerate(list(inbox.pending())):
            session = review.open(item.prescription_id)
            if item.prescription.patient_person_ref is not None and session.history is not HistoryUse.SERVER:
                raise SimError(f"the review of {item.prescription.rx_no} could not look up the patient's purchases")
            session.acknowledge_all()
            reject = n == len(his.registered_rx) - 1  # the last one of the day is sent back
            kiosk.show(pharmacist)
            result = (
                review.decide(session, ReviewOutcome.REJECTED, ["用药不适宜 / inappropriate"])
                if reject or session.blocked
                else review.decide(session, ReviewOutcome.APPROVED, [])
            )
            if not result.recorded or result.record is None:
                rx = item.prescription.rx_no
                raise SimError(f"the review of {rx} was not recorded (face: {result.face.outcome})")
            self.ledger.reviews[item.prescription.rx_no] = result.record.decision.value
        for rx_no in his.registered_rx:

            def reviewed(rx: str = rx_no) -> bool:
                return bool(his.call("GET", f"/his/v1/prescriptions/{rx}").json().get("status") != "pending")

            wait_for(reviewed, f"the review of {rx_no} to reach the server")
            answer = his.call("GET", f"/his/v1/prescriptions/{rx_no}").json()
            if answer.get("status") == "approved":
                settled = his.call(
                    "POST", f"/his/v1/prescriptions/{rx_no}/settlement", {"settlement_id": f"SETL-{rx_no}"}
                )
                if settled.status_code >= 400:
                    raise SimError(f"settling {rx_no} failed: {settled.status_code} {settled.text[:300]}")
                his.settled_rx.append(rx_no)

    def _purchases(self, kiosk: Kiosk, citizens: list[Any]) -> None:
        his = self.his[kiosk.institution_code]
        rig = kiosk.rig
        for n, person in enumerate(citizens):
            proxy = n % 5 == 4
            if proxy:  # a neighbour buys for them: the agent is not insured, entered by hand at the POS
                agent = synthetic_card(5000 + n)
                body: dict[str, Any] = {
                    "method": "evoucher",
                    "proxy": {
                        "agent": {
                            "method": "manual",
                            "psn_name": agent.name,
                            "psn_cert_type": "01",
                            "certno": agent.id_number,
                        }
                    },
                }
                relationship = his.call(
                    "POST",
                    "/his/v1/proxy-relationships",
                    {
                        "beneficiary": {"psn_cert_type": "01", "certno": person.id_number, "psn_name": person.name},
                        "agent": {"psn_cert_type": "01", "certno": agent.id_number, "psn_name": agent.name},
                        "relation": "neighbour",
                    },
                )
                if relationship.status_code >= 400:
                    raise SimError(f"registering a relationship failed: {relationship.text[:300]}")
                if kiosk.runtime.proxy_sync is not None:
                    kiosk.runtime.proxy_sync.sync()
            else:
                body = {"method": "evoucher"}
            code, name, _spec, _package, _unit, price, _form, _dispensing = DRUGS[n % len(DRUGS)]
            body["drug_lines"] = [{"med_list_codg": code, "cnt": 1}]
            account = rig.evoucher.enrol(person)
            started = kiosk.pos(self.pos_http, "POST", "/pos/v1/verifications", body)
            if started.status_code >= 400:
                raise SimError(f"POS verification refused: {started.status_code} {started.text[:300]}")
            verification_id = started.json()["verification_id"]
            time.sleep(0.2)
            rig.qr_scanner.scan(rig.evoucher.issue_code(account))
            result = self._wait_verification(kiosk, verification_id)
            if result["status"] != "verified":
                raise SimError(f"buyer verification at {kiosk.device_id}: {result.get('reason')}")
            transaction = result["transaction_code"]
            self.ledger.verifications.append(transaction)
            self.ledger.methods["proxy" if proxy else "evoucher"] += 1
            settlement_no = f"SETL-{kiosk.device_id}-{n + 1:04d}"
            purchase: dict[str, Any] = {
                "settlement_no": settlement_no,
                "transaction_code": transaction,
                "settled_at": datetime.now(UTC).isoformat(),
                "buyer": {"psn_cert_type": "01", "certno": person.id_number, "psn_name": person.name},
                "lines": [
                    {
                        "med_list_codg": code,
                        "drug_name": name,
                        "cnt": 1,
                        "amount_fen": price,
                        "trace_codes": [f"8{self.rng.randrange(10**18, 10**19):019d}"],
                    }
                ],
            }
            if proxy:
                purchase["proxy"] = {
                    "agent": {
                        "kind": "manual",
                        "psn_cert_type": "01",
                        "certno": body["proxy"]["agent"]["certno"],
                        "psn_name": body["proxy"]["agent"]["psn_name"],
                    }
                }
                self.ledger.proxy_purchases += 1
            registered = his.call("POST", "/his/v1/purchases", purchase)
            if registered.status_code >= 400:
                raise SimError(f"registering {settlement_no} failed: {registered.status_code} {registered.text[:300]}")
            his.purchases.append(settlement_no)

    def _wait_verification(self, kiosk: Kiosk, verification_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answer: dict[str, Any] = kiosk.pos(self.pos_http, "GET", f"/pos/v1/verifications/{verification_id}").json()
            if answer.get("status") not in {"pending", "in_progress"}:
                return answer
            time.sleep(0.1)
        raise SimError(f"verification {verification_id} at {kiosk.device_id} did not finish in 60 s")

    # ------------------------------------------------------------------ evening

    def evening(self) -> None:
        for kiosk in self.kiosks:
            desk = kiosk.runtime.pharmacists
            if desk is None:
                continue
            for person in kiosk.pharmacists:
                kiosk.show(person)
                result = desk.sign_out()
                if not result.ok:
                    raise SimError(f"sign-out at {kiosk.device_id} failed: {result.detail}")
                self.ledger.sign_outs += 1
        for kiosk in self.kiosks:
            outbox = kiosk.runtime.outbox

            def drained(o: Any = outbox) -> bool:
                return bool(o.stats().depth == 0)

            wait_for(drained, f"{kiosk.device_id}'s outbox to drain", 120)

    # ------------------------------------------------------------------ reconciliation

    def reconcile(self, db_url: str) -> dict[str, Any]:
        from sync_server.db.engine import create_db_engine
        from sync_server.db.models import (
            Device,
            Event,
            PharmacistSession,
            PosVerification,
            PrescriptionReview,
            PrescriptionRow,
            Purchase,
            PurchaseVerificationState,
        )

        problems: list[str] = []
        engine = create_db_engine(db_url)
        try:
            with engine.connect() as conn:

                def count(stmt: Any) -> int:
                    return int(conn.execute(stmt).scalar() or 0)

                events_terminal = 0
                events_server = 0
                for kiosk in self.kiosks:
                    # Heartbeats keep coming: compare until both sides agree on a moment (bounded).
                    deadline = time.monotonic() + 30
                    while True:
                        made = kiosk.runtime.outbox.created_since(self.started_at)
                        rows = conn.execute(
                            select(Event.payload_type, func.count())
                            .where(Event.device_id == kiosk.device_id)
                            .group_by(Event.payload_type)
                        ).all()
                        stored = {str(kind): int(n) for kind, n in rows}
                        if made == stored or time.monotonic() > deadline:
                            break
                        time.sleep(0.5)
                    if made != stored:
                        problems.append(f"{kiosk.device_id}: outbox {made} != server {stored}")
                    events_terminal += sum(made.values())
                    events_server += sum(stored.values())
                registered_rx = sum(len(h.registered_rx) for h in self.his.values())
                settled_rx = sum(len(h.settled_rx) for h in self.his.values())
                purchases = sum(len(h.purchases) for h in self.his.values())
                server_rx = count(select(func.count()).select_from(PrescriptionRow))
                server_settled = count(
                    select(func.count()).select_from(PrescriptionRow).where(PrescriptionRow.settled_at.is_not(None))
                )
                server_reviews = count(select(func.count()).select_from(PrescriptionReview))
                if server_rx != registered_rx:
                    problems.append(f"prescriptions: HIS registered {registered_rx}, server has {server_rx}")
                if server_settled != settled_rx:
                    problems.append(f"settlements: HIS settled {settled_rx}, server has {server_settled}")
                if server_reviews != len(self.ledger.reviews):
                    problems.append(f"reviews: kiosks decided {len(self.ledger.reviews)}, server has {server_reviews}")
                orphan_reviews = count(
                    select(func.count())
                    .select_from(PrescriptionReview)
                    .outerjoin(PrescriptionRow, PrescriptionRow.id == PrescriptionReview.prescription_id)
                    .where(PrescriptionRow.id.is_(None))
                )
                if orphan_reviews:
                    problems.append(f"{orphan_reviews} reviews without their prescription")
                for rx_no, decided in self.ledger.reviews.items():
                    status = conn.execute(select(PrescriptionRow.status).where(PrescriptionRow.rx_no == rx_no)).scalar()
                    seen = None if status is None else str(getattr(status, "value", status))
                    if seen != decided and not (decided == "approved" and seen == "settled"):
                        problems.append(f"{rx_no}: decided {decided} at the kiosk, {seen} at the server")
                server_purchases = count(select(func.count()).select_from(Purchase))
                if server_purchases != purchases:
                    problems.append(f"purchases: HIS registered {purchases}, server has {server_purchases}")
                unlinked = count(
                    select(func.count())
                    .select_from(Purchase)
                    .where(Purchase.verification_state != PurchaseVerificationState.LINKED)
                )
                if unlinked:
                    problems.append(f"{unlinked} purchases without their kiosk verification")
                verifications = count(select(func.count()).select_from(PosVerification))
                if verifications != len(self.ledger.verifications):
                    problems.append(
                        f"verifications: kiosks handed out {len(self.ledger.verifications)}, server has {verifications}"
                    )
                sessions = count(select(func.count()).select_from(PharmacistSession))
                closed = count(
                    select(func.count())
                    .select_from(PharmacistSession)
                    .where(PharmacistSession.signed_out_at.is_not(None))
                )
                if sessions != self.ledger.sign_ins:
                    problems.append(f"sign-ins: kiosks {self.ledger.sign_ins}, server {sessions}")
                if closed != self.ledger.sign_outs:
                    problems.append(f"sign-outs: kiosks {self.ledger.sign_outs}, server {closed}")
                bound = count(select(func.count()).select_from(Device).where(Device.institution_id.is_not(None)))
                if bound != len(self.kiosks):
                    problems.append(f"bound terminals: {len(self.kiosks)} applied and approved, server has {bound}")
        finally:
            engine.dispose()
        for problem in problems:
            logger.error("reconciliation: %s", problem)
        return {
            "bench": "sim_day",
            "discrepancies": len(problems),
            "institutions": len(self.kiosks),
            "terminals": len(self.kiosks),
            "pharmacists": sum(len(k.pharmacists) for k in self.kiosks),
            "sign_ins": self.ledger.sign_ins,
            "sign_outs": self.ledger.sign_outs,
            "prescriptions": registered_rx,
            "reviews": dict(sorted(Counter(self.ledger.reviews.values()).items())),
            "settled": settled_rx,
            "purchases": purchases,
            "proxy_purchases": self.ledger.proxy_purchases,
            "verifications": len(self.ledger.verifications),
            "events_terminal": events_terminal,
            "events_server": events_server,
            "problems": problems,
        }


class _Reader:
    """The kiosk's real ID-card driver as the desk's card source (the card was placed on the simulated reader)."""

    def __init__(self, kiosk: Kiosk) -> None:
        self._kiosk = kiosk

    def read_card(self, timeout_s: float = 5.0) -> IdCardData:
        devices = self._kiosk.runtime.devices
        if devices is None or devices.id_card_reader is None:
            raise SimError("the kiosk has no ID-card reader")
        return devices.id_card_reader.read_card(timeout_s)


def _photos(faces_dir: Path | None) -> list[Path]:
    """One photo per person of the development photos (tests/fixtures/faces by default): the first of each person's
    photos that passes the kiosk's quality gate (a citizen who steps up to the kiosk faces it from close by)."""
    from hardware_sim.camera_sim import letterbox
    from models.face import engine_from_store
    from models.manifest import ModelStore

    root = faces_dir or Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "faces"
    engine = engine_from_store(ModelStore())
    photos = []
    for person in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in {"video", "group"}):
        usable = [p for p in sorted(person.glob("*.jpg")) if engine.analyse(letterbox(load_rgb(p))).quality.ok]
        if usable:
            photos.append(usable[0])
    if len(photos) < 3:
        raise SimError(f"need usable photos of at least 3 people under {root}")
    return photos
