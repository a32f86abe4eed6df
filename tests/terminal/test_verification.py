"""Face verification end to end on the real models: simulated camera (real photos, synthetic IR/depth, attacks,
faults) → quality gate → liveness → 1:1 / 1:N against the sealed gallery → a decision record with no face in it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from drivers.camera import CameraFault, Frame
from hardware_sim.camera_sim import Presentation, SimulatedCamera
from models.dlib_convert import build_dlib_resnet
from models.face import FaceEngine, engine_from_store
from models.liveness import LivenessChecker
from models.manifest import ModelStore
from protocol import AuditEvent, AuditOutcome, PeripheralKind, PeripheralStatus
from terminal.face_templates import TemplateStore
from terminal.verification import FaceOutcome, FaceVerifier, Prompt
from tests.face_data import person_photos
from tests.terminal.conftest import FakeClock

KEY = bytes(range(16))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> FaceEngine:
    models_dir = tmp_path_factory.mktemp("models")
    build_dlib_resnet(ModelStore(models_dir).manifest("dlib_resnet_v1"), models_dir)
    return engine_from_store(ModelStore(models_dir, operator_dir=None))


class PacedCamera:
    """The simulated camera at 15 frames per second of fake time (the verifier's windows run on that clock)."""

    def __init__(self, camera: SimulatedCamera, clock: FakeClock) -> None:
        self.inner = camera
        self.clock = clock
        self.frames: list[Frame] = []

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
        frame = self.inner.read()
        self.frames.append(frame)
        return frame


class Rig:
    """A kiosk's verification parts around one simulated camera; records what the outbox would get."""

    def __init__(self, engine: FaceEngine, tmp_path: Path, photos: list[Path], **camera: object) -> None:
        self.clock = FakeClock()
        self.camera = SimulatedCamera(photos, engine.detector, seed=3, **camera)  # type: ignore[arg-type]
        self.camera.open()
        self.paced = PacedCamera(self.camera, self.clock)
        self.templates = TemplateStore(tmp_path / "gallery.db", KEY, model_sha256=engine.embedder.model_sha256)
        self.events: list[AuditEvent] = []
        self.prompts: list[Prompt] = []

        def prompt(p: Prompt) -> None:
            self.prompts.append(p)
            if p.challenge is not None:
                self.camera.perform(p.challenge)  # the citizen does as asked

        self.verifier = FaceVerifier(
            self.paced,
            engine,
            LivenessChecker(),
            self.templates,
            self.clock,
            rng=random.Random(7),
            prompt=prompt,
            record=self.events.append,
        )


def photo(name: str) -> list[Path]:
    """One photo that passes the kiosk's quality gate once letterboxed to 640x480 (several in the set do not)."""
    return [p for photos in person_photos().values() for p in photos if p.stem == name]


def test_enrol_then_verify_the_same_person_is_accepted_and_the_record_holds_no_face(
    engine: FaceEngine, tmp_path: Path
) -> None:
    enrol = Rig(engine, tmp_path, photo("obama_a"))
    decision = enrol.verifier.enrol("staff-0001")
    assert decision.outcome is FaceOutcome.ACCEPTED, decision
    assert enrol.templates.subjects() == {"staff-0001": engine.embedder.model_sha256}

    probe = Rig(engine, tmp_path, photo("obama_b"))
    result = probe.verifier.verify("staff-0001")
    assert result.outcome is FaceOutcome.ACCEPTED, result
    assert result.similarity is not None
    assert result.similarity >= result.threshold
    assert result.liveness is not None
    assert result.liveness.live
    event = probe.events[-1]
    assert event.category == "identity"
    assert event.outcome is AuditOutcome.SUCCESS
    assert event.subject == "staff-0001"
    assert event.detail["template_hash"] == result.template_hash
    assert result.template_hash is not None
    assert event.detail["model_sha256"] == engine.embedder.model_sha256[:16]
    wire = json.dumps(event.model_dump(mode="json"))
    assert len(wire) < 2000  # scores and hashes only: no frame, no template could fit
    assert "[" not in json.dumps(event.detail)  # no vectors


def test_another_person_is_not_matched_one_to_one_or_one_to_n(engine: FaceEngine, tmp_path: Path) -> None:
    enrol = Rig(engine, tmp_path, photo("obama_a"))
    assert enrol.verifier.enrol("staff-0001").accepted
    impostor = Rig(engine, tmp_path, photo("biden_b"))
    one = impostor.verifier.verify("staff-0001")
    assert one.outcome is FaceOutcome.NO_MATCH, one
    many = impostor.verifier.identify()
    assert many.outcome is FaceOutcome.NO_MATCH
    assert many.subject_ref is None
    assert [e.outcome for e in impostor.events] == [AuditOutcome.FAILURE, AuditOutcome.FAILURE]


def test_one_to_n_finds_the_enrolled_pharmacist(engine: FaceEngine, tmp_path: Path) -> None:
    for i, name in enumerate(("obama_a", "rose_a", "alex_a", "kit_b")):
        assert Rig(engine, tmp_path, photo(name)).verifier.enrol(f"staff-{i}").accepted
    found = Rig(engine, tmp_path, photo("rose_b")).verifier.identify()
    assert found.outcome is FaceOutcome.ACCEPTED, found
    assert found.subject_ref == "staff-1"


@pytest.mark.parametrize("attack", [Presentation.PRINT, Presentation.SCREEN_REPLAY])
def test_a_presentation_attack_is_refused_before_any_match(
    engine: FaceEngine, tmp_path: Path, attack: Presentation
) -> None:
    assert Rig(engine, tmp_path, photo("obama_a")).verifier.enrol("staff-0001").accepted
    rig = Rig(engine, tmp_path, photo("obama_b"), presentation=attack)
    decision = rig.verifier.verify("staff-0001")
    assert decision.outcome is FaceOutcome.LIVENESS_FAILED, decision
    assert decision.similarity is None
    assert decision.template_hash is None
    assert rig.events[-1].detail["liveness"] == "attack_suspected"


def test_without_ir_or_depth_the_active_challenge_decides(engine: FaceEngine, tmp_path: Path) -> None:
    assert Rig(engine, tmp_path, photo("obama_a")).verifier.enrol("staff-0001").accepted
    live = Rig(engine, tmp_path, photo("obama_b"), with_ir=False, with_depth=False)
    decision = live.verifier.verify("staff-0001")
    assert decision.outcome is FaceOutcome.ACCEPTED, decision
    assert decision.challenge
    assert any(p.challenge is not None for p in live.prompts)
    assert decision.liveness is not None
    assert "challenge" in decision.liveness.method

    printed = Rig(engine, tmp_path, photo("obama_b"), with_ir=False, with_depth=False, presentation=Presentation.PRINT)
    refused = printed.verifier.verify("staff-0001")
    assert refused.outcome in {FaceOutcome.LIVENESS_FAILED, FaceOutcome.TIMEOUT}, refused
    assert not refused.accepted


def test_an_unplugged_camera_and_an_unknown_subject_end_cleanly(engine: FaceEngine, tmp_path: Path) -> None:
    rig = Rig(engine, tmp_path, photo("obama_a"))
    assert rig.verifier.verify("nobody").outcome is FaceOutcome.NOT_ENROLLED
    assert rig.verifier.enrol("staff-0001").accepted
    rig.camera.inject_fault(CameraFault.UNPLUGGED)
    assert rig.verifier.verify("staff-0001").outcome is FaceOutcome.CAMERA_FAULT


def test_a_dark_camera_times_out_with_the_reason(engine: FaceEngine, tmp_path: Path) -> None:
    rig = Rig(engine, tmp_path, photo("obama_a"))
    assert rig.verifier.enrol("staff-0001").accepted
    rig.camera.inject_fault(CameraFault.TOO_DARK)
    rig.verifier.window_s = 2.0  # 30 frames at 15 fps
    decision = rig.verifier.verify("staff-0001")
    assert decision.outcome is FaceOutcome.TIMEOUT, decision
    assert decision.quality_issues
    assert rig.prompts
    assert all(p.zh for p in rig.prompts)


def test_frames_do_not_outlive_the_attempt(engine: FaceEngine, tmp_path: Path) -> None:
    rig = Rig(engine, tmp_path, photo("obama_a"))
    assert rig.verifier.enrol("staff-0001").accepted
    seen = [a for f in rig.paced.frames for a in (f.rgb, f.ir, f.depth) if a is not None]
    assert seen
    assert all(not f.any() for f in seen)
