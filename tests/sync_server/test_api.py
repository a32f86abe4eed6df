"""The REST API over a seeded fleet: shapes, filters, keyset pagination, 404 and 422, and 503 without a database."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from sync_server.app import create_app
from sync_server.db.engine import create_db_engine
from sync_server.db.migrate import upgrade
from sync_server.settings import ServerSettings
from tests.sync_server.conftest import (
    FLEET_NOW,
    INSTITUTION_CODE,
    T0,
    TEST_ADMIN_TOKEN,
    FakeClock,
    pg_schema,
    seed_fleet,
    serving,
)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One seeded database and server per database kind for the whole module: these tests only read."""
    with ExitStack() as stack:
        if request.param == "sqlite":
            db_url = f"sqlite:///{tmp_path_factory.mktemp('api') / 'server.sqlite3'}"
        else:
            db_url = stack.enter_context(pg_schema(request.getfixturevalue("pg_database")))
        upgrade(db_url)
        engine = create_db_engine(db_url)
        stack.callback(engine.dispose)
        seed_fleet(engine)
        settings = ServerSettings(
            database_url=db_url,
            bootstrap_admin_token=SecretStr(TEST_ADMIN_TOKEN),
            data_dir=tmp_path_factory.mktemp("api-data"),
        )
        app = create_app(settings, engine=engine, start_ingest=False, clock=FakeClock(FLEET_NOW))
        yield stack.enter_context(serving(app))


def test_health_reports_database_and_mqtt(client: httpx.Client) -> None:
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "database": "ok", "mqtt": "disabled", "pid": os.getpid()}


def test_device_list(client: httpx.Client) -> None:
    body = client.get("/api/v1/devices").json()
    assert body["total"] == 3
    assert [d["device_id"] for d in body["items"]] == ["kiosk-001", "kiosk-002", "kiosk-003"]
    k1, k2, k3 = body["items"]
    assert (k1["online"], k1["link_state"]) == (True, "online")
    assert (k2["online"], k2["link_state"]) == (False, "online")  # connected per status, heartbeat stale
    assert (k3["online"], k3["link_state"]) == (False, "offline")
    assert k1["institution"]["code"] == INSTITUTION_CODE
    assert k1["institution"]["kind"] == "pharmacy"
    assert k2["institution"] is None
    assert k1["registration"] == "unprovisioned"
    assert k1["software_version"] == "1.2.3"
    assert k1["last_heartbeat_at"] == "2026-03-01T08:00:00Z"
    assert k1["heartbeat_expires_at"] == "2026-03-01T08:00:30Z"
    hb = k1["heartbeat"]
    assert (hb["outbox_depth"], hb["outbox_oldest_age_s"], hb["alarms"]) == (7, 125.0, ["outbox_high"])
    assert [(p["name"], p["state"]) for p in hb["peripherals"]] == [("camera0", "ok"), ("qr0", "fault")]
    assert k3["last_seq"] == 250


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("online=true", ["kiosk-001"]),
        ("online=false", ["kiosk-002", "kiosk-003"]),
        ("limit=1&offset=1", ["kiosk-002"]),
    ],
)
def test_device_list_filters(client: httpx.Client, query: str, expected: list[str]) -> None:
    body = client.get(f"/api/v1/devices?{query}").json()
    assert [d["device_id"] for d in body["items"]] == expected


def test_one_device_and_a_clear_404(client: httpx.Client) -> None:
    assert client.get("/api/v1/devices/kiosk-001").json()["online"] is True
    resp = client.get("/api/v1/devices/nope-1")
    assert resp.status_code == 404
    assert resp.json() == {"detail": "device 'nope-1' is not known to this server"}
    assert client.get("/api/v1/devices/nope-1/events").status_code == 404


def _all_pages(client: httpx.Client, **params: Any) -> tuple[list[int], list[int]]:
    seqs: list[int] = []
    totals: list[int] = []
    after = 0
    while True:
        page = client.get("/api/v1/devices/kiosk-003/events", params={**params, "after_seq": after}).json()
        seqs += [e["seq"] for e in page["items"]]
        totals.append(page["total"])
        if page["next_after_seq"] is None:
            return seqs, totals
        after = page["next_after_seq"]


def test_events_are_paged_by_seq(client: httpx.Client) -> None:
    first = client.get("/api/v1/devices/kiosk-003/events", params={"limit": 100}).json()
    assert (len(first["items"]), first["next_after_seq"], first["total"]) == (100, 100, 250)
    event = first["items"][0]
    assert set(event) == {"seq", "message_id", "payload_type", "device_time", "received_at", "payload"}
    assert (event["seq"], event["payload_type"], event["payload"]["detail"]) == (1, "audit_event", {"n": 1})
    assert event["device_time"] == "2026-03-01T08:00:01Z"
    seqs, totals = _all_pages(client, limit=100)
    assert seqs == list(range(1, 251))
    assert totals == [250, 250, 250]
    exact = client.get("/api/v1/devices/kiosk-003/events", params={"after_seq": 150, "limit": 100}).json()
    assert exact["next_after_seq"] is None  # exactly the last 100: no empty extra page


def test_events_filters(client: httpx.Client) -> None:
    seqs, totals = _all_pages(client, payload_type="heartbeat", limit=7)
    assert seqs == list(range(10, 251, 10))
    assert set(totals) == {25}
    window = {"since": "2026-03-01T08:01:41+00:00", "until": "2026-03-01T16:01:51+08:00"}
    body = client.get("/api/v1/devices/kiosk-003/events", params=window).json()
    assert [e["seq"] for e in body["items"]] == list(range(101, 111))
    assert body["total"] == 10


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 1001},
        {"after_seq": -1},
        {"payload_type": "selfie"},
        {"since": "2026-03-01T08:00:00"},  # no time zone: ambiguous
        {"since": "yesterday"},
        {"since": "2026-03-02T00:00:00Z", "until": "2026-03-01T00:00:00Z"},
    ],
)
def test_malformed_event_queries_are_422(client: httpx.Client, params: dict[str, Any]) -> None:
    resp = client.get("/api/v1/devices/kiosk-003/events", params=params)
    assert resp.status_code == 422
    assert resp.json()["detail"]


def test_malformed_device_id_is_422(client: httpx.Client) -> None:
    assert client.get("/api/v1/devices/a%20b").status_code == 422


def test_ingest_stats_and_institutions(client: httpx.Client) -> None:
    stats = client.get("/api/v1/ingest/stats").json()
    assert stats["ingest"]["running"] is False
    assert stats["ingest"]["mqtt"] == "disabled"
    assert stats["ingest"]["stored"] == 0
    assert stats["database"] == {"events": 252, "devices": 3, "devices_online": 1, "institutions": 1}
    inst = client.get("/api/v1/institutions").json()
    assert inst["total"] == 1
    assert inst["items"][0]["region_code"] == "310115"
    assert inst["items"][0]["created_at"] == T0.isoformat().replace("+00:00", "Z")


def test_without_a_database_the_api_answers_503() -> None:
    dead = create_db_engine("postgresql+psycopg://postgres@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    try:
        app = create_app(ServerSettings(), engine=dead, start_ingest=False)
        with serving(app) as client:
            health = client.get("/healthz")
            assert health.status_code == 503
            assert health.json() == {"status": "error", "database": "error", "mqtt": "disabled", "pid": os.getpid()}
            resp = client.get("/api/v1/devices")
            assert resp.status_code == 503
            assert "database is unavailable" in resp.json()["detail"]
    finally:
        dead.dispose()


def test_openapi_describes_the_endpoints(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert {
        "/healthz",
        "/api/v1/devices",
        "/api/v1/devices/{device_id}",
        "/api/v1/devices/{device_id}/events",
        "/api/v1/ingest/stats",
        "/api/v1/institutions",
    } <= set(spec["paths"])
    assert "/" not in spec["paths"]  # pages are not API
