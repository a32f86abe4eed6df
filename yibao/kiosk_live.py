"""One kiosk against a RUNNING server, for tests that drive the kiosk's view-models end to end (issue 6).

The stack is `yibao sim day`'s (yibao/sim_town.py) cut down to one pharmacy: a private Mosquitto, the server as a
child process (`yibao server run`, SQLite, HTTP on a free loopback port), one kiosk's terminal core
(`terminal.runtime.build_runtime`: outbox, MQTT sync with sealed frames, downlink commands, the device API, real ONNX
face models) on simulated peripherals, the pharmacy's HIS as a signed `/his/v1` client and the device admin on the
admin API. On top of sim_day it configures the server's national-platform relay: the national-platform simulator
(`hardware_sim.national_platform`) served over HTTP on loopback, with the institution's SM2 key in an encrypted key
file, so a citizen's query goes kiosk → server (signed device API) → platform (signed envelopes) and back.

Owns starting and stopping that stack (`live_stack`) and the steps the live kiosk cannot take on a screen (the HIS
pharmacist sync, and the pharmacist's face enrolment, which needs a WLT photo decoder: done at the desk as sim_town
does). The kiosk's view-models are
built by the caller with `ui.kiosk.run.kiosk_models(stack.runtime)`, exactly as `yibao terminal run --ui kiosk`
builds them. It must never send traffic anywhere but 127.0.0.1, never log personal data (everyone here is
synthetic) and never wait without a deadline. Never imported by production code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx
import uvicorn

from drivers.card_reader import Sex
from drivers.idcard import IdCardData
from drivers.sscard import SocialSecurityCardData
from hardware_sim.idcard_sim import synthetic_card
from hardware_sim.national_platform import INSUTYPE_EMPLOYEE, NationalPlatformSimulator, SyntheticPerson, create_app
from hardware_sim.sscard_sim import synthetic_ss_card
from protocol.clock import SystemClock
from protocol.gm.keystore import save_private_key
from protocol.gm.sm2 import SM2PrivateKey
from terminal.pharmacists import Consent
from terminal.runtime import TerminalRuntime
from yibao.server_proc import ServerProcess
from yibao.sim_day import REGION, HisClient, SimDayOptions, SimError
from yibao.sim_town import Kiosk, Person, Town, prescription_body

NATIONAL_PAASID: Final = "paas-kiosk-live"
INSTITUTION_CODE: Final = f"P{REGION}00000"
INSTITUTION_NAME: Final = "昆山示例药房1号"
"""The pharmacy: what `yibao.sim_town.Town` names its first institution (the national platform registers it too)."""
COMMAND_DISPATCH_S: Final = "0.2"
"""How often the server dispatches queued commands (the binding decision, notices): fast, so the test is."""


class _ServedApp:
    """An ASGI app under uvicorn on a free loopback port, in a daemon thread (the national platform's HTTP side)."""

    def __init__(self, app: Any, name: str) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off")
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name=name, daemon=True
        )

    def __enter__(self) -> _ServedApp:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            self.__exit__()
            raise SimError(f"{self._thread.name} did not start serving")
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(15)
        self._socket.close()


@dataclass
class LiveStack:
    """The running stack: the server process, the town (one pharmacy, its kiosk, its HIS) and the national platform."""

    workdir: Path
    server: ServerProcess
    db_url: str
    town: Town
    national: NationalPlatformSimulator

    @property
    def kiosk(self) -> Kiosk:
        return self.town.kiosks[0]

    @property
    def runtime(self) -> TerminalRuntime:
        return self.kiosk.runtime

    @property
    def his(self) -> HisClient:
        return self.town.his[self.kiosk.institution_code]

    @property
    def admin(self) -> httpx.Client:
        """The device admin's client of the admin API (bootstrap admin token)."""
        return self.town.admin

    @property
    def institution_name(self) -> str:
        return INSTITUTION_NAME

    # ------------------------------------------------------------------ people

    def person(self, photo_index: int) -> Person:
        """Someone of the town with the `photo_index`-th usable photo as their face, and an ID card of their own."""
        photos = self.town._photos
        return self.town._person(photos[photo_index % len(photos)])

    def enrol_pharmacist(self, person: Person, code: str) -> None:
        """HIS syncs `person` as the pharmacy's pharmacist `code`; they enrol at the kiosk's desk (ID card on the
        reader, 人证比对 of the live face against the card photo, consent). The desk, not the kiosk's enrolment screen:
        the kiosk as `kiosk_models` builds it has no WLT photo decoder (docs/kiosk-staff.md, open points)."""
        person.code = code
        body = {
            "pharmacists": [
                {
                    "dr_code": code,
                    "dr_id": f"his-{code}",
                    "dr_name": person.card.name,
                    "psn_cert_type": "01",
                    "certno": person.card.id_number,
                    "dr_prac_cert_no": f"ZY{code}",
                    "prac_regn": REGION,
                    "mul_prac_flag": "0",
                }
            ]
        }
        resp = self.his.call("PUT", "/his/v1/pharmacists", body)
        if resp.status_code >= 400:
            raise SimError(f"HIS pharmacist sync failed: {resp.status_code} {resp.text[:300]}")
        desk = self.runtime.pharmacists
        if desk is None:
            raise SimError("the kiosk has no pharmacist desk")
        desk.sync_roster()
        if desk.store.member(code) is None:
            raise SimError(f"{code} is not on the kiosk's roster after the sync")
        self.kiosk.rig.id_card.place(person.card)
        self.kiosk.show(person)
        reader = self.runtime.devices.id_card_reader if self.runtime.devices is not None else None
        if reader is None:
            raise SimError("the kiosk has no ID-card reader")
        result = desk.enrol(
            code,
            card_reader=reader,
            decode_photo=self.town.decoder,
            consent=Consent(desk.config.consent_version, self.runtime.clock.now()),
        )
        if not result.enrolled:
            raise SimError(f"pharmacist enrolment failed: {result.outcome}")

    def register_prescription(
        self, rx_no: str, *, drug: int = 0, patient_person_ref: str | None = None
    ) -> dict[str, Any]:
        """HIS registers a prescription for this pharmacy (`POST /his/v1/prescriptions`, signed); the body sent.
        `patient_person_ref` names the patient, so the review looks up their earlier purchases."""
        body = prescription_body(
            rx_no,
            drug=drug,
            patient_ref=f"pt-live-{rx_no}",
            patient_age_years=67,
            patient_person_ref=patient_person_ref,
        )
        resp = self.his.call("POST", "/his/v1/prescriptions", body)
        if resp.status_code != 201:
            raise SimError(f"registering {rx_no} failed: {resp.status_code} {resp.text[:300]}")
        self.his.registered_rx.append(rx_no)
        return body

    # ------------------------------------------------------------------ the national platform's people

    def insured(self) -> SyntheticPerson:
        """An employee the platform knows, with settlements, account credits and contributions to show."""
        return next(
            p
            for p in self.national.people
            if p.enrolment.insutype == INSUTYPE_EMPLOYEE and len(p.settlements) > 3 and p.credits and p.contributions
        )

    @staticmethod
    def id_card_of(person: SyntheticPerson) -> IdCardData:
        return dataclasses.replace(
            synthetic_card(0),
            name=person.psn_name,
            id_number=person.certno,
            birth_date=person.brdy,
            sex=Sex(person.gend),
        )

    @staticmethod
    def ss_card_of(person: SyntheticPerson) -> SocialSecurityCardData:
        return dataclasses.replace(
            synthetic_ss_card(0),
            name=person.psn_name,
            ss_number=person.certno,
            card_number=person.card_no,
            card_identification_code=person.card_sn,
            birth_date=person.brdy,
            sex=Sex(person.gend),
        )

    # ------------------------------------------------------------------ what the server recorded

    def audit(self) -> tuple[bool, list[dict[str, Any]]]:
        """The server's audit chain (`<data_dir>/audit/server-audit.jsonl`), read from its file and checked with its
        key as `yibao audit verify` does: (whether every link verifies, the events in order). The admin API's
        `/api/v1/audit` needs an auditor's account, which this stack does not make."""
        from protocol.gm.audit_chain import load_chain_key, verify_chain

        directory = self.workdir / "server" / "server-data" / "audit"
        chain = directory / "server-audit.jsonl"
        report = verify_chain(chain, load_chain_key(directory / "chain.key"))
        lines = chain.read_text(encoding="utf-8").splitlines()
        return report.ok, [json.loads(line)["event"] for line in lines if line.strip()]

    def sessions_at_server(self, pharmacist_code: str) -> list[dict[str, Any]]:
        """The attendance sessions the server stored for `pharmacist_code` (its database, read-only, as the
        reconciliation of `yibao sim day` reads it: the admin API lists attendance only to a regulator or the
        pharmacy's own accounts). Times are aware (UTC)."""
        from sqlalchemy import select

        from sync_server.db.engine import create_db_engine
        from sync_server.db.models import Institution, Pharmacist, PharmacistSession

        engine = create_db_engine(self.db_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(
                        PharmacistSession.device_id,
                        Institution.code,
                        PharmacistSession.signed_in_at,
                        PharmacistSession.signed_out_at,
                    )
                    .join(Pharmacist, Pharmacist.id == PharmacistSession.pharmacist_id)
                    .join(Institution, Institution.id == PharmacistSession.institution_id)
                    .where(Pharmacist.code == pharmacist_code)
                    .order_by(PharmacistSession.signed_in_at)
                ).all()
        finally:
            engine.dispose()
        return [
            {
                "device_id": device_id,
                "institution_code": institution,
                "signed_in_at": _aware(signed_in),
                "signed_out_at": None if signed_out is None else _aware(signed_out),
            }
            for device_id, institution, signed_in, signed_out in rows
        ]


def _aware(moment: datetime) -> datetime:
    """SQLite gives back naive datetimes; the server stores UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@contextlib.contextmanager
def live_stack(workdir: Path, *, faces_dir: Path | None = None, seed: int = 1) -> Iterator[LiveStack]:
    """Start the stack in `workdir` (one pharmacy, its kiosk enrolled with the server but not bound yet); stop every
    part of it when the block ends."""
    from yibao.broker import MosquittoBroker
    from yibao.procs import stop
    from yibao.server_proc import start_server_process

    options = SimDayOptions(
        institutions=1,
        pharmacists_per_institution=1,
        prescriptions_per_institution=1,
        purchases_per_institution=1,
        faces_dir=faces_dir,
        seed=seed,
    )
    institution_code = INSTITUTION_CODE
    national = NationalPlatformSimulator(SystemClock(), people=12, seed=8)
    key = SM2PrivateKey.generate()
    passphrase = secrets.token_urlsafe(18)
    paas_secret = secrets.token_urlsafe(18)
    key_file = workdir / "national" / "institution.key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    save_private_key(key_file, key, passphrase)
    national.register_institution(
        institution_code, INSTITUTION_NAME, key.public_key, paasid=NATIONAL_PAASID, paas_secret=paas_secret
    )
    with contextlib.ExitStack() as stack:
        platform = stack.enter_context(_ServedApp(create_app(national), "national-sim-http"))
        settings = {
            "base_url": platform.url,
            "paasid": NATIONAL_PAASID,
            "paas_secret": paas_secret,
            "fixmedins_code": institution_code,
            "fixmedins_name": INSTITUTION_NAME,
            "mdtrtarea_admvs": national.admdvs,
            "opter": "kiosk01",
            "opter_name": "自助终端",
            "opter_type": "2",
            "platform_public_key_hex": national.public_key.hex(),
        }
        broker = stack.enter_context(MosquittoBroker(workdir=workdir / "broker"))
        db_url = f"sqlite:///{workdir / 'server.sqlite3'}"
        server = start_server_process(
            database_url=db_url,
            mqtt_host=broker.host,
            mqtt_port=broker.port,
            workdir=workdir / "server",
            env={
                "YIBAO_SERVER_COMMAND_DISPATCH_INTERVAL_S": COMMAND_DISPATCH_S,
                "YIBAO_SERVER_NATIONAL_PLATFORM": json.dumps(settings),
                "YIBAO_SERVER_NATIONAL_PLATFORM_KEY_FILE": str(key_file),
                "YIBAO_SERVER_NATIONAL_PLATFORM_KEY_PASSPHRASE": passphrase,
            },
        )
        stack.callback(stop, server.proc, name="server")
        # The town's generator only makes purchases' 追溯码, which this stack never registers: any source will do
        town = stack.enter_context(Town.open(options, workdir, server, broker, random.SystemRandom()))
        kiosk = town.kiosks[0]
        listed = town.admin.get("/api/v1/institutions").json()["items"]
        named = next((i["name"] for i in listed if i["code"] == kiosk.institution_code), None)
        if (kiosk.institution_code, named) != (institution_code, INSTITUTION_NAME):
            raise SimError(f"the town's pharmacy is {kiosk.institution_code} {named}, not {institution_code}")
        yield LiveStack(workdir, server, db_url, town, national)
