"""The operator pages: `GET /` (device list, auto-refreshing), `GET /devices/{device_id}` (one device and its
events, paged by seq), `GET /bindings` and `GET /statistics` (back-office statistics, D-04), and `GET /login` (the
sign-in form; static/operator.js signs in through the JSON API and drives the approve / reject / unbind forms).

Owns building the page context from the API's query functions and schemas. It must never write or duplicate
query logic the API already has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from protocol import PayloadType
from sync_server.api.binding import application_page, history_page
from sync_server.api.commands import command_page
from sync_server.api.deps import ClockDep, SessionDep, SettingsDep
from sync_server.api.devices import DeviceIdPath, event_page, get_device_or_404, online_clause
from sync_server.api.schemas import DeviceOut
from sync_server.api.statistics import DaysDep, RegionQuery
from sync_server.db.models import BindingStatus, Device
from sync_server.settings import ServerSettings
from sync_server.statistics import (
    MAX_DAYS,
    Scope,
    device_statistics,
    prescription_filings,
    verification_statistics,
)
from sync_server.web.format import (
    ago,
    bar_width,
    command_kind_words,
    command_state_words,
    duration,
    local_time,
    percent,
    peripheral_state_words,
)

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "static"
REFRESH_S = 5
PAGE_DEVICES = 500
PAGE_EVENTS = 50

router = APIRouter(include_in_schema=False)


PAGE_COMMANDS = 10
"""Most recent commands shown on a device page (the API pages through all of them)."""


def make_templates(settings: ServerSettings) -> Jinja2Templates:
    templates = Jinja2Templates(directory=TEMPLATES_DIR)
    tz = ZoneInfo(settings.display_timezone)
    templates.env.filters["localtime"] = lambda value: local_time(value, tz)
    templates.env.filters["duration"] = duration
    templates.env.globals["ago"] = ago
    templates.env.globals["peripheral_state_words"] = peripheral_state_words
    templates.env.globals["command_kind_words"] = command_kind_words
    templates.env.globals["command_state_words"] = command_state_words
    templates.env.globals["tz_name"] = settings.display_timezone
    templates.env.filters["percent"] = percent
    templates.env.globals["bar_width"] = bar_width
    return templates


def _templates(request: Request) -> Jinja2Templates:
    templates = getattr(request.app.state, "templates", None)
    if not isinstance(templates, Jinja2Templates):
        raise RuntimeError("templates are not configured; build the app with create_app()")
    return templates


@router.get("/", response_class=HTMLResponse)
def devices_page(
    request: Request,
    session: SessionDep,
    clock: ClockDep,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> HTMLResponse:
    now = clock.now()
    total = session.scalar(select(func.count()).select_from(Device)) or 0
    online_count = session.scalar(select(func.count()).select_from(Device).where(online_clause(now))) or 0
    rows = session.scalars(
        select(Device)
        .options(selectinload(Device.institution))
        .order_by(Device.device_id)
        .limit(PAGE_DEVICES)
        .offset(offset)
    )
    context: dict[str, Any] = {
        "devices": [DeviceOut.of(row, now=now) for row in rows],
        "total": total,
        "online_count": online_count,
        "offset": offset,
        "page_size": PAGE_DEVICES,
        "now": now,
        "refresh": REFRESH_S,
    }
    return _templates(request).TemplateResponse(request, "devices.html", context)


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device_page(
    request: Request,
    device_id: DeviceIdPath,
    session: SessionDep,
    clock: ClockDep,
    settings: SettingsDep,
    payload_type: Annotated[PayloadType | None, Query()] = None,
    after_seq: Annotated[int, Query(ge=0)] = 0,
) -> HTMLResponse:
    now = clock.now()
    try:
        device = get_device_or_404(session, device_id)
    except HTTPException:
        context = {"device_id": device_id, "now": now}
        return _templates(request).TemplateResponse(request, "not_found.html", context, status_code=404)
    page = event_page(session, device_id, payload_type=payload_type, after_seq=after_seq, limit=PAGE_EVENTS)
    context = {
        "d": DeviceOut.of(device, now=now),
        "page": page,
        "commands": command_page(session, device_id, limit=PAGE_COMMANDS),
        "payload_type": payload_type.value if payload_type is not None else None,
        "payload_types": [t.value for t in PayloadType],
        "after_seq": after_seq,
        "now": now,
        "timeout_factor": settings.heartbeat_timeout_factor,
    }
    return _templates(request).TemplateResponse(request, "device.html", context)


PAGE_BINDINGS = 100


@router.get("/bindings", response_class=HTMLResponse)
def bindings_page(request: Request, session: SessionDep, clock: ClockDep) -> HTMLResponse:
    """Pending binding applications and the binding history (masked and pseudonymous data only). The decide forms
    are rendered disabled; static/operator.js enables them for a signed-in device_admin and calls the API
    (docs/binding.md "Approving in the web UI")."""
    context: dict[str, Any] = {
        "pending": application_page(session, BindingStatus.PENDING, limit=PAGE_BINDINGS),
        "history": history_page(session, limit=PAGE_BINDINGS),
        "now": clock.now(),
    }
    return _templates(request).TemplateResponse(request, "bindings.html", context)


@router.get("/statistics", response_class=HTMLResponse)
def statistics_page(
    request: Request,
    session: SessionDep,
    clock: ClockDep,
    days: DaysDep,
    region: RegionQuery = None,
) -> HTMLResponse:
    """Back-office statistics (D-04): devices, verification methods, prescription filings, as tables with bars drawn
    by CSS (no script, nothing fetched from elsewhere). Unscoped, like the other pages, until there is a login page;
    `region` narrows it to a 医保区划 prefix."""
    scope = Scope(region_prefix=region)
    context: dict[str, Any] = {
        "devices": device_statistics(session, scope, days, now=clock.now()),
        "verifications": verification_statistics(session, scope, days),
        "prescriptions": prescription_filings(session, scope, days),
        "region": region or "",
        "max_days": MAX_DAYS,
        "now": clock.now(),
    }
    return _templates(request).TemplateResponse(request, "statistics.html", context)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, clock: ClockDep) -> HTMLResponse:
    """The sign-in form (and the change-password form an expired password leads to). The page itself holds nothing:
    static/operator.js calls `POST /api/v1/auth/login` and keeps the token in the tab's sessionStorage
    (docs/accounts.md "Signing in on the web pages")."""
    return _templates(request).TemplateResponse(request, "login.html", {"now": clock.now()})
