"""The kiosk's citizen queries (K-11…K-16, K-19), asked of the sync server's national-platform relay.

Owns `NationalQueries`, a thin typed client over `terminal.server_api.ServerApi` (`POST /device/v1/national/{query}`,
signed with the session key): `person_info` by the citizen's 就诊凭证 (an ecToken from the decoded 医保码, an ID
number or a social-security card), then `settlements`, `account_credits` and `contributions` with the `query_ref` the
first answer carried, and `institutions`. Answers are `protocol.national_query` models, already masked by the server
for the screen. Failures become one small tree the UI can act on:

    NationalQueryError (TerminalError)
    ├── QueryUnavailableError     no session key, server or platform unreachable, platform not configured: "try later"
    ├── CredentialNotAcceptedError the platform refused the credential, or the query_ref lapsed: "scan / read again"
    ├── PersonNotInsuredError      nobody insured behind the credential
    └── QueryFailedError           anything else (a refused request, a broken answer): "try later", logged

It must never log or keep a credential, a query_ref or an answer (they are the citizen's), and never retry on its
own: the citizen is standing at the kiosk and decides.
"""

from __future__ import annotations

import logging
from datetime import date
from typing import Any, Final, TypeVar

from pydantic import BaseModel, ValidationError

from protocol.national_query import (
    ContributionsAnswer,
    CreditsAnswer,
    InstitutionsAnswer,
    InstitutionsRequest,
    NationalQuery,
    PersonInfoAnswer,
    PersonInfoRequest,
    RecordsRequest,
    SettlementsAnswer,
)
from terminal.errors import TerminalError
from terminal.server_api import ServerApi
from terminal.session import NoSessionKeyError, ServerRefusedError, ServerUnreachableError

logger = logging.getLogger(__name__)

PATH: Final = "/device/v1/national"


class NationalQueryError(TerminalError):
    """Base of the citizen-query failures the kiosk shows."""


class QueryUnavailableError(NationalQueryError):
    """The query cannot be made now (no session key yet, server or national platform unreachable or not set up)."""


class CredentialNotAcceptedError(NationalQueryError):
    """The credential was refused (expired ecToken, wrong card_sn, bad ID number) or the query_ref lapsed."""


class PersonNotInsuredError(NationalQueryError):
    """The platform knows nobody insured behind the credential."""


class QueryFailedError(NationalQueryError):
    """The server refused the request or answered something unusable (a kiosk or configuration fault)."""


_A = TypeVar("_A", bound=BaseModel)


class NationalQueries:
    """Citizen queries for one kiosk session. Thread-safe as `ServerApi` is; holds no state of its own."""

    def __init__(self, api: ServerApi) -> None:
        self._api = api

    def person_info(self, cert_type: str, cert_no: str, *, card_sn: str | None = None) -> PersonInfoAnswer:
        """K-11/K-12/K-13 by 就诊凭证: '01' ecToken, '02' ID number, '03' social-security card (with `card_sn`)."""
        try:
            request = PersonInfoRequest.model_validate(
                {"mdtrt_cert_type": cert_type, "mdtrt_cert_no": cert_no, "card_sn": card_sn}
            )
        except ValidationError as exc:
            raise CredentialNotAcceptedError("the credential is not in a usable form: read it again") from exc
        return self._ask(NationalQuery.PERSON_INFO, request, PersonInfoAnswer)

    def settlements(
        self, query_ref: str, begndate: date | None = None, enddate: date | None = None
    ) -> SettlementsAnswer:
        """K-14 医保支付明细 (default: the year up to today)."""
        return self._ask(NationalQuery.SETTLEMENTS, _records(query_ref, begndate, enddate), SettlementsAnswer)

    def account_credits(
        self, query_ref: str, begndate: date | None = None, enddate: date | None = None
    ) -> CreditsAnswer:
        """K-15 个账划入."""
        return self._ask(NationalQuery.ACCOUNT_CREDITS, _records(query_ref, begndate, enddate), CreditsAnswer)

    def contributions(
        self, query_ref: str, begndate: date | None = None, enddate: date | None = None
    ) -> ContributionsAnswer:
        """K-16 缴费信息."""
        return self._ask(NationalQuery.CONTRIBUTIONS, _records(query_ref, begndate, enddate), ContributionsAnswer)

    def institutions(self, fixmedins_type: str | None = None, fixmedins_name: str = "") -> InstitutionsAnswer:
        """K-19 定点医院 ('1') / 定点药店 ('2') from the national platform (the synced catalogue works offline)."""
        request = InstitutionsRequest.model_validate(
            {"fixmedins_type": fixmedins_type, "fixmedins_name": fixmedins_name}
        )
        return self._ask(NationalQuery.INSTITUTIONS, request, InstitutionsAnswer)

    def _ask(self, query: NationalQuery, request: BaseModel, answer: type[_A]) -> _A:
        try:
            raw: Any = self._api.post_json(f"{PATH}/{query.value}", request.model_dump(mode="json"))
        except NoSessionKeyError as exc:
            raise QueryUnavailableError("not connected to the server yet: try again shortly") from exc
        except ServerUnreachableError as exc:
            raise QueryUnavailableError("the server cannot be reached: try again later") from exc
        except ServerRefusedError as exc:
            raise _refusal(query, exc) from exc
        try:
            return answer.model_validate(raw)
        except ValidationError as exc:
            logger.warning("national query %s: the server's answer does not match the protocol", query.value)
            raise QueryFailedError(f"the {query.value} answer is not valid") from exc


def _records(query_ref: str, begndate: date | None, enddate: date | None) -> RecordsRequest:
    try:
        return RecordsRequest(query_ref=query_ref, begndate=begndate, enddate=enddate)
    except ValidationError as exc:
        raise QueryFailedError("the date range is not valid (at most 366 days, end not before begin)") from exc


def _refusal(query: NationalQuery, exc: ServerRefusedError) -> NationalQueryError:
    if exc.status == 503:
        return QueryUnavailableError("the national platform is not available: try again later")
    if exc.status == 409:
        return CredentialNotAcceptedError("the credential was not accepted: scan the code or read the card again")
    if exc.status == 404:
        return PersonNotInsuredError("no insured person was found for this credential")
    logger.warning("national query %s refused by the server (HTTP %d)", query.value, exc.status)
    return QueryFailedError(f"the {query.value} query failed (HTTP {exc.status}): try again later")
