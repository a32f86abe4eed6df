"""The staff view-models' ports implemented over a running terminal (`terminal.runtime.TerminalRuntime`).

Owns the translation from the terminal's pharmacist desk (`terminal.pharmacists`), review desk and inbox
(`terminal.review`) and binding store (`terminal.binding`) into the kiosk's plain results: masked names, the
医保药师代码, times formatted in the pharmacy's time zone, reasons as i18n keys, the drug-rule findings in words.
For the institution head's binding application it reads the 医保码 (through the e-voucher service) or the ID card,
checks the face and has the record signed. Every personal value leaves here masked; the applicant becomes a
`protocol.purchase.person_ref`. It must never import Kivy or `hardware_sim`, never log personal data, and never
keep a card's or a voucher's data after the application is built.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Final
from zoneinfo import ZoneInfo

import numpy as np
from numpy.typing import NDArray
from pydantic import JsonValue

from drivers.card_reader import CardReaderError, NoCardError, ReaderTimeoutError
from drivers.idcard import IdCardData, IdCardReader
from drivers.qr_scanner import MalformedScanError, QrScannerError, ScanTimeoutError
from protocol import Envelope, SignedRecordKind
from protocol.binding import ApplicantVerification
from protocol.drug_rules import Finding, RuleAction
from protocol.pharmacist import SignOutReason
from protocol.prescription import HistoryUse, ReviewOutcome
from protocol.purchase import person_ref
from terminal.binding import BindingError, BindingState, apply_for_binding, binding_application_record
from terminal.config import PharmacistsConfig
from terminal.errors import TerminalError
from terminal.evoucher import EVoucherAccepted, RefusalReason
from terminal.pharmacists import (
    AttendanceResult,
    Consent,
    IdPhotoDecoder,
    LocalSession,
    OnDuty,
    PharmacistDesk,
    PharmacistError,
)
from terminal.review import InboxItem, InboxState, ReviewError, ReviewSession
from terminal.runtime import TerminalRuntime
from terminal.verification import FaceDecision, FaceOutcome, FaceVerifier, Prompt
from ui.i18n import text
from ui.viewmodels.kiosk import KioskModel
from ui.viewmodels.ports import Guidance
from ui.viewmodels.staff import StaffModels, build_staff_models
from ui.viewmodels.staff_ports import (
    AttendanceOutcome,
    AttendanceRecords,
    AttendanceRow,
    BindingApplied,
    BindingShown,
    BindingView,
    ConsentGiven,
    Enrolled,
    EnrolmentShown,
    GuidanceSink,
    HeadMethod,
    PharmacistSeen,
    ReverifyDue,
    RosterEntry,
    RxDecided,
    RxFinding,
    RxLine,
    RxOpened,
    RxSummary,
    StepSink,
    Unlocked,
    Verdict,
)

logger = logging.getLogger(__name__)

DEFAULT_TZ: Final = "Asia/Shanghai"
RECORDS_LIMIT: Final = 200
"""Attendance rows fetched for the list (about half a year of working days)."""
SCAN_TIMEOUT_S: Final = 30.0
CARD_TIMEOUT_S: Final = 20.0
APPLICATION_REASON: Final = "药店负责人在终端申请绑定"

RecordSigned = Callable[[SignedRecordKind, dict[str, JsonValue]], Envelope]

FACE_REASONS: Final[dict[FaceOutcome, str]] = {
    FaceOutcome.NO_MATCH: "staff.reason.face_no_match",
    FaceOutcome.LIVENESS_FAILED: "staff.reason.face_liveness",
    FaceOutcome.TIMEOUT: "staff.reason.face_timeout",
    FaceOutcome.CAMERA_FAULT: "staff.reason.device_fault",
    FaceOutcome.NOT_ENROLLED: "staff.reason.not_enrolled",
}
NOTES: Final[dict[SignOutReason, str]] = {
    SignOutReason.SIGNED_OUT: "staff.note.signed_out",
    SignOutReason.AUTO_CLOSED: "staff.note.auto_closed",
    SignOutReason.REVERIFICATION_FAILED: "staff.note.reverification_failed",
    SignOutReason.SERVER_CLOSED: "staff.note.server_closed",
}
_VOUCHER_REASONS: Final[dict[RefusalReason, str]] = {
    RefusalReason.OFFLINE: "staff.reason.platform_unreachable",
    RefusalReason.NOT_AUTHORIZED: "staff.reason.unavailable",
}
_SEX: Final = {"1": "男", "2": "女"}


def face_reason(decision: FaceDecision) -> str:
    return FACE_REASONS.get(decision.outcome, "staff.reason.face_no_match")


@contextmanager
def prompting(verifier: FaceVerifier, guidance: GuidanceSink) -> Iterator[None]:
    """Pass the face pipeline's prompts (distance, light, the liveness challenge) to the screen while a check runs;
    the verifier's own prompt (voice, the simulated person) still gets them."""
    previous = verifier.prompt

    def prompt(p: Prompt) -> None:
        guidance(Guidance(p.zh, p.en, is_challenge=p.challenge is not None))  # shown before anything waits on it
        previous(p)

    verifier.prompt = prompt
    try:
        yield
    finally:
        verifier.prompt = previous


class _Times:
    def __init__(self, tz: str) -> None:
        self.tz = ZoneInfo(tz)

    def show(self, when: dt.datetime | None) -> str:
        return "" if when is None else when.astimezone(self.tz).strftime("%Y-%m-%d %H:%M")


# ---------------------------------------------------------------- pharmacists


class RuntimePharmacists:
    """`PharmacistPort` over the runtime's `PharmacistDesk`."""

    def __init__(self, runtime: TerminalRuntime, *, face_lock: threading.Lock | None = None) -> None:
        self.runtime = runtime
        self._lock = face_lock or threading.Lock()  # FaceVerifier is not thread-safe
        config = runtime.config.pharmacists
        self.times = _Times(config.timezone if config is not None else DEFAULT_TZ)

    def available(self) -> bool:
        return self.runtime.pharmacists is not None

    def _seen(self, desk: PharmacistDesk, code: str) -> PharmacistSeen:
        member = desk.store.member(code)
        return PharmacistSeen(code, member.name_masked if member is not None else "***")

    def on_duty(self) -> PharmacistSeen | None:
        desk = self.runtime.pharmacists
        if desk is None:
            return None
        try:
            current = OnDuty(desk).current()
        except TerminalError as exc:
            logger.warning("who is on duty cannot be read: %s", type(exc).__name__)
            return None
        return None if current is None else self._seen(desk, current[0])

    def _attend(self, flow: Callable[[PharmacistDesk], AttendanceResult], guidance: GuidanceSink) -> AttendanceOutcome:
        desk = self.runtime.pharmacists
        if desk is None:
            return AttendanceOutcome(False, reason="staff.reason.unavailable")
        try:
            with self._lock, prompting(desk.verifier, guidance):
                result = flow(desk)
        except PharmacistError:
            # The desk refuses before the camera only when the terminal is not bound (docs/pharmacists.md)
            return AttendanceOutcome(False, reason="staff.reason.not_bound")
        except TerminalError as exc:  # the outbox or a store failed: said calmly, logged without contents
            logger.warning("pharmacist attendance failed: %s", type(exc).__name__)
            return AttendanceOutcome(False, reason="staff.reason.unavailable")
        decision = result.decision
        if not decision.accepted or decision.subject_ref is None:
            return AttendanceOutcome(False, reason=face_reason(decision))
        who = self._seen(desk, decision.subject_ref)
        session = result.session
        if result.detail == "not_on_roster":
            return AttendanceOutcome(False, reason="staff.reason.not_on_roster")
        if result.detail == "not_signed_in" or session is None:
            return AttendanceOutcome(False, who, reason="staff.reason.not_signed_in")
        since = self.times.show(session.signed_in_at)
        if result.detail == "already_signed_in":
            return AttendanceOutcome(False, who, since=since, reason="staff.reason.already_signed_in")
        at = self.times.show(session.signed_out_at or session.signed_in_at)
        return AttendanceOutcome(True, who, at=at, since=since)

    def sign_in(self, guidance: GuidanceSink) -> AttendanceOutcome:
        return self._attend(lambda desk: desk.sign_in(), guidance)

    def sign_out(self, guidance: GuidanceSink) -> AttendanceOutcome:
        return self._attend(lambda desk: desk.sign_out(), guidance)

    def identify(self, guidance: GuidanceSink) -> AttendanceOutcome:
        desk = self.runtime.pharmacists
        if desk is None:
            return AttendanceOutcome(False, reason="staff.reason.unavailable")
        with self._lock, prompting(desk.verifier, guidance):
            decision = desk.verifier.identify()
        if not decision.accepted or decision.subject_ref is None:
            return AttendanceOutcome(False, reason=face_reason(decision))
        if desk.store.member(decision.subject_ref) is None:
            return AttendanceOutcome(False, reason="staff.reason.not_on_roster")
        return AttendanceOutcome(True, self._seen(desk, decision.subject_ref))

    def records(self, code: str) -> AttendanceRecords:
        """The server's records of every terminal of the pharmacy; this terminal's own when offline."""
        desk = self.runtime.pharmacists
        if desk is None:
            return AttendanceRecords(reason="staff.reason.unavailable")
        try:
            page = desk.server_records(code, RECORDS_LIMIT)
        except TerminalError as exc:
            logger.info(
                "attendance from the server unavailable (%s): this terminal's records shown", type(exc).__name__
            )
        else:
            rows = [
                self._row(a.signed_in_at, a.signed_out_at, a.closed_reason)
                for a in page.items
                if a.pharmacist_code == code
            ]
            return AttendanceRecords(rows, from_server=True)
        try:
            sessions: list[LocalSession] = desk.records(code, RECORDS_LIMIT)
        except TerminalError as exc:
            logger.warning("attendance records cannot be read: %s", type(exc).__name__)
            return AttendanceRecords(reason="staff.reason.unavailable")
        return AttendanceRecords([self._row(s.signed_in_at, s.signed_out_at, s.reason) for s in sessions])

    def _row(
        self, signed_in: dt.datetime, signed_out: dt.datetime | None, reason: SignOutReason | None
    ) -> AttendanceRow:
        note = "staff.note.open" if signed_out is None else NOTES.get(reason or SignOutReason.SIGNED_OUT, "")
        return AttendanceRow(self.times.show(signed_in), self.times.show(signed_out), note)

    # pharmacist face enrolment and re-verification
    @property
    def face_lock(self) -> threading.Lock:
        """The lock around the pharmacists' face verifier, for the other ports that use it."""
        return self._lock


# ---------------------------------------------------------------- prescriptions


def _finding(finding: Finding) -> RxFinding:
    if not finding.checkable:
        detail = text("staff.rx.finding.unchecked")
    elif finding.limit is not None and finding.observed is not None:
        detail = text("staff.rx.finding.detail", limit=finding.limit, observed=finding.observed)
    else:
        detail = ", ".join(finding.drug_codes)
    return RxFinding(finding.rule_id, finding.action is RuleAction.BLOCK, finding.message_zh, detail)


class RuntimeReview:
    """`ReviewPort` over the runtime's prescription inbox and `ReviewDesk`; one review open at a time."""

    def __init__(self, runtime: TerminalRuntime, *, face_lock: threading.Lock | None = None) -> None:
        self.runtime = runtime
        self._lock = face_lock or threading.Lock()
        self._session: ReviewSession | None = None
        config = runtime.config.pharmacists
        self.times = _Times(config.timezone if config is not None else DEFAULT_TZ)

    def available(self) -> bool:
        return self.runtime.review is not None and self.runtime.prescriptions is not None

    def unlock(self, guidance: GuidanceSink) -> Unlocked:
        desk = self.runtime.pharmacists
        if desk is None or self.runtime.review is None:
            return Unlocked(False, "staff.reason.unavailable")
        try:
            current = OnDuty(desk).current()
        except TerminalError as exc:
            logger.warning("who is on duty cannot be read: %s", type(exc).__name__)
            return Unlocked(False, "staff.reason.unavailable")
        if current is None:
            return Unlocked(False, "staff.reason.no_pharmacist")
        code, template = current
        with self._lock, prompting(desk.verifier, guidance):
            decision = desk.verifier.verify_template(template, subject_ref=code)
        return Unlocked(True) if decision.accepted else Unlocked(False, face_reason(decision))

    def _summary(self, item: InboxItem) -> RxSummary:
        rx = item.prescription
        patient = rx.patient_masked or "***"
        if rx.patient_age_years is not None:
            patient += f" {rx.patient_age_years}岁"
        if rx.patient_sex in _SEX:
            patient += f" {_SEX[rx.patient_sex]}"
        prescriber = " ".join(p for p in (rx.department_name, rx.prescriber_name) if p)
        return RxSummary(
            prescription_id=item.prescription_id,
            rx_no=rx.rx_no,
            patient=patient,
            prescriber=prescriber,
            prescribed_at=self.times.show(rx.prescribed_at),
            lines=len(rx.lines),
            verdict=None if item.decision is None else Verdict(item.decision.value),
            decided_at=self.times.show(item.decided_at),
        )

    def _items(self, reviewed: bool) -> Sequence[RxSummary]:
        inbox = self.runtime.prescriptions
        if inbox is None:
            return ()
        try:
            items = inbox.reviewed() if reviewed else inbox.pending()
        except ReviewError as exc:
            logger.warning("the prescription inbox cannot be read: %s", type(exc).__name__)
            return ()
        return tuple(self._summary(item) for item in items)

    def pending(self) -> Sequence[RxSummary]:
        return self._items(reviewed=False)

    def reviewed(self) -> Sequence[RxSummary]:
        return self._items(reviewed=True)

    def _on_duty(self) -> str | None:
        desk = self.runtime.pharmacists
        current = None if desk is None else OnDuty(desk).current()
        return None if current is None else current[0]

    def open(self, prescription_id: int) -> RxOpened:
        review, inbox = self.runtime.review, self.runtime.prescriptions
        if review is None or inbox is None:
            return RxOpened(False, reason="staff.reason.unavailable")
        self._session = None
        try:
            if self._on_duty() is None:
                return RxOpened(False, reason="staff.reason.no_pharmacist")
            item = inbox.get(prescription_id)
            if item is None or item.state is not InboxState.PENDING:
                return RxOpened(False, reason="staff.reason.not_pending")
            session = review.open(prescription_id)
        except TerminalError as exc:
            logger.warning("prescription %d cannot be opened: %s", prescription_id, type(exc).__name__)
            return RxOpened(False, reason="staff.reason.unavailable")
        self._session = session
        rx = item.prescription
        lines = tuple(
            RxLine(
                text("staff.line.title", no=line.line_no, name=line.drug_name, spec=line.specification or ""),
                text(
                    "staff.line.detail",
                    quantity=line.quantity,
                    unit=line.unit or "",
                    dosage=line.dosage or "",
                    days="" if line.days_supply is None else text("staff.line.days", days=line.days_supply),
                ),
            )
            for line in rx.lines
        )
        return RxOpened(
            True,
            self._summary(item),
            lines,
            tuple(_finding(f) for f in session.findings),
            len(session.unknown_drugs),
            history_checked=session.history is HistoryUse.SERVER,
        )

    def decide(
        self, verdict: Verdict, reasons: Sequence[str], acknowledged: frozenset[str], guidance: GuidanceSink
    ) -> RxDecided:
        review, session, desk = self.runtime.review, self._session, self.runtime.pharmacists
        if review is None or session is None or desk is None:
            return RxDecided(False, "staff.reason.not_pending")
        on_duty = self._on_duty()
        if on_duty is None:
            return RxDecided(False, "staff.reason.no_pharmacist")
        if on_duty != session.pharmacist_code:
            return RxDecided(False, "staff.reason.wrong_pharmacist")
        session.acknowledged.clear()
        for finding in session.evaluation.warnings:
            if finding.rule_id in acknowledged:
                session.acknowledge(finding.rule_id)
        try:
            with self._lock, prompting(desk.verifier, guidance):
                result = review.decide(session, ReviewOutcome(verdict.value), list(reasons))
        except ReviewError as exc:
            logger.info("review decision refused: %s", exc)  # the desk's messages hold no personal data
            current = (
                self.runtime.prescriptions.get(session.item.prescription_id) if self.runtime.prescriptions else None
            )
            if current is None or current.state is not InboxState.PENDING:
                return RxDecided(False, "staff.reason.not_pending")
            return RxDecided(False, "staff.reason.refused")
        except TerminalError as exc:
            logger.warning("review decision not recorded: %s", type(exc).__name__)
            return RxDecided(False, "staff.reason.unavailable")
        if not result.recorded:
            return RxDecided(False, face_reason(result.face))
        self._session = None
        return RxDecided(True)

    def close(self) -> None:
        self._session = None


# ---------------------------------------------------------------- binding


class RuntimeBinding:
    """`BindingPort` over the runtime's binding store, QR scanner + e-voucher service, ID-card reader and face
    verifier. `record_signed` defaults to the runtime's (the device's SM2 identity key).

    The head's face: 1:1 against the ID card's photo when `decode_photo` (the reader vendor's WLT library) is
    given; else 1:1 against a template the terminal holds for them; else liveness only (a live person was present,
    as `terminal.pos_api` does) — the platform's approver decides on the application with that stated."""

    def __init__(
        self,
        runtime: TerminalRuntime,
        *,
        record_signed: RecordSigned | None = None,
        decode_photo: IdPhotoDecoder | None = None,
        face_lock: threading.Lock | None = None,
    ) -> None:
        self.runtime = runtime
        self.record_signed: RecordSigned = record_signed if record_signed is not None else runtime.record_signed
        self.decode_photo = decode_photo
        self._lock = face_lock or threading.Lock()
        config = runtime.config.pharmacists
        self.times = _Times(config.timezone if config is not None else DEFAULT_TZ)

    def status(self) -> BindingView:
        store = self.runtime.binding
        if store is None:
            return BindingView(BindingShown.UNBOUND)
        try:
            status = store.load()
        except BindingError as exc:
            logger.warning("the binding status cannot be read: %s", type(exc).__name__)
            return BindingView(BindingShown.UNBOUND, reason=text("staff.reason.unavailable"))
        if status.state is BindingState.UNBOUND and status.application_id is not None and status.reason:
            shown = BindingShown.REJECTED  # the platform's decision on an application made here
        else:
            shown = BindingShown(status.state.value)
        institution = " ".join(p for p in (status.institution_code, status.institution_name) if p)
        updated = ""
        if status.updated_at:
            try:
                updated = self.times.show(dt.datetime.fromisoformat(status.updated_at))
            except ValueError:
                updated = ""
        return BindingView(shown, institution, status.reason or "", status.contact or "", updated)

    def methods(self) -> frozenset[HeadMethod]:
        runtime, found = self.runtime, set[HeadMethod]()
        devices = runtime.devices
        if runtime.face is None or devices is None or runtime.binding is None:
            return frozenset()
        if devices.qr_scanner is not None and runtime.evoucher is not None:
            found.add(HeadMethod.YIBAO_CODE)
        if devices.id_card_reader is not None:
            found.add(HeadMethod.ID_CARD)
        return frozenset(found)

    def apply(
        self, institution_code: str, method: HeadMethod, step: StepSink, guidance: GuidanceSink
    ) -> BindingApplied:
        runtime, store, face = self.runtime, self.runtime.binding, self.runtime.face
        if store is None or face is None or method not in self.methods():
            return BindingApplied(False, reason="staff.reason.unavailable")
        try:
            if store.load().state is BindingState.BOUND:
                return BindingApplied(False, reason="staff.reason.bound_already")
        except BindingError:
            return BindingApplied(False, reason="staff.reason.unavailable")
        who = self._read_yibao_code() if method is HeadMethod.YIBAO_CODE else self._read_id_card()
        if isinstance(who, str):
            return BindingApplied(False, reason=who)
        ref, masked, reference = who
        step("staff.binding.step.face")
        with self._lock, prompting(face, guidance):
            if reference is not None:
                decision = face.verify_template(reference, subject_ref=ref)
            elif ref in face.templates.subjects():
                decision = face.verify(ref)
            else:
                decision = face.check_live()
        if not decision.accepted:
            reason = face_reason(decision)
            if reference is not None and decision.outcome is FaceOutcome.NO_MATCH:
                reason = "staff.reason.id_photo_mismatch"
            return BindingApplied(False, reason=reason)
        now = runtime.clock.now()
        try:
            record = binding_application_record(
                replace(decision, subject_ref=ref),  # the person the document named, whose face was checked
                verification=ApplicantVerification(method.value),
                institution_code=institution_code,
                applicant_masked=masked,
                reason=APPLICATION_REASON,
                applied_at=now,
            )
            apply_for_binding(self.record_signed, store, record, now=now)
        except BindingError:
            return BindingApplied(False, reason="staff.reason.bound_already")
        except TerminalError as exc:  # no enrolled device identity to sign with, or the outbox failed
            logger.warning("binding application not queued: %s", type(exc).__name__)
            return BindingApplied(False, reason="staff.reason.not_enrolled_device")
        logger.info("binding application queued for institution %s", institution_code)
        return BindingApplied(True, masked)

    def _read_yibao_code(self) -> tuple[str, str, None] | str:
        devices, service = self.runtime.devices, self.runtime.evoucher
        if devices is None or devices.qr_scanner is None or service is None:
            return "staff.reason.unavailable"
        try:
            code = devices.qr_scanner.read_code(SCAN_TIMEOUT_S)
        except ScanTimeoutError:
            return "staff.reason.timeout"
        except MalformedScanError:
            return "staff.reason.code_invalid"
        except QrScannerError:
            return "staff.reason.unavailable"
        outcome = service.verify(code.text, source="scanner")
        if not isinstance(outcome, EVoucherAccepted):
            return _VOUCHER_REASONS.get(outcome.reason, "staff.reason.code_invalid")
        holder = outcome.identity
        return person_ref(holder.id_type.value, holder.id_number), holder.masked_name, None

    def _read_id_card(self) -> tuple[str, str, NDArray[np.float32] | None] | str:
        devices = self.runtime.devices
        if devices is None or devices.id_card_reader is None:
            return "staff.reason.unavailable"
        try:
            card = devices.id_card_reader.read_card(CARD_TIMEOUT_S)
        except (NoCardError, ReaderTimeoutError):
            return "staff.reason.no_card"
        except CardReaderError:
            return "staff.reason.card_unreadable"
        ref, masked, photo = person_ref("01", card.id_number), card.masked()["name"], card.photo_wlt
        del card  # nothing but the reference, the masked name and the photo is needed from here on
        if self.decode_photo is None or self.runtime.face is None:
            return ref, masked, None
        try:
            analysis = self.runtime.face.engine.analyse(self.decode_photo(photo))
        except ValueError:
            return "staff.reason.id_photo_unusable"
        if analysis.template is None:
            return "staff.reason.id_photo_unusable"
        return ref, masked, np.asarray(analysis.template, dtype=np.float32)


# ---------------------------------------------------------------- pharmacist face enrolment and re-verification


class _CardThenFace:
    """The ID-card reader as `PharmacistDesk.enrol` reads it, telling the screen the next step once the card is
    read (the desk goes straight on to the face)."""

    def __init__(self, reader: IdCardReader, step: StepSink) -> None:
        self.reader = reader
        self.step = step

    def read_card(self, timeout_s: float = 5.0) -> IdCardData:
        card = self.reader.read_card(timeout_s)
        self.step("staff.enrol.step.face")
        return card


class RuntimeEnrolment:
    """`EnrolmentPort` over the runtime's `PharmacistDesk.enrol`: the ID-card reader of the runtime, the WLT photo
    decoder given (`decode_photo`, the reader vendor's library; without one enrolment is not offered: no 人证比对)."""

    def __init__(
        self,
        runtime: TerminalRuntime,
        *,
        decode_photo: IdPhotoDecoder | None = None,
        face_lock: threading.Lock | None = None,
    ) -> None:
        self.runtime = runtime
        self.decode_photo = decode_photo
        self._lock = face_lock or threading.Lock()

    def available(self) -> str:
        devices = self.runtime.devices
        if self.runtime.pharmacists is None:
            return "staff.reason.unavailable"
        if devices is None or devices.id_card_reader is None:
            return "staff.reason.no_id_reader"
        if self.decode_photo is None:
            return "staff.reason.no_photo_decoder"
        return ""

    def roster(self) -> Sequence[RosterEntry]:
        desk = self.runtime.pharmacists
        if desk is None:
            return ()
        try:
            members = desk.roster()
            enrolled = set(desk.templates.subjects())
        except TerminalError as exc:
            logger.warning("the pharmacist roster cannot be read: %s", type(exc).__name__)
            return ()
        return tuple(RosterEntry(m.code, m.name_masked, m.code in enrolled) for m in members.values())

    def consent_version(self) -> str:
        config = self.runtime.config.pharmacists
        return config.consent_version if config is not None else PharmacistsConfig().consent_version

    def enrol(self, code: str, consent: ConsentGiven, step: StepSink, guidance: GuidanceSink) -> Enrolled:
        desk, devices, decode = self.runtime.pharmacists, self.runtime.devices, self.decode_photo
        if desk is None or devices is None or devices.id_card_reader is None or decode is None:
            return Enrolled(None, reason=self.available() or "staff.reason.unavailable")
        try:
            with self._lock, prompting(desk.verifier, guidance):
                result = desk.enrol(
                    code,
                    card_reader=_CardThenFace(devices.id_card_reader, step),
                    decode_photo=decode,
                    consent=Consent(consent.version, consent.agreed_at),
                    card_timeout_s=CARD_TIMEOUT_S,
                )
        except PharmacistError as exc:  # it could not start: not bound, not on the roster (messages hold no data)
            logger.info("pharmacist enrolment not started: %s", exc)
            if desk.institution() is None:
                return Enrolled(None, reason="staff.reason.not_bound")
            if desk.store.member(code) is None:
                return Enrolled(None, reason="staff.reason.not_on_roster")
            return Enrolled(None, reason="staff.reason.unavailable")
        except TerminalError as exc:  # the outbox or a store failed
            logger.warning("pharmacist enrolment failed: %s", type(exc).__name__)
            return Enrolled(None, reason="staff.reason.unavailable")
        shown = EnrolmentShown(result.outcome.value)
        reason = ""
        if shown is EnrolmentShown.FACE_NOT_ACCEPTED and result.decision is not None:
            reason = face_reason(result.decision)
        return Enrolled(shown, uploaded=result.uploaded, reason=reason)


class RuntimeReverify:
    """`ReverifyPort` over `PharmacistDesk.reverification_due` / `reverify` for the pharmacist on duty (`OnDuty`)."""

    def __init__(self, runtime: TerminalRuntime, *, face_lock: threading.Lock | None = None) -> None:
        self.runtime = runtime
        self._lock = face_lock or threading.Lock()
        config = runtime.config.pharmacists
        self.times = _Times(config.timezone if config is not None else DEFAULT_TZ)

    def _seen(self, desk: PharmacistDesk, code: str) -> PharmacistSeen:
        member = desk.store.member(code)
        return PharmacistSeen(code, member.name_masked if member is not None else "***")

    def due(self) -> ReverifyDue | None:
        desk = self.runtime.pharmacists
        if desk is None:
            return None
        try:
            due = {s.code for s in desk.reverification_due()}
            current = OnDuty(desk).current() if due else None
        except TerminalError as exc:
            logger.warning("re-verification cannot be checked: %s", type(exc).__name__)
            return None
        if current is None or current[0] not in due:
            return None
        return ReverifyDue(self._seen(desk, current[0]))

    def reverify(self, code: str, guidance: GuidanceSink) -> AttendanceOutcome:
        desk = self.runtime.pharmacists
        if desk is None:
            return AttendanceOutcome(False, reason="staff.reason.unavailable")
        try:
            with self._lock, prompting(desk.verifier, guidance):
                result = desk.reverify(code)
        except PharmacistError:  # signed out meanwhile (the closing hour, at another counter)
            return AttendanceOutcome(False, reason="staff.reason.not_signed_in")
        except TerminalError as exc:
            logger.warning("re-verification failed: %s", type(exc).__name__)
            return AttendanceOutcome(False, reason="staff.reason.unavailable")
        who = self._seen(desk, code)
        if result.detail or not result.decision.accepted:
            return AttendanceOutcome(False, who, reason=face_reason(result.decision))
        return AttendanceOutcome(True, who, at=self.times.show(self.runtime.clock.now()))


def staff_ports(
    runtime: TerminalRuntime,
    *,
    record_signed: RecordSigned | None = None,
    decode_photo: IdPhotoDecoder | None = None,
) -> tuple[RuntimePharmacists, RuntimeReview, RuntimeBinding]:
    """The three staff ports over `runtime`, sharing one lock around the pharmacists' face verifier."""
    face_lock = threading.Lock()
    return (
        RuntimePharmacists(runtime, face_lock=face_lock),
        RuntimeReview(runtime, face_lock=face_lock),
        RuntimeBinding(runtime, record_signed=record_signed, decode_photo=decode_photo),
    )


def staff_models(
    runtime: TerminalRuntime,
    kiosk: KioskModel,
    *,
    record_signed: RecordSigned | None = None,
    decode_photo: IdPhotoDecoder | None = None,
) -> StaffModels:
    """The staff view-models over `runtime`, on the kiosk's navigation and idle timeout."""
    pharmacists, review, binding = staff_ports(runtime, record_signed=record_signed, decode_photo=decode_photo)
    # pharmacist face enrolment and re-verification
    enrolment = RuntimeEnrolment(runtime, decode_photo=decode_photo, face_lock=pharmacists.face_lock)
    reverify = RuntimeReverify(runtime, face_lock=pharmacists.face_lock)
    return build_staff_models(
        kiosk, pharmacists=pharmacists, review=review, binding=binding, enrolment=enrolment, reverify=reverify
    )
