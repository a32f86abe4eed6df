"""The server-rendered operator pages: device list (words and colours for online/offline, auto-refresh, stable
hooks for browser tests), device detail with paged events, 404 page, escaping, static CSS; and who may read them:
the login session cookie (HttpOnly, SameSite=Strict) opens the pages and nothing that acts, anonymous browsers are
sent to /login and back, a role that may not read a page gets a 403 page, a regulator sees its region only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser

import httpx
import pytest
from pydantic import SecretStr

from protocol import AuditEvent, AuditOutcome
from protocol.catalogue import CatalogueKind
from protocol.drug_rules import RuleKind
from sync_server.accounts import Role
from sync_server.app import create_app
from sync_server.authz import PAGE_COOKIE
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.migrate import upgrade
from sync_server.settings import ServerSettings
from sync_server.store import store_envelopes
from sync_server.web.pages import CATALOGUE_KIND_WORDS, RULE_KIND_WORDS, catalogue_columns
from tests.sync_server.conftest import FLEET_NOW, T0, TEST_ADMIN_TOKEN, FakeClock, envelope, seed_fleet, serving
from tests.sync_server.test_accounts import GOOD, make_account

XSS = "<script>alert(1)</script>"


class Elements(HTMLParser):
    """Collects every element's tag and attributes, and the text inside elements that carry an id or a data-*
    attribute (enough to find rows and cells the way a browser test would)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        want = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in want.items())]


def parse(html: str) -> Elements:
    parser = Elements()
    parser.feed(html)
    return parser


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    db_url = f"sqlite:///{tmp_path_factory.mktemp('web') / 'server.sqlite3'}"
    upgrade(db_url)
    engine = create_db_engine(db_url)
    try:
        seed_fleet(engine)
        make_account(engine, "web-admin", Role.DEVICE_ADMIN, now=FLEET_NOW)
        make_account(engine, "web-reg-sh", Role.REGULATOR, region_prefix="3101", now=FLEET_NOW)
        make_account(engine, "web-reg-js", Role.REGULATOR, region_prefix="3201", now=FLEET_NOW)
        make_account(engine, "web-pharm", Role.PHARMACIST, institution_id=1, now=FLEET_NOW)
        make_account(engine, "web-new", Role.DEVICE_ADMIN, must_change=True, now=FLEET_NOW)
        hostile = AuditEvent(category="system", action=XSS, outcome=AuditOutcome.INFO)
        with session_factory(engine, write_intent=True).begin() as session:
            store_envelopes(session, [envelope("kiosk-004", 1, hostile)], received_at=T0)
        app = create_app(
            ServerSettings(
                database_url=db_url,
                data_dir=tmp_path_factory.mktemp("web-data"),
                bootstrap_admin_token=SecretStr(TEST_ADMIN_TOKEN),
            ),
            engine=engine,
            start_ingest=False,
            clock=FakeClock(FLEET_NOW),
        )
        with serving(app) as c:
            yield c
    finally:
        engine.dispose()


def test_device_list_page(client: httpx.Client) -> None:
    resp = client.get("/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    html = resp.text
    page = parse(html)
    assert page.find("html", lang="zh-CN")
    assert page.find("meta", http_equiv="refresh", content="5")
    rows = {a["data-device-id"]: a for a in page.find("tr") if "device" in a.get("class", "").split()}
    assert sorted(rows) == ["kiosk-001", "kiosk-002", "kiosk-003", "kiosk-004"]
    assert rows["kiosk-001"]["data-online"] == "true"
    assert rows["kiosk-001"]["id"] == "device-kiosk-001"
    assert rows["kiosk-002"]["data-online"] == "false"
    assert "在线" in html
    assert "离线" in html
    assert page.find("span", class_="badge status-online", data_status="online")
    assert len(page.find("span", class_="badge status-offline", data_status="offline")) == 3
    assert page.find("td", class_="outbox-depth num", data_value="7")
    assert page.find("td", class_="outbox-oldest-age num", data_value="125.0")
    assert "2 分 5 秒" in html  # oldest waiting record, in words
    assert page.find("li", class_="peripheral state-fault", data_peripheral="qr0", data_state="fault")
    assert page.find("li", class_="alarm", data_alarm="outbox_high")
    assert "故障" in html
    assert "2026-03-01 16:00:00" in html  # last heartbeat, shown in Asia/Shanghai
    assert page.find("strong", id="online-count")
    assert ">1<" in html.split('id="online-count"', 1)[1][:5]


def test_device_page_shows_paged_events(client: httpx.Client) -> None:
    page1 = client.get("/devices/kiosk-003")
    assert page1.status_code == 200
    parsed = parse(page1.text)
    events = parsed.find("tr", class_="event")
    assert [int(e["data-seq"]) for e in events] == list(range(1, 51))
    assert parsed.find("a", id="next-page", href="/devices/kiosk-003?after_seq=50")
    assert parsed.find("section", id="device", data_device_id="kiosk-003", data_online="false")
    last = parse(client.get("/devices/kiosk-003", params={"after_seq": 200}).text)
    assert [int(e["data-seq"]) for e in last.find("tr", class_="event")] == list(range(201, 251))
    assert not last.find("a", id="next-page")
    beats = parse(client.get("/devices/kiosk-003", params={"payload_type": "heartbeat"}).text)
    assert {e["data-payload-type"] for e in beats.find("tr", class_="event")} == {"heartbeat"}


def test_payload_text_is_escaped(client: httpx.Client) -> None:
    html = client.get("/devices/kiosk-004").text
    assert XSS not in html
    assert "alert(1)" in html


def test_unknown_device_page_is_a_404_page(client: httpx.Client) -> None:
    resp = client.get("/devices/nope-1")
    assert resp.status_code == 404
    assert "未找到设备" in resp.text
    assert parse(resp.text).find("p", id="not-found")


def test_static_css_is_served(client: httpx.Client) -> None:
    resp = client.get("/static/style.css")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/css")
    assert ".status-online" in resp.text


# ---------------------------------------------------------------------------------------------------- who may read


@contextmanager
def browser(client: httpx.Client, username: str | None) -> Iterator[httpx.Client]:
    """A client with no admin header, signed in as `username` (through the login API, which sets the page cookie)
    or anonymous: what a browser holds."""
    with httpx.Client(base_url=client.base_url, timeout=10.0) as own:
        if username is not None:
            resp = own.post("/api/v1/auth/login", json={"username": username, "password": GOOD})
            assert resp.status_code == 200, resp.text
        yield own


def test_anonymous_browsers_are_sent_to_login_and_back(client: httpx.Client) -> None:
    with browser(client, None) as anonymous:
        for path, back in (("/", "%2F"), ("/statistics?region=31", "%2Fstatistics%3Fregion%3D31")):
            resp = anonymous.get(path)
            assert resp.status_code == 303
            assert resp.headers["location"] == f"/login?next={back}"
        assert anonymous.get("/devices/kiosk-001").status_code == 303
        assert anonymous.get("/bindings").status_code == 303
        login_page = anonymous.get("/login", params={"next": "/"})
        assert login_page.status_code == 200
        assert parse(login_page.text).find("p", id="login-asked")
        assert anonymous.get("/static/style.css").status_code == 200


def test_the_login_cookie_opens_the_pages_and_nothing_that_acts(client: httpx.Client) -> None:
    with browser(client, "web-admin") as admin:
        cookie = next(c for c in admin.cookies.jar if c.name == PAGE_COOKIE)
        assert cookie.has_nonstandard_attr("HttpOnly")
        assert str(cookie.get_nonstandard_attr("SameSite")).lower() == "strict"
        assert cookie.path == "/"
        assert not cookie.secure  # plain HTTP here; Secure is set over HTTPS
        assert (cookie.value or "").startswith("ys_")
        page = admin.get("/")
        assert page.status_code == 200
        assert parse(page.text).find("tr", data_device_id="kiosk-001")
        assert admin.get("/devices/kiosk-003").status_code == 200
        assert admin.get("/api/v1/auth/me").json()["username"] == "web-admin"
        # every API route but /auth/me and /auth/logout ignores the cookie: it cannot make the browser act
        assert admin.get("/api/v1/devices").status_code == 401
        assert admin.post("/api/v1/devices/kiosk-001/unbind", json={"reason": "x", "contact": "y"}).status_code == 401
        # signing out with the cookie alone ends the session and deletes the cookie
        out = admin.post("/api/v1/auth/logout")
        assert out.status_code == 204
        assert PAGE_COOKIE in out.headers["set-cookie"]
        assert PAGE_COOKIE not in admin.cookies
        assert admin.get("/").status_code == 303


def test_an_ended_or_forged_session_cookie_is_dropped(client: httpx.Client) -> None:
    with browser(client, None) as forged:
        forged.cookies.set(PAGE_COOKIE, "ys_" + "0" * 43)
        resp = forged.get("/")
        assert resp.status_code == 303
        assert f'{PAGE_COOKIE}=""' in resp.headers["set-cookie"]
        forged.cookies.clear()
        forged.cookies.set(PAGE_COOKIE, TEST_ADMIN_TOKEN)  # only a login session is ever taken from the cookie
        assert forged.get("/").status_code == 303


def test_a_role_that_may_not_read_a_page_gets_a_403_page(client: httpx.Client) -> None:
    with browser(client, "web-pharm") as pharmacist:
        resp = pharmacist.get("/")
        assert resp.status_code == 403
        assert "无权查看此页面" in resp.text
        assert parse(resp.text).find("a", id="switch-account", href="/login")
        assert pharmacist.get("/statistics").status_code == 403
    with browser(client, "web-new") as must_change:  # an initial password: change it first, on /login
        assert must_change.get("/").headers["location"] == "/login?next=%2F"


def test_a_regulator_sees_its_region_only(client: httpx.Client) -> None:
    with browser(client, "web-reg-sh") as shanghai:
        page = parse(shanghai.get("/").text)
        assert [a["data-device-id"] for a in page.find("tr") if "data-device-id" in a] == ["kiosk-001"]
        device = shanghai.get("/devices/kiosk-001")
        assert device.status_code == 200
        assert parse(device.text).find("p", id="events-hidden")  # device events are the device admin's
        assert not parse(device.text).find("table", id="events")
        assert shanghai.get("/devices/kiosk-003").status_code == 404  # bound to no institution in its region
        stats = parse(shanghai.get("/statistics").text)
        assert stats.find("section", id="verifications-section")
        assert shanghai.get("/statistics", params={"region": "32"}).status_code == 403
    with browser(client, "web-reg-js") as jiangsu:
        page = parse(jiangsu.get("/").text)
        assert [a for a in page.find("tr") if "data-device-id" in a] == []
        assert jiangsu.get("/devices/kiosk-001").status_code == 404
    with browser(client, "web-admin") as admin:
        stats = parse(admin.get("/statistics").text)
        assert not stats.find("section", id="verifications-section")  # not a device admin's API
        assert stats.find("p", id="sections-hidden")
        assert parse(admin.get("/devices/kiosk-003").text).find("table", id="events")


def test_the_rules_page_has_words_for_every_rule_kind_and_is_for_fleet_readers(client: httpx.Client) -> None:
    assert set(RULE_KIND_WORDS) == {kind.value for kind in RuleKind}
    with browser(client, None) as anonymous:
        assert anonymous.get("/catalogue").headers["location"] == "/login?next=%2Fcatalogue"
    with browser(client, "web-reg-sh") as regulator:
        page = regulator.get("/catalogue")
        assert page.status_code == 200
        assert parse(page.text).find("p", id="rules-version", data_version="0")
        assert parse(page.text).find("form", id="rules-form")
        # the catalogue form: every kind with its current version (nothing published here) and its CSV columns
        assert parse(page.text).find("form", id="catalogue-form")
        options = [o for o in parse(page.text).find("option") if "data-columns" in o]
        assert [(o["value"], o["data-version"]) for o in options] == [(k.value, "0") for k in CatalogueKind]
        assert json.loads(options[0]["data-columns"]) == list(catalogue_columns(CatalogueKind.DRUG))
        assert parse(page.text).find("input", id="catalogue-file", type="file", accept=".json,.csv")
    with browser(client, "web-pharm") as pharmacist:
        assert pharmacist.get("/catalogue").status_code == 403


def test_the_catalogue_form_knows_every_kind_and_its_columns() -> None:
    assert set(CATALOGUE_KIND_WORDS) == {kind.value for kind in CatalogueKind}
    drug = {c["name"]: c for c in catalogue_columns(CatalogueKind.DRUG)}
    assert "kind" not in drug
    assert (drug["code"]["required"], drug["code"]["type"], drug["code"]["blank"]) == (True, "text", False)
    assert (drug["price_fen"]["required"], drug["price_fen"]["type"]) == (False, "int")
    assert (drug["homologous_herb"]["required"], drug["homologous_herb"]["type"]) == (False, "bool")
    assert (drug["category"]["type"], drug["category"]["choices"]) == ("choice", ["甲", "乙", "丙"])
    assert (drug["limit_note"]["required"], drug["limit_note"]["blank"]) == (False, False)
    institution = {c["name"]: c for c in catalogue_columns(CatalogueKind.INSTITUTION)}
    assert institution["level"]["choices"] == ["3", "2", "1", "0"]
    assert (institution["address"]["required"], institution["address"]["blank"]) == (True, True)
    assert institution["region_code"]["blank"] is False
    treatment = [c["name"] for c in catalogue_columns(CatalogueKind.TREATMENT) if c["required"]]
    assert treatment == ["code", "name", "unit", "category"]
