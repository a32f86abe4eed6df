"""create_app with ingest on: the lifespan starts the worker and the sweeper, the API sees what a terminal sent,
and shutdown stops every thread and disposes the engine it created."""

from __future__ import annotations

import os
import threading

from protocol import DeviceStatusMessage, LinkState, Topics
from sync_server.app import create_app
from sync_server.db.migrate import upgrade
from sync_server.settings import ServerSettings
from tests.sync_server.conftest import BOOT, Publisher, envelope, heartbeat, serving, wait_until
from yibao.broker import MosquittoBroker


def _our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("yibao-")]


def test_the_app_ingests_and_reports_through_the_api(
    broker: MosquittoBroker, publisher: Publisher, sqlite_url: str
) -> None:
    upgrade(sqlite_url)
    settings = ServerSettings(
        database_url=sqlite_url,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_client_id="test-app-ingest",
        presence_sweep_interval_s=0.1,
    )
    topics = Topics()
    with serving(create_app(settings)) as http:  # engine=None: the lifespan creates and disposes it
        wait_until(lambda: http.get("/healthz").json()["mqtt"] == "connected", what="ingest to subscribe")
        assert http.get("/healthz").json() == {
            "status": "ok",
            "database": "ok",
            "mqtt": "connected",
            "pid": os.getpid(),
        }
        assert sorted(_our_threads()) == ["yibao-commands", "yibao-ingest", "yibao-presence"]
        status = DeviceStatusMessage(device_id="kiosk-100", state=LinkState.ONLINE, boot_id=BOOT)
        publisher.publish(topics.status("kiosk-100"), status.to_bytes(), retain=True)
        publisher.publish(topics.uplink("kiosk-100"), envelope("kiosk-100", 1, heartbeat(interval_s=30)).to_bytes())
        publisher.publish(topics.uplink("kiosk-100"), b"garbage")

        def online() -> bool:
            resp = http.get("/api/v1/devices/kiosk-100")
            return resp.status_code == 200 and resp.json()["online"] is True

        wait_until(online, what="kiosk-100 to show online")
        wait_until(lambda: http.get("/api/v1/ingest/stats").json()["ingest"]["rejected"] == 1, what="the reject")
        stats = http.get("/api/v1/ingest/stats").json()
        assert stats["ingest"]["running"] is True
        assert stats["ingest"]["mqtt"] == "connected"
        assert (stats["ingest"]["stored"], stats["ingest"]["statuses"]) == (1, 1)
        assert stats["database"]["events"] == 1
        assert stats["database"]["devices_online"] == 1
        page = http.get("/").text
        assert 'data-device-id="kiosk-100"' in page
        assert 'data-online="true"' in page
    assert _our_threads() == []
