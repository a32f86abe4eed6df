"""The e-voucher platform simulator over HTTP: `create_app(simulator)`, a FastAPI app serving POST /v1/ec/decode and
/v1/ec/consume with an injectable response delay for timeout tests.

The wire models and the client adapter (`HttpEVoucherPlatform`) live in `terminal.evoucher_http`, where the
terminal's composition root can use them; this module is the other end of that invented wire format. Like
everything in hardware_sim, never imported by production code.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from hardware_sim.evoucher import EVoucherSimulator
from terminal.evoucher import EVoucherError, TerminalContext
from terminal.evoucher_http import (
    ERROR_CODES,
    ConsumeRequest,
    ConsumeResponse,
    DecodeRequest,
    DecodeResponse,
    ErrorResponse,
)

logger = logging.getLogger(__name__)


def _error_response(exc: EVoucherError) -> JSONResponse:
    for kind, name, status in ERROR_CODES:
        if isinstance(exc, kind):
            return JSONResponse(ErrorResponse(error=name).model_dump(), status_code=status)
    return JSONResponse(ErrorResponse(error="ERROR").model_dump(), status_code=500)


def create_app(simulator: EVoucherSimulator, *, delay_s: float = 0.0) -> FastAPI:
    """The simulated platform as an HTTP service. `app.state.delay_s` delays every answer (set it in a test to make
    the client time out); `simulator.reachable = False` answers 503 to everything."""
    app = FastAPI(title="Simulated e-voucher platform (invented wire format)", docs_url=None, redoc_url=None)
    app.state.delay_s = delay_s

    @app.post("/v1/ec/decode", response_model=DecodeResponse)
    async def decode(request: Annotated[DecodeRequest, Body()]) -> DecodeResponse | JSONResponse:
        await asyncio.sleep(app.state.delay_s)
        try:
            identity = simulator.decode(request.code, TerminalContext(request.org_code, request.device_id))
        except EVoucherError as exc:
            return _error_response(exc)
        return DecodeResponse(
            ec_token=identity.ec_token,
            name=identity.name,
            id_type=identity.id_type,
            id_number=identity.id_number,
            insured_region=identity.insured_region,
        )

    @app.post("/v1/ec/consume", response_model=ConsumeResponse)
    async def consume(request: Annotated[ConsumeRequest, Body()]) -> ConsumeResponse | JSONResponse:
        await asyncio.sleep(app.state.delay_s)
        try:
            receipt = simulator.consume(
                request.ec_token, request.business, TerminalContext(request.org_code, request.device_id)
            )
        except EVoucherError as exc:
            return _error_response(exc)
        return ConsumeResponse(token_ref=receipt.token_ref, business=receipt.business, serial=receipt.serial)

    return app
