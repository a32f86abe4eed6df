"""The private Mosquitto harness: ready means *this* broker is running, and a taken port is reported clearly."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from yibao.broker import BrokerError, MosquittoBroker
from yibao.procs import is_alive


def test_a_port_someone_else_listens_on_is_refused_with_the_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(BrokerError, match="Address already in use"):
            MosquittoBroker(port=taken.getsockname()[1]).start()


def test_started_broker_accepts_mqtt_and_stops_without_leftovers() -> None:
    broker = MosquittoBroker().start()
    pid = broker.pid
    assert pid is not None
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=MQTTProtocolVersion.MQTTv5)
    try:
        assert client.connect(broker.host, broker.port) == mqtt.MQTT_ERR_SUCCESS
    finally:
        client.disconnect()
    broker.kill()
    broker.restart()
    assert broker.pid not in (None, pid)
    broker.stop()
    assert not is_alive(pid)


def test_the_broker_dies_with_a_parent_that_is_killed() -> None:
    code = (
        "from yibao.broker import MosquittoBroker; import time; "
        "b = MosquittoBroker().start(); print(b.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    broker_pid = int(parent.stdout.readline())
    assert is_alive(broker_pid)
    parent.kill()
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 5
    while is_alive(broker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(broker_pid)
