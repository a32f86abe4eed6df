"""What the staff screens need from the terminal, as small Protocols with plain result types.

Owns the seams between the staff view-models (pharmacist sign-in/out and attendance, prescription review, the
institution head's binding application) and `terminal/`: `ui.staff_services` implements them over a
`TerminalRuntime`, unit tests with plain classes. Results carry display values only: masked names, 医保药师代码,
masked prescription fields, times already formatted; never a full ID number, a name in clear, a face or a template.
Reasons are i18n keys (`staff.reason.*`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from ui.viewmodels.ports import Guidance

GuidanceSink = Callable[[Guidance], None]
"""Live face-pipeline prompts, passed on to the screen while a face is checked."""
StepSink = Callable[[str], None]
"""The next step of a multi-device flow (an i18n key: "show the 医保码", "now your face")."""


# ---------------------------------------------------------------- pharmacists


@dataclass(frozen=True)
class PharmacistSeen:
    """A pharmacist recognised by face (or on duty): the 医保药师代码 and the roster's masked name."""

    code: str
    masked_name: str


@dataclass(frozen=True)
class AttendanceOutcome:
    """A sign-in, sign-out or identification. `reason` is an i18n key: why it failed, or a note when it did
    nothing although the face was accepted (already signed in, not signed in)."""

    ok: bool
    who: PharmacistSeen | None = None
    at: str = ""
    """The sign-in (or sign-out) time, formatted for display."""
    since: str = ""
    """For a sign-out or an already open session: when the session began."""
    reason: str = ""


@dataclass(frozen=True)
class AttendanceRow:
    signed_in: str
    signed_out: str
    """'' while the session is open."""
    note: str
    """i18n key: how it ended (signed out, closed at the closing hour, re-verification failed, still open)."""


@dataclass(frozen=True)
class AttendanceRecords:
    rows: Sequence[AttendanceRow] = ()
    from_server: bool = False
    """True: every terminal of the pharmacy (server); False: this terminal only (offline)."""
    reason: str = ""


class PharmacistPort(Protocol):
    def available(self) -> bool:
        """Whether pharmacist sign-in works on this terminal ([pharmacists] configured, face verification)."""

    def on_duty(self) -> PharmacistSeen | None: ...

    def sign_in(self, guidance: GuidanceSink) -> AttendanceOutcome: ...

    def sign_out(self, guidance: GuidanceSink) -> AttendanceOutcome: ...

    def identify(self, guidance: GuidanceSink) -> AttendanceOutcome:
        """Who of the pharmacy's pharmacists is in front of the camera (to show their own records)."""

    def records(self, code: str) -> AttendanceRecords: ...


# ---------------------------------------------------------------- prescriptions


class Verdict(StrEnum):
    """The pharmacist's decision (values as `protocol.prescription.ReviewOutcome`)."""

    APPROVED = "approved"
    REJECTED = "rejected"
    RETURNED = "returned"


@dataclass(frozen=True)
class RxSummary:
    prescription_id: int
    rx_no: str
    patient: str
    """Masked name, age and sex as served ('李*  67 岁  女')."""
    prescriber: str
    """Institution, department, masked prescriber name."""
    prescribed_at: str
    lines: int
    verdict: Verdict | None = None
    decided_at: str = ""


@dataclass(frozen=True)
class RxLine:
    title: str
    detail: str


@dataclass(frozen=True)
class RxFinding:
    rule_id: str
    blocks: bool
    message: str
    """The rule's own words (zh)."""
    detail: str
    """What tripped it in words ('限量 2，本处方 3')."""


@dataclass(frozen=True)
class RxOpened:
    ok: bool
    summary: RxSummary | None = None
    lines: Sequence[RxLine] = ()
    findings: Sequence[RxFinding] = ()
    unknown_drugs: int = 0
    reason: str = ""
    history_checked: bool = True
    """False when the period rules counted this prescription only (no lookback of the patient's purchases)."""


@dataclass(frozen=True)
class RxDecided:
    """`recorded`: the signed decision is in the outbox. Otherwise `reason` says why (face not confirmed, refused)."""

    recorded: bool
    reason: str = ""


@dataclass(frozen=True)
class Unlocked:
    """The pharmacist on duty showed their face: the prescriptions may be shown. `reason` when not."""

    ok: bool
    reason: str = ""


class ReviewPort(Protocol):
    def available(self) -> bool: ...

    def unlock(self, guidance: GuidanceSink) -> Unlocked:
        """1:1 face check of the pharmacist on duty before the prescriptions are listed."""

    def pending(self) -> Sequence[RxSummary]: ...

    def reviewed(self) -> Sequence[RxSummary]: ...

    def open(self, prescription_id: int) -> RxOpened:
        """Open one pending prescription for the pharmacist on duty (the rules evaluated); kept open until
        `decide` or `close`."""

    def decide(
        self, verdict: Verdict, reasons: Sequence[str], acknowledged: frozenset[str], guidance: GuidanceSink
    ) -> RxDecided: ...

    def close(self) -> None:
        """Forget the open review."""


# ---------------------------------------------------------------- binding


class HeadMethod(StrEnum):
    """How the institution head identifies themselves (values as `protocol.binding.ApplicantVerification`)."""

    YIBAO_CODE = "face_yibao_code"
    ID_CARD = "face_id_card"


class BindingShown(StrEnum):
    UNBOUND = "unbound"
    PENDING = "pending"
    BOUND = "bound"
    REJECTED = "rejected"


@dataclass(frozen=True)
class BindingView:
    state: BindingShown
    institution: str = ""
    """'code  name' of the bound (or applied-for) institution."""
    reason: str = ""
    contact: str = ""
    updated_at: str = ""


@dataclass(frozen=True)
class BindingApplied:
    ok: bool
    masked_name: str = ""
    reason: str = ""


class BindingPort(Protocol):
    def status(self) -> BindingView: ...

    def methods(self) -> frozenset[HeadMethod]:
        """The identification methods whose devices are present."""

    def apply(
        self, institution_code: str, method: HeadMethod, step: StepSink, guidance: GuidanceSink
    ) -> BindingApplied: ...


# ---------------------------------------------------------------- pharmacist face enrolment and re-verification


@dataclass(frozen=True)
class RosterEntry:
    """One pharmacist of the roster as the enrolment list shows them: 医保药师代码 and masked name only."""

    code: str
    masked_name: str
    enrolled: bool
    """This terminal holds a face template for them."""


@dataclass(frozen=True)
class ConsentGiven:
    """The pharmacist accepted the consent text of `version` at `agreed_at` (the kiosk's wall clock)."""

    version: str
    agreed_at: dt.datetime


class EnrolmentShown(StrEnum):
    """The enrolment's outcome (values as `terminal.pharmacists.EnrolmentOutcome`)."""

    ENROLLED = "enrolled"
    CARD_UNREADABLE = "card_unreadable"
    CARD_NOT_THE_PHARMACISTS = "card_not_the_pharmacists"
    ID_PHOTO_UNUSABLE = "id_photo_unusable"
    FACE_NOT_ACCEPTED = "face_not_accepted"
    ID_PHOTO_MISMATCH = "id_photo_mismatch"


@dataclass(frozen=True)
class Enrolled:
    """`outcome` None: the enrolment could not start (`reason` says why). For `face_not_accepted`, `reason` says
    what the face pipeline saw (liveness, timeout, camera)."""

    outcome: EnrolmentShown | None
    uploaded: bool = False
    """Enrolled and the template is on the server; False: uploaded at the next roster sync."""
    reason: str = ""


@dataclass(frozen=True)
class ReverifyDue:
    """The on-duty pharmacist whose periodic face check is due."""

    who: PharmacistSeen


class EnrolmentPort(Protocol):
    def available(self) -> str:
        """'' when enrolment works here; otherwise the reason (an i18n key): no pharmacists, no ID-card reader, no
        ID-photo decoder."""

    def roster(self) -> Sequence[RosterEntry]: ...

    def consent_version(self) -> str: ...

    def enrol(self, code: str, consent: ConsentGiven, step: StepSink, guidance: GuidanceSink) -> Enrolled:
        """Read the ID card (`step` says so), then the live face (`step` again), 人证比对, consent and signed record."""


class ReverifyPort(Protocol):
    def due(self) -> ReverifyDue | None:
        """The pharmacist on duty when their periodic face check is due (None: nobody, not due, or switched off)."""

    def reverify(self, code: str, guidance: GuidanceSink) -> AttendanceOutcome:
        """1:1 face check of `code`; not accepted closes their session (`reason` says why)."""
