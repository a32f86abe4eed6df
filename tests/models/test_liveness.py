"""Liveness signals, the active challenge and the fusion policy on real photos with simulated presentations."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hardware_sim.camera_sim import Motion, Presentation, Synthesized, load_rgb, synthesize
from models.liveness import (
    Challenge,
    ChallengeSession,
    ChallengeState,
    DepthSignal,
    IrSignal,
    LivenessChecker,
    OnnxPadSignal,
    SignalResult,
    TextureSignal,
    pitch_proxy,
    yaw_proxy,
)
from models.manifest import ModelStore, sha256_file
from models.types import Detection, FaceDetector, RgbImage
from tests.face_data import faces_dir
from yibao.pad_harness import make_detector, run_challenge


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return make_detector("mtcnn")


@pytest.fixture(scope="module")
def face(detector: FaceDetector) -> tuple[RgbImage, Detection]:
    rgb = load_rgb(faces_dir() / "obama" / "obama_a.jpg")
    found = detector.detect(rgb)
    assert len(found) == 1
    return rgb, found[0]


def present(
    face: tuple[RgbImage, Detection], detector: FaceDetector, presentation: Presentation, seed: int = 3
) -> tuple[Synthesized, Detection]:
    rgb, det = face
    synth = synthesize(rgb, det, presentation, np.random.default_rng(seed))
    seen = detector.detect(synth.rgb)
    assert seen, f"{presentation} shows no detectable face"
    return synth, seen[0]


def signals(synth: Synthesized, det: Detection) -> dict[str, SignalResult]:
    return {r.name: r for r in LivenessChecker().signals(synth.rgb, det, ir=synth.ir, depth=synth.depth)}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_live_face_is_accepted_by_every_signal(
    face: tuple[RgbImage, Detection], detector: FaceDetector, seed: int
) -> None:
    synth, det = present(face, detector, Presentation.BONA_FIDE, seed)
    decision = LivenessChecker().assess(synth.rgb, det, ir=synth.ir, depth=synth.depth)
    assert decision.live, decision.failed
    assert decision.method == "ir+depth+texture"
    assert set(decision.scores) == {"ir", "depth", "texture"}


def test_a_print_is_rejected_by_depth_and_by_ir(face: tuple[RgbImage, Detection], detector: FaceDetector) -> None:
    synth, det = present(face, detector, Presentation.PRINT)
    results = signals(synth, det)
    assert not results["depth"].passed
    assert results["depth"].reason == "depth_flat"
    assert results["depth"].measures["rms_mm"] < 3.0
    assert not results["ir"].passed
    assert results["ir"].reason in {"ir_flat_reflectance", "ir_no_eye_structure"}
    decision = LivenessChecker().assess(synth.rgb, det, ir=synth.ir, depth=synth.depth)
    assert not decision.live
    assert {"depth:depth_flat"} <= set(decision.failed)


def test_a_screen_replay_is_rejected_by_ir_and_by_moire(
    face: tuple[RgbImage, Detection], detector: FaceDetector
) -> None:
    synth, det = present(face, detector, Presentation.SCREEN_REPLAY)
    results = signals(synth, det)
    assert not results["ir"].passed
    assert results["ir"].reason == "no_face_in_ir"
    assert not results["texture"].passed
    assert results["texture"].reason == "periodic_texture"
    assert not results["depth"].passed


def test_a_mask_beats_depth_but_not_ir(face: tuple[RgbImage, Detection], detector: FaceDetector) -> None:
    synth, det = present(face, detector, Presentation.MASK)
    results = signals(synth, det)
    assert results["depth"].passed  # a 3D mask has a face's relief: depth alone cannot stop it
    assert not results["ir"].passed
    assert results["ir"].reason in {"ir_no_eye_structure", "no_face_in_ir"}
    assert results["ir"].measures["eye"] < IrSignal().eye_range[0]  # no pupil, no corneal glint


def test_texture_alone_passes_the_real_photo(face: tuple[RgbImage, Detection]) -> None:
    rgb, det = face
    result = TextureSignal().score(rgb, det)
    assert result.passed, result.measures


def _box_det(x0: float, y0: float, x1: float, y1: float) -> Detection:
    w = x1 - x0
    lm = np.array(
        [
            [x0 + 0.3 * w, y0 + 0.4 * w],
            [x0 + 0.7 * w, y0 + 0.4 * w],
            [x0 + 0.5 * w, y0 + 0.6 * w],
            [x0 + 0.35 * w, y0 + 0.8 * w],
            [x0 + 0.65 * w, y0 + 0.8 * w],
        ],
        dtype=np.float32,
    )
    return Detection(box=(x0, y0, x1, y1), score=0.99, landmarks=lm)


def test_depth_signal_on_constructed_surfaces() -> None:
    det = _box_det(200, 120, 400, 320)
    ys, xs = np.mgrid[0:480, 0:640].astype(np.float64)
    plane = (500 + 0.2 * xs - 0.1 * ys).astype(np.uint16)
    assert DepthSignal().score(plane, det).reason == "depth_flat"
    dome = 500 + np.clip((xs - 300) ** 2 + (ys - 220) ** 2, 0, 100**2) * 0.006
    result = DepthSignal().score(dome.astype(np.uint16), det)
    assert result.passed, result.measures
    assert DepthSignal().score((dome + 2000).astype(np.uint16), det).reason == "depth_out_of_range"
    assert DepthSignal().score(np.zeros((480, 640), np.uint16), det).reason == "depth_no_reading"


def test_ir_without_a_face_is_refused(face: tuple[RgbImage, Detection]) -> None:
    rgb, det = face
    uniform = np.full(rgb.shape[:2], 40, dtype=np.uint8)
    assert IrSignal().score(rgb, uniform, det).reason == "no_face_in_ir"
    assert IrSignal().score(rgb, uniform[:100], det).reason == "ir_not_registered"


# ---------------------------------------------------------------- the active challenge


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def now(self) -> float:
        return self.t


def _posed(yaw: float = 0.0, pitch: float = 0.0) -> Detection:
    """A face whose nose is moved by yaw/pitch inter-ocular distances (iod = 80 px)."""
    lm = np.array([[280, 200], [360, 200], [320, 250], [290, 290], [350, 290]], dtype=np.float32)
    lm[2, 0] += yaw * 80
    lm[2, 1] += pitch * 80
    return Detection(box=(240, 150, 400, 330), score=0.99, landmarks=lm)


def _session(challenge: Challenge, clock: FakeClock, **kwargs: float) -> ChallengeSession:
    for seed in range(100):
        session = ChallengeSession(random.Random(seed), clock, **kwargs)  # type: ignore[arg-type]
        if session.challenges == (challenge,):
            return session
    raise AssertionError(f"no seed draws {challenge}")


def test_proxies_follow_the_nose() -> None:
    assert yaw_proxy(_posed()) == pytest.approx(0.0)
    assert yaw_proxy(_posed(yaw=0.2)) == pytest.approx(0.2)
    assert pitch_proxy(_posed(pitch=0.1)) - pitch_proxy(_posed()) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("challenge", "pose"),
    [(Challenge.TURN_LEFT, {"yaw": 0.15}), (Challenge.TURN_RIGHT, {"yaw": -0.15}), (Challenge.NOD, {"pitch": 0.12})],
)
def test_a_followed_challenge_passes(challenge: Challenge, pose: dict[str, float]) -> None:
    clock = FakeClock()
    session = _session(challenge, clock)
    for _ in range(3):
        clock.t += 0.1
        assert session.observe(_posed()) is ChallengeState.PENDING
    states = []
    for _ in range(2):  # the session takes the median of the last 3 frames: one jittery frame is not a move
        clock.t += 0.1
        states.append(session.observe(_posed(**pose)))
    assert states == [ChallengeState.PENDING, ChallengeState.PASSED]
    assert session.result().passed


def test_a_challenge_not_followed_fails_after_the_window() -> None:
    clock = FakeClock()
    session = _session(Challenge.TURN_LEFT, clock, window_s=5.0)
    for _ in range(49):
        clock.t += 0.1
        assert session.observe(_posed()) is ChallengeState.PENDING
    clock.t += 0.2
    assert session.observe(_posed()) is ChallengeState.FAILED
    assert session.result().reason == "challenge_timeout"
    clock.t += 0.1
    assert session.observe(_posed(yaw=0.3)) is ChallengeState.FAILED  # single-use: too late is too late


def test_the_wrong_move_fails_at_once() -> None:
    clock = FakeClock()
    session = _session(Challenge.TURN_LEFT, clock)
    for _ in range(3):
        session.observe(_posed())
    session.observe(_posed(yaw=-0.2))
    assert session.observe(_posed(yaw=-0.2)) is ChallengeState.FAILED
    assert session.result().reason == "challenge_wrong_move_turn_left"


def test_challenges_are_random_but_reproducible() -> None:
    clock = FakeClock()
    draws = [ChallengeSession(random.Random(s), clock, steps=3).challenges for s in range(30)]
    assert draws == [ChallengeSession(random.Random(s), clock, steps=3).challenges for s in range(30)]
    assert len(set(draws)) > 5
    assert all(a is not b for d in draws for a, b in itertools.pairwise(d))


def test_simulated_live_subject_passes_and_a_print_fails(
    face: tuple[RgbImage, Detection], detector: FaceDetector
) -> None:
    rgb, det = face
    passed = [
        run_challenge(detector, rgb, det, Presentation.BONA_FIDE, np.random.default_rng(s), random.Random(s)).passed
        for s in range(3)
    ]
    assert all(passed)
    printed = [
        run_challenge(detector, rgb, det, Presentation.PRINT, np.random.default_rng(s), random.Random(s))
        for s in range(3)
    ]
    assert not any(r.passed for r in printed)
    assert {r.reason for r in printed} <= {"challenge_timeout", "challenge_incomplete"}


def test_a_motion_warp_moves_the_detected_landmarks(face: tuple[RgbImage, Detection], detector: FaceDetector) -> None:
    rgb, det = face
    left = synthesize(rgb, det, Presentation.BONA_FIDE, np.random.default_rng(0), motion=Motion(Challenge.TURN_LEFT, 1))
    seen = detector.detect(left.rgb)[0]
    assert yaw_proxy(seen) - yaw_proxy(det) > 0.12


# ---------------------------------------------------------------- fusion


def test_without_ir_or_depth_the_challenge_is_required(face: tuple[RgbImage, Detection]) -> None:
    rgb, det = face
    checker = LivenessChecker()
    refused = checker.assess(rgb, det)
    assert not refused.live
    assert "challenge:challenge_required" in refused.failed
    accepted = checker.assess(rgb, det, challenge=SignalResult("challenge", 1.0, True, "ok"))
    assert accepted.live, accepted.failed
    assert accepted.method == "texture+challenge"
    failed = checker.assess(rgb, det, challenge=SignalResult("challenge", 0.2, False, "challenge_timeout"))
    assert failed.failed == ["challenge:challenge_timeout"]


# ---------------------------------------------------------------- operator ONNX PAD model


def _mean_brightness_model(operator_dir: Path, *, size: int = 16, threshold: str = "") -> None:
    """A tiny stand-in PAD model with its operator manifest: logits = (-mean, +mean) of the crop (bright = 'live')."""
    n = 3 * size * size
    weights = np.zeros((n, 2), dtype=np.float32)
    weights[:, 0], weights[:, 1] = -5.0 / n, 5.0 / n
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny_pad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(operator_dir / "tiny_pad.onnx"))
    sha = sha256_file(operator_dir / "tiny_pad.onnx")
    (operator_dir / "tiny_pad.toml").write_text(
        f"""schema_version = 1
name = "tiny_pad"
role = "pad"
description = "test stand-in for an operator PAD model"
file = "operator:tiny_pad.onnx"
sha256 = "{sha}"
licence = "CC0-1.0"

[source]
notes = "built by the test"

[input]
name = "input"
shape = [1, 3, {size}, {size}]
dtype = "float32"
layout = "NCHW"
channel_order = "BGR"

[normalisation]
kind = "mean_scale"
mean = [127.5, 127.5, 127.5]
scale = [0.0078431, 0.0078431, 0.0078431]

[[outputs]]
name = "logits"
shape = [1, 2]
{threshold}"""
    )


def test_an_operator_onnx_pad_model_is_an_extra_signal(face: tuple[RgbImage, Detection], tmp_path: Path) -> None:
    rgb, det = face
    _mean_brightness_model(tmp_path)
    store = ModelStore(tmp_path / "models", tmp_path)
    signal = OnnxPadSignal(store.load("tiny_pad"))
    bright = np.clip(rgb.astype(np.int16) + 120, 0, 255).astype(np.uint8)
    dark = (rgb // 6).astype(np.uint8)
    assert signal.score(bright, det).passed
    assert signal.score(dark, det).reason == "pad_model_attack"
    checker = LivenessChecker(extra=(signal,))
    decision = checker.assess(dark, det, challenge=SignalResult("challenge", 1.0, True, "ok"))
    assert "onnx_pad:pad_model_attack" in decision.failed
    assert "onnx_pad" in decision.method
    wrong = OnnxPadSignal(store.load("tiny_pad"), live_index=5)
    assert wrong.score(bright, det).reason == "pad_model_output_mismatch"


def test_the_manifest_threshold_is_the_operating_point(face: tuple[RgbImage, Detection], tmp_path: Path) -> None:
    rgb, det = face
    calibrated = """
[threshold]
metric = "score"
value = 0.9999
how_chosen = "test: stricter than any crop of this photo can reach"
calibrated_on = 2026-12-01
"""
    _mean_brightness_model(tmp_path, threshold=calibrated)
    signal = OnnxPadSignal(ModelStore(tmp_path / "models", tmp_path).load("tiny_pad"))
    assert signal.threshold == 0.9999
    result = signal.score(np.clip(rgb.astype(np.int16) + 120, 0, 255).astype(np.uint8), det)
    assert 0.5 < result.score < 0.9999
    assert not result.passed


def test_a_model_that_is_not_a_pad_model_is_refused() -> None:
    store = ModelStore(operator_dir=None)
    with pytest.raises(ValueError, match="not 'pad'"):
        OnnxPadSignal(store.load("mtcnn_onet"))


def test_ir_parallax_of_a_binocular_module_is_searched(face: tuple[RgbImage, Detection]) -> None:
    rgb, det = face
    synth = synthesize(rgb, det, Presentation.BONA_FIDE, np.random.default_rng(4), ir_parallax_px=9)
    assert synth.ir is not None
    found = IrSignal().score(synth.rgb, synth.ir, det)
    assert found.passed, found.measures
    assert abs(found.measures["parallax_px"] - 9) <= 2
    registered_only = IrSignal(max_parallax_px=0).score(synth.rgb, synth.ir, det)
    assert registered_only.score < found.score
    assert not registered_only.passed  # the glints are beside the landmarks: no eye structure where it is sought


@pytest.fixture(scope="module")
def real_turn() -> list[Detection]:
    """The largest face in frames 90-140 of the real clip, where the person turns their head (to their right:
    the yaw proxy falls by about 0.4 inter-ocular distances) — real landmarks, no synthesis."""
    from models.detector import PARAMS_PHOTOS, MtcnnDetector
    from models.manifest import ModelStore

    detector = MtcnnDetector.from_store(ModelStore(), PARAMS_PHOTOS)
    capture = cv2.VideoCapture(str(faces_dir() / "video" / "short_clip.mp4"))
    found: list[Detection] = []
    try:
        for index in range(141):
            ok, bgr = capture.read()
            assert ok, f"the clip ended at frame {index}"
            if index >= 90:
                faces = detector.detect(np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
                if faces:
                    found.append(max(faces, key=lambda d: d.width * d.height))
    finally:
        capture.release()
    assert len(found) >= 45
    return found


@pytest.mark.parametrize(
    ("challenge", "expected"),
    [
        (Challenge.TURN_RIGHT, ChallengeState.PASSED),
        (Challenge.TURN_LEFT, ChallengeState.FAILED),
        (Challenge.NOD, ChallengeState.FAILED),
    ],
)
def test_the_challenge_on_a_real_head_turn(
    challenge: Challenge, expected: ChallengeState, real_turn: list[Detection]
) -> None:
    clock = FakeClock()
    session = _session(challenge, clock)
    state = ChallengeState.PENDING
    for detection in real_turn:
        clock.t += 1 / 30  # the clip's frame rate
        state = session.observe(detection)
        if state is not ChallengeState.PENDING:
            break
    assert state is expected, session.result()
