"""The kiosk's local HTTP API for the pharmacy POS (收银/HIS client): "verify the buyer in front of you" (REQUIREMENTS
H-02…H-04, K-03…K-07, B-11; docs/pos-api.md).

Owns:
  * request authentication: per-client shared secrets (`load_pos_clients`), the HMAC-SM3 request signature
    (`protocol.request_signing`), the ±window timestamp check and single-use nonces (`RequestAuthenticator`);
  * `PosState`, the small SQLite file behind the transaction codes (交易流水号: device id + yyyyMMddHHmmss (Beijing
    time) + 4-digit sequence, never reused, also across restarts) and the used nonces;
  * the `BuyerVerifier` seam (how the kiosk proves who the buyer is) and `RuntimeBuyerVerifier`, its implementation on
    the runtime's devices (QR scanner + `EVoucherService`, ID/SS card readers, `FaceVerifier`);
  * `PosVerificationService`: one verification at a time (a kiosk serves one customer), proxy purchase (代购) checked
    against a `terminal.proxy.ProxyRegistry`, the drug lines evaluated against the held drug-usage rules
    (`protocol.drug_rules` on `terminal.catalogue.CatalogueStore`: warnings in the answer), the outcome recorded as an
    audit event (identity / pos.verify) and, on an enrolled terminal, as a signed `pos_verification` record
    (`protocol.purchase.PosVerificationRecord`, the server's evidence linked to the purchase HIS registers);
  * `build_pos_app` (the FastAPI app), `PosApiServer` (uvicorn in a thread, started/stopped by the runtime) and
    `attach_pos_api`, which the composition root calls after `build_runtime` when `[pos_api] enabled`.

It must never log or record a name, a full ID number or a face (events carry person references, masked values and
decisions), never answer an unauthenticated request with anything but 401, and never import `hardware_sim`.
"""

from __future__ import annotations

import enum
import logging
import math
import socket
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.card_reader import (
    CardReaderError,
    NoCardError,
    ReaderTimeoutError,
    id_birth_date,
    id_number_problem,
    id_sex_digit_is_male,
)
from drivers.qr_scanner import MalformedScanError, QrScannerError, ScanTimeoutError
from protocol import AuditEvent, AuditOutcome, Clock, SignedRecordKind
from protocol.drug_rules import (
    DrugRuleSet,
    Evaluation,
    HistoryLine,
    PersonFacts,
    Proposal,
    ProposedLine,
    RuleKind,
    RuleStage,
    Sex,
)
from protocol.gm.sm3 import mac_equal, sm3_digest
from protocol.purchase import (
    AgentKind,
    PosVerificationRecord,
    ProxyEvidence,
    RuleFindingRef,
    VerificationMethod,
    VerificationOutcome,
)
from protocol.request_signing import RequestAuthError, verify_signed_request
from terminal.catalogue import CatalogueError
from terminal.config import PosApiConfig
from terminal.devices import KioskDevices
from terminal.errors import TerminalError
from terminal.evoucher import EVoucherAccepted, EVoucherService, mask_id_number, mask_name
from terminal.proxy import ProxyRegistry, SqliteProxyRegistry, person_ref
from terminal.purchase_history import PurchaseHistorySource, ServerPurchaseHistory
from terminal.runtime import TerminalRuntime
from terminal.verification import FaceDecision, FaceOutcome, FaceVerifier

logger = logging.getLogger(__name__)

BEIJING: Final = timezone(timedelta(hours=8))
POS_HEADER_PREFIX: Final = "X-POS-"
MIN_SECRET_CHARS: Final = 32
MAX_BODY_BYTES: Final = 64 * 1024
KEEP_FINISHED_S: Final = 3600.0
"""A finished verification can be polled this long; then it is forgotten (the audit event stays in the outbox)."""


# ---------------------------------------------------------------------------------------------------- errors


class PosApiError(TerminalError):
    """Base of the POS API's errors."""


class PosSecretError(PosApiError):
    """A client's secret file is missing, readable by others, too short, or does not match its pinned digest."""


class PosAuthError(PosApiError):
    """A request failed authentication. `code` is the machine-readable reason returned with the 401."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class KioskBusyError(PosApiError):
    """Another verification is still running on this kiosk."""


class UnknownVerificationError(PosApiError):
    """No verification with that id for this client (never created, forgotten, or another client's)."""


# ---------------------------------------------------------------------------------------------------- auth


@dataclass(frozen=True, slots=True, repr=False)
class PosClient:
    """One provisioned POS client. `repr` hides the secret."""

    client_id: str
    secret: bytes

    def __repr__(self) -> str:
        return f"PosClient({self.client_id!r})"


def load_pos_clients(config: PosApiConfig) -> list[PosClient]:
    """Read each client's secret file (must be mode 0600 or stricter, ≥ 32 characters, and match `secret_sm3`)."""
    clients: list[PosClient] = []
    for entry in config.clients:
        path = entry.secret_file
        try:
            mode = path.stat().st_mode
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise PosSecretError(f"pos_api client {entry.client_id}: cannot read {path}: {exc.strerror}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PosSecretError(f"pos_api client {entry.client_id}: {path} is readable by others (chmod 600)")
        if len(secret) < MIN_SECRET_CHARS:
            raise PosSecretError(f"pos_api client {entry.client_id}: secret shorter than {MIN_SECRET_CHARS} chars")
        if not mac_equal(bytes.fromhex(entry.secret_sm3), sm3_digest(secret)):
            raise PosSecretError(f"pos_api client {entry.client_id}: secret does not match secret_sm3")
        clients.append(PosClient(entry.client_id, secret))
    return clients


class RequestAuthenticator:
    """Checks the four X-POS-* headers of a request (`protocol.request_signing`); thread-safe (nonces are claimed in
    `PosState`)."""

    def __init__(self, clients: Sequence[PosClient], state: PosState, clock: Clock, *, window_s: float = 60.0) -> None:
        self._clients = {c.client_id: c for c in clients}
        self._state = state
        self._clock = clock
        self._window_s = window_s

    def _secret_of(self, client_id: str) -> bytes | None:
        client = self._clients.get(client_id)
        return None if client is None else client.secret

    def authenticate(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> str:
        """Return the authenticated client id or raise `PosAuthError`. Order: shape, time, client, signature,
        nonce (a nonce is spent only by a correctly signed request, so a forger cannot burn a client's nonces)."""
        now = self._clock.now().timestamp()
        try:
            signed = verify_signed_request(
                POS_HEADER_PREFIX,
                headers,
                method=method,
                path=path,
                body=body,
                secret_of=self._secret_of,
                now=now,
                window_s=self._window_s,
            )
        except RequestAuthError as exc:
            raise PosAuthError(exc.code, str(exc)) from exc
        if not self._state.use_nonce(signed.client_id, signed.nonce, now=now, keep_s=2 * self._window_s + 1):
            raise PosAuthError("replayed_nonce", "X-POS-Nonce was already used")
        return signed.client_id


# ---------------------------------------------------------------------------------------------------- state


class PosState:
    """SQLite state of the POS API: the transaction-code counter, the codes issued, the nonces seen. Thread-safe."""

    def __init__(self, path: Path | str, device_id: str) -> None:
        self._device_id = device_id
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS tx_counter (device_id TEXT PRIMARY KEY, counter INTEGER NOT NULL);"
            "CREATE TABLE IF NOT EXISTS tx_code (code TEXT PRIMARY KEY, issued_at REAL NOT NULL);"
            "CREATE TABLE IF NOT EXISTS nonce (client_id TEXT NOT NULL, nonce TEXT NOT NULL,"
            " expires_at REAL NOT NULL, PRIMARY KEY (client_id, nonce));"
        )

    def next_transaction_code(self, now: datetime) -> str:
        """device id + yyyyMMddHHmmss (Beijing time) + 4-digit sequence. The sequence is a persisted counter modulo
        10000 and every code issued is kept under a unique key, so neither a restart nor a clock set back can hand
        out a code twice (a collision just takes the next sequence number)."""
        stamp = now.astimezone(BEIJING).strftime("%Y%m%d%H%M%S")
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT counter FROM tx_counter WHERE device_id = ?", (self._device_id,)).fetchone()
            counter = 0 if row is None else int(row[0])
            for _ in range(10000):
                counter += 1
                code = f"{self._device_id}{stamp}{counter % 10000:04d}"
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO tx_code VALUES (?, ?)", (code, now.timestamp())
                ).rowcount
                if inserted:
                    self._db.execute("INSERT OR REPLACE INTO tx_counter VALUES (?, ?)", (self._device_id, counter))
                    self._db.execute("COMMIT")
                    return code
            self._db.execute("ROLLBACK")
        raise PosApiError("all 10000 transaction codes of this second are used")

    def use_nonce(self, client_id: str, nonce: str, *, now: float, keep_s: float) -> bool:
        """Claim a nonce; False if this client used it before (and it is still remembered)."""
        with self._lock:
            self._db.execute("DELETE FROM nonce WHERE expires_at < ?", (now,))
            inserted = self._db.execute(
                "INSERT OR IGNORE INTO nonce VALUES (?, ?, ?)", (client_id, nonce, now + keep_s)
            ).rowcount
            return bool(inserted)

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ---------------------------------------------------------------------------------------------------- the seam


class BuyerMethod(enum.StrEnum):
    EVOUCHER = "evoucher"
    ID_CARD_FACE = "id_card_face"
    SS_CARD_FACE = "ss_card_face"


@dataclass(frozen=True, slots=True, repr=False)
class BuyerIdentity:
    """Who the kiosk established. Personal data: kept in memory for the verification only; `repr` masks it.
    Field names follow the national interface (psn_name, psn_cert_type, certno, insuplc_admdvs, psn_no)."""

    psn_name: str
    psn_cert_type: str
    certno: str
    insuplc_admdvs: str | None = None
    psn_no: str | None = None

    @property
    def ref(self) -> str:
        return person_ref(self.psn_cert_type, self.certno)

    def masked(self) -> dict[str, str | None]:
        return {
            "psn_name": mask_name(self.psn_name),
            "psn_cert_type": self.psn_cert_type,
            "certno": mask_id_number(self.certno),
            "insuplc_admdvs": self.insuplc_admdvs,
            "psn_no": self.psn_no,
        }

    def __repr__(self) -> str:
        return f"BuyerIdentity({self.masked()!r})"


@dataclass(frozen=True, slots=True)
class BuyerCheck:
    """What a `BuyerVerifier` found. `check` names exactly what was verified (e.g. 'evoucher', 'id_card+face_1to1',
    'id_card+liveness_only', 'id_card' when the face step was not asked for); `reason` is set when refused."""

    identity: BuyerIdentity | None
    check: str
    reason: str | None = None

    @property
    def verified(self) -> bool:
        return self.identity is not None and self.reason is None


@dataclass(frozen=True, slots=True)
class AgentCheck:
    """The agent's live face against the agents registered for the beneficiary: `agent_ref` when one matched."""

    agent_ref: str | None
    check: str
    reason: str | None = None


class BuyerVerifier(Protocol):
    """How the kiosk establishes a buyer. Blocking (the service runs it in a worker thread); it should give up soon
    after `cancel` is set. Implementations record their own device-level audit events (face decisions, e-voucher
    attempts); the service records the overall outcome."""

    def verify_buyer(self, method: BuyerMethod, cancel: threading.Event, *, with_face: bool = True) -> BuyerCheck:
        """Read the card / wait for the e-voucher scan and, for the card methods with `with_face`, check the face."""
        ...

    def verify_agent_face(self, candidate_refs: Sequence[str], cancel: threading.Event) -> AgentCheck:
        """Check the live face in front of the camera against the enrolled templates of `candidate_refs`."""
        ...


Show = Callable[[str, str], None]
"""What the kiosk shows (and may read aloud) while the POS waits: Chinese, English."""


class RuntimeBuyerVerifier:
    """`BuyerVerifier` on the runtime's devices and services.

    What is and is not checked (docs/pos-api.md):
      * evoucher: the QR scanner's code goes to `EVoucherService.verify` (national platform; refused offline);
      * id_card_face / ss_card_face: the card is read locally (the SAM module authenticates an ID card; an SS card's
        data is read as is). The ID card photo is WLT-encoded and cannot be decoded here, so the face is compared
        1:1 with the holder's ENROLLED template when the gallery has one (check '…+face_1to1'); otherwise only
        liveness is established (check '…+liveness_only': a live person was present, NOT that it is the holder).
    """

    def __init__(
        self,
        devices: KioskDevices | None,
        evoucher: EVoucherService | None,
        face: FaceVerifier | None,
        *,
        show: Show | None = None,
        wait_s: float = 60.0,
        poll_s: float = 1.0,
    ) -> None:
        self.devices = devices
        self.evoucher = evoucher
        self.face = face
        self.show: Show = show or (lambda _zh, _en: None)
        self.wait_s = wait_s
        self.poll_s = poll_s

    def verify_buyer(self, method: BuyerMethod, cancel: threading.Event, *, with_face: bool = True) -> BuyerCheck:
        if method is BuyerMethod.EVOUCHER:
            return self._evoucher(cancel)
        card = "id_card" if method is BuyerMethod.ID_CARD_FACE else "ss_card"
        identity, reason = self._read_card(method, cancel)
        if identity is None:
            return BuyerCheck(None, card, reason or "card_read_failed")
        if not with_face:
            return BuyerCheck(identity, card)
        if self.face is None:
            return BuyerCheck(None, card, "face_unavailable")
        self.show("请正对摄像头", "Please look at the camera")
        if identity.ref in self.face.templates.subjects():
            decision = self.face.verify(identity.ref)
            check = f"{card}+face_1to1"
        else:
            decision = self.face.check_live()  # quality gate + liveness (+ challenge)
            check = f"{card}+liveness_only"
        if decision.outcome is not FaceOutcome.ACCEPTED:
            return BuyerCheck(None, check, f"face_{decision.outcome.value}")
        return BuyerCheck(identity, check)

    def verify_agent_face(self, candidate_refs: Sequence[str], cancel: threading.Event) -> AgentCheck:
        if self.face is None:
            return AgentCheck(None, "face_1toN", "face_unavailable")
        enrolled = set(self.face.templates.subjects())
        if not enrolled.intersection(candidate_refs):
            return AgentCheck(None, "face_1toN", "agent_not_enrolled")
        self.show("请代购人正对摄像头", "Agent: please look at the camera")
        decision = self.face.identify()
        if decision.outcome is not FaceOutcome.ACCEPTED or decision.subject_ref is None:
            return AgentCheck(None, "face_1toN", f"face_{decision.outcome.value}")
        if decision.subject_ref not in candidate_refs:
            return AgentCheck(None, "face_1toN", "agent_not_registered")
        return AgentCheck(decision.subject_ref, "face_1toN")

    @staticmethod
    def _liveness_only(face: FaceVerifier) -> FaceDecision:
        return face.check_live()  # quality gate + liveness (+ challenge), recorded as 'face_liveness'

    def _evoucher(self, cancel: threading.Event) -> BuyerCheck:
        scanner = None if self.devices is None else self.devices.qr_scanner
        if scanner is None or self.evoucher is None:
            return BuyerCheck(None, "evoucher", "evoucher_unavailable")
        self.show("请出示医保电子凭证", "Please show your medical-insurance code")
        deadline = time.monotonic() + self.wait_s
        while not cancel.is_set():
            if time.monotonic() > deadline:
                return BuyerCheck(None, "evoucher", "timeout")
            try:
                scanned = scanner.read_code(self.poll_s)
            except (ScanTimeoutError, MalformedScanError):
                continue
            except QrScannerError:
                return BuyerCheck(None, "evoucher", "device_unavailable")
            outcome = self.evoucher.verify(scanned.text, source="scanner")
            if not isinstance(outcome, EVoucherAccepted):
                return BuyerCheck(None, "evoucher", f"evoucher_{outcome.reason.value}")
            person = outcome.identity
            identity = BuyerIdentity(person.name, person.id_type.value, person.id_number, person.insured_region)
            return BuyerCheck(identity, "evoucher")
        return BuyerCheck(None, "evoucher", "cancelled")

    def _read_card(self, method: BuyerMethod, cancel: threading.Event) -> tuple[BuyerIdentity | None, str | None]:
        id_reader = None if self.devices is None else self.devices.id_card_reader
        ss_reader = None if self.devices is None else self.devices.ss_card_reader
        read: Callable[[], BuyerIdentity]
        if method is BuyerMethod.ID_CARD_FACE and id_reader is not None:
            self.show("请将身份证放在读卡区", "Please place your ID card on the reader")
            reader = id_reader

            def read() -> BuyerIdentity:
                card = reader.read_card(self.poll_s)
                return BuyerIdentity(card.name, "01", card.id_number)

        elif method is BuyerMethod.SS_CARD_FACE and ss_reader is not None:
            self.show("请插入社保卡", "Please insert your social-security card")
            ss_reader_ = ss_reader

            def read() -> BuyerIdentity:
                ss = ss_reader_.read_card(self.poll_s)
                # The card's identification code starts with the issuing division: the insured region as far as
                # the card can tell (the platform's answer is authoritative when online).
                region = ss.card_identification_code[:6]
                cert_type = "01" if id_number_problem(ss.ss_number) is None else "99"
                return BuyerIdentity(ss.name, cert_type, ss.ss_number, region if region.isdigit() else None)

        else:
            return None, "device_unavailable"
        deadline = time.monotonic() + self.wait_s
        while not cancel.is_set():
            if time.monotonic() > deadline:
                return None, "timeout"
            try:
                return read(), None
            except (NoCardError, ReaderTimeoutError):
                continue
            except CardReaderError:
                return None, "card_read_failed"
        return None, "cancelled"


# ---------------------------------------------------------------------------------------------------- API models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FaceLiveAgent(_Model):
    """The agent is insured and enrolled: their live face is checked against the registered proxy relationship."""

    method: Literal["face_live"]


class ManualAgent(_Model):
    """A non-insured agent entered by hand at the POS (K-04): validated here, masked in every record."""

    method: Literal["manual"]
    psn_name: str = Field(min_length=1, max_length=50, description="代购人姓名 / agent's name")
    psn_cert_type: str = Field(
        default="01", pattern=r"^[0-9]{2}$", description="证件类型 (psn_cert_type; 01 = 居民身份证)"
    )
    certno: str = Field(min_length=1, max_length=20, description="证件号码 / certificate number")

    @model_validator(mode="after")
    def _valid_number(self) -> ManualAgent:
        self.certno = self.certno.strip().upper()
        if self.psn_cert_type == "01":
            problem = id_number_problem(self.certno)
            if problem is not None:
                raise ValueError(problem)  # the message never contains the number
        return self


class ProxyBeneficiary(_Model):
    method: Literal["evoucher"] = Field(
        default="evoucher", description="The beneficiary proves identity with their e-voucher (K-05)."
    )


class ProxyRequest(_Model):
    """代购: the agent buys for the beneficiary with the beneficiary's e-voucher and their own face (or manual
    entry)."""

    beneficiary: ProxyBeneficiary = Field(default_factory=ProxyBeneficiary)
    agent: Annotated[FaceLiveAgent | ManualAgent, Field(discriminator="method")]


class DrugLine(_Model):
    med_list_codg: str = Field(min_length=1, max_length=50, description="医保目录编码 / catalogue code")
    cnt: float = Field(gt=0, le=100000, description="数量 / quantity (sale units; rounded up for the rules)")
    days_supply: int | None = Field(default=None, ge=1, le=3660, description="用药天数 / days' supply, when known")


class VerificationRequest(_Model):
    """POST /pos/v1/verifications body. 请求核验购药人 / ask the kiosk to verify the buyer."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"method": "id_card_face"},
                {"method": "evoucher", "proxy": {"agent": {"method": "face_live"}}},
                {
                    "method": "evoucher",
                    "proxy": {
                        "agent": {
                            "method": "manual",
                            "psn_name": "张三",
                            "psn_cert_type": "01",
                            "certno": "11010519491231002X",
                        }
                    },
                },
            ]
        },
    )

    method: BuyerMethod = Field(description="核验方式 / how the buyer proves identity")
    proxy: ProxyRequest | None = Field(default=None, description="代购 / proxy purchase; absent for the buyer self")
    amount: float | None = Field(default=None, ge=0, le=1_000_000, description="金额 (元), informational")
    drug_lines: list[DrugLine] = Field(
        default_factory=list,
        max_length=200,
        description="药品明细: evaluated against the kiosk's drug-usage rules once the buyer is known (warnings)",
    )
    has_prescription: bool = Field(default=False, description="有处方 / the purchase has a prescription (rules)")

    @model_validator(mode="after")
    def _proxy_method(self) -> VerificationRequest:
        if self.proxy is not None and self.method is not BuyerMethod(self.proxy.beneficiary.method):
            raise ValueError("with proxy, method must be the beneficiary's method ('evoucher')")
        return self


class Status(enum.StrEnum):
    PENDING = "pending"
    VERIFIED = "verified"
    REFUSED = "refused"
    CANCELLED = "cancelled"


class PersonOut(_Model):
    psn_name: str = Field(description="姓名（脱敏）/ masked name")
    psn_cert_type: str = Field(description="证件类型 / certificate type")
    certno: str = Field(description="证件号码（脱敏）/ masked number")
    insuplc_admdvs: str | None = Field(default=None, description="参保地医保区划 / insured region")
    psn_no: str | None = Field(default=None, description="人员编号 when known")
    person_ref: str = Field(description="Pseudonymous reference (HMAC-SM3 of type and number)")


class AgentOut(_Model):
    method: Literal["face_live", "manual"] = Field(description="face_live: registered agent; manual: entered by hand")
    check: str = Field(description="What was verified about the agent")
    person_ref: str = Field(description="Pseudonymous reference of the agent")
    psn_name: str | None = Field(default=None, description="姓名（脱敏）, manual entry only")
    psn_cert_type: str | None = Field(default=None, description="证件类型, manual entry only")
    certno: str | None = Field(default=None, description="证件号码（脱敏）, manual entry only")


class FindingOut(_Model):
    """One drug-usage rule the purchase's lines hit (docs/catalogue.md): shown to the cashier; `block` means the
    regulator's rule forbids the sale (the POS must not settle it), `warn` that the cashier may go on."""

    rule_id: str
    rule_kind: str
    action: Literal["warn", "block"]
    drug_codes: list[str]
    message_zh: str
    message_en: str
    limit: int | None = None
    observed: int | None = None
    checkable: bool = Field(default=True, description="False: a needed fact (age, days' supply…) was unknown")


class VerificationAccepted(_Model):
    verification_id: str
    status: Status
    poll: str


class VerificationOut(_Model):
    verification_id: str
    status: Status
    method: BuyerMethod
    check: str | None = Field(default=None, description="What exactly was verified (see docs/pos-api.md)")
    identity: PersonOut | None = Field(default=None, description="购药人 / buyer (the beneficiary for proxy)")
    agent: AgentOut | None = Field(default=None, description="代购人 / agent, proxy purchases only")
    proxy: bool = False
    relationship_id: str | None = None
    transaction_code: str | None = Field(default=None, description="交易流水号, set when verified")
    reason: str | None = Field(default=None, description="Why refused/cancelled (machine-readable)")
    warnings: list[FindingOut] = Field(default_factory=list, description="用药规则提示 / drug-rule findings")
    blocked: bool = Field(default=False, description="A finding with action block: the sale must not be settled")
    rules_version: int | None = Field(default=None, description="The drug-rule set evaluated (null: none held)")
    unknown_drug_codes: list[str] = Field(
        default_factory=list, description="Drug codes the kiosk's catalogue does not list (not checked by the rules)"
    )
    purchase_history: Literal["server", "unavailable", "not_asked"] = Field(
        default="not_asked",
        description="The buyer's earlier registered purchases the period rules counted: 'server' (the platform's "
        "lookback), 'unavailable' (it could not be reached: period rules saw this purchase only), 'not_asked'",
    )
    created_at: datetime
    finished_at: datetime | None = None


def _person_out(identity: BuyerIdentity) -> dict[str, Any]:
    return {**identity.masked(), "person_ref": identity.ref}


# ---------------------------------------------------------------------------------------------------- the service


@dataclass
class _Verification:
    id: str
    client_id: str
    request: VerificationRequest
    created_at: datetime
    created_mono: float
    cancel: threading.Event = field(default_factory=threading.Event)
    status: Status = Status.PENDING
    check: str | None = None
    identity: BuyerIdentity | None = None
    agent: AgentOut | None = None
    relationship_id: str | None = None
    transaction_code: str | None = None
    reason: str | None = None
    finished_at: datetime | None = None
    findings: list[FindingOut] = field(default_factory=list)
    rules_version: int | None = None
    unknown_drug_codes: list[str] = field(default_factory=list)
    purchase_history: Literal["server", "unavailable", "not_asked"] = "not_asked"

    def view(self) -> VerificationOut:
        return VerificationOut(
            verification_id=self.id,
            status=self.status,
            method=self.request.method,
            check=self.check,
            identity=None if self.identity is None else PersonOut(**_person_out(self.identity)),
            agent=self.agent,
            proxy=self.request.proxy is not None,
            relationship_id=self.relationship_id,
            transaction_code=self.transaction_code,
            reason=self.reason,
            warnings=self.findings,
            blocked=any(f.action == "block" for f in self.findings),
            rules_version=self.rules_version,
            unknown_drug_codes=self.unknown_drug_codes,
            purchase_history=self.purchase_history,
            created_at=self.created_at,
            finished_at=self.finished_at,
        )


AuditSink = Callable[[AuditEvent], object]
EvidenceSink = Callable[[PosVerificationRecord, AuditEvent], object]
"""Records the signed evidence and the audit event together (one outbox transaction: `attach_pos_api` signs it with
`TerminalRuntime.record_signed`). Raising means neither was recorded."""


class DrugRules(Protocol):
    """What the verification needs of the catalogue store (`terminal.catalogue.CatalogueStore`)."""

    @property
    def rule_set(self) -> DrugRuleSet | None: ...

    def proposed_line(
        self, drug_code: str, quantity: int, *, days_supply: int | None = None, amount_fen: int | None = None
    ) -> ProposedLine: ...

    def evaluate(self, proposal: Proposal) -> Evaluation: ...


def person_facts(identity: BuyerIdentity, on: datetime) -> PersonFacts:
    """Age and sex from a resident ID number (type 01); unknown for anything else. Computed in memory only."""
    if identity.psn_cert_type != "01" or id_number_problem(identity.certno) is not None:
        return PersonFacts(None, None)
    born = id_birth_date(identity.certno)
    today = on.astimezone(BEIJING).date()
    age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    sex = Sex.MALE if id_sex_digit_is_male(identity.certno) else Sex.FEMALE
    return PersonFacts(max(age, 0), sex)


_HISTORY_RULES: Final = frozenset(
    {
        RuleKind.MAX_QUANTITY_PER_PERIOD,
        RuleKind.MAX_DAYS_SUPPLY_PER_PERIOD,
        RuleKind.MAX_PURCHASES_PER_PERIOD,
        RuleKind.EARLY_REFILL,
    }
)


def _needs_history(rule_set: DrugRuleSet) -> bool:
    """Whether a rule of the set counts earlier purchases (no lookback is made for a set without one)."""
    return any(RuleKind(rule.kind) in _HISTORY_RULES for rule in rule_set.rules)


def _finding_out(finding: Any) -> FindingOut:
    return FindingOut(
        rule_id=finding.rule_id,
        rule_kind=finding.rule_kind.value,
        action=finding.action.value,
        drug_codes=list(finding.drug_codes),
        message_zh=finding.message_zh,
        message_en=finding.message_en,
        limit=finding.limit,
        observed=finding.observed,
        checkable=finding.checkable,
    )


class PosVerificationService:
    """Runs verifications one at a time in a worker thread and keeps their state for polling."""

    def __init__(
        self,
        verifier: BuyerVerifier,
        registry: ProxyRegistry,
        state: PosState,
        record: AuditSink,
        clock: Clock,
        *,
        evidence: EvidenceSink | None = None,
        rules: DrugRules | None = None,
        history: PurchaseHistorySource | None = None,
    ) -> None:
        """`record` takes the audit event of each outcome; with `evidence` (an enrolled terminal) the signed
        `pos_verification` record and the audit event go to `evidence` instead. `rules` evaluates drug lines;
        `history` feeds the period rules the buyer's earlier purchases."""
        self.verifier = verifier
        self.registry = registry
        self.state = state
        self.record = record
        self.evidence = evidence
        self.rules = rules
        self.history = history
        self.clock = clock
        self._lock = threading.Lock()
        self._items: dict[str, _Verification] = {}
        self._active: _Verification | None = None
        self._threads: list[threading.Thread] = []

    def start(self, client_id: str, request: VerificationRequest) -> _Verification:
        with self._lock:
            self._forget_old()
            if self._active is not None and self._active.status is Status.PENDING:
                raise KioskBusyError("another verification is running on this kiosk")
            item = _Verification(uuid.uuid4().hex, client_id, request, self.clock.now(), self.clock.monotonic())
            self._items[item.id] = item
            self._active = item
            thread = threading.Thread(target=self._run, args=(item,), name=f"pos-verify-{item.id[:8]}", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return item

    def get(self, client_id: str, verification_id: str) -> VerificationOut:
        with self._lock:
            item = self._items.get(verification_id)
            if item is None or item.client_id != client_id:
                raise UnknownVerificationError(verification_id)
            return item.view()

    def cancel(self, client_id: str, verification_id: str) -> VerificationOut:
        with self._lock:
            item = self._items.get(verification_id)
            if item is None or item.client_id != client_id:
                raise UnknownVerificationError(verification_id)
            if item.status is Status.PENDING:
                item.cancel.set()
                self._finish_locked(item, Status.CANCELLED, reason="cancelled_by_pos")
            return item.view()

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel what runs and wait briefly for the worker threads."""
        with self._lock:
            for item in self._items.values():
                item.cancel.set()
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout_s)

    # ------------------------------------------------------------------ the worker

    def _run(self, item: _Verification) -> None:
        try:
            self._verify(item)
        except Exception:
            # A device or service failure must still end the verification (refused) and leave an audit trace.
            logger.exception("POS verification %s failed", item.id[:8])
            with self._lock:
                if item.status is Status.PENDING:
                    self._finish_locked(item, Status.REFUSED, reason="internal_error")

    def _verify(self, item: _Verification) -> None:
        request = item.request
        proxy = request.proxy
        buyer = self.verifier.verify_buyer(request.method, item.cancel, with_face=proxy is None)
        check = buyer.check
        if not buyer.verified or buyer.identity is None:
            self._finish(item, Status.REFUSED, check=check, reason=buyer.reason or "not_verified")
            return
        self._evaluate_rules(item, buyer.identity)
        if proxy is None:
            self._finish(item, Status.VERIFIED, check=check, identity=buyer.identity)
            return
        agent = proxy.agent
        if isinstance(agent, ManualAgent):
            # K-04: a non-insured agent cannot be checked against a relationship; they are registered by hand and
            # reported as such (the server's proxy supervision reviews these, B-12).
            person = BuyerIdentity(agent.psn_name, agent.psn_cert_type, agent.certno)
            masked = person.masked()
            agent_out = AgentOut(
                method="manual",
                check="manual_entry",
                person_ref=person.ref,
                psn_name=masked["psn_name"],
                psn_cert_type=person.psn_cert_type,
                certno=masked["certno"],
            )
            self._finish(item, Status.VERIFIED, check=check, identity=buyer.identity, agent=agent_out)
            return
        relationships = self.registry.agents_of(buyer.identity.ref, self.clock.now())
        if not relationships:
            self._finish(item, Status.REFUSED, check=check, identity=buyer.identity, reason="no_proxy_relationship")
            return
        found = self.verifier.verify_agent_face([r.agent_ref for r in relationships], item.cancel)
        if found.agent_ref is None:
            self._finish(
                item,
                Status.REFUSED,
                check=f"{check}+agent_{found.check}",
                identity=buyer.identity,
                reason=found.reason or "agent_not_verified",
            )
            return
        relationship = next(r for r in relationships if r.agent_ref == found.agent_ref)
        agent_out = AgentOut(method="face_live", check=found.check, person_ref=found.agent_ref)
        self._finish(
            item,
            Status.VERIFIED,
            check=f"{check}+agent_{found.check}",
            identity=buyer.identity,
            agent=agent_out,
            relationship_id=relationship.relationship_id,
        )

    def _evaluate_rules(self, item: _Verification, buyer: BuyerIdentity) -> None:
        """The drug lines against the held rules, for the person bought for (the beneficiary for proxy). A failure
        here never blocks the verification: the answer then says no rules were evaluated."""
        request = item.request
        if self.rules is None or not request.drug_lines:
            return
        try:
            rule_set = self.rules.rule_set
            lines: list[ProposedLine] = []
            unknown: list[str] = []
            for line in request.drug_lines:
                try:
                    lines.append(
                        self.rules.proposed_line(
                            line.med_list_codg, math.ceil(line.cnt - 1e-9), days_supply=line.days_supply
                        )
                    )
                except CatalogueError:
                    unknown.append(line.med_list_codg)
            now = self.clock.now()
            earlier: tuple[HistoryLine, ...] = ()
            if self.history is not None and rule_set is not None and _needs_history(rule_set):
                found = self.history.lines(buyer.ref, at=now)
                item.purchase_history = "unavailable" if found is None else "server"
                earlier = found or ()
            evaluation = self.rules.evaluate(
                Proposal(
                    RuleStage.PURCHASE,
                    now,
                    person_facts(buyer, now),
                    tuple(lines),
                    request.has_prescription,
                    history=earlier,
                )
            )
        except Exception:
            logger.exception("POS verification %s: drug rules not evaluated", item.id[:8])
            return
        item.findings = [_finding_out(f) for f in evaluation.findings]
        item.rules_version = None if rule_set is None else rule_set.version
        item.unknown_drug_codes = unknown

    def _finish(self, item: _Verification, status: Status, **values: Any) -> None:
        with self._lock:
            if item.status is not Status.PENDING:
                return  # cancelled meanwhile: the result is dropped (the cancel was recorded)
            for name, value in values.items():
                setattr(item, name, value)
            self._finish_locked(item, status, reason=values.get("reason"))

    def _finish_locked(self, item: _Verification, status: Status, *, reason: str | None) -> None:
        if status is Status.VERIFIED:
            item.transaction_code = self.state.next_transaction_code(self.clock.now())
        item.status = status
        item.reason = reason
        item.finished_at = self.clock.now()
        if self._active is item:
            self._active = None
        try:
            event = self._event(item)
            if self.evidence is not None:
                self.evidence(self._evidence(item), event)
            else:
                self.record(event)
        except Exception:
            # Fail closed (S-09): a verified identity without its audit trace must not reach the POS. The code
            # drawn above is simply never used.
            logger.exception("POS verification %s: outcome not recorded, refused", item.id[:8])
            if item.status is Status.VERIFIED:
                item.status, item.reason, item.transaction_code = Status.REFUSED, "not_recorded", None
            return
        logger.info(
            "POS verification %s: %s (%s%s)",
            item.id[:8],
            status.value,
            item.check or item.request.method.value,
            "" if reason is None else f", {reason}",
        )

    def _event(self, item: _Verification) -> AuditEvent:
        proxy = item.request.proxy
        detail: dict[str, str | int | float | bool | None] = {
            "verification_id": item.id,
            "client_id": item.client_id,
            "method": item.request.method.value,
            "check": item.check,
            "status": item.status.value,
            "reason": item.reason,
            "proxy": proxy is not None,
            "transaction_code": item.transaction_code,
            "duration_ms": round((self.clock.monotonic() - item.created_mono) * 1000.0, 1),
        }
        if item.identity is not None:
            detail["psn_cert_type"] = item.identity.psn_cert_type
            detail["insuplc_admdvs"] = item.identity.insuplc_admdvs
        if proxy is not None:
            detail["agent_method"] = proxy.agent.method
            detail["agent_ref"] = None if item.agent is None else item.agent.person_ref
            detail["relationship_id"] = item.relationship_id
        return AuditEvent(
            category="identity",
            action="pos.verify",
            outcome=AuditOutcome.SUCCESS if item.status is Status.VERIFIED else AuditOutcome.FAILURE,
            subject=None if item.identity is None else item.identity.ref,
            detail=detail,
        )

    def _evidence(self, item: _Verification) -> PosVerificationRecord:
        proxy_request = item.request.proxy
        identity = item.identity
        proxy: ProxyEvidence | None = None
        if proxy_request is not None and identity is not None:
            agent = item.agent
            manual = isinstance(proxy_request.agent, ManualAgent)
            proxy = ProxyEvidence(
                beneficiary_ref=identity.ref,
                agent_kind=AgentKind.MANUAL if manual else AgentKind.FACE,
                agent_ref=None if agent is None else agent.person_ref,
                agent_masked_id=None if agent is None or not manual else agent.certno,
                agent_cert_type=None if agent is None or not manual else agent.psn_cert_type,
                relationship_id=item.relationship_id,
            )
        verified = item.status is Status.VERIFIED
        return PosVerificationRecord(
            verification_id=item.id,
            client_id=item.client_id,
            transaction_code=item.transaction_code if verified else None,
            method=VerificationMethod(item.request.method.value),
            check=item.check,
            outcome=VerificationOutcome(item.status.value),
            reason=item.reason,
            buyer_ref=None if identity is None else identity.ref,
            buyer_masked_id=None if identity is None else mask_id_number(identity.certno),
            buyer_cert_type=None if identity is None else identity.psn_cert_type,
            insuplc_admdvs=None if identity is None else identity.insuplc_admdvs,
            proxy=proxy,
            findings=[RuleFindingRef(rule_id=f.rule_id, action=f.action) for f in item.findings],
            rules_version=item.rules_version,
            verified_at=item.finished_at or self.clock.now(),
        )

    def _forget_old(self) -> None:
        now = self.clock.monotonic()
        for key in [
            k
            for k, v in self._items.items()
            if v.status is not Status.PENDING and now - v.created_mono > KEEP_FINISHED_S
        ]:
            del self._items[key]


# ---------------------------------------------------------------------------------------------------- the app

_AUTH_401: Final[dict[int | str, dict[str, Any]]] = {
    401: {
        "description": "认证失败 / authentication failed: detail.code is one of missing_header, unknown_client, "
        "bad_timestamp, stale_timestamp, bad_nonce, bad_signature, replayed_nonce"
    }
}


def _error(status_code: int, code: str, en: str, zh: str) -> HTTPException:
    return HTTPException(status_code, detail={"code": code, "message": en, "message_zh": zh})


async def _authenticated(request: Request) -> str:
    """The dependency every endpoint has: the authenticated client id, or 401 (before the body is validated)."""
    authenticator: RequestAuthenticator = request.app.state.pos_authenticator
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise _error(413, "body_too_large", "request body too large", "请求体过大")
    try:
        return authenticator.authenticate(request.method, request.url.path, request.headers, body)
    except PosAuthError as exc:
        logger.warning("POS API request refused: %s", exc.code)
        raise HTTPException(401, detail={"code": exc.code, "message": str(exc), "message_zh": "请求认证失败"}) from exc


ClientId = Annotated[str, Depends(_authenticated)]


def build_pos_app(service: PosVerificationService, authenticator: RequestAuthenticator) -> FastAPI:
    """The FastAPI app of the local POS API (docs/pos-api.md)."""
    app = FastAPI(
        title="Yibao kiosk POS API / 自助终端药店收银接口",
        version="1",
        description="本地接口：药店收银系统请求终端核验购药人（含代购）。Local API: the pharmacy POS asks the kiosk to "
        "verify the buyer (including proxy purchase). Every request is signed; see docs/pos-api.md.",
        docs_url=None,
        redoc_url=None,
    )

    router = APIRouter(prefix="/pos/v1", responses=_AUTH_401)
    app.state.pos_authenticator = authenticator

    @router.post(
        "/verifications",
        status_code=202,
        response_model=VerificationAccepted,
        summary="开始核验购药人 / start verifying the buyer",
        description="终端开始读卡/扫码/刷脸，收银系统轮询结果。The kiosk starts reading the card / "
        "waiting for the QR code / checking the face; poll GET /pos/v1/verifications/{id}. "
        "409 when another verification is running.",
        responses={409: {"description": "终端忙 / kiosk busy"}, 422: {"description": "请求无效 / invalid request"}},
    )
    def start(body: VerificationRequest, client_id: ClientId) -> VerificationAccepted:
        try:
            item = service.start(client_id, body)
        except KioskBusyError as exc:
            raise _error(409, "kiosk_busy", "another verification is running", "终端正在核验其他购药人") from exc
        return VerificationAccepted(
            verification_id=item.id, status=item.status, poll=f"/pos/v1/verifications/{item.id}"
        )

    @router.get(
        "/verifications/{verification_id}",
        response_model=VerificationOut,
        summary="查询核验结果 / verification status",
        description="pending → verified (身份信息脱敏 + 交易流水号) | refused (reason) | cancelled.",
        responses={404: {"description": "无此核验 / unknown verification"}},
    )
    def status(verification_id: str, client_id: ClientId) -> VerificationOut:
        try:
            return service.get(client_id, verification_id)
        except UnknownVerificationError as exc:
            raise _error(404, "unknown_verification", "no such verification", "无此核验记录") from exc

    @router.post(
        "/verifications/{verification_id}/cancel",
        response_model=VerificationOut,
        summary="取消核验 / cancel a verification",
        responses={404: {"description": "无此核验 / unknown verification"}},
    )
    def cancel(verification_id: str, client_id: ClientId) -> VerificationOut:
        try:
            return service.cancel(client_id, verification_id)
        except UnknownVerificationError as exc:
            raise _error(404, "unknown_verification", "no such verification", "无此核验记录") from exc

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the rejected input (an ID number, a name): only location and message here.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    app.include_router(router)
    return app


# ---------------------------------------------------------------------------------------------------- the server


class PosApiServer:
    """uvicorn serving the POS app in a daemon thread. `port` 0 binds a free port (`bound_port` tells which)."""

    def __init__(self, app: FastAPI, host: str, port: int, *, on_stop: Callable[[], None] | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._on_stop = on_stop
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.bound_port: int | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise PosApiError(f"POS API cannot bind {self.host}:{self.port}: {exc.strerror}") from exc
        self._sock = sock
        self.bound_port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            server_header=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="pos-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise PosApiError("POS API server did not start")
            time.sleep(0.01)
        logger.info("POS API listening on %s:%d", self.host, self.bound_port)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._sock is not None:
            self._sock.close()
        if self._on_stop is not None:
            self._on_stop()
        self._server = self._thread = self._sock = None


def build_pos_server(
    config: PosApiConfig,
    *,
    device_id: str,
    verifier: BuyerVerifier,
    registry: ProxyRegistry,
    record: AuditSink,
    clock: Clock,
    port: int | None = None,
    evidence: EvidenceSink | None = None,
    rules: DrugRules | None = None,
    history: PurchaseHistorySource | None = None,
) -> PosApiServer:
    """Everything the runtime needs from `[pos_api]`: clients loaded, state opened, app built, server (not started).
    `port` overrides the configured one (0: any free port, for tests). Stopping the server cancels running
    verifications and closes the state file. `evidence` and `rules`: see `PosVerificationService`."""
    clients = load_pos_clients(config)
    state = PosState(config.state, device_id)
    if config.state != Path(":memory:"):
        config.state.chmod(0o600)
    service = PosVerificationService(
        verifier, registry, state, record, clock, evidence=evidence, rules=rules, history=history
    )
    authenticator = RequestAuthenticator(clients, state, clock, window_s=config.timestamp_window_s)

    def closed() -> None:
        service.close()
        state.close()

    return PosApiServer(
        build_pos_app(service, authenticator),
        config.host,
        config.port if port is None else port,
        on_stop=closed,
    )


def runtime_evidence(runtime: TerminalRuntime) -> EvidenceSink | None:
    """The evidence sink of an enrolled runtime: the `pos_verification` record signed with the device's identity key
    and put into the outbox in one transaction with its audit event. None for a terminal without an identity."""
    if runtime.security is None:
        return None

    def evidence(record: PosVerificationRecord, event: AuditEvent) -> None:
        runtime.record_signed(SignedRecordKind.POS_VERIFICATION, record.to_record(), with_records=[event])

    return evidence


def _runtime_history(runtime: TerminalRuntime) -> PurchaseHistorySource | None:
    if runtime.server_api is None or runtime.catalogue is None:
        return None
    return ServerPurchaseHistory(runtime.server_api, runtime.catalogue.drug)


def attach_pos_api(
    runtime: TerminalRuntime,
    *,
    registry: ProxyRegistry | None = None,
    show: Show | None = None,
    rules: DrugRules | None = None,
) -> PosApiServer | None:
    """Build the POS API for a built (not yet started) runtime when `[pos_api] enabled`, and set it as
    `runtime.pos_api` so `start()`/`stop()` run it; returns it, or None when disabled. The verifier uses the runtime's
    devices, e-voucher service and face verifier; outcomes go into its outbox: on an enrolled terminal as a signed
    `pos_verification` record plus the audit event (one transaction), otherwise as the audit event only. Without
    `registry` the runtime's own `proxy_registry` is used (kept equal to the server's relationships by
    `runtime.proxy_sync`). `rules` evaluates the drug lines of a request: by default the runtime's catalogue store
    (the rules the regulator published), with the platform's purchase lookback for the period rules when the
    terminal has the device API."""
    config = runtime.config.pos_api
    if not config.enabled:
        return None
    server = build_pos_server(
        config,
        device_id=runtime.config.device_id,
        verifier=RuntimeBuyerVerifier(runtime.devices, runtime.evoucher, runtime.face, show=show),
        registry=registry or runtime.proxy_registry or SqliteProxyRegistry(),
        record=lambda event: runtime.record_audits([event]),
        clock=runtime.clock,
        evidence=runtime_evidence(runtime),
        rules=rules if rules is not None else runtime.catalogue,
        history=_runtime_history(runtime),
    )
    runtime.pos_api = server
    return server
