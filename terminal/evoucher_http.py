"""The HTTP adapter of the e-voucher seam: `HttpEVoucherPlatform`, a `terminal.evoucher.EVoucherPlatform` over httpx,
and the wire models it shares with the simulated platform (`hardware_sim.evoucher_http` serves the other end).

The wire format is INVENTED (the real SDK's is not public); what this adapter shows is the shape a real SDK adapter
must have: one timeout, every transport failure and 5xx translated into `PlatformUnreachableError` once, at the
boundary, every platform refusal into its typed error, never a retry of `decode` (a resent code is a replay), and no
code, token or identity in a log line. The terminal's composition root (`terminal.devices.open_evoucher_platform`)
builds it from `[evoucher]`; this module must never import `hardware_sim`.
"""

from __future__ import annotations

import logging
from typing import Final

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from terminal.evoucher import (
    BusinessType,
    CodeExpiredError,
    CodeForgedError,
    CodeInvalidError,
    CodeMalformedError,
    CodeReplayedError,
    ConsumeReceipt,
    EVoucherError,
    EVoucherIdentity,
    IdType,
    NotAuthorizedError,
    PlatformUnreachableError,
    TerminalContext,
    TokenInvalidError,
    TokenUsedError,
)

logger = logging.getLogger(__name__)

# Most specific first: CodeForgedError is a CodeInvalidError.
ERROR_CODES: Final[tuple[tuple[type[EVoucherError], str, int], ...]] = (
    (CodeMalformedError, "CODE_MALFORMED", 400),
    (CodeForgedError, "CODE_FORGED", 400),
    (CodeInvalidError, "CODE_INVALID", 400),
    (CodeExpiredError, "CODE_EXPIRED", 410),
    (CodeReplayedError, "CODE_REPLAYED", 409),
    (TokenUsedError, "TOKEN_USED", 409),
    (TokenInvalidError, "TOKEN_INVALID", 400),
    (NotAuthorizedError, "NOT_AUTHORIZED", 403),
    (PlatformUnreachableError, "UNAVAILABLE", 503),
)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DecodeRequest(_Wire):
    code: str = Field(max_length=1024, description="The dynamic code text as scanned.")
    org_code: str = Field(max_length=32, description="The designated institution's code.")
    device_id: str = Field(max_length=64, description="The terminal's device id.")


class DecodeResponse(_Wire):
    ec_token: str = Field(min_length=40, max_length=40, description="Single-use token for one business call.")
    name: str = Field(max_length=64)
    id_type: IdType
    id_number: str = Field(max_length=32)
    insured_region: str = Field(pattern=r"^\d{6}$")


class ConsumeRequest(_Wire):
    ec_token: str = Field(max_length=64)
    business: BusinessType
    org_code: str = Field(max_length=32)
    device_id: str = Field(max_length=64)


class ConsumeResponse(_Wire):
    token_ref: str = Field(max_length=64)
    business: BusinessType
    serial: str = Field(max_length=64)


class ErrorResponse(_Wire):
    error: str = Field(max_length=32, description="One of the ERROR_CODES names.")


class HttpEVoucherPlatform:
    """`EVoucherPlatform` over HTTP against `create_app`. One httpx client (connection reuse), one timeout for the
    whole call; not retried. Close it (or use it as a context manager) when the terminal stops."""

    def __init__(self, base_url: str, *, timeout_s: float = 3.0, client: httpx.Client | None = None) -> None:
        self._client = client or httpx.Client(base_url=base_url, timeout=timeout_s)

    def __enter__(self) -> HttpEVoucherPlatform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def decode(self, code: str, context: TerminalContext) -> EVoucherIdentity:
        request = DecodeRequest(code=code, org_code=context.org_code, device_id=context.device_id)
        body = self._post("/v1/ec/decode", request)
        try:
            answer = DecodeResponse.model_validate_json(body)
        except ValidationError as exc:
            raise EVoucherError("platform answered decode with an unexpected body") from exc
        return EVoucherIdentity(
            ec_token=answer.ec_token,
            name=answer.name,
            id_type=answer.id_type,
            id_number=answer.id_number,
            insured_region=answer.insured_region,
        )

    def consume(self, ec_token: str, business: BusinessType, context: TerminalContext) -> ConsumeReceipt:
        request = ConsumeRequest(
            ec_token=ec_token, business=business, org_code=context.org_code, device_id=context.device_id
        )
        body = self._post("/v1/ec/consume", request)
        try:
            answer = ConsumeResponse.model_validate_json(body)
        except ValidationError as exc:
            raise EVoucherError("platform answered consume with an unexpected body") from exc
        return ConsumeReceipt(answer.token_ref, answer.business, answer.serial)

    def _post(self, path: str, request: _Wire) -> bytes:
        try:
            response = self._client.post(path, content=request.model_dump_json(), headers=_JSON)
        except httpx.TimeoutException as exc:
            raise PlatformUnreachableError(f"e-voucher platform timed out on {path}") from exc
        except httpx.TransportError as exc:
            raise PlatformUnreachableError(f"e-voucher platform unreachable on {path}: {type(exc).__name__}") from exc
        if response.status_code == 200:
            return response.content
        if response.status_code in (502, 503, 504):  # the platform or a gateway in front of it is down
            raise PlatformUnreachableError(f"e-voucher platform answered {response.status_code} on {path}")
        try:
            name = ErrorResponse.model_validate_json(response.content).error
        except ValidationError as exc:
            raise EVoucherError(f"e-voucher platform answered {response.status_code} on {path}") from exc
        for kind, code, _status in ERROR_CODES:
            if code == name:
                raise kind(f"e-voucher platform refused: {name}")
        raise EVoucherError(f"e-voucher platform answered {response.status_code} {name} on {path}")


_JSON: Final = {"content-type": "application/json"}
