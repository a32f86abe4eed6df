"""Durable commands on the server: the state machine in `device_commands` (queued -> delivered -> acknowledged |
expired), the REST API, the device page, and the whole path through a real Mosquitto, the real server app (ingest +
dispatcher) and a real terminal runtime: applied once, answered once, delivered after an absence, never when expired."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy import Engine, func, select

from hardware_sim import simulated_peripherals
from protocol import (
    CommandKind,
    CommandOutcome,
    CommandResult,
    DeviceCommand,
    DeviceStatusMessage,
    LinkState,
    PayloadType,
    Topics,
)
from sync_server.app import create_app
from sync_server.commands import (
    CommandDispatcher,
    commands_to_publish,
    expire_commands,
    issue_command,
    mark_published,
    record_command_results,
)
from sync_server.db.engine import session_factory
from sync_server.db.models import CommandState, Event, IssuedCommand
from sync_server.settings import ServerSettings
from sync_server.store import apply_statuses, register_devices
from terminal.runtime import TerminalRuntime, build_runtime
from tests.sync_server.conftest import BOOT, T0, FakeClock, Publisher, envelope, serving, wait_until
from tests.sync_server.test_ingest import make_settings, publish_all, running, settled
from tests.terminal.conftest import DEVICE_ID, terminal_config
from yibao.broker import MosquittoBroker

TOPICS = Topics()


def writer(engine: Engine) -> Any:
    return session_factory(engine, write_intent=True).begin()


def issue(engine: Engine, device_id: str, kind: CommandKind = CommandKind.PING, *, ttl_s: float = 600) -> uuid.UUID:
    with writer(engine) as session:
        register_devices(session, {device_id}, now=T0)
        return issue_command(session, device_id=device_id, kind=kind, args={}, ttl_s=ttl_s, now=T0).command_id


def command_row(engine: Engine, command_id: uuid.UUID) -> IssuedCommand:
    with session_factory(engine)() as session:
        row = session.scalar(select(IssuedCommand).where(IssuedCommand.command_id == command_id))
        assert row is not None
        return row


def due(engine: Engine, *, at: Any = T0, republish_after_s: float = 300) -> list[uuid.UUID]:
    with session_factory(engine)() as session:
        return [r.command_id for r in commands_to_publish(session, now=at, republish_after_s=republish_after_s)]


def result_for(command_id: uuid.UUID, outcome: CommandOutcome = CommandOutcome.APPLIED) -> CommandResult:
    return CommandResult(command_id=command_id, outcome=outcome, detail="pong", applied_at=T0)


# ---------------------------------------------------------------------- store level


def test_queued_delivered_republished_on_interval_and_when_the_device_returns(engine: Engine) -> None:
    cid = issue(engine, "kiosk-100")
    assert due(engine) == [cid], "a queued command is due at once"
    with writer(engine) as session:
        assert mark_published(session, [cid], now=T0) == 1
    row = command_row(engine, cid)
    assert (row.state, row.attempts, row.last_published_at) == (CommandState.DELIVERED, 1, T0)
    assert due(engine, at=T0 + timedelta(seconds=299)) == [], "delivered, not yet due again"
    assert due(engine, at=T0 + timedelta(seconds=300)) == [cid], "re-published after the interval"
    online = DeviceStatusMessage(device_id="kiosk-100", state=LinkState.ONLINE, boot_id=BOOT, at=T0)
    with writer(engine) as session:
        apply_statuses(session, [online], received_at=T0 + timedelta(seconds=10))
    assert due(engine, at=T0 + timedelta(seconds=11)) == [cid], "the device came back after the last publish"
    with writer(engine) as session:
        mark_published(session, [cid], now=T0 + timedelta(seconds=11))
    assert due(engine, at=T0 + timedelta(seconds=12)) == []
    assert command_row(engine, cid).attempts == 2


def test_an_unanswered_command_expires_and_is_never_published_after_that(engine: Engine) -> None:
    cid = issue(engine, "kiosk-101", ttl_s=60)
    later = T0 + timedelta(seconds=60)
    assert due(engine, at=later) == [], "never published at or after expires_at"
    published: list[tuple[str, bytes]] = []

    def publish(device_id: str, payload: bytes) -> bool:
        published.append((device_id, payload))
        return True

    dispatcher = CommandDispatcher(engine, publish, interval_s=60, republish_after_s=300, clock=FakeClock(later))
    assert dispatcher.dispatch_once() == 0
    assert published == []
    assert command_row(engine, cid).state is CommandState.EXPIRED
    assert dispatcher.stats().expired == 1
    with writer(engine) as session:
        assert expire_commands(session, now=later) == 0
        assert mark_published(session, [cid], now=later) == 0, "an expired command stays expired"


def test_dispatcher_publishes_wire_commands_and_waits_when_the_client_refuses(engine: Engine) -> None:
    cid = issue(engine, "kiosk-102", CommandKind.LOG_REQUEST)
    accepting = False
    published: list[tuple[str, bytes]] = []

    def publish(device_id: str, payload: bytes) -> bool:
        if accepting:
            published.append((device_id, payload))
        return accepting

    dispatcher = CommandDispatcher(engine, publish, interval_s=60, republish_after_s=300, clock=FakeClock(T0))
    assert dispatcher.dispatch_once() == 0
    assert command_row(engine, cid).state is CommandState.QUEUED, "not accepted: still queued"
    accepting = True
    assert dispatcher.dispatch_once() == 1
    [(device_id, payload)] = published
    wire = DeviceCommand.model_validate_json(payload)
    assert (device_id, wire.command_id, wire.kind, wire.expires_at) == (
        "kiosk-102",
        cid,
        CommandKind.LOG_REQUEST,
        T0 + timedelta(seconds=600),
    )
    assert command_row(engine, cid).state is CommandState.DELIVERED
    assert dispatcher.stats().published == 1


def test_results_acknowledge_their_command_once_and_unknown_ones_are_flagged(engine: Engine) -> None:
    cid = issue(engine, "kiosk-103")
    other = issue(engine, "kiosk-104")
    stray = uuid.uuid4()
    envelopes = [
        envelope("kiosk-103", 1, result_for(cid, CommandOutcome.REJECTED)),
        envelope("kiosk-103", 2, result_for(stray)),
        envelope("kiosk-103", 3, result_for(other)),  # kiosk-104's command, answered by kiosk-103
    ]
    with writer(engine) as session:
        applied = record_command_results(session, envelopes, now=T0)
    assert (applied.acknowledged, applied.repeated) == (1, 0)
    assert set(applied.unmatched) == {f"kiosk-103/{stray}", f"kiosk-103/{other}"}
    row = command_row(engine, cid)
    assert (row.state, row.result_outcome, row.result_detail, row.acknowledged_at) == (
        CommandState.ACKNOWLEDGED,
        "rejected",
        "pong",
        T0,
    )
    assert command_row(engine, other).state is CommandState.QUEUED
    with writer(engine) as session:
        again = record_command_results(session, envelopes[:1], now=T0)
        assert (again.acknowledged, again.repeated) == (0, 1)
        assert mark_published(session, [cid], now=T0) == 0, "nothing leaves acknowledged"


def test_ingest_stores_results_exactly_once_and_counts_unmatched_ones(
    broker: MosquittoBroker, publisher: Publisher, engine: Engine, db_url: str
) -> None:
    cid = issue(engine, "kiosk-105")
    answer = envelope("kiosk-105", 1, result_for(cid))
    stray = envelope("kiosk-105", 2, result_for(uuid.uuid4()))
    with running(make_settings(broker, db_url), engine) as worker:
        publish_all(publisher, [answer, answer, stray])
        stats = settled(worker, received=3)
    assert (stats.stored, stats.duplicates) == (2, 1)
    assert (stats.commands_acknowledged, stats.command_results_unmatched) == (1, 1)
    assert command_row(engine, cid).state is CommandState.ACKNOWLEDGED
    with session_factory(engine)() as session:
        stored = session.scalar(
            select(func.count()).select_from(Event).where(Event.payload_type == PayloadType.COMMAND_RESULT.value)
        )
    assert stored == 2, "the stray result is stored too (and flagged)"


# ---------------------------------------------------------------------- REST API and page


def test_command_api_issues_lists_and_reads_commands(engine: Engine, db_url: str) -> None:
    with writer(engine) as session:
        register_devices(session, {"kiosk-110"}, now=T0)
    app = create_app(ServerSettings(database_url=db_url), engine=engine, start_ingest=False, clock=FakeClock(T0))
    with serving(app) as client:
        created = client.post("/api/v1/devices/kiosk-110/commands", json={"kind": "ping", "ttl_s": 120})
        assert created.status_code == 201, created.text
        body = created.json()
        assert (body["kind"], body["state"], body["attempts"], body["args"]) == ("ping", "queued", 0, {})
        assert body["expires_at"].startswith("2026-03-01T08:02:00")
        log = client.post("/api/v1/devices/kiosk-110/commands", json={"kind": "log_request", "args": {"window_s": 900}})
        assert log.status_code == 201
        for bad in (
            {"kind": "reboot"},
            {"kind": "ping", "args": {"x": 1}},
            {"kind": "log_request", "args": {"window_s": 5}},
            {"kind": "ping", "ttl_s": 0},
            {"kind": "ping", "ttl_s": 10 * 86400},
            {"kind": "ping", "args": {"nested": {"a": 1}}},
            {"kind": "ping", "priority": "high"},
        ):
            assert client.post("/api/v1/devices/kiosk-110/commands", json=bad).status_code == 422, bad
        assert client.post("/api/v1/devices/nobody-1/commands", json={"kind": "ping"}).status_code == 404
        listing = client.get("/api/v1/devices/kiosk-110/commands", params={"limit": 1}).json()
        assert listing["total"] == 2
        assert [c["kind"] for c in listing["items"]] == ["log_request"], "newest first (same time: later id first)"
        second = client.get("/api/v1/devices/kiosk-110/commands", params={"limit": 1, "offset": 1}).json()
        assert {listing["items"][0]["command_id"], second["items"][0]["command_id"]} == {
            body["command_id"],
            log.json()["command_id"],
        }
        one = client.get(f"/api/v1/commands/{body['command_id']}").json()
        assert one["command_id"] == body["command_id"]
        assert client.get(f"/api/v1/commands/{uuid.uuid4()}").status_code == 404
        assert client.get("/api/v1/devices/nobody-1/commands").status_code == 404
        page = client.get("/devices/kiosk-110").text
    assert "连通测试" in page
    assert "queued, not sent yet" in page
    assert 'data-state="queued"' in page


def test_device_page_says_what_the_terminal_answered(engine: Engine, db_url: str) -> None:
    cid = issue(engine, "kiosk-111", CommandKind.UNBIND)
    with writer(engine) as session:
        record_command_results(
            session,
            [
                envelope(
                    "kiosk-111",
                    1,
                    CommandResult(
                        command_id=cid, outcome=CommandOutcome.REJECTED, detail="not supported yet", applied_at=T0
                    ),
                )
            ],
            now=T0,
        )
    app = create_app(ServerSettings(database_url=db_url), engine=engine, start_ingest=False, clock=FakeClock(T0))
    with serving(app) as client:
        page = client.get("/devices/kiosk-111").text
    assert "终端已回复：终端拒绝" in page
    assert "answered: rejected by the terminal" in page
    assert "not supported yet" in page


# ---------------------------------------------------------------------- end to end: server app + real terminal


@contextmanager
def server_app(broker: MosquittoBroker, db_url: str, engine: Engine, **overrides: Any) -> Iterator[httpx.Client]:
    settings = make_settings(broker, db_url, command_dispatch_interval_s=0.1, **overrides)
    with serving(create_app(settings, engine=engine)) as client:
        wait_until(lambda: client.get("/healthz").json().get("mqtt") == "connected", what="server broker session")
        yield client


@contextmanager
def terminal(tmp_path: Path, broker: MosquittoBroker) -> Iterator[TerminalRuntime]:
    rt = build_runtime(terminal_config(tmp_path, broker), simulated_peripherals())
    rt.start()
    try:
        assert rt.sync.link.wait_connected(10)
        yield rt
    finally:
        rt.stop()


def deliver_until_answered(publisher: Publisher, rt: TerminalRuntime, command: DeviceCommand) -> None:
    for _ in range(20):
        publisher.publish(TOPICS.downlink(DEVICE_ID), command.to_bytes())
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if rt.outbox.command_answer(command.command_id) is not None:
                return
            time.sleep(0.05)
    raise AssertionError(f"command {command.command_id} was not answered within 20 s")


def command_results_stored(engine: Engine) -> int:
    with session_factory(engine)() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(Event)
                .where(Event.device_id == DEVICE_ID, Event.payload_type == PayloadType.COMMAND_RESULT.value)
            )
            or 0
        )


def answered(client: httpx.Client, command_id: str) -> None:
    wait_until(lambda: state_of(client, command_id)["state"] == "acknowledged", what=f"an answer to {command_id}")


def state_of(client: httpx.Client, command_id: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"/api/v1/commands/{command_id}").json()
    return body


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_a_command_reaches_an_online_terminal_and_is_acknowledged(
    tmp_path: Path, broker: MosquittoBroker, engine: Engine, db_url: str, publisher: Publisher
) -> None:
    with server_app(broker, db_url, engine) as client, terminal(tmp_path, broker) as rt:
        wait_until(lambda: client.get(f"/api/v1/devices/{DEVICE_ID}").status_code == 200, what="device registered")
        ping = client.post(f"/api/v1/devices/{DEVICE_ID}/commands", json={"kind": "ping"}).json()
        log = client.post(f"/api/v1/devices/{DEVICE_ID}/commands", json={"kind": "log_request"}).json()
        # a kind this software does not carry out yet (unbind/binding_decision go through the binding routes)
        unbind = client.post(f"/api/v1/devices/{DEVICE_ID}/commands", json={"kind": "config_update"}).json()
        for c in (ping, log, unbind):
            answered(client, c["command_id"])
        assert state_of(client, ping["command_id"])["result_outcome"] == "applied"
        assert state_of(client, log["command_id"])["result_outcome"] == "applied"
        assert (
            state_of(client, unbind["command_id"])["result_outcome"],
            state_of(client, unbind["command_id"])["result_detail"],
        ) == ("rejected", "not supported yet")
        # A forged command for another device, and garbage, on this terminal's topic: refused and counted.
        now = T0.replace(year=2099)
        forged = DeviceCommand(
            command_id=uuid.uuid4(),
            device_id="SIM-0009",
            kind=CommandKind.PING,
            issued_at=now,
            expires_at=now + timedelta(hours=1),
        )
        publisher.publish(TOPICS.downlink(DEVICE_ID), forged.to_bytes())
        publisher.publish(TOPICS.downlink(DEVICE_ID), b'{"type": "command"}')
        downlink = rt.sync.downlink
        assert downlink is not None
        wait_until(lambda: downlink.stats().refused == 2, what="two refusals")
        assert rt.outbox.answered_commands() == 3
        counters = client.get("/api/v1/ingest/stats").json()["ingest"]
        assert (counters["commands_acknowledged"], counters["command_results_unmatched"]) == (3, 0)
        summaries = client.get(f"/api/v1/devices/{DEVICE_ID}/events", params={"payload_type": "audit_event"}).json()[
            "items"
        ]
    assert any(e["payload"]["action"] == "terminal.state_summary" for e in summaries)
    assert command_results_stored(engine) == 3


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_command_for_an_offline_terminal_is_delivered_when_it_returns_and_applied_once(
    tmp_path: Path, broker: MosquittoBroker, engine: Engine, db_url: str
) -> None:
    with server_app(broker, db_url, engine) as client:
        with terminal(tmp_path, broker):  # known to the server, with a persistent session at the broker
            wait_until(lambda: client.get(f"/api/v1/devices/{DEVICE_ID}").status_code == 200, what="registered")
        first = client.post(f"/api/v1/devices/{DEVICE_ID}/commands", json={"kind": "ping"}).json()
        wait_until(lambda: state_of(client, first["command_id"])["state"] == "delivered", what="published")
        with terminal(tmp_path, broker) as rt:
            wait_until(lambda: state_of(client, first["command_id"])["state"] == "acknowledged", what="answered")
            assert rt.outbox.answered_commands() == 1
    assert command_results_stored(engine) == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_command_the_broker_could_not_queue_is_published_again_when_the_terminal_comes_online(
    tmp_path: Path, broker: MosquittoBroker, engine: Engine, db_url: str
) -> None:
    """The terminal never connected before: the broker has no session to queue the first publish in. Its 'online'
    status makes the dispatcher publish again."""
    with server_app(broker, db_url, engine, command_republish_after_s=3600) as client:
        offline = DeviceStatusMessage(device_id=DEVICE_ID, state=LinkState.OFFLINE, boot_id=BOOT)
        pub = Publisher(broker)
        try:
            pub.publish(TOPICS.status(DEVICE_ID), offline.to_bytes())  # registers the device, no session
        finally:
            pub.close()
        wait_until(lambda: client.get(f"/api/v1/devices/{DEVICE_ID}").status_code == 200, what="registered")
        # A probe (another client id) sees the first publish, proving the broker routed it before the terminal
        # had a session: "delivered" is recorded when the publish is handed to paho, not when it reaches the broker.
        probe, seen = _downlink_probe(broker)
        try:
            cmd = client.post(f"/api/v1/devices/{DEVICE_ID}/commands", json={"kind": "ping"}).json()
            wait_until(seen.is_set, what="the first publish routed while the terminal had no session")
        finally:
            probe.loop_stop()
            probe.disconnect()
        with terminal(tmp_path, broker) as rt:
            wait_until(lambda: state_of(client, cmd["command_id"])["state"] == "acknowledged", what="answered")
            assert state_of(client, cmd["command_id"])["attempts"] >= 2
            assert rt.outbox.answered_commands() == 1
    assert command_results_stored(engine) == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_same_command_twice_across_a_terminal_restart_is_applied_once_and_its_result_stored_once(
    tmp_path: Path, broker: MosquittoBroker, engine: Engine, db_url: str, publisher: Publisher
) -> None:
    with server_app(broker, db_url, engine) as client:
        with terminal(tmp_path, broker):
            wait_until(lambda: client.get(f"/api/v1/devices/{DEVICE_ID}").status_code == 200, what="registered")
        cmd = client.post(f"/api/v1/devices/{DEVICE_ID}/commands", json={"kind": "log_request"}).json()
        with terminal(tmp_path, broker) as rt:
            wait_until(lambda: state_of(client, cmd["command_id"])["state"] == "acknowledged", what="answered")
            wire = DeviceCommand(
                command_id=uuid.UUID(cmd["command_id"]),
                device_id=DEVICE_ID,
                kind=CommandKind.LOG_REQUEST,
                issued_at=rt.clock.now() - timedelta(seconds=1),
                expires_at=rt.clock.now() + timedelta(hours=1),
            )
        with terminal(tmp_path, broker) as rt:  # restarted between the deliveries
            publisher.publish(TOPICS.downlink(DEVICE_ID), wire.to_bytes())
            publisher.publish(TOPICS.downlink(DEVICE_ID), wire.to_bytes())
            downlink = rt.sync.downlink
            assert downlink is not None
            wait_until(lambda: downlink.stats().commands_redelivered == 2, what="both redeliveries seen")
            assert downlink.stats().commands_answered == 0, "not carried out again"
        summaries = client.get(f"/api/v1/devices/{DEVICE_ID}/events", params={"payload_type": "audit_event"}).json()[
            "items"
        ]
    assert sum(e["payload"]["action"] == "terminal.state_summary" for e in summaries) == 1, "applied once"
    assert command_results_stored(engine) == 1, "result stored once"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_expired_command_is_never_applied(
    tmp_path: Path, broker: MosquittoBroker, engine: Engine, db_url: str, publisher: Publisher
) -> None:
    """Both ways a command can be too late: the server lets it expire unanswered (never published again, even when the
    device returns), and a terminal that receives one past expires_at answers `expired` instead of carrying it out."""
    with server_app(broker, db_url, engine, command_republish_after_s=3600) as client:
        offline = DeviceStatusMessage(device_id=DEVICE_ID, state=LinkState.OFFLINE, boot_id=BOOT)
        publisher.publish(TOPICS.status(DEVICE_ID), offline.to_bytes())
        wait_until(lambda: client.get(f"/api/v1/devices/{DEVICE_ID}").status_code == 200, what="registered")
        short = client.post(f"/api/v1/devices/{DEVICE_ID}/commands", json={"kind": "ping", "ttl_s": 0.5}).json()
        wait_until(lambda: state_of(client, short["command_id"])["state"] == "expired", what="expired on the server")
        with terminal(tmp_path, broker) as rt:
            late = DeviceCommand(
                command_id=uuid.uuid4(),
                device_id=DEVICE_ID,
                kind=CommandKind.PING,
                issued_at=rt.clock.now() - timedelta(hours=2),
                expires_at=rt.clock.now() - timedelta(hours=1),
            )
            # Sent until answered: the terminal's first SUBSCRIBE may still be on its way when it reports connected
            # (a QoS 1 message to a topic nobody has subscribed yet is not kept). The terminal remembers command ids,
            # so the repeats are answered once: one result reaches the server (asserted below).
            deliver_until_answered(publisher, rt, late)
            answer = rt.outbox.command_answer(late.command_id)
            assert answer is not None
            assert answer.outcome is CommandOutcome.EXPIRED
            wait_until(lambda: command_results_stored(engine) == 1, what="the expired answer stored")
            assert rt.outbox.command_answer(uuid.UUID(short["command_id"])) is None, "the expired one never arrived"
        assert state_of(client, short["command_id"])["state"] == "expired"
        assert state_of(client, short["command_id"])["attempts"] == 1


def _downlink_probe(broker: MosquittoBroker) -> tuple[mqtt.Client, threading.Event]:
    seen = threading.Event()
    probe = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="downlink-probe", protocol=MQTTProtocolVersion.MQTTv5)
    subscribed = threading.Event()
    probe.on_subscribe = lambda *_: subscribed.set()
    probe.on_message = lambda *_: seen.set()
    probe.connect(broker.host, broker.port)
    probe.loop_start()
    probe.subscribe(TOPICS.downlink(DEVICE_ID), qos=1)
    if not subscribed.wait(10):
        raise AssertionError("probe subscription not granted")
    return probe, seen
