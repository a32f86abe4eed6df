"""A whole kiosk on simulated hardware in this process, for `yibao kiosk screens` (docs/screens/) and the Xvfb
tests: the serial device simulators and the e-voucher platform (`hardware_sim.kiosk_rig`) under the REAL drivers
and terminal runtime, a simulated camera under the real face pipeline with one enrolled citizen, and a synthetic
catalogue — plus the `TourRig` the screen tour drives.

This is a composition root (it may choose simulators); everything personal in it is synthetic. The runtime does
not connect to a broker (the kiosk works offline; the maintenance screen says so).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from argon2 import PasswordHasher

from hardware_sim.camera_sim import SimulatedCamera
from hardware_sim.catalogue_gen import generate_catalogue
from hardware_sim.evoucher import Insured, synthetic_insured
from hardware_sim.idcard_sim import synthetic_card
from hardware_sim.kiosk_rig import KioskSimulatorRig, start_kiosk_simulators
from hardware_sim.peripherals import SimulatedPeripheral
from hardware_sim.sscard_sim import synthetic_ss_card
from models.face import engine_from_store
from models.liveness import LivenessChecker
from models.manifest import ModelStore
from protocol.catalogue import CatalogueKind, CatalogueSnapshot
from terminal.catalogue import CatalogueStore
from terminal.config import parse_terminal_config
from terminal.devices import open_devices, open_evoucher_platform
from terminal.face_templates import TemplateStore
from terminal.runtime import CATALOGUE_FILE, TerminalRuntime, build_runtime
from terminal.verification import FaceVerifier, Prompt
from yibao.kiosk_sim_national import SimulatedNational, start_simulated_national  # national queries (K-11…K-16)

# staff screens (pharmacist, review, binding)
from yibao.kiosk_sim_staff import StaffSim, add_staff, attach_staff

logger = logging.getLogger(__name__)

CITIZEN_REF: Final = "citizen-0000000123"
ENROL_PHOTO: Final = "obama/obama_b.jpg"
PRESENT_PHOTO: Final = ENROL_PHOTO
"""The same photo: what the tour shows is the kiosk, not the matcher's margin (tests/terminal covers that)."""
HOLD_LIMIT_S: Final = 20.0

_BASE_TOML: Final = """
schema_version = 1
config_version = "kiosk-sim-1"
device_id = "KIOSK-SIM-01"
software_version = "0.1.0"

[mqtt]
host = "127.0.0.1"
port = 1
topic_prefix = "yibao/v1"

[outbox]
path = "{outbox}"

[heartbeat]
interval_s = 3600.0
"""


@dataclass
class SimulatedKiosk:
    """The runtime plus the handles the tour pulls on. `close()` stops everything it started."""

    runtime: TerminalRuntime
    devices: KioskSimulatorRig
    camera: SimulatedCamera | None
    citizen: Insured
    account: str
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    query_needle: str = ""
    _hold: threading.Event = field(default_factory=threading.Event)
    _released: threading.Event = field(default_factory=threading.Event)
    # staff screens (pharmacist, review, binding)
    staff: StaffSim | None = None
    # national queries (K-11…K-16)
    national: SimulatedNational | None = None

    @property
    def admin_hash(self) -> str:
        return PasswordHasher().hash(self.admin_password)

    @property
    def secrets(self) -> tuple[str, ...]:
        card, ss_card = synthetic_card(0), synthetic_ss_card(0)
        personal = (self.citizen.id_number, self.citizen.name, card.id_number, card.name, ss_card.ss_number)
        return personal + (self.national.secrets if self.national is not None else ())  # national queries

    # ------------------------------------------------------------------ TourRig

    def offer_qr(self, *, valid: bool, delay_s: float) -> None:
        evoucher, scanner = self.devices.evoucher, self.devices.qr_scanner

        def later() -> None:
            time.sleep(delay_s)
            scanner.scan(evoucher.issue_code(self.account) if valid else evoucher.forge_code())

        threading.Thread(target=later, name="sim-citizen-qr", daemon=True).start()

    def remove_cards(self) -> None:
        self.devices.id_card.remove()
        self.devices.ss_card.remove()

    def place_id_card(self) -> None:
        self.devices.id_card.place(synthetic_card(0))

    def place_ss_card(self) -> None:
        self.devices.ss_card.place(synthetic_ss_card(0))

    def hold_face_at_challenge(self) -> None:
        if self.camera is not None:
            self.camera.perform(None)  # a new citizen steps up facing the camera (not still turned from the last)
        self._released.clear()
        self._hold.set()

    def release_face(self) -> None:
        self._hold.clear()
        self._released.set()

    def citizen_follows(self, prompt: Prompt) -> None:
        """The simulated citizen does what the kiosk asks (after the tour's screenshot when it holds them)."""
        if prompt.challenge is None or self.camera is None:
            return
        if self._hold.is_set():
            self._released.wait(HOLD_LIMIT_S)
        self.camera.perform(prompt.challenge)

    def close(self) -> None:
        try:
            if self.national is not None:  # national queries
                self.national.close()
            self.runtime.stop()
        finally:
            if self.camera is not None:
                self.camera.close()
            self.devices.stop()


def start_simulated_kiosk(workdir: Path, faces_dir: Path | None) -> SimulatedKiosk:
    """Start the simulators and build the kiosk's runtime on them (face only when `faces_dir` has the photos)."""
    workdir.mkdir(parents=True, exist_ok=True)
    rig = start_kiosk_simulators(workdir / "devices")
    try:
        raw = tomllib.loads(_BASE_TOML.format(outbox=workdir / "outbox.sqlite3") + rig.terminal_toml())
        config = parse_terminal_config(raw, source="kiosk-sim")
        devices = open_devices(config.devices, stand_in=SimulatedPeripheral)
        runtime = build_runtime(config, devices, evoucher_platform=open_evoucher_platform(config.evoucher))
    except BaseException:
        rig.stop()
        raise
    citizen = synthetic_insured(1, seed=11)[0]
    kiosk = SimulatedKiosk(runtime, rig, None, citizen, rig.evoucher.enrol(citizen))
    try:
        kiosk.query_needle = _load_catalogue(runtime, workdir)
        kiosk.national = start_simulated_national(rig, runtime.clock, workdir)  # national queries (K-11…K-16)
        if faces_dir is not None and (faces_dir / ENROL_PHOTO).is_file():
            _add_face(kiosk, workdir, faces_dir)
            # staff screens (pharmacist, review, binding)
            kiosk.staff = add_staff(runtime, workdir, faces_dir, kiosk.query_needle, kiosk.camera)
    except BaseException:
        kiosk.close()
        raise
    return kiosk


def _load_catalogue(runtime: TerminalRuntime, workdir: Path) -> str:
    """A synthetic catalogue in the runtime's store (what the catalogue sync would have fetched); returns a drug
    name that many entries share, for the paged list."""
    store = CatalogueStore.open(workdir / CATALOGUE_FILE)
    catalogue = generate_catalogue(drugs=2000, treatments=200, institutions=100)
    at = datetime(2026, 6, 1, tzinfo=UTC)
    store.apply_snapshot(CatalogueSnapshot.build(CatalogueKind.DRUG, 1, catalogue.drugs, at))
    store.apply_snapshot(CatalogueSnapshot.build(CatalogueKind.TREATMENT, 1, catalogue.treatments, at))
    store.apply_snapshot(CatalogueSnapshot.build(CatalogueKind.INSTITUTION, 1, catalogue.institutions, at))
    runtime.catalogue = store
    counts: dict[str, int] = {}
    for drug in catalogue.drugs:
        counts[drug.generic_name] = counts.get(drug.generic_name, 0) + 1
    return max(counts, key=lambda name: counts[name])


def _add_face(kiosk: SimulatedKiosk, workdir: Path, faces_dir: Path) -> None:
    """The real face pipeline on a simulated RGB+IR+depth camera; one citizen enrolled, another photo of the same
    person presented, and a liveness challenge always asked (so the guidance screen shows one)."""
    runtime = kiosk.runtime
    engine = engine_from_store(ModelStore())
    camera = SimulatedCamera([faces_dir / ENROL_PHOTO], engine.detector, seed=3)
    camera.open()
    kiosk.camera = camera
    templates = TemplateStore(
        workdir / "face_gallery.sqlite3", secrets.token_bytes(16), model_sha256=engine.embedder.model_sha256
    )
    verifier = FaceVerifier(
        camera,
        engine,
        LivenessChecker(),
        templates,
        runtime.clock,
        window_s=30.0,
        always_challenge=True,
        challenge_window_s=HOLD_LIMIT_S + 10.0,
        prompt=kiosk.citizen_follows,
        record=lambda event: runtime.record_audits([event]),
    )
    runtime.face = verifier
    enrolled = verifier.enrol(CITIZEN_REF)
    if not enrolled.accepted:
        raise RuntimeError(f"the simulated citizen's face could not be enrolled: {enrolled.outcome.value}")
    camera.present_person([faces_dir / PRESENT_PHOTO])
    camera.perform(None)
    runtime.model_versions.update({"face_embedder": engine.embedder.model_sha256[:16]})


def regenerate_screens(
    out_dir: Path, *, faces_dir: Path | None, workdir: Path, fullscreen: bool = False
) -> dict[str, Any]:
    """Run the screen tour on a simulated kiosk (under a private Xvfb when there is no display) and write one PNG
    per screen and mode into `out_dir`. Returns the tour's report (with the voice prompts spoken in care mode)."""
    import os

    from ui.xvfb import start_xvfb

    xvfb = None
    if not os.environ.get("DISPLAY"):
        xvfb = start_xvfb()
        os.environ["DISPLAY"] = xvfb.display  # this process only: Kivy reads it when it opens the window
    try:
        from ui.kiosk import env

        env.prepare(fullscreen=fullscreen, home=workdir / "kivy")
        from ui.kiosk.run import kiosk_models
        from ui.kiosk.tour import run_tour
        from ui.voice import RecordingSpeaker

        kiosk = start_simulated_kiosk(workdir, faces_dir)
        try:
            speaker = RecordingSpeaker()
            national = kiosk.national.client if kiosk.national is not None else None  # national queries
            models = kiosk_models(kiosk.runtime, speaker=speaker, admin_hash=kiosk.admin_hash, national=national)
            from terminal.pos_api import BuyerMethod, RuntimeBuyerVerifier
            from ui.pos_link import KioskBuyerVerifier

            runtime = kiosk.runtime
            register = KioskBuyerVerifier(
                RuntimeBuyerVerifier(runtime.devices, runtime.evoucher, runtime.face, show=models.pos.instruct),
                models.pos,
                face=runtime.face,
            )

            def proxy_purchase() -> None:
                # What the POS service's worker does for a proxy request: the beneficiary's code, then the agent
                if register.verify_buyer(BuyerMethod.EVOUCHER, threading.Event(), with_face=False).verified:
                    register.verify_agent_face([CITIZEN_REF], threading.Event())

            # staff screens (pharmacist, review, binding)
            attach_staff(models, kiosk.staff)
            report = run_tour(
                models,
                kiosk,
                out_dir,
                pos=lambda: register.verify_buyer(BuyerMethod.EVOUCHER, threading.Event()),
                proxy=proxy_purchase,
            ).as_json()
            report["spoken"] = list(speaker.phrases)
            report["secrets_shown"] = sorted(
                {s for shot in report["shots"] for text in shot["texts"] for s in kiosk.secrets if s in text}
            )
            return report
        finally:
            kiosk.close()
    finally:
        if xvfb is not None:
            xvfb.stop()
