"""`POST /device/v1/national/{query}`: a terminal's citizen query relayed to the national platform (K-11…K-16, K-19).

The request and answer shapes are `protocol.national_query` (one per `NationalQuery`); the relay, its masking and its
audit are `sync_server.national_relay`. This module validates the body for the query, calls the relay, and maps
failures to what the kiosk should tell the citizen, always as `{"detail": {"code": …, "message": …}}` (the form
`terminal.server_api` reports):

| failure | status | code | the kiosk says |
|---|---|---|---|
| no platform configured on this server | 503 | `not_configured` | service unavailable |
| platform unreachable (timeout, refused, 5xx) | 503 | `unreachable` | network down, try later |
| credential refused (ecToken expired, card_sn wrong, bad ID) | 409 | `credential_rejected` | scan / read again |
| query_ref expired or from another terminal | 409 | `query_ref_rejected` | scan / read again |
| nobody behind the credential | 404 | `person_not_found` | not insured here |
| range too long, body invalid | 422 | `invalid_request` | (a kiosk bug) |
| anything else (signatures, envelope, sign-in) | 502 | `platform_error` | try later; operators alerted |

It must never echo the request body (it carries a credential) or log anything but the query and the outcome.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from protocol.envelope import summarise_validation_error
from protocol.national_query import InstitutionsRequest, NationalQuery, PersonInfoRequest, RecordsRequest
from sync_server.api.deps import DeviceCallerDep, RuntimeDep
from sync_server.national import CredentialRejectedError, NationalPlatformError, PersonNotFoundError, UnreachableError
from sync_server.national_relay import (
    NationalRelay,
    NotConfiguredError,
    QueryRangeError,
    QueryRefRejectedError,
)
from sync_server.runtime import ServerRuntime

router = APIRouter(prefix="/device/v1/national", tags=["national"])


def relay_of(runtime: ServerRuntime) -> NationalRelay:
    return NationalRelay(
        runtime.national,
        secret=runtime.settings.secret_key.get_secret_value().encode("utf-8"),
        clock=runtime.clock,
        audit=runtime.audit,
        ref_ttl_s=runtime.settings.national_query_ref_ttl_s,
    )


def _error(status_code: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": {"code": code, "message": detail}})


MAX_QUERY_BYTES = 16 * 1024
"""A query is a credential and a few dates; anything larger is refused (413) before it is parsed."""


@router.post(
    "/{query}",
    responses={404: {}, 409: {}, 422: {}, 502: {}, 503: {}},
    max_body_size=MAX_QUERY_BYTES,
)
def relay_query(
    query: NationalQuery,
    body: Annotated[dict[str, Any], Body()],
    runtime: RuntimeDep,
    caller: DeviceCallerDep,
) -> Any:
    """Relay one citizen query for the calling terminal; the answer is masked for the kiosk screen."""
    relay = relay_of(runtime)
    device_id = caller.device_id
    try:
        answer: BaseModel
        if query is NationalQuery.PERSON_INFO:
            answer = relay.person_info(device_id, PersonInfoRequest.model_validate(body))
        elif query is NationalQuery.SETTLEMENTS:
            answer = relay.settlements(device_id, RecordsRequest.model_validate(body))
        elif query is NationalQuery.ACCOUNT_CREDITS:
            answer = relay.account_credits(device_id, RecordsRequest.model_validate(body))
        elif query is NationalQuery.CONTRIBUTIONS:
            answer = relay.contributions(device_id, RecordsRequest.model_validate(body))
        else:
            answer = relay.institutions(device_id, InstitutionsRequest.model_validate(body))
    except ValidationError as exc:
        return _error(422, "invalid_request", f"invalid {query.value} request: {summarise_validation_error(exc)}")
    except QueryRangeError as exc:
        return _error(422, "invalid_request", str(exc))
    except NotConfiguredError as exc:
        return _error(status.HTTP_503_SERVICE_UNAVAILABLE, "not_configured", str(exc))
    except QueryRefRejectedError as exc:
        return _error(status.HTTP_409_CONFLICT, "query_ref_rejected", str(exc))
    except UnreachableError:
        return _error(
            status.HTTP_503_SERVICE_UNAVAILABLE, "unreachable", "the national platform cannot be reached; try later"
        )
    except CredentialRejectedError:
        return _error(
            status.HTTP_409_CONFLICT,
            "credential_rejected",
            "the national platform did not accept the credential: scan the code or read the card again",
        )
    except PersonNotFoundError:
        return _error(status.HTTP_404_NOT_FOUND, "person_not_found", "no insured person behind this credential")
    except NationalPlatformError:
        return _error(
            status.HTTP_502_BAD_GATEWAY,
            "platform_error",
            "the national platform refused or garbled the query; try later (operators are alerted)",
        )
    return JSONResponse(content=answer.model_dump(mode="json"))
