"""Encrypted fleet: each simulated terminal with its own SM2 identity and session key seals every uplink on a real
Mosquitto; the frames open only under the key the server side agreed for that device (server side played with the
real `protocol` functions, tests/terminal/identity_server.py). The full path through the real server is in tests/e2e."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from hardware_sim.fleet import Fleet, FleetOptions, fleet_device_id
from protocol import SystemClock, Topics, decode_envelope
from protocol.enrolment import make_enrol_request
from protocol.gm.sm2 import SM2PrivateKey
from protocol.secure import Direction, open_frame, parse_frame
from terminal.identity import identity_from_enrolment
from terminal.session import SessionManager
from tests.terminal.identity_server import PlayedServer
from yibao.broker import MosquittoBroker

pytestmark = pytest.mark.e2e

TERMINALS = 3
PER_TERMINAL = 5


def enrolled_sessions(server: PlayedServer, device_ids: list[str], workdir: Path) -> dict[str, SessionManager]:
    sessions = {}
    for device_id in device_ids:
        code = server.register(device_id)
        key = SM2PrivateKey.generate()
        request = make_enrol_request(
            key, device_id=device_id, claim_token=code.claim_token, hardware_id=f"sim-{device_id}", now=server.now()
        )
        identity = identity_from_enrolment(
            key,
            server.enrol(request),
            device_id=device_id,
            server_fingerprint=code.server_fingerprint,
            directory=workdir,
        )
        manager = SessionManager(identity, None, server, server.clock)
        manager.handshake("test")
        sessions[device_id] = manager
    return sessions


def test_fleet_terminals_seal_their_uplinks_under_their_own_keys(tmp_path: Path, broker: MosquittoBroker) -> None:
    server = PlayedServer(SystemClock())
    device_ids = [fleet_device_id("SEC", i) for i in range(TERMINALS)]
    sessions = enrolled_sessions(server, device_ids, tmp_path)
    frames: list[tuple[str, bytes]] = []
    lock = threading.Lock()
    subscribed = threading.Event()
    listener = Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)

    def on_message(client: Client, userdata: object, message: MQTTMessage) -> None:
        with lock:
            frames.append((message.topic, bytes(message.payload)))

    listener.on_message = on_message
    listener.on_subscribe = lambda *args: subscribed.set()
    listener.connect(broker.host, broker.port)
    listener.subscribe("yibao/v1/dev/+/up", qos=1)
    listener.loop_start()
    assert subscribed.wait(10)
    fleet = Fleet(
        FleetOptions(
            terminals=TERMINALS,
            broker_host=broker.host,
            broker_port=broker.port,
            workdir=tmp_path / "fleet",
            device_prefix="SEC",
            scheduling="pooled",
            sweep_s=0.5,
            heartbeat_interval_s=60,
            sessions=sessions,
        )
    )
    try:
        fleet.start()
        assert fleet.wait_connected(20) == TERMINALS
        fleet.enqueue_audits(PER_TERMINAL)
        wanted = TERMINALS * (PER_TERMINAL + 1)  # each terminal's first heartbeat too
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(frames) < wanted:
            time.sleep(0.05)
    finally:
        fleet.stop()
        listener.disconnect()
        listener.loop_stop()
    assert len(frames) >= wanted
    topics = Topics()
    seen: dict[str, set[int]] = {}
    for topic, frame in frames:
        header = parse_frame(frame)
        device_id = topic.split("/")[-2]
        assert topic == topics.uplink(device_id)
        key = server.granted[header.key_id]
        assert sessions[device_id].current() == key  # each device under its own agreed key
        envelope = decode_envelope(open_frame(key.key, device_id, frame))
        assert header.direction is Direction.UPLINK
        assert header.counter == envelope.seq
        seen.setdefault(device_id, set()).add(envelope.seq)
    assert {d: len(s) for d, s in seen.items()} == dict.fromkeys(device_ids, PER_TERMINAL + 1)
