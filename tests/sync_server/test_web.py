"""The server-rendered operator pages: device list (words and colours for online/offline, auto-refresh, stable
hooks for browser tests), device detail with paged events, 404 page, escaping, static CSS."""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser

import httpx
import pytest

from protocol import AuditEvent, AuditOutcome
from sync_server.app import create_app
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.migrate import upgrade
from sync_server.settings import ServerSettings
from sync_server.store import store_envelopes
from tests.sync_server.conftest import FLEET_NOW, T0, FakeClock, envelope, seed_fleet, serving

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
        hostile = AuditEvent(category="system", action=XSS, outcome=AuditOutcome.INFO)
        with session_factory(engine, write_intent=True).begin() as session:
            store_envelopes(session, [envelope("kiosk-004", 1, hostile)], received_at=T0)
        app = create_app(
            ServerSettings(database_url=db_url, data_dir=tmp_path_factory.mktemp("web-data")),
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
