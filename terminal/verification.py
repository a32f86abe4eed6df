"""Face verification at the kiosk: camera frames → quality gate → liveness (signals + active challenge) → 1:1 or
1:N match → a decision, of which only derived values leave the device.

Owns one verification attempt from first frame to decision, and what is recorded about it (issue 4 points 1, 3, 9;
DESIGN.md §4):

    camera.read() ─► FrameWindow (frames wiped when the attempt ends or its time runs out)
         │
         ├─► FaceEngine.analyse: quality gate ──(not ok)──► prompt the citizen (plain words), next frame
         ├─► ChallengeSession.observe(landmarks)   randomized turn/nod; required when the camera has no IR/depth
         └─► LivenessChecker.assess(rgb, ir, depth, challenge result) on the best frontal frame
                  │ live
                  ▼
         compare the frontal frame's template: 1:1 against a reference (a claimed subject's enrolled template, or
         one read from a document), or 1:N against the TemplateStore gallery
                  │
                  ▼
         FaceDecision ──► audit event: outcome, method, similarity, threshold, liveness scores and method,
                          quality issues, model sha256, template hash — never a frame, never a template

The caller (the kiosk flow) supplies the camera, the engine, the liveness policy and a prompt callback that shows
each instruction on screen and speaks it. This module must never keep a frame beyond the attempt, never log one,
and never put a name, an ID number or a template into a record.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

import numpy as np

from drivers.camera import Camera, CameraError, CameraUnavailable, Frame
from models.face import FaceAnalysis, FaceEngine, FaceEngineError, Gallery, cosine_similarity
from models.liveness import Challenge, ChallengeSession, ChallengeState, LivenessChecker, LivenessDecision
from models.quality import message
from models.types import Embedding, QualityIssue
from protocol import AuditEvent, AuditOutcome, Clock
from protocol.payloads import AuditDetailValue
from terminal.face_templates import TemplateStore
from terminal.frame_window import FrameWindow, WindowExpiredError

logger = logging.getLogger(__name__)

CHALLENGE_PROMPTS: Final[dict[Challenge, tuple[str, str]]] = {
    Challenge.TURN_LEFT: ("请慢慢向左转头", "Please turn your head slowly to the left"),
    Challenge.TURN_RIGHT: ("请慢慢向右转头", "Please turn your head slowly to the right"),
    Challenge.NOD: ("请慢慢点头", "Please nod slowly"),
}


class FaceOutcome(StrEnum):
    """How an attempt ended. Only ACCEPTED lets a flow go on; every other outcome offers the non-face path."""

    ACCEPTED = "accepted"
    NO_MATCH = "no_match"
    LIVENESS_FAILED = "liveness_failed"
    TIMEOUT = "timeout"  # the window ran out before a good, live frame (last quality issues say why)
    CAMERA_FAULT = "camera_fault"
    NOT_ENROLLED = "not_enrolled"  # 1:N with an empty gallery, or 1:1 against a subject with no template


@dataclass(frozen=True, slots=True)
class Prompt:
    """An instruction for the citizen: Chinese and English text, and the challenge move when it is one."""

    zh: str
    en: str
    challenge: Challenge | None = None
    quality_issue: QualityIssue | None = None


@dataclass(frozen=True)
class FaceDecision:
    """The result of one attempt: everything here may be recorded; nothing here identifies a face by itself."""

    outcome: FaceOutcome
    method: str  # "face_1to1" or "face_1toN"
    subject_ref: str | None  # the claimed subject (1:1) or the matched one (1:N); pseudonymous
    similarity: float | None
    threshold: float
    liveness: LivenessDecision | None
    quality_issues: tuple[str, ...]
    model_sha256: str
    template_hash: str | None
    frames: int
    duration_ms: float
    challenge: tuple[str, ...] = field(default=())

    @property
    def accepted(self) -> bool:
        return self.outcome is FaceOutcome.ACCEPTED

    def audit_detail(self) -> dict[str, AuditDetailValue]:
        """The flat detail of the audit event: decision, scores, method, model hash, template hash."""
        detail: dict[str, AuditDetailValue] = {
            "decision": self.outcome.value,
            "method": self.method,
            "similarity": None if self.similarity is None else round(self.similarity, 4),
            "threshold": round(self.threshold, 4),
            "model_sha256": self.model_sha256[:16],
            "template_hash": self.template_hash,
            "frames": self.frames,
            "duration_ms": round(self.duration_ms, 1),
        }
        if self.liveness is not None:
            detail["liveness"] = "live" if self.liveness.live else "attack_suspected"
            detail["liveness_method"] = self.liveness.method[:256]
            for name, score in self.liveness.scores.items():
                detail[f"pad_{name}"] = score
            if self.liveness.failed:
                detail["liveness_failed"] = ",".join(self.liveness.failed)[:256]
        if self.quality_issues:
            detail["quality_issues"] = ",".join(self.quality_issues)[:256]
        if self.challenge:
            detail["challenge"] = ",".join(self.challenge)
        return detail

    def audit_outcome(self) -> AuditOutcome:
        return AuditOutcome.SUCCESS if self.accepted else AuditOutcome.FAILURE

    def audit_event(self) -> AuditEvent:
        """The record of this attempt for the outbox (category 'identity', action = method)."""
        return AuditEvent(
            category="identity",
            action=self.method,
            outcome=self.audit_outcome(),
            subject=self.subject_ref,
            detail=self.audit_detail(),
        )


def _template_of(analysis: FaceAnalysis) -> Embedding:
    if analysis.template is None:
        raise FaceEngineError("no template: the attempt accepted a frame without a face")
    return analysis.template


@dataclass(frozen=True)
class _MonotonicSeconds:
    """`models.liveness.Clock` (float seconds) on top of the terminal's `protocol.Clock`."""

    clock: Clock

    def now(self) -> float:
        return self.clock.monotonic()


@dataclass
class _Attempt:
    best: FaceAnalysis | None = None
    best_frame: Frame | None = None
    liveness: LivenessDecision | None = None
    issues: tuple[str, ...] = ()
    asked: int = -1  # index of the last challenge step prompted


class FaceVerifier:
    """Runs attempts on one camera. Not thread-safe: the kiosk's verification worker owns it."""

    def __init__(
        self,
        camera: Camera,
        engine: FaceEngine,
        liveness: LivenessChecker,
        templates: TemplateStore,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        window_s: float = 15.0,
        challenge_steps: int = 1,
        always_challenge: bool = False,
        challenge_window_s: float = 5.0,
        prompt: Callable[[Prompt], None] | None = None,
        record: Callable[[AuditEvent], object] | None = None,
    ) -> None:
        self.camera = camera
        self.engine = engine
        self.liveness = liveness
        self.templates = templates
        self.clock = clock
        self.rng = rng if rng is not None else random.SystemRandom()
        self.window_s = window_s
        self.challenge_steps = challenge_steps
        self.always_challenge = always_challenge
        self.challenge_window_s = challenge_window_s
        self.prompt = prompt or (lambda _p: None)
        self.record = record
        self.model_versions: dict[str, str] = {}  # model name -> sha256 prefix, for heartbeats

    # ------------------------------------------------------------------ public flows

    def verify(self, subject_ref: str) -> FaceDecision:
        """1:1 against `subject_ref`'s enrolled template."""
        gallery = self.templates.load_gallery()
        if subject_ref not in gallery.ids:
            return self._not_enrolled("face_1to1", subject_ref)
        reference = gallery.templates[gallery.ids.index(subject_ref)]
        return self.verify_template(reference, subject_ref=subject_ref)

    def verify_template(self, reference: Embedding, *, subject_ref: str | None = None) -> FaceDecision:
        """1:1 against a template the flow holds (e.g. computed from a document photo in memory)."""
        return self._run("face_1to1", lambda a: self._match_one(a, reference, subject_ref))

    def identify(self) -> FaceDecision:
        """1:N against the gallery (who of this pharmacy's staff is in front of the camera)."""
        gallery = self.templates.load_gallery()
        if not gallery.ids:
            return self._not_enrolled("face_1toN", None)
        return self._run("face_1toN", lambda a: self._match_gallery(a, gallery))

    def check_live(self) -> FaceDecision:
        """A live, good-quality face with no identity claim (method `face_liveness`): for a holder with no enrolled
        template, where only presence can be checked. The decision says so; it never names anyone."""
        return self._run("face_liveness", lambda _analysis: (FaceOutcome.ACCEPTED, None, None))

    def enrol(self, subject_ref: str) -> FaceDecision:
        """Capture a live, good-quality face and store it (sealed) as `subject_ref`'s template."""

        def store(analysis: FaceAnalysis) -> tuple[FaceOutcome, str | None, float | None]:
            self.templates.enrol(subject_ref, _template_of(analysis))
            return FaceOutcome.ACCEPTED, subject_ref, None

        return self._run("face_enrol", store)

    # ------------------------------------------------------------------ the attempt

    def _match_one(
        self, analysis: FaceAnalysis, reference: Embedding, subject_ref: str | None
    ) -> tuple[FaceOutcome, str | None, float | None]:
        similarity = cosine_similarity(_template_of(analysis), np.asarray(reference, dtype=np.float32))
        outcome = FaceOutcome.ACCEPTED if similarity >= self.engine.threshold else FaceOutcome.NO_MATCH
        return outcome, subject_ref, similarity

    def _match_gallery(self, analysis: FaceAnalysis, gallery: Gallery) -> tuple[FaceOutcome, str | None, float | None]:
        probe = _template_of(analysis)
        template = probe / max(float(np.linalg.norm(probe)), 1e-12)
        scores = gallery.templates @ template.astype(np.float32)
        best = int(np.argmax(scores))
        similarity = float(scores[best])
        if similarity >= self.engine.threshold:
            return FaceOutcome.ACCEPTED, gallery.ids[best], similarity
        return FaceOutcome.NO_MATCH, None, similarity

    def _run(
        self,
        method: str,
        decide: Callable[[FaceAnalysis], tuple[FaceOutcome, str | None, float | None]],
    ) -> FaceDecision:
        started = time.perf_counter()
        attempt = _Attempt()
        session: ChallengeSession | None = None
        frames = 0
        outcome: FaceOutcome | None = None
        with FrameWindow(self.clock, max_seconds=self.window_s) as window:
            try:
                while outcome is None:
                    frame = self.camera.read()
                    frames += 1
                    window.add(frame.rgb, frame.ir, frame.depth)
                    if session is None and frames == 1:
                        session = self._maybe_challenge(frame)
                    outcome = self._step(frame, attempt, session)
            except WindowExpiredError:
                outcome = FaceOutcome.TIMEOUT
            except CameraError as exc:
                logger.warning(
                    "face verification stopped: camera %s",
                    "unplugged" if isinstance(exc, CameraUnavailable) else "gave no frame",
                )
                outcome = FaceOutcome.CAMERA_FAULT
            subject_ref: str | None = None
            similarity: float | None = None
            template_hash: str | None = None
            if outcome is FaceOutcome.ACCEPTED and attempt.best is not None and attempt.best.template is not None:
                outcome, subject_ref, similarity = decide(attempt.best)
                template_hash = self.templates.template_hash(attempt.best.template)
            attempt.best_frame = None  # the window wipes the arrays; drop the reference too
        decision = FaceDecision(
            outcome=outcome,
            method=method,
            subject_ref=subject_ref,
            similarity=similarity,
            threshold=self.engine.threshold,
            liveness=attempt.liveness,
            quality_issues=attempt.issues,
            model_sha256=self.templates.model_sha256,
            template_hash=template_hash,
            frames=frames,
            duration_ms=(time.perf_counter() - started) * 1000.0,
            challenge=tuple(c.value for c in session.challenges) if session is not None else (),
        )
        logger.info(
            "face %s: %s (similarity %s, liveness %s, %d frames)",
            method,
            decision.outcome.value,
            "n/a" if similarity is None else f"{similarity:.3f}",
            "n/a" if attempt.liveness is None else attempt.liveness.method,
            frames,
        )
        return self._recorded(decision)

    def _recorded(self, decision: FaceDecision) -> FaceDecision:
        # The outbox sink raises if it refuses the event: the attempt then counts as not done.
        if self.record is not None:
            self.record(decision.audit_event())
        return decision

    def _maybe_challenge(self, frame: Frame) -> ChallengeSession | None:
        hardware = frame.ir is not None or frame.depth is not None
        if hardware and not self.always_challenge:
            return None
        return ChallengeSession(
            self.rng,
            _MonotonicSeconds(self.clock),
            steps=self.challenge_steps,
            window_s=self.challenge_window_s,
        )

    def _step(self, frame: Frame, attempt: _Attempt, session: ChallengeSession | None) -> FaceOutcome | None:
        """One frame. Returns the outcome once decided; ACCEPTED here means 'live and good', the match comes after."""
        analysis = self.engine.analyse(frame.rgb)
        if session is not None:
            state = session.observe(analysis.face)
            if state is ChallengeState.FAILED:
                attempt.liveness = self.liveness.decide([session.result()], hardware=False)
                return FaceOutcome.LIVENESS_FAILED
            if state is ChallengeState.PENDING and attempt.best is not None:
                self._ask(attempt, session)
        if attempt.best is None:
            if not analysis.quality.ok or analysis.face is None or analysis.template is None:
                attempt.issues = tuple(i.value for i in analysis.quality.issues)
                issue = analysis.quality.issues[0] if analysis.quality.issues else QualityIssue.NO_FACE
                self.prompt(Prompt(message(issue, "zh"), message(issue, "en"), quality_issue=issue))
                return None
            decision = self.liveness.assess(frame.rgb, analysis.face, ir=frame.ir, depth=frame.depth, challenge=None)
            hardware_failed = [f for f in decision.failed if not f.startswith("challenge:")]
            if hardware_failed:
                attempt.liveness = decision
                return FaceOutcome.LIVENESS_FAILED
            attempt.best, attempt.best_frame, attempt.liveness, attempt.issues = analysis, frame, decision, ()
            if session is not None:
                self._ask(attempt, session)
        if session is None:
            return FaceOutcome.ACCEPTED
        if session.state is ChallengeState.PASSED:
            best, kept = attempt.best, attempt.best_frame
            if best is None or best.face is None or kept is None:
                return None  # the challenge finished before a good frontal frame: keep looking for one
            attempt.liveness = self.liveness.assess(
                kept.rgb, best.face, ir=kept.ir, depth=kept.depth, challenge=session.result()
            )
            return FaceOutcome.ACCEPTED if attempt.liveness.live else FaceOutcome.LIVENESS_FAILED
        return None

    def _ask(self, attempt: _Attempt, session: ChallengeSession) -> None:
        """Prompt the current challenge move once (a new prompt only when the move changes)."""
        move = session.current
        if move is not None and (attempt.asked < session.step_index):
            attempt.asked = session.step_index
            zh, en = CHALLENGE_PROMPTS[move]
            self.prompt(Prompt(zh, en, challenge=move))

    def _not_enrolled(self, method: str, subject_ref: str | None) -> FaceDecision:
        return self._recorded(
            FaceDecision(
                outcome=FaceOutcome.NOT_ENROLLED,
                method=method,
                subject_ref=subject_ref,
                similarity=None,
                threshold=self.engine.threshold,
                liveness=None,
                quality_issues=(),
                model_sha256=self.templates.model_sha256,
                template_hash=None,
                frames=0,
                duration_ms=0.0,
            )
        )
