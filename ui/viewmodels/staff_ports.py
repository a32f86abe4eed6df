"""What the staff screens need from the terminal, as small Protocols with plain result types.

Owns the seams between the staff view-models (pharmacist sign-in/out and attendance, prescription review, the
institution head's binding application) and `terminal/`: `ui.staff_services` implements them over a
`TerminalRuntime`, unit tests with plain classes. Results carry display values only: masked names, 医保药师代码,
masked prescription fields, times already formatted; never a full ID number, a name in clear, a face or a template.
Reasons are i18n keys (`staff.reason.*`).
"""

from __future__ import annotations

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
