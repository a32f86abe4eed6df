"""What the view-models need from the terminal, as small Protocols with plain result types.

Owns the seams between the screens and `terminal/`: identity checks (QR 医保码, face, ID card, social-security
card), catalogue queries and maintenance facts. `ui.services` implements them over a `TerminalRuntime`; unit
tests implement them with plain functions. Results carry only masked display values, never a full ID number, a
name in clear, a face image or a template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Method(StrEnum):
    QR = "qr"
    FACE = "face"
    ID_CARD = "id_card"
    SS_CARD = "ss_card"


NON_FACE_METHODS = (Method.QR, Method.ID_CARD, Method.SS_CARD)


@dataclass(frozen=True)
class VerifiedPerson:
    masked_name: str
    masked_id: str
    method: Method


@dataclass(frozen=True)
class IdentityOutcome:
    """`reason` is an i18n key (`reason.*`) when not ok."""

    ok: bool
    person: VerifiedPerson | None = None
    reason: str = ""


@dataclass(frozen=True)
class Guidance:
    """A live instruction during face capture (from the face pipeline's prompts)."""

    zh: str
    en: str
    is_challenge: bool = False


class IdentityPort(Protocol):
    def available(self) -> frozenset[Method]:
        """Methods whose device is present (a missing device's button is shown disabled, with words)."""

    def scan_qr(self, timeout_s: float) -> IdentityOutcome: ...

    def read_id_card(self, timeout_s: float) -> IdentityOutcome: ...

    def read_ss_card(self, timeout_s: float) -> IdentityOutcome: ...

    def verify_face(self, guidance: Callable[[Guidance], None]) -> IdentityOutcome: ...


class QueryKind(StrEnum):
    DRUGS = "drugs"
    TREATMENTS = "treatments"
    INSTITUTIONS = "institutions"


@dataclass(frozen=True)
class QueryRow:
    title: str
    detail: str = ""


@dataclass(frozen=True)
class QueryAnswer:
    """`reason` (an i18n key) when the query could not run."""

    rows: Sequence[QueryRow] = ()
    reason: str = ""


class QueryPort(Protocol):
    def search(self, kind: QueryKind, needle: str) -> QueryAnswer: ...


@dataclass(frozen=True)
class PeripheralFact:
    name: str
    kind: str
    state: str
    detail: str = ""


@dataclass(frozen=True)
class MaintenanceFacts:
    device_id: str
    software_version: str
    config_version: str
    peripherals: Sequence[PeripheralFact]
    outbox_depth: int
    outbox_oldest_age_s: float | None
    online: bool
    last_sync_age_s: float | None
    model_versions: dict[str, str] = field(default_factory=dict)


class MaintenancePort(Protocol):
    def facts(self) -> MaintenanceFacts: ...

    def admin_ok(self, credential: str) -> bool:
        """Whether `credential` opens the maintenance screen (compared in constant time)."""


# national queries (K-11…K-16)
class NationalKind(StrEnum):
    """The personal queries asked of the national platform through the server's relay."""

    PERSON = "person"
    """个人信息 / 参保信息 / 账户余额 (K-11, K-12, K-13): the person_info answer itself."""
    SETTLEMENTS = "settlements"
    """结算明细 (K-14)."""
    CREDITS = "credits"
    """个人账户划入 (K-15)."""
    CONTRIBUTIONS = "contributions"
    """缴费记录 (K-16)."""


NATIONAL_METHODS = (Method.QR, Method.ID_CARD, Method.SS_CARD)
"""A query needs the citizen's credential (就诊凭证), not their face."""


@dataclass(frozen=True)
class NationalPerson:
    """Who the platform found, as the screen may show it. `query_ref` is the platform's opaque, sealed, short-lived
    reference for this person from this terminal (never an identifier in clear); the view-model forgets it with the
    rest when the citizen leaves."""

    masked_name: str
    masked_id: str
    rows: Sequence[QueryRow]
    query_ref: str


@dataclass(frozen=True)
class NationalOutcome:
    """`reason` is an i18n key when no person came back."""

    person: NationalPerson | None = None
    reason: str = ""


class NationalPort(Protocol):
    def available(self) -> frozenset[Method]:
        """Credential methods usable now (a device present and the server's relay configured)."""

    def identify(self, method: Method, timeout_s: float) -> NationalOutcome:
        """Read the citizen's credential with `method` and ask the platform who they are (person_info)."""

    def records(self, kind: NationalKind, query_ref: str) -> QueryAnswer:
        """One kind of the person's records (the year up to today), newest first, as display rows."""
