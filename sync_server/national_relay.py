"""The citizen-query relay: a terminal's query (protocol.national_query) → the `NationalPlatform` → a masked answer.

Owns the mapping of each `NationalQuery` to one platform call, the masking of what comes back (the kiosk shows it to
the citizen standing at it: surname only, ID number first 3 + last 2, no psn_no, no birth date), the `query_ref`
that lets the same terminal ask for the same person's records without ever holding their platform number, and the
audit record of every relayed query.

`query_ref` is SM4-GCM over `{psn_no, device_id, expires}` under a key derived from the server's `secret_key`
(associated data names the purpose): stateless, so any server process can open it, opaque to the terminal, bound to
the terminal it was issued to and short-lived (`national_query_ref_ttl_s`). A ref that does not open, belongs to
another terminal or has expired is refused (`QueryRefRejectedError`): the kiosk asks the citizen for the credential
again.

Every relay is audited (`national.query`: device, query, infno, outcome, record count, and a pseudonymous
`subject_ref` = HMAC-SM3 of the psn_no under the server key, so an auditor can link the queries of one person without
the log naming them). It must never log, audit or store a name, an ID or card number, an ecToken, a psn_no or an
amount, and never retry a call (the platform client does its one re-sign-in itself).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final, Literal, TypeVar

from protocol import Clock
from protocol.gm import sm4
from protocol.gm.errors import CryptoError
from protocol.gm.sm3 import hmac_sm3, sm3_kdf
from protocol.national_query import (
    DEFAULT_RANGE_DAYS,
    MAX_RANGE_DAYS,
    ContributionsAnswer,
    ContributionView,
    CreditsAnswer,
    CreditView,
    IdentityView,
    InstitutionsAnswer,
    InstitutionsRequest,
    InstitutionView,
    InsuranceView,
    NationalQuery,
    PersonInfoAnswer,
    PersonInfoRequest,
    PersonView,
    RecordsRequest,
    SettlementsAnswer,
    SettlementView,
)
from sync_server.audit import ServerAudit
from sync_server.errors import ServerError
from sync_server.masking import mask_id_number, mask_name
from sync_server.national import (
    CHINA_TZ,
    AccountCredit,
    BadSignatureError,
    CertType,
    Contribution,
    CredentialRejectedError,
    Infno,
    NationalPlatform,
    NationalPlatformError,
    PersonNotFoundError,
    ProtocolViolationError,
    RefusedError,
    Settlement,
    UnreachableError,
)

logger = logging.getLogger(__name__)

REF_PURPOSE: Final = b"yibao-national-query-ref-v1"
SUBJECT_PURPOSE: Final = b"|yibao-national-subject-v1"

INFNO: Final[dict[NationalQuery, Infno]] = {
    NationalQuery.PERSON_INFO: Infno.PERSON_INFO,
    NationalQuery.SETTLEMENTS: Infno.SETTLEMENTS,
    NationalQuery.ACCOUNT_CREDITS: Infno.ACCOUNT_CREDITS,
    NationalQuery.CONTRIBUTIONS: Infno.CONTRIBUTIONS,
    NationalQuery.INSTITUTIONS: Infno.INSTITUTIONS,
}


class RelayError(ServerError):
    """Base of the relay's own refusals (the platform's errors keep their `NationalPlatformError` types)."""


class NotConfiguredError(RelayError):
    """This server has no national platform configured (settings `national_platform`)."""


class QueryRangeError(RelayError):
    """The date range asked for is longer than the platform allows (with a default end of today)."""


class QueryRefRejectedError(RelayError):
    """The query_ref does not open, was issued to another terminal, or has expired."""


@dataclass(frozen=True, slots=True)
class _Subject:
    psn_no: str
    ref: str


_T = TypeVar("_T")


class NationalRelay:
    """One relay per request is cheap: it holds references only (the platform client is the runtime's)."""

    def __init__(
        self,
        platform: NationalPlatform | None,
        *,
        secret: bytes,
        clock: Clock,
        audit: ServerAudit,
        ref_ttl_s: int,
    ) -> None:
        self._platform = platform
        self._ref_key = sm3_kdf(secret + b"|" + REF_PURPOSE, sm4.KEY_SIZE)
        self._subject_key = sm3_kdf(secret + SUBJECT_PURPOSE, 32)
        self._clock = clock
        self._audit = audit
        self._ttl_s = ref_ttl_s

    # ------------------------------------------------------------------ queries

    def person_info(self, device_id: str, request: PersonInfoRequest) -> PersonInfoAnswer:
        """1101 by the citizen's credential; the answer masked, with a query_ref for the records queries."""
        platform = self._require(device_id, NationalQuery.PERSON_INFO)
        cert_type = CertType(request.mdtrt_cert_type)
        info = self._call(
            device_id,
            NationalQuery.PERSON_INFO,
            None,
            lambda: platform.person_info(cert_type, request.mdtrt_cert_no, request.card_sn),
            cert_type=cert_type.value,
        )
        base = info.baseinfo
        subject = self._subject(base.psn_no)
        self._record(device_id, NationalQuery.PERSON_INFO, "ok", subject, records=1, cert_type=cert_type.value)
        return PersonInfoAnswer(
            query_ref=self._seal_ref(base.psn_no, device_id),
            query_ref_expires_in_s=self._ttl_s,
            person=PersonView(
                psn_name_masked=mask_name(base.psn_name),
                certno_masked=mask_id_number(base.certno),
                gend=base.gend,
                naty=base.naty,
                age=base.age,
            ),
            insurance=[
                InsuranceView(
                    insutype=i.insutype,
                    psn_type=i.psn_type,
                    psn_insu_stas=i.psn_insu_stas,
                    psn_insu_date=i.psn_insu_date,
                    paus_insu_date=i.paus_insu_date,
                    cvlserv_flag=i.cvlserv_flag,
                    insuplc_admdvs=i.insuplc_admdvs,
                    emp_name=i.emp_name,
                    balance=i.balc,
                )
                for i in info.insuinfo
            ],
            identities=[
                IdentityView(
                    psn_idet_type=d.psn_idet_type, psn_type_lv=d.psn_type_lv, begntime=d.begntime, endtime=d.endtime
                )
                for d in info.idetinfo
            ],
        )

    def settlements(self, device_id: str, request: RecordsRequest) -> SettlementsAnswer:
        """5203: the person's settlements (医保支付明细) in the range."""
        begin, end, rows = self._person_records(device_id, NationalQuery.SETTLEMENTS, request)
        records = [SettlementView.model_validate(s, from_attributes=True) for s in rows]
        return SettlementsAnswer(begndate=begin, enddate=end, records=records)

    def account_credits(self, device_id: str, request: RecordsRequest) -> CreditsAnswer:
        """5207: credits to the person's personal account (个账划入) in the range."""
        begin, end, rows = self._person_records(device_id, NationalQuery.ACCOUNT_CREDITS, request)
        records = [CreditView.model_validate(c, from_attributes=True) for c in rows]
        return CreditsAnswer(begndate=begin, enddate=end, records=records)

    def contributions(self, device_id: str, request: RecordsRequest) -> ContributionsAnswer:
        """5208: the person's contributions (缴费信息) in the range."""
        begin, end, rows = self._person_records(device_id, NationalQuery.CONTRIBUTIONS, request)
        records = [ContributionView.model_validate(c, from_attributes=True) for c in rows]
        return ContributionsAnswer(begndate=begin, enddate=end, records=records)

    def _person_records(
        self, device_id: str, query: NationalQuery, request: RecordsRequest
    ) -> tuple[date, date, Sequence[Settlement | AccountCredit | Contribution]]:
        """One records query about the person behind `request.query_ref`: platform configured, reference opened
        for this terminal, range settled, the call made and audited with the number of records."""
        platform = self._require(device_id, query)
        subject = self._open_ref(device_id, query, request.query_ref)
        begin, end = self._range(request)
        fetchers: dict[NationalQuery, Callable[[str, date, date], Sequence[Settlement | AccountCredit | Contribution]]]
        fetchers = {
            NationalQuery.SETTLEMENTS: platform.settlements,
            NationalQuery.ACCOUNT_CREDITS: platform.account_credits,
            NationalQuery.CONTRIBUTIONS: platform.contributions,
        }
        fetch = fetchers[query]
        rows: Sequence[Settlement | AccountCredit | Contribution] = self._call(
            device_id, query, subject, lambda: fetch(subject.psn_no, begin, end)
        )
        self._record(device_id, query, "ok", subject, records=len(rows))
        return begin, end, rows

    def institutions(self, device_id: str, request: InstitutionsRequest) -> InstitutionsAnswer:
        """1201: designated hospitals and pharmacies (no person involved)."""
        platform = self._require(device_id, NationalQuery.INSTITUTIONS)
        rows = self._call(
            device_id,
            NationalQuery.INSTITUTIONS,
            None,
            lambda: platform.institutions(request.fixmedins_type, request.fixmedins_name),
        )
        self._record(device_id, NationalQuery.INSTITUTIONS, "ok", None, records=len(rows))
        return InstitutionsAnswer(
            institutions=[
                InstitutionView(
                    fixmedins_code=i.fixmedins_code,
                    fixmedins_name=i.fixmedins_name,
                    fixmedins_type=i.fixmedins_type,
                    hosp_lv=i.hosp_lv,
                    admdvs=i.admdvs,
                    addr=i.addr,
                )
                for i in rows
            ]
        )

    # ------------------------------------------------------------------ plumbing

    def _require(self, device_id: str, query: NationalQuery) -> NationalPlatform:
        if self._platform is None:
            self._record(device_id, query, "not_configured", None)
            raise NotConfiguredError(
                "the national platform is not configured on this server (settings national_platform, "
                "national_platform_key_file); citizen queries are unavailable"
            )
        return self._platform

    def _call(
        self,
        device_id: str,
        query: NationalQuery,
        subject: _Subject | None,
        call: Callable[[], _T],
        *,
        cert_type: str | None = None,
    ) -> _T:
        try:
            return call()
        except NationalPlatformError as exc:
            outcome = _outcome(exc)
            reason = exc.reason if isinstance(exc, RefusedError) else None
            self._record(device_id, query, outcome, subject, cert_type=cert_type, reason=reason)
            if outcome not in ("unreachable", "credential_rejected", "person_not_found"):
                # Not the citizen's doing: configuration, keys, or somebody in between. An operator must look.
                logger.error(
                    "national relay: %s for terminal %s refused or broken (%s): check the platform configuration",
                    INFNO[query].value,
                    device_id,
                    outcome,
                )
            raise

    def _record(
        self,
        device_id: str,
        query: NationalQuery,
        outcome: str,
        subject: _Subject | None,
        *,
        records: int | None = None,
        cert_type: str | None = None,
        reason: str | None = None,
    ) -> None:
        fields: dict[str, object] = {"device_id": device_id, "query": query.value, "infno": INFNO[query].value}
        fields["outcome"] = outcome
        if subject is not None:
            fields["subject_ref"] = subject.ref
        if records is not None:
            fields["records"] = records
        if cert_type is not None:
            fields["cert_type"] = cert_type
        if reason:
            fields["reason"] = reason[:32]  # the platform's [REASON] code, never its free text
        self._audit.record("national.query", **fields)

    def _subject(self, psn_no: str) -> _Subject:
        return _Subject(psn_no, hmac_sm3(self._subject_key, psn_no.encode("utf-8")).hex()[:16])

    def _seal_ref(self, psn_no: str, device_id: str) -> str:
        expires = int(self._clock.now().timestamp()) + self._ttl_s
        plain = json.dumps({"p": psn_no, "d": device_id, "e": expires}, separators=(",", ":")).encode("utf-8")
        return base64.urlsafe_b64encode(sm4.seal(self._ref_key, plain, REF_PURPOSE)).decode("ascii")

    def _open_ref(self, device_id: str, query: NationalQuery, ref: str) -> _Subject:
        try:
            plain = sm4.open(self._ref_key, base64.urlsafe_b64decode(ref.encode("ascii")), REF_PURPOSE)
            fields = json.loads(plain)
            psn_no, owner, expires = str(fields["p"]), str(fields["d"]), int(fields["e"])
        except (binascii.Error, UnicodeError, CryptoError, ValueError, KeyError, TypeError) as exc:
            self._record(device_id, query, "ref_rejected", None)
            raise QueryRefRejectedError("the query_ref is not valid: read the citizen's credential again") from exc
        subject = self._subject(psn_no)
        if owner != device_id or self._clock.now().timestamp() >= expires:
            self._record(device_id, query, "ref_rejected", subject)
            raise QueryRefRejectedError(
                "the query_ref has expired or belongs to another terminal: read the citizen's credential again"
            )
        return subject

    def _range(self, request: RecordsRequest) -> tuple[date, date]:
        today = self._clock.now().astimezone(CHINA_TZ).date()
        end = request.enddate or today
        begin = request.begndate or (end - timedelta(days=DEFAULT_RANGE_DAYS))
        if begin > end:
            raise QueryRangeError("begndate is after the end of the range (enddate defaults to today)")
        if (end - begin).days > MAX_RANGE_DAYS:
            raise QueryRangeError(f"the range is longer than {MAX_RANGE_DAYS} days (enddate defaults to today)")
        return begin, end


Outcome = Literal[
    "unreachable",
    "credential_rejected",
    "person_not_found",
    "refused",
    "bad_signature",
    "protocol_violation",
    "platform_error",
]


def _outcome(exc: NationalPlatformError) -> Outcome:
    if isinstance(exc, UnreachableError):
        return "unreachable"
    if isinstance(exc, CredentialRejectedError):
        return "credential_rejected"
    if isinstance(exc, PersonNotFoundError):
        return "person_not_found"
    if isinstance(exc, RefusedError):
        return "refused"
    if isinstance(exc, BadSignatureError):
        return "bad_signature"
    if isinstance(exc, ProtocolViolationError):
        return "protocol_violation"
    return "platform_error"
