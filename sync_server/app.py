"""The FastAPI application factory of the sync server.

`create_app(settings, engine=None, start_ingest=True)` wires routers, static files, templates and error handlers,
and the app-wide authorisation check (`sync_server.api.deps.authorize` against `sync_server.authz.ROUTE_POLICIES`);
it raises `ConfigurationError` when a route has no declared policy, so a new endpoint cannot forget one;
its lifespan builds the process's `ServerRuntime`, starts the ingest worker and the presence sweeper, and stops them
(and disposes an engine it created) at shutdown. Database errors during a request are translated once, here, into
HTTP 503 with a JSON body. It must never run migrations (that is `sync_server.service.serve` / `yibao server
migrate`) or keep state outside the app instance.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from protocol import Clock
from sync_server.api import (
    accounts,
    binding,
    catalogues,
    commands,
    devices,
    health,
    ingest,
    institutions,
    machine_clients,
    national,
    pharmacists,
    prescriptions,
    provisioning,
    purchases,
    statistics,
)
from sync_server.api.deps import PageForbiddenError, PageLoginRequiredError, authorize
from sync_server.authz import check_route_policies, document_security
from sync_server.db.async_pg import AsyncDatabaseError
from sync_server.runtime import ServerRuntime
from sync_server.settings import ServerSettings
from sync_server.web import pages

logger = logging.getLogger(__name__)


def create_app(
    settings: ServerSettings,
    *,
    engine: Engine | None = None,
    start_ingest: bool = True,
    clock: Clock | None = None,
) -> FastAPI:
    """Build the app. With `engine=None` the lifespan creates one from `settings.database_url` (and disposes it);
    a given engine stays the caller's. `start_ingest=False` serves the API and pages only (no broker session, no
    sweeper). `clock` is injected into ingest, presence and the pages' notion of "now"."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = ServerRuntime.build(settings, engine=engine, clock=clock, start_ingest=start_ingest)
        app.state.runtime = runtime
        try:
            runtime.start()
            if runtime.hot is not None:
                await runtime.hot.open()
        except BaseException:
            if runtime.hot is not None:
                await runtime.hot.close()
            await run_in_threadpool(runtime.stop)
            raise
        try:
            yield
        finally:
            if runtime.hot is not None:
                await runtime.hot.close()
            await run_in_threadpool(runtime.stop)
            del app.state.runtime

    app = FastAPI(
        title="医保 sync server",
        summary="Device registry, MQTT ingest and operator pages of the 医保 self-service terminal platform.",
        version="0.1.0",
        lifespan=lifespan,
        # Every route's policy (sync_server.authz.ROUTE_POLICIES) is checked before its handler runs.
        dependencies=[Depends(authorize)],
        # FastAPI's built-in OpenTelemetry spans, metrics and logs: nothing here exports them (no SDK is installed),
        # and creating them cost every request CPU the HIS bar at 200 req/s on 2 cores needs (docs/benchmarks.md).
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.templates = pages.make_templates(settings)
    # Routes are matched in this order, one regex after another: the HIS interfaces' routers come first (the bulk
    # of the traffic; no path overlaps another router's, so the order changes nothing else).
    app.include_router(prescriptions.router)
    app.include_router(purchases.router)
    app.include_router(machine_clients.router)
    app.include_router(health.router)
    app.include_router(provisioning.router)
    app.include_router(devices.router)
    app.include_router(commands.router)
    app.include_router(ingest.router)  # operational counters, like /healthz
    app.include_router(institutions.router)
    app.include_router(accounts.router)
    app.include_router(binding.router)
    app.include_router(statistics.router)
    app.include_router(catalogues.router)
    app.include_router(national.router)
    app.include_router(pharmacists.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")
    check_route_policies(app)  # a route without a declared policy stops the server here
    _document_security(app)
    app.add_exception_handler(PageLoginRequiredError, pages.login_redirect)
    app.add_exception_handler(PageForbiddenError, pages.forbidden_page)
    app.add_exception_handler(SQLAlchemyError, _database_unavailable)
    app.add_exception_handler(AsyncDatabaseError, _database_unavailable)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    return app


def _document_security(app: FastAPI) -> None:
    """The OpenAPI document states each operation's security from its route policy (`sync_server.authz`)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_security(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


async def _invalid_request(_request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's default 422 echoes the rejected input, which can be an ID number or a name (a HIS body): the
    # location, message and type of each error only (still FastAPI's documented HTTPValidationError shape).
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors
    ]
    return JSONResponse(status_code=422, content={"detail": detail})


async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, DataError):  # a value the database refuses (out of its range): the request's fault
        logger.info("request refused by the database: %s", type(exc).__name__)
        return JSONResponse(status_code=422, content={"detail": "a value is out of the range the server can store"})
    if not isinstance(exc, AsyncDatabaseError):  # that one was logged where it happened
        logger.warning("request failed on the database: %s", type(exc).__name__)
    return JSONResponse(status_code=503, content={"detail": "the database is unavailable; try again shortly"})
