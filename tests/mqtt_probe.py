"""A paho client for tests that need to see what the broker answers: CONNACK, PUBACK and SUBACK reason codes and
the DISCONNECT reason, each waited for with a deadline (no sleeps)."""

from __future__ import annotations

import queue
import secrets
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode


class Probe:
    def __init__(self, host: str, port: int, username: str | None = None, password: str | None = None) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"probe-{secrets.token_hex(4)}", protocol=MQTTProtocolVersion.MQTTv5
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connack: ReasonCode | None = None
        self.disconnect_reason: str | None = None
        self.disconnected_at: float | None = None
        self.connected = threading.Event()
        self.gone = threading.Event()
        self._results: dict[tuple[str, int], str] = {}
        self._cond = threading.Condition()
        self.messages: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None) -> None:
        self.connack = rc
        if not rc.is_failure:
            self.connected.set()
        else:
            self.gone.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None) -> None:
        if self.disconnected_at is None:  # the first one; paho may reconnect and be refused afterwards
            self.disconnect_reason = str(rc)
            self.disconnected_at = time.monotonic()
        self.gone.set()

    def _note(self, key: tuple[str, int], value: str) -> None:
        with self._cond:
            self._results[key] = value
            self._cond.notify_all()

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Properties | None) -> None:
        self._note(("pub", mid), str(rc))

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, rcs: list[ReasonCode], _p: Properties | None) -> None:
        self._note(("sub", mid), str(rcs[0]))

    def _wait(self, key: tuple[str, int], timeout_s: float) -> str:
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._results, timeout_s):
                raise AssertionError(f"no answer from the broker for {key}")
            return self._results[key]

    def wait_connected(self, timeout_s: float = 5.0) -> str:
        """'Success' or the refusal reason."""
        if not (self.connected.wait(timeout_s) or self.gone.is_set()):
            raise AssertionError("no CONNACK")
        return str(self.connack)

    def publish(self, topic: str, payload: bytes, timeout_s: float = 5.0) -> str:
        """The PUBACK reason ('Success', 'No matching subscribers', 'Not authorized', ...)."""
        info = self.client.publish(topic, payload, qos=1)
        return self._wait(("pub", info.mid), timeout_s)

    def subscribe(self, topic: str, timeout_s: float = 5.0) -> str:
        """The SUBACK reason ('Granted QoS 1', 'Not authorized', ...)."""
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        return self._wait(("sub", mid), timeout_s)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        _drop_callbacks(self.client)


def _drop_callbacks(client: mqtt.Client) -> None:
    """Break the client <-> owner reference cycle, so the client is freed (and its sockets closed by paho) at once
    instead of by the cycle collector, which would leave them unclosed (a ResourceWarning, an error in tests)."""
    client.on_connect = None
    client.on_disconnect = None
    client.on_publish = None
    client.on_subscribe = None
    client.on_message = None


drop_callbacks = _drop_callbacks

PUBLISH_OK = {"Success", "No matching subscribers"}


def connack_of(host: str, port: int, username: str | None, password: str | None) -> str:
    """How the broker answers a login: 'Success' or the refusal."""
    probe = Probe(host, port, username, password)
    try:
        return probe.wait_connected()
    finally:
        probe.close()
