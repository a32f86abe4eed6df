"""The operator pages: `GET /` (device list, auto-refreshing), `GET /devices/{device_id}` (one device and its
events, paged by seq), `GET /bindings`, `GET /statistics` (back-office statistics, D-04), `GET /catalogue` (the
drug-usage rules and the catalogue versions; a regulator publishes the next rule set there, a regulator or device
admin the next version of a catalogue from a JSON or CSV file), and `GET /login` (the sign-in form;
static/operator.js signs in through the JSON API and drives the approve / reject / unbind forms and the two
publishing forms).

Every page but /login needs a signed-in operator (the login session cookie, or a bearer token) whose role may read
the API the page shows, and shows what that API would show the same caller: a regulator its region, an institution
head its institution, a section of an API the role may not read left out (`sync_server.authz`, policies made with
`page(...)`). Without credentials `login_redirect` sends the browser to /login and back; a role that may not read a
page gets `forbidden_page`.

Owns building the page context from the API's query functions and schemas. It must never write or duplicate
query logic the API already has.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from protocol import PayloadType
from protocol.catalogue import ENTRY_MODELS, MAX_CATALOGUE_DOCUMENT_BYTES, CatalogueKind
from protocol.drug_rules import DrugRule
from sync_server import catalogues
from sync_server.api.binding import application_page, history_page
from sync_server.api.catalogues import get_drug_rules, list_catalogue_versions
from sync_server.api.commands import command_page
from sync_server.api.deps import (
    ClockDep,
    PageForbiddenError,
    PageLoginRequiredError,
    Principal,
    PrincipalDep,
    RegionDep,
    SessionDep,
    SettingsDep,
    clear_session_cookie,
)
from sync_server.api.devices import DeviceIdPath, event_page, get_scoped_device_or_404, list_devices
from sync_server.api.schemas import DeviceOut
from sync_server.api.statistics import DaysDep, RegionQuery, caller_scope
from sync_server.authz import ROUTE_POLICIES
from sync_server.db.models import BindingStatus
from sync_server.runtime import ServerRuntime
from sync_server.settings import ServerSettings
from sync_server.statistics import (
    MAX_DAYS,
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


def _may_read(principal: Principal, route: str) -> bool:
    """Does the caller's role let it read the API route `route` ("METHOD /path")? A page shows a section only then:
    a page never shows more than its API would."""
    policy = ROUTE_POLICIES[route]
    return policy.allows(principal.roles)


@router.get("/", response_class=HTMLResponse)
def devices_page(
    request: Request,
    session: SessionDep,
    clock: ClockDep,
    region: RegionDep,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> HTMLResponse:
    """The devices the caller may see (a regulator: its region's), as the device API lists them."""
    devices = list_devices(session, clock, region, online=None, limit=PAGE_DEVICES, offset=offset)
    online = list_devices(session, clock, region, online=True, limit=1, offset=0)
    context: dict[str, Any] = {
        "devices": devices.items,
        "total": devices.total,
        "online_count": online.total,
        "offset": offset,
        "page_size": PAGE_DEVICES,
        "now": clock.now(),
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
    principal: PrincipalDep,
    region: RegionDep,
    payload_type: Annotated[PayloadType | None, Query()] = None,
    after_seq: Annotated[int, Query(ge=0)] = 0,
) -> HTMLResponse:
    """One device; its commands and events only for a caller who may read them through the API (device admin)."""
    now = clock.now()
    try:
        device = get_scoped_device_or_404(session, device_id, region)
    except HTTPException:
        context = {"device_id": device_id, "now": now}
        return _templates(request).TemplateResponse(request, "not_found.html", context, status_code=404)
    page = (
        event_page(session, device_id, payload_type=payload_type, after_seq=after_seq, limit=PAGE_EVENTS)
        if _may_read(principal, "GET /api/v1/devices/{device_id}/events")
        else None
    )
    commands = (
        command_page(session, device_id, limit=PAGE_COMMANDS)
        if _may_read(principal, "GET /api/v1/devices/{device_id}/commands")
        else None
    )
    context = {
        "d": DeviceOut.of(device, now=now),
        "page": page,
        "commands": commands,
        "payload_type": payload_type.value if payload_type is not None else None,
        "payload_types": [t.value for t in PayloadType],
        "after_seq": after_seq,
        "now": now,
        "timeout_factor": settings.heartbeat_timeout_factor,
    }
    return _templates(request).TemplateResponse(request, "device.html", context)


PAGE_BINDINGS = 100


@router.get("/bindings", response_class=HTMLResponse)
def bindings_page(request: Request, session: SessionDep, clock: ClockDep, region: RegionDep) -> HTMLResponse:
    """Pending binding applications and the binding history (masked and pseudonymous data only; a regulator sees
    its region's). The decide forms are rendered disabled; static/operator.js enables them for a signed-in
    device_admin and calls the API (docs/binding.md "Approving in the web UI")."""
    context: dict[str, Any] = {
        "pending": application_page(session, BindingStatus.PENDING, region=region, limit=PAGE_BINDINGS),
        "history": history_page(session, region=region, limit=PAGE_BINDINGS),
        "now": clock.now(),
    }
    return _templates(request).TemplateResponse(request, "bindings.html", context)


@router.get("/statistics", response_class=HTMLResponse)
def statistics_page(
    request: Request,
    session: SessionDep,
    clock: ClockDep,
    principal: PrincipalDep,
    days: DaysDep,
    region: RegionQuery = None,
) -> HTMLResponse:
    """Back-office statistics (D-04): devices, verification methods, prescription filings, as tables with bars drawn
    by CSS (no script, nothing fetched from elsewhere), in the caller's scope exactly as the API counts them (a
    regulator its region, an institution head its institution); `region` narrows it to a 医保区划 prefix inside
    that. A section whose API the caller may not read is left out."""
    try:
        scope = caller_scope(principal, region)
    except HTTPException as exc:
        raise PageForbiddenError(str(exc.detail)) from exc
    context: dict[str, Any] = {
        "devices": device_statistics(session, scope, days, now=clock.now()),
        "verifications": verification_statistics(session, scope, days)
        if _may_read(principal, "GET /api/v1/statistics/verifications")
        else None,
        "prescriptions": prescription_filings(session, scope, days)
        if _may_read(principal, "GET /api/v1/statistics/prescriptions")
        else None,
        "region": region or "",
        "max_days": MAX_DAYS,
        "now": clock.now(),
    }
    return _templates(request).TemplateResponse(request, "statistics.html", context)


RULE_KIND_WORDS: dict[str, tuple[str, str]] = {
    "max_quantity_per_purchase": ("单次限量", "quantity per purchase"),
    "max_quantity_per_period": ("期间限量", "quantity per period"),
    "max_days_supply_per_period": ("期间用药天数", "days' supply per period"),
    "max_purchases_per_period": ("期间购药次数", "purchases per period"),
    "max_amount_per_purchase": ("单次限额", "amount per purchase"),
    "age_range": ("年龄限制", "age range"),
    "sex_restriction": ("性别限制", "sex"),
    "prescription_required": ("凭处方购买", "prescription required"),
    "combination_limit": ("联用限制", "combination"),
    "early_refill": ("提前购药", "early refill"),
}
"""Each rule kind of `protocol.drug_rules.RuleKind` in words (a test keeps the two equal)."""
_COMMON_RULE_FIELDS = frozenset({"rule_id", "title", "title_en", "drugs", "action", "stages", "basis", "kind"})


def _rule_view(rule: DrugRule) -> dict[str, Any]:
    data = rule.model_dump(mode="json")
    return {
        "rule_id": rule.rule_id,
        "title": rule.title,
        "title_en": rule.title_en,
        "kind": RULE_KIND_WORDS[rule.kind],
        "action": rule.action.value,
        "stages": [stage.value for stage in rule.stages],
        "drugs": [*rule.drugs.generic_names, *rule.drugs.drug_codes],
        "limits": {k: v for k, v in data.items() if k not in _COMMON_RULE_FIELDS},
        "basis": rule.basis,
    }


CATALOGUE_KIND_WORDS: dict[str, tuple[str, str]] = {
    "drug": ("医保药品目录", "drugs"),
    "treatment": ("诊疗项目目录", "treatment items"),
    "institution": ("定点医药机构", "designated institutions"),
}
"""Each `protocol.catalogue.CatalogueKind` in words (a test keeps the two equal)."""


@cache
def catalogue_columns(kind: CatalogueKind) -> tuple[dict[str, Any], ...]:
    """The CSV columns of a catalogue kind, read from its entry model (docs/catalogue.md "Publishing on the web"):
    `name`, `required`, `type` ("text", "int", "bool" or "choice" with its `choices`) and `blank` (a required text
    column that may be empty, like an institution's `address`: an empty cell is sent as "" instead of left out).
    static/operator.js checks a file's header against them and turns cells into JSON values; the server validates."""
    schema = ENTRY_MODELS[kind].model_json_schema()
    defs = schema.get("$defs", {})
    required = set(schema.get("required", []))
    columns: list[dict[str, Any]] = []
    for name, prop in schema["properties"].items():
        if name == "kind":
            continue
        options = [prop, *prop.get("anyOf", [])]
        resolved = [defs[o["$ref"].rsplit("/", 1)[-1]] if "$ref" in o else o for o in options]
        types = {o.get("type") for o in resolved}
        choices = next((list(o["enum"]) for o in resolved if "enum" in o), [])
        if choices:
            kind_of = "choice"
        elif "integer" in types:
            kind_of = "int"
        elif "boolean" in types:
            kind_of = "bool"
        else:
            kind_of = "text"
        blank = name in required and kind_of == "text" and not prop.get("minLength") and "pattern" not in prop
        columns.append(
            {"name": name, "required": name in required, "type": kind_of, "choices": choices, "blank": blank}
        )
    return tuple(columns)


def _catalogue_kind_views(session: Session) -> list[dict[str, Any]]:
    latest = catalogues.latest_versions(session)
    return [
        {
            "kind": kind.value,
            "words": CATALOGUE_KIND_WORDS[kind.value],
            "version": latest[kind][0] if kind in latest else 0,
            "columns": list(catalogue_columns(kind)),
        }
        for kind in CatalogueKind
    ]


@router.get("/catalogue", response_class=HTMLResponse)
def catalogue_page(request: Request, session: SessionDep, clock: ClockDep) -> HTMLResponse:
    """The drug-usage knowledge base the terminals hold (P-05, R-11) in words, a form for a regulator to publish
    the next version (prefilled with the current one as JSON; static/operator.js sends it to
    `PUT /api/v1/drug-rules`), the published catalogue versions, as `GET /api/v1/drug-rules` and
    `GET /api/v1/catalogues` answer them, and a form to publish the next version of a catalogue from a file (each
    kind's current version and CSV columns are in its `<option>`; static/operator.js reads the file and sends it to
    `POST /api/v1/catalogues/{kind}/versions` with that version as `base_version`)."""
    current = get_drug_rules(session)
    editable = json.dumps({"rules": [r.model_dump(mode="json") for r in current.rules]}, ensure_ascii=False, indent=2)
    context: dict[str, Any] = {
        "rules": current,
        "rule_views": [_rule_view(r) for r in current.rules],
        "editable": editable,
        "catalogues": list_catalogue_versions(session, kind=None, limit=100, offset=0),
        "catalogue_kinds": _catalogue_kind_views(session),
        "catalogue_kind_words": CATALOGUE_KIND_WORDS,
        "catalogue_max_bytes": MAX_CATALOGUE_DOCUMENT_BYTES,
        "now": clock.now(),
    }
    return _templates(request).TemplateResponse(request, "catalogue.html", context)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, clock: ClockDep) -> HTMLResponse:
    """The sign-in form (and the change-password form an expired password leads to). The page itself holds nothing:
    static/operator.js calls `POST /api/v1/auth/login` and keeps the token in the tab's sessionStorage
    (docs/accounts.md "Signing in on the web pages")."""
    asked = request.query_params.get("next") is not None
    return _templates(request).TemplateResponse(request, "login.html", {"now": clock.now(), "asked": asked})


async def login_redirect(request: Request, exc: Exception) -> Response:
    """A page asked for without valid credentials: 303 to /login, which comes back here after signing in (and an
    ended session's cookie is dropped)."""
    next_path = exc.next_path if isinstance(exc, PageLoginRequiredError) else "/"
    response = RedirectResponse(f"/login?next={quote(next_path, safe='')}", status_code=303)
    if isinstance(exc, PageLoginRequiredError) and exc.forget_cookie:
        clear_session_cookie(response, request)
    return response


async def forbidden_page(request: Request, exc: Exception) -> Response:
    """A signed-in operator whose role may not read this page: 403, said in words, with a way to sign in as
    someone else."""
    runtime = getattr(request.app.state, "runtime", None)
    now = runtime.clock.now() if isinstance(runtime, ServerRuntime) else datetime.now(UTC)
    context = {"now": now, "reason": str(exc)}
    return _templates(request).TemplateResponse(request, "forbidden.html", context, status_code=403)
