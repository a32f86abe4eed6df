"""`GET /healthz`: is the database reachable and is ingest connected to the broker.

It must stay cheap (one `SELECT 1`) and never raise: an unreachable database is reported, with HTTP 503.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

from fastapi import APIRouter, Response
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from sync_server.api.deps import RuntimeDep
from sync_server.api.schemas import HealthOut

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, responses={503: {"model": HealthOut}})
def healthz(runtime: RuntimeDep, response: Response) -> HealthOut:
    database: Literal["ok", "error"] = "ok"
    try:
        with runtime.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        logger.warning("health check: database unreachable (%s)", type(exc).__name__)
        database = "error"
    mqtt = runtime.mqtt_state
    if database == "error":
        response.status_code = 503
        status: Literal["ok", "degraded", "error"] = "error"
    elif mqtt == "disconnected":
        status = "degraded"
    else:
        status = "ok"
    return HealthOut(status=status, database=database, mqtt=mqtt, pid=os.getpid())
