"""Pharmacists at the terminal (P-01, P-02, H-08; docs/pharmacists.md): roster, face enrolment checked against the
ID card (人证比对) with consent, sign-in / sign-out by face, the closing hour, periodic re-verification.

Owns:

* `PharmacistStore`: one SQLite file with the roster of this terminal's institution (code, masked name, masked ID
  number, template state), the consents given and the attendance sessions opened here. No clear name, no clear ID
  number, no template (those live sealed in the pharmacist gallery, a `terminal.face_templates.TemplateStore` of
  its own, so 1:N never compares a pharmacist with anyone else);
* `PharmacistDesk`, the flows the kiosk UI calls (no Kivy here):
  - `sync_roster`: `GET /device/v1/pharmacists`, templates opened with the session key they were sealed under and
    re-sealed in the gallery; pharmacists no longer listed lose their template;
  - `enrol`: ID card read → its photo decoded (`IdPhotoDecoder`, the reader vendor's licensed WLT library) → a live
    face captured with liveness (`FaceVerifier.enrol`) → 人证比对 (live template vs the photo's, the engine's
    threshold) → consent recorded → a signed `pharmacist_enrolment` record → the template uploaded sealed;
  - `sign_in` (1:N among the institution's pharmacists) / `sign_out` → signed `sign_in` / `sign_out` records;
  - `close_overdue` (the configured closing hour, reason `auto_closed`), `reverification_due` / `reverify`
    (a failed re-verification closes the session, reason `reverification_failed`);
  - `records` (this terminal's sessions of one pharmacist) and `server_records` (all of them, P-02);
  - `purge` / `purge_all`: the `template_purge` command and `unbind` remove templates.
* `PharmacistCommands`: the `roster_update` and `template_purge` handlers and the `unbind` purge hook, built before
  the desk exists (the command registry is) and attached to it once it does;
* `OnDuty`: who is signed in here, for the prescription review (`terminal.review.SignedInPharmacist`);
* `RosterSyncWorker`: a thread that runs `sync_roster` at start, on `roster_update`, and every few hours;
  `ClosingHourWorker`: a thread that runs `close_overdue` once a minute.

It must never log or record a name, an ID number, an ID-card photo or a template, and never keep the card's data
beyond the enrolment call.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import sqlite3
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar, cast
from zoneinfo import ZoneInfo

import numpy as np
from numpy.typing import NDArray
from pydantic import JsonValue, ValidationError

from drivers.card_reader import CardReaderError
from drivers.idcard import IdCardData
from models.face import cosine_similarity
from models.types import RgbImage
from protocol import (
    AuditEvent,
    AuditOutcome,
    Clock,
    CommandKind,
    CommandOutcome,
    ContractError,
    DeviceCommand,
    Envelope,
    parse_command_args,
)
from protocol.downlink import TemplatePurgeArgs
from protocol.payloads import SignedRecordKind
from protocol.pharmacist import (
    AttendancePage,
    FaceDecisionValue,
    FaceEvidence,
    LivenessValue,
    PharmacistEnrolmentRecord,
    Roster,
    SignInRecord,
    SignOutReason,
    SignOutRecord,
    TemplateDirection,
    TemplateUpload,
    close_moment,
    open_template,
    seal_template,
    template_aad,
)
from protocol.secure import SessionKey
from terminal.commands import CommandHandler, HandlerOutcome
from terminal.config import PharmacistsConfig
from terminal.errors import TerminalError
from terminal.face_templates import TemplateStore
from terminal.verification import FaceDecision, FaceVerifier

logger = logging.getLogger(__name__)

ROSTER_PATH: Final = "/device/v1/pharmacists"
SESSIONS_PATH: Final = "/device/v1/pharmacist-sessions"
ROSTER_RESYNC_S: Final = 6 * 3600.0
"""The roster is fetched again this often even without a `roster_update` notice (a notice can expire unseen)."""


class PharmacistError(TerminalError):
    """A pharmacist flow cannot go on: the terminal is not bound, the pharmacist is not on the roster, no consent,
    the store cannot be read or written. The message never holds personal data."""


class PharmacistApi(Protocol):
    """The device-authenticated HTTP API (`terminal.server_api.ServerApi`): JSON in, JSON out, signed with the
    current session key; errors are `TerminalError`s."""

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any: ...

    def post_json(self, path: str, body: Mapping[str, Any]) -> Any: ...


class SessionKeys(Protocol):
    """The terminal's session keys (`terminal.session.SessionManager`)."""

    def current(self) -> SessionKey | None: ...

    def key_for(self, key_id: object) -> SessionKey | None: ...


class IdCardSource(Protocol):
    """The ID-card reader (`drivers.idcard.IdCardReader`)."""

    def read_card(self, timeout_s: float = 5.0) -> IdCardData: ...


IdPhotoDecoder = Callable[[bytes], RgbImage]
"""The ID card's WLT-compressed photo -> an RGB image. Decoding WLT needs the reader vendor's licensed library;
the kiosk passes its adapter in (tests pass a fake). `ValueError` when the bytes cannot be decoded."""


class TemplateState(StrEnum):
    NONE = "none"
    PENDING_UPLOAD = "pending_upload"
    """Enrolled here; the server has not accepted the upload yet (retried at the next roster sync)."""
    SYNCED = "synced"


@dataclass(frozen=True, slots=True)
class RosterMember:
    code: str
    name_masked: str
    id_number_masked: str | None
    template: TemplateState


@dataclass(frozen=True, slots=True)
class Consent:
    """The pharmacist agreed to face enrolment: which text version, when (terminal wall clock)."""

    version: str
    agreed_at: dt.datetime


@dataclass(frozen=True, slots=True)
class LocalSession:
    """An attendance session opened at this terminal."""

    session_id: uuid.UUID
    code: str
    institution_code: str
    signed_in_at: dt.datetime
    signed_out_at: dt.datetime | None
    reason: SignOutReason | None
    last_verified_at: dt.datetime

    @property
    def open(self) -> bool:
        return self.signed_out_at is None


_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS roster (
        code TEXT PRIMARY KEY, name_masked TEXT NOT NULL, id_number_masked TEXT, template TEXT NOT NULL,
        id_photo_similarity REAL
    ) STRICT""",
    """CREATE TABLE IF NOT EXISTS consent (
        code TEXT NOT NULL, version TEXT NOT NULL, agreed_at TEXT NOT NULL, PRIMARY KEY (code, version)
    ) STRICT""",
    """CREATE TABLE IF NOT EXISTS attendance (
        session_id TEXT PRIMARY KEY, code TEXT NOT NULL, institution_code TEXT NOT NULL, signed_in_at TEXT NOT NULL,
        signed_out_at TEXT, reason TEXT, last_verified_at TEXT NOT NULL
    ) STRICT""",
    "CREATE INDEX IF NOT EXISTS attendance_code ON attendance (code, signed_in_at)",
)


def _when(text: str | None) -> dt.datetime | None:
    return None if text is None else dt.datetime.fromisoformat(text)


class PharmacistStore:
    """Roster, consents and sessions in one SQLite file. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            for statement in _SCHEMA:
                self._db.execute(statement)
            path.chmod(0o600)
        except (OSError, sqlite3.Error) as exc:
            raise PharmacistError(f"cannot open the pharmacist store {path}: {type(exc).__name__}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise PharmacistError(f"the pharmacist store failed: {type(exc).__name__}") from exc

    # roster
    def members(self) -> dict[str, RosterMember]:
        rows = self._run("SELECT code, name_masked, id_number_masked, template FROM roster ORDER BY code")
        return {r[0]: RosterMember(r[0], r[1], r[2], TemplateState(r[3])) for r in rows}

    def member(self, code: str) -> RosterMember | None:
        return self.members().get(code)

    def put_member(self, code: str, name_masked: str, id_number_masked: str | None) -> None:
        self._run(
            "INSERT INTO roster (code, name_masked, id_number_masked, template) VALUES (?, ?, ?, 'none') "
            "ON CONFLICT (code) DO UPDATE SET name_masked = excluded.name_masked, "
            "id_number_masked = excluded.id_number_masked",
            (code, name_masked, id_number_masked),
        )

    def set_template_state(self, code: str, state: TemplateState, *, id_photo_similarity: float | None = None) -> None:
        """`id_photo_similarity`: the 人证比对 score of an enrolment made here (uploaded with the template)."""
        self._run(
            "UPDATE roster SET template = ?, id_photo_similarity = coalesce(?, id_photo_similarity) WHERE code = ?",
            (state.value, id_photo_similarity, code),
        )

    def id_photo_similarity(self, code: str) -> float | None:
        rows = self._run("SELECT id_photo_similarity FROM roster WHERE code = ?", (code,))
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    def remove_member(self, code: str) -> None:
        self._run("DELETE FROM roster WHERE code = ?", (code,))

    def clear_roster(self) -> None:
        self._run("DELETE FROM roster")

    # consent
    def record_consent(self, code: str, consent: Consent) -> None:
        self._run(
            "INSERT OR REPLACE INTO consent (code, version, agreed_at) VALUES (?, ?, ?)",
            (code, consent.version, consent.agreed_at.isoformat()),
        )

    def consents(self, code: str) -> list[Consent]:
        rows = self._run("SELECT version, agreed_at FROM consent WHERE code = ? ORDER BY agreed_at", (code,))
        return [Consent(v, dt.datetime.fromisoformat(a)) for v, a in rows]

    # sessions
    def _session(self, row: tuple[Any, ...]) -> LocalSession:
        when_in, when_out, verified = _when(row[3]), _when(row[4]), _when(row[6])
        if when_in is None or verified is None:  # NOT NULL columns; narrows the types
            raise PharmacistError("the pharmacist store holds a malformed session")
        return LocalSession(
            uuid.UUID(row[0]),
            row[1],
            row[2],
            when_in,
            when_out,
            None if row[5] is None else SignOutReason(row[5]),
            verified,
        )

    _COLUMNS: Final = "session_id, code, institution_code, signed_in_at, signed_out_at, reason, last_verified_at"

    def open_sessions(self) -> list[LocalSession]:
        rows = self._run(
            f"SELECT {self._COLUMNS} FROM attendance WHERE signed_out_at IS NULL ORDER BY signed_in_at"  # noqa: S608
        )
        return [self._session(r) for r in rows]

    def open_session(self, code: str) -> LocalSession | None:
        return next((s for s in self.open_sessions() if s.code == code), None)

    def sessions_of(self, code: str, limit: int = 100) -> list[LocalSession]:
        rows = self._run(
            f"SELECT {self._COLUMNS} FROM attendance WHERE code = ? "  # noqa: S608
            "ORDER BY signed_in_at DESC LIMIT ?",
            (code, limit),
        )
        return [self._session(r) for r in rows]

    def add_session(self, s: LocalSession) -> None:
        self._run(
            f"INSERT INTO attendance ({self._COLUMNS}) VALUES (?, ?, ?, ?, NULL, NULL, ?)",  # noqa: S608
            (str(s.session_id), s.code, s.institution_code, s.signed_in_at.isoformat(), s.last_verified_at.isoformat()),
        )

    def close_session(self, session_id: uuid.UUID, at: dt.datetime, reason: SignOutReason) -> None:
        self._run(
            "UPDATE attendance SET signed_out_at = ?, reason = ? WHERE session_id = ? AND signed_out_at IS NULL",
            (at.isoformat(), reason.value, str(session_id)),
        )

    def verified(self, session_id: uuid.UUID, at: dt.datetime) -> None:
        self._run("UPDATE attendance SET last_verified_at = ? WHERE session_id = ?", (at.isoformat(), str(session_id)))


# ---------------------------------------------------------------- results


class EnrolmentOutcome(StrEnum):
    ENROLLED = "enrolled"
    CARD_UNREADABLE = "card_unreadable"
    CARD_NOT_THE_PHARMACISTS = "card_not_the_pharmacists"
    """The card's masked ID number differs from the roster's (someone else's card)."""
    ID_PHOTO_UNUSABLE = "id_photo_unusable"
    FACE_NOT_ACCEPTED = "face_not_accepted"
    """No live, good-quality face (liveness failed, timeout, camera fault): the decision says which."""
    ID_PHOTO_MISMATCH = "id_photo_mismatch"
    """人证比对 failed: the live face is not the person of the ID-card photo."""


@dataclass(frozen=True, slots=True)
class EnrolmentResult:
    outcome: EnrolmentOutcome
    decision: FaceDecision | None = None
    id_photo_similarity: float | None = None
    uploaded: bool = False
    envelope: Envelope | None = None

    @property
    def enrolled(self) -> bool:
        return self.outcome is EnrolmentOutcome.ENROLLED


@dataclass(frozen=True, slots=True)
class AttendanceResult:
    """A sign-in or sign-out attempt: the face decision, and the session when one was opened or closed."""

    decision: FaceDecision
    session: LocalSession | None = None
    envelope: Envelope | None = None
    detail: str = ""
    """Why nothing happened although the face was accepted ('already_signed_in', 'not_signed_in', 'not_on_roster')."""

    @property
    def ok(self) -> bool:
        return self.session is not None and not self.detail


def _evidence(decision: FaceDecision) -> FaceEvidence:
    liveness = decision.liveness
    return FaceEvidence(
        face_similarity=None if decision.similarity is None else round(decision.similarity, 4),
        face_threshold=round(decision.threshold, 4),
        face_decision=FaceDecisionValue(decision.outcome.value),
        liveness=None if liveness is None else LivenessValue.LIVE if liveness.live else LivenessValue.ATTACK_SUSPECTED,
        liveness_method=None if liveness is None else liveness.method[:64],
        template_hash=decision.template_hash,
        model_sha256=decision.model_sha256,
    )


def _id_matches(masked: str | None, number: str) -> bool:
    """Does the card's number fit the roster's masked one (head 3 and tail 2 characters, the same length)?"""
    if masked is None:
        return True  # the HIS sent no 证件号码: the face-to-photo match alone decides
    number = number.strip().upper()
    masked = masked.upper()
    return len(masked) == len(number) and masked[:3] == number[:3] and masked[-2:] == number[-2:]


# ---------------------------------------------------------------- the desk

_F = TypeVar("_F", bound=Callable[..., Any])


def _serialised(method: _F) -> _F:
    """Run a desk method under the desk's lock (re-entrant: flows call one another)."""

    @functools.wraps(method)
    def locked(self: PharmacistDesk, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return cast(_F, locked)


class PharmacistDesk:
    """The pharmacist flows at one terminal. Called from the kiosk's worker thread (one flow at a time); the roster
    sync and the purge commands may run beside it (the stores are thread-safe)."""

    def __init__(
        self,
        config: PharmacistsConfig,
        store: PharmacistStore,
        verifier: FaceVerifier,
        clock: Clock,
        *,
        device_id: str,
        institution: Callable[[], str | None],
        record_signed: Callable[[SignedRecordKind, dict[str, JsonValue]], Envelope],
        record_audit: Callable[[AuditEvent], object],
        api: PharmacistApi | None = None,
        keys: SessionKeys | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.verifier = verifier
        self.templates = verifier.templates
        self.clock = clock
        self.device_id = device_id
        self.institution = institution
        self.record_signed = record_signed
        self.record_audit = record_audit
        self.api = api
        self.keys = keys
        self.tz = ZoneInfo(config.timezone)
        # One flow at a time: a roster sync or a purge must not remove a template an enrolment just captured, and
        # the closing-hour thread must not close a session a sign-out is closing.
        self._lock = threading.RLock()

    def close(self) -> None:
        self.store.close()
        self.templates.close()

    def _institution(self) -> str:
        code = self.institution()
        if code is None:
            raise PharmacistError("this terminal is not bound to an institution")
        return code

    def _audit(
        self, action: str, outcome: AuditOutcome, subject: str | None, **detail: str | int | float | None
    ) -> None:
        self.record_audit(
            AuditEvent(category="pharmacist", action=action, outcome=outcome, subject=subject, detail=detail)
        )

    # ---------------------------------------------------------------- roster

    def roster(self) -> dict[str, RosterMember]:
        return self.store.members()

    def sync_roster(self) -> int:
        """Fetch the institution's roster and templates; returns the number of pharmacists listed.
        `PharmacistError` without a server API or session key; the server's errors pass through."""
        api, keys = self._online()
        with self._lock:
            raw = api.get_json(ROSTER_PATH)
            try:
                roster = Roster.model_validate(raw)
            except ValidationError as exc:
                raise PharmacistError("the server's roster is malformed") from exc
            local = self.store.members()
            listed = {entry.code for entry in roster.pharmacists}
            for entry in roster.pharmacists:
                self.store.put_member(entry.code, entry.name_masked, entry.id_number_masked)
                state = local[entry.code].template if entry.code in local else TemplateState.NONE
                if state is TemplateState.PENDING_UPLOAD:
                    continue  # enrolled here after the server's copy: ours is newer and is uploaded below
                if entry.template is None:
                    if self.templates.remove(entry.code):
                        logger.info("pharmacist %s: template withdrawn by the server", entry.code)
                    self.store.set_template_state(entry.code, TemplateState.NONE)
                    continue
                if entry.template.model_sha256 != self.templates.model_sha256:
                    logger.warning("pharmacist %s: the server's template is of another model; skipped", entry.code)
                    continue
                key = keys.key_for(entry.template.key_id)
                if key is None:
                    raise PharmacistError("the roster was sealed under a session key this terminal no longer holds")
                aad = template_aad(TemplateDirection.DOWNLOAD, self.device_id, entry.code, entry.template.model_sha256)
                try:
                    vector = open_template(key.key, entry.template.sealed, aad, entry.template.dims)
                except ContractError as exc:
                    raise PharmacistError(f"pharmacist {entry.code}: the template does not open") from exc
                self.templates.enrol(entry.code, vector)
                self.store.set_template_state(entry.code, TemplateState.SYNCED)
            for code in set(local) - listed:
                self._forget(code)
            for code, member in self.store.members().items():
                if member.template is TemplateState.PENDING_UPLOAD:
                    self._upload(code)
        logger.info("pharmacist roster synced: %d listed", len(listed))
        return len(listed)

    def _online(self) -> tuple[PharmacistApi, SessionKeys]:
        if self.api is None or self.keys is None:
            raise PharmacistError("no server API: the terminal has no enrolled identity or server URL")
        return self.api, self.keys

    def _forget(self, code: str) -> None:
        self.templates.remove(code)
        self.store.remove_member(code)

    @_serialised
    def purge(self, code: str | None) -> int:
        """Delete one pharmacist's template (they left) or, with None, every pharmacist template and the roster.
        Idempotent; returns the number of templates deleted."""
        if code is None:
            return self.purge_all()
        removed = int(self.templates.remove(code))
        self.store.remove_member(code)
        logger.info("pharmacist %s: template purged", code)
        return removed

    @_serialised
    def purge_all(self) -> int:
        removed = sum(int(self.templates.remove(ref)) for ref in self.templates.subjects())
        self.store.clear_roster()
        logger.info("every pharmacist template purged (%d)", removed)
        return removed

    # ---------------------------------------------------------------- enrolment

    @_serialised
    def enrol(
        self,
        code: str,
        *,
        card_reader: IdCardSource,
        decode_photo: IdPhotoDecoder,
        consent: Consent | None,
        card_timeout_s: float = 10.0,
    ) -> EnrolmentResult:
        """Enrol `code`'s face: ID card, 人证比对 with liveness, consent, signed record, upload (docs/pharmacists.md).

        `PharmacistError` when it cannot start (not bound, not on the roster, no consent). Every other failure is
        an `EnrolmentResult` the kiosk explains; only `enrolled` leaves a template behind."""
        institution = self._institution()
        member = self.store.member(code)
        if member is None:
            raise PharmacistError(f"pharmacist {code} is not on this institution's roster (HIS sync first)")
        if consent is None:
            raise PharmacistError("face enrolment needs the pharmacist's consent first")
        try:
            card = card_reader.read_card(card_timeout_s)
        except CardReaderError as exc:
            logger.info("pharmacist enrolment: the ID card could not be read (%s)", type(exc).__name__)
            return self._enrol_failed(code, EnrolmentOutcome.CARD_UNREADABLE)
        matches = _id_matches(member.id_number_masked, card.id_number)
        photo = card.photo_wlt
        del card  # nothing but the photo is needed from here on
        if not matches:
            return self._enrol_failed(code, EnrolmentOutcome.CARD_NOT_THE_PHARMACISTS)
        reference = self._photo_template(photo, decode_photo)
        if reference is None:
            return self._enrol_failed(code, EnrolmentOutcome.ID_PHOTO_UNUSABLE)
        had_template = code in self.templates.subjects()
        decision = self.verifier.enrol(code)
        if not decision.accepted:
            return self._enrol_failed(code, EnrolmentOutcome.FACE_NOT_ACCEPTED, decision)
        gallery = self.templates.load_gallery()
        live = gallery.templates[gallery.ids.index(code)]
        similarity = cosine_similarity(live, reference)
        if similarity < self.verifier.engine.threshold:
            self.templates.remove(code)
            if had_template:  # the earlier template was overwritten by this capture: it must come back by sync
                self.store.set_template_state(code, TemplateState.NONE)
            return self._enrol_failed(code, EnrolmentOutcome.ID_PHOTO_MISMATCH, decision, similarity)
        now = self.clock.now()
        self.store.record_consent(code, consent)
        self.store.set_template_state(code, TemplateState.PENDING_UPLOAD, id_photo_similarity=similarity)
        evidence = _evidence(decision)
        record = PharmacistEnrolmentRecord(
            **evidence.model_dump(),
            pharmacist_code=code,
            institution_code=institution,
            id_photo_similarity=round(similarity, 4),
            consent_version=consent.version,
            consent_at=consent.agreed_at,
            enrolled_at=now,
        )
        envelope = self.record_signed(SignedRecordKind.PHARMACIST_ENROLMENT, record.to_record())
        uploaded = False
        if self.api is not None and self.keys is not None:
            try:
                uploaded = self._upload(code)
            except TerminalError as exc:
                logger.warning("pharmacist %s: template upload failed, retried at the next sync (%s)", code, exc)
        return EnrolmentResult(EnrolmentOutcome.ENROLLED, decision, similarity, uploaded, envelope)

    def _enrol_failed(
        self,
        code: str,
        outcome: EnrolmentOutcome,
        decision: FaceDecision | None = None,
        similarity: float | None = None,
    ) -> EnrolmentResult:
        self._audit(
            "pharmacist.enrolment",
            AuditOutcome.FAILURE,
            code,
            reason=outcome.value,
            id_photo_similarity=None if similarity is None else round(similarity, 4),
        )
        return EnrolmentResult(outcome, decision, similarity)

    def _photo_template(self, photo: bytes, decode: IdPhotoDecoder) -> NDArray[np.float32] | None:
        try:
            rgb = decode(photo)
        except ValueError:
            return None
        analysis = self.verifier.engine.analyse(rgb)
        # An ID-card photo is small and flat: the kiosk's quality gate (made for live frames) does not apply, a
        # detected face with a template is what counts.
        return None if analysis.template is None else np.asarray(analysis.template, dtype=np.float32)

    def _upload(self, code: str) -> bool:
        """Upload `code`'s local template sealed under the current session key; True when the server took it."""
        api, keys = self._online()
        gallery = self.templates.load_gallery()
        if code not in gallery.ids:
            return False
        consents = self.store.consents(code)
        if not consents:
            raise PharmacistError(f"pharmacist {code}: no consent recorded; not uploading")
        consent = consents[-1]
        similarity = self.store.id_photo_similarity(code)
        if similarity is None:
            raise PharmacistError(f"pharmacist {code}: no 人证比对 score recorded; not uploading")
        vector = gallery.templates[gallery.ids.index(code)]
        for attempt in range(2):
            key = keys.current()
            if key is None:
                raise PharmacistError("no session key: the template is uploaded once the terminal is online")
            aad = template_aad(TemplateDirection.UPLOAD, self.device_id, code, self.templates.model_sha256)
            body = TemplateUpload(
                key_id=key.key_id,
                sealed=seal_template(key.key, vector, aad),
                model_sha256=self.templates.model_sha256,
                dims=int(vector.size),
                consent_version=consent.version,
                consent_at=consent.agreed_at,
                id_photo_similarity=round(similarity, 4),
            )
            try:
                api.post_json(f"{ROSTER_PATH}/{code}/template", body.model_dump(mode="json"))
            except TerminalError as exc:
                if attempt == 0 and getattr(exc, "status", None) == 409:
                    continue  # the session key rotated between sealing and signing: seal again
                raise
            self.store.set_template_state(code, TemplateState.SYNCED)
            logger.info("pharmacist %s: template uploaded", code)
            return True
        return False

    # ---------------------------------------------------------------- attendance

    @_serialised
    def sign_in(self) -> AttendanceResult:
        """Find the pharmacist in front of the camera among the institution's (1:N) and open their session."""
        institution = self._institution()
        self.close_overdue()
        decision = self.verifier.identify()
        if not decision.accepted or decision.subject_ref is None:
            return AttendanceResult(decision)
        code = decision.subject_ref
        if self.store.member(code) is None:
            return AttendanceResult(decision, detail="not_on_roster")
        current = self.store.open_session(code)
        if current is not None:
            return AttendanceResult(decision, current, detail="already_signed_in")
        now = self.clock.now()
        session = LocalSession(uuid.uuid4(), code, institution, now, None, None, now)
        record = SignInRecord(
            **_evidence(decision).model_dump(),
            pharmacist_code=code,
            institution_code=institution,
            session_id=session.session_id,
            signed_in_at=now,
        )
        envelope = self.record_signed(SignedRecordKind.SIGN_IN, record.to_record())
        self.store.add_session(session)
        logger.info("pharmacist %s signed in (session %s)", code, session.session_id)
        return AttendanceResult(decision, session, envelope)

    @_serialised
    def sign_out(self) -> AttendanceResult:
        """Find the pharmacist in front of the camera (1:N) and close their open session."""
        self._institution()
        self.close_overdue()
        decision = self.verifier.identify()
        if not decision.accepted or decision.subject_ref is None:
            return AttendanceResult(decision)
        current = self.store.open_session(decision.subject_ref)
        if current is None:
            return AttendanceResult(decision, detail="not_signed_in")
        closed, envelope = self._close(current, self.clock.now(), SignOutReason.SIGNED_OUT, decision)
        return AttendanceResult(decision, closed, envelope)

    def _close(
        self, session: LocalSession, at: dt.datetime, reason: SignOutReason, decision: FaceDecision | None
    ) -> tuple[LocalSession, Envelope]:
        record = SignOutRecord(
            pharmacist_code=session.code,
            institution_code=session.institution_code,
            session_id=session.session_id,
            signed_in_at=session.signed_in_at,
            signed_out_at=at,
            reason=reason,
            face=None if decision is None else _evidence(decision),
        )
        envelope = self.record_signed(SignedRecordKind.SIGN_OUT, record.to_record())
        self.store.close_session(session.session_id, at, reason)
        logger.info("pharmacist %s signed out (%s)", session.code, reason.value)
        closed = LocalSession(
            session.session_id,
            session.code,
            session.institution_code,
            session.signed_in_at,
            at,
            reason,
            session.last_verified_at,
        )
        return closed, envelope

    @_serialised
    def close_overdue(self) -> list[LocalSession]:
        """Close every open session whose closing hour has passed, at that hour (reason `auto_closed`)."""
        now = self.clock.now()
        closed: list[LocalSession] = []
        for session in self.store.open_sessions():
            moment = close_moment(session.signed_in_at, self.config.close_hour, self.tz)
            if moment <= now:
                closed.append(self._close(session, moment, SignOutReason.AUTO_CLOSED, None)[0])
        return closed

    def reverification_due(self) -> list[LocalSession]:
        """Open sessions whose pharmacist should show their face again now (none when re-verification is off)."""
        if self.config.reverify_every_min is None:
            return []
        interval = dt.timedelta(minutes=self.config.reverify_every_min)
        now = self.clock.now()
        return [s for s in self.store.open_sessions() if s.last_verified_at + interval <= now]

    @_serialised
    def reverify(self, code: str) -> AttendanceResult:
        """1:1 against `code`'s template: accepted keeps the session (next check one interval later); anything else
        closes it (reason `reverification_failed`), because nobody can say the pharmacist is still there."""
        session = self.store.open_session(code)
        if session is None:
            raise PharmacistError(f"pharmacist {code} is not signed in")
        decision = self.verifier.verify(code)
        now = self.clock.now()
        if decision.accepted:
            self.store.verified(session.session_id, now)
            self._audit(
                "pharmacist.reverified",
                AuditOutcome.SUCCESS,
                code,
                session_id=str(session.session_id),
                similarity=None if decision.similarity is None else round(decision.similarity, 4),
            )
            return AttendanceResult(decision, self.store.open_session(code))
        closed, envelope = self._close(session, now, SignOutReason.REVERIFICATION_FAILED, decision)
        return AttendanceResult(decision, closed, envelope, detail="reverification_failed")

    # ---------------------------------------------------------------- queries (P-02)

    def records(self, code: str, limit: int = 100) -> list[LocalSession]:
        """This terminal's sessions of `code`, newest first (works offline)."""
        self.close_overdue()
        return self.store.sessions_of(code, limit)

    def server_records(self, code: str, limit: int = 100) -> AttendancePage:
        """Every session of `code` at this institution as the server has them (all its terminals)."""
        api, _keys = self._online()
        raw = api.get_json(SESSIONS_PATH, {"pharmacist": code, "limit": str(limit)})
        try:
            return AttendancePage.model_validate(raw)
        except ValidationError as exc:
            raise PharmacistError("the server's attendance records are malformed") from exc


class OnDuty:
    """`terminal.review.SignedInPharmacist` on a desk: the pharmacist who signed in here most recently and whose
    session is still open, with their template (the review confirms decisions 1:1 against it); None when nobody
    is signed in or their template is gone (purged)."""

    def __init__(self, desk: PharmacistDesk) -> None:
        self.desk = desk

    def current(self) -> tuple[str, NDArray[np.float32]] | None:
        self.desk.close_overdue()
        sessions = self.desk.store.open_sessions()
        if not sessions:
            return None
        code = max(sessions, key=lambda s: s.signed_in_at).code
        gallery = self.desk.templates.load_gallery()
        if code not in gallery.ids:
            return None
        return code, gallery.templates[gallery.ids.index(code)]


def open_desk(
    config: PharmacistsConfig,
    face: FaceVerifier,
    template_key: bytes,
    clock: Clock,
    **kwargs: Any,
) -> PharmacistDesk:
    """A desk on the kiosk's face verifier (same camera, engine, liveness policy and prompts) with the pharmacists'
    own sealed gallery, and its store opened from `config`."""
    gallery = TemplateStore(config.gallery, template_key, model_sha256=face.templates.model_sha256)
    verifier = FaceVerifier(
        face.camera,
        face.engine,
        face.liveness,
        gallery,
        clock,
        rng=face.rng,
        window_s=face.window_s,
        challenge_steps=face.challenge_steps,
        always_challenge=face.always_challenge,
        challenge_window_s=face.challenge_window_s,
        prompt=face.prompt,
        record=face.record,
    )
    try:
        store = PharmacistStore(config.store)
    except PharmacistError:
        gallery.close()
        raise
    return PharmacistDesk(config, store, verifier, clock, **kwargs)


# ---------------------------------------------------------------- commands and the sync thread


class PharmacistCommands:
    """`roster_update`, `template_purge` and the `unbind` purge, registered before the desk exists."""

    def __init__(self) -> None:
        self.desk: PharmacistDesk | None = None
        self.sync_requested = threading.Event()

    def attach(self, desk: PharmacistDesk) -> None:
        self.desk = desk

    def roster_update(self, command: DeviceCommand) -> HandlerOutcome:
        if self.desk is None:
            return HandlerOutcome(CommandOutcome.REJECTED, "pharmacists are not configured on this terminal")
        # Handlers never talk to the network: the sync thread fetches the roster.
        self.sync_requested.set()
        return HandlerOutcome(CommandOutcome.APPLIED, "roster sync requested")

    def template_purge(self, command: DeviceCommand) -> HandlerOutcome:
        args = parse_command_args(command.kind, command.args)
        if not isinstance(args, TemplatePurgeArgs):
            return HandlerOutcome(CommandOutcome.REJECTED, "not a template purge")
        if self.desk is None:
            return HandlerOutcome(CommandOutcome.APPLIED, "no pharmacist templates on this terminal")
        removed = self.desk.purge(args.pharmacist_code)
        return HandlerOutcome(CommandOutcome.APPLIED, f"{removed} template(s) purged")

    def purge_all(self) -> int:
        return 0 if self.desk is None else self.desk.purge_all()

    def handlers(self) -> dict[CommandKind, CommandHandler]:
        return {CommandKind.ROSTER_UPDATE: self.roster_update, CommandKind.TEMPLATE_PURGE: self.template_purge}


class RosterSyncWorker:
    """Runs `sync_roster` at start, whenever `roster_update` asks, and every `ROSTER_RESYNC_S`."""

    def __init__(self, desk: PharmacistDesk, requested: threading.Event, *, every_s: float = ROSTER_RESYNC_S) -> None:
        self.desk = desk
        self.requested = requested
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        requested.set()  # a first sync at start

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pharmacist-roster", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self.requested.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.requested.wait(self.every_s)
            if self._stop.is_set():
                return
            self.requested.clear()
            try:
                self.desk.sync_roster()
            except TerminalError as exc:
                if not self._failing:  # once on failure, once on recovery
                    logger.warning("pharmacist roster sync failed: %s", exc)
                self._failing = True
                self._stop.wait(30.0)
                self.requested.set()
                continue
            if self._failing:
                logger.info("pharmacist roster sync works again")
            self._failing = False


class ClosingHourWorker:
    """Closes sessions at the configured hour even when nobody touches the kiosk (`PharmacistDesk.close_overdue`
    once a minute)."""

    def __init__(self, desk: PharmacistDesk, *, every_s: float = 60.0) -> None:
        self.desk = desk
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pharmacist-closing-hour", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.every_s):
            try:
                self.desk.close_overdue()
            except TerminalError as exc:  # the outbox full, the store unwritable: said once, tried again
                if not failing:
                    logger.warning("closing open pharmacist sessions failed: %s", exc)
                failing = True
                continue
            failing = False
