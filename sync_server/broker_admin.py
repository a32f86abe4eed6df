"""Device broker users and ACLs through Mosquitto's dynamic-security plugin (`$CONTROL/dynamic-security/v1`).

Owns what a device may do on the broker: user name = device id, a random password from enrolment, and one role
`yibao-device-<id>` that allows publishing only to its own `…/dev/<id>/up` and `…/dev/<id>/status` (its last will
included: Mosquitto checks the will against publishClientSend when it is published) and subscribing only to its own
`…/dev/<id>/down`. The plugin disconnects a client at once when it is deleted, which is how revocation kicks a device.

Each operation is one short admin connection (connect, send the command list, wait for the response, disconnect):
provisioning is rare, and no long-lived admin session can go stale. Without admin credentials in the settings,
`DynsecAdmin` is not built and every operation reports "not managed" (dev brokers with anonymous access). It must
never log passwords.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import uuid
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocol import Topics

logger = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
NOT_MANAGED = "not managed"


class BrokerAdminError(RuntimeError):
    """The broker refused an admin command or could not be reached; the text says which (never a password)."""


def device_role(device_id: str) -> str:
    return f"yibao-device-{device_id}"


def device_acls(topics: Topics, device_id: str) -> list[dict[str, Any]]:
    return [
        {"acltype": "publishClientSend", "topic": topics.uplink(device_id), "priority": 0, "allow": True},
        {"acltype": "publishClientSend", "topic": topics.status(device_id), "priority": 0, "allow": True},
        {"acltype": "subscribeLiteral", "topic": topics.downlink(device_id), "priority": 0, "allow": True},
    ]


def server_acls(topics: Topics) -> list[dict[str, Any]]:
    """What the server's own broker user needs: every uplink (plain and through the shared subscription, which
    Mosquitto 2.0.11 checks with the `$share/<group>/` prefix still on; see tests/yibao/test_broker_dynsec.py), every
    status, and publishing downlinks."""
    prefix = topics.prefix
    return [
        {"acltype": "subscribePattern", "topic": f"$share/+/{prefix}/dev/+/up", "priority": 0, "allow": True},
        {"acltype": "subscribePattern", "topic": f"{prefix}/dev/+/up", "priority": 0, "allow": True},
        {"acltype": "subscribePattern", "topic": f"{prefix}/dev/+/status", "priority": 0, "allow": True},
        {"acltype": "publishClientSend", "topic": f"{prefix}/dev/+/down", "priority": 0, "allow": True},
    ]


class BrokerAdmin(Protocol):
    """What provisioning asks of the broker. Each call returns a short state for the API ("created", "not managed",
    ...), or raises `BrokerAdminError`."""

    @property
    def managed(self) -> bool: ...

    def add_device(self, device_id: str, password: str) -> str: ...

    def set_password(self, device_id: str, password: str) -> str: ...

    def remove_device(self, device_id: str) -> str: ...


class UnmanagedBroker:
    """No broker admin configured: devices' broker access is whatever the broker's own config allows."""

    @property
    def managed(self) -> bool:
        return False

    def add_device(self, device_id: str, password: str) -> str:
        return NOT_MANAGED

    def set_password(self, device_id: str, password: str) -> str:
        return NOT_MANAGED

    def remove_device(self, device_id: str) -> str:
        return NOT_MANAGED


class DynsecAdmin:
    def __init__(
        self, host: str, port: int, username: str, password: str, *, topics: Topics, timeout_s: float = 10.0
    ) -> None:
        self._host, self._port = host, port
        self._username, self._password = username, password
        self._topics = topics
        self._timeout_s = timeout_s
        self._lock = threading.Lock()  # one admin conversation at a time

    @property
    def managed(self) -> bool:
        return True

    def add_device(self, device_id: str, password: str) -> str:
        role = device_role(device_id)
        self.execute(
            [{"command": "deleteClient", "username": device_id}, {"command": "deleteRole", "rolename": role}],
            tolerate=("not found",),
        )
        self.execute(
            [
                {"command": "createRole", "rolename": role, "acls": device_acls(self._topics, device_id)},
                {
                    "command": "createClient",
                    "username": device_id,
                    "password": password,
                    "roles": [{"rolename": role, "priority": 0}],
                },
            ]
        )
        return "created"

    def set_password(self, device_id: str, password: str) -> str:
        self.execute([{"command": "setClientPassword", "username": device_id, "password": password}])
        return "password changed"

    def remove_device(self, device_id: str) -> str:
        self.execute(
            [
                {"command": "deleteClient", "username": device_id},
                {"command": "deleteRole", "rolename": device_role(device_id)},
            ],
            tolerate=("not found",),
        )
        return "deleted"

    def add_client(self, username: str, password: str, role: str, acls: list[dict[str, Any]]) -> None:
        """A broker user with its own role (used for the server's own user and by tests)."""
        self.execute(
            [{"command": "deleteClient", "username": username}, {"command": "deleteRole", "rolename": role}],
            tolerate=("not found",),
        )
        self.execute(
            [
                {"command": "createRole", "rolename": role, "acls": acls},
                {
                    "command": "createClient",
                    "username": username,
                    "password": password,
                    "roles": [{"rolename": role, "priority": 0}],
                },
            ]
        )

    def execute(self, commands: list[dict[str, Any]], *, tolerate: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Send `commands` in one message and return the plugin's responses; `BrokerAdminError` on any error
        except those whose text contains one of `tolerate`."""
        correlation = uuid.uuid4().hex
        for i, command in enumerate(commands):
            command["correlationData"] = f"{correlation}-{i}"
        with self._lock:
            responses = self._round_trip(json.dumps({"commands": commands}).encode(), correlation)
        errors = [
            f"{r.get('command')}: {r['error']}"
            for r in responses
            if r.get("error") and not any(t in str(r["error"]).lower() for t in tolerate)
        ]
        if errors:
            raise BrokerAdminError("the broker refused: " + "; ".join(errors))
        return responses

    def _round_trip(self, payload: bytes, correlation: str) -> list[dict[str, Any]]:
        done = threading.Event()
        subscribed = threading.Event()
        connected: list[ReasonCode] = []
        found: list[dict[str, Any]] = []

        def on_connect(
            client: mqtt.Client, _u: Any, _f: mqtt.ConnectFlags, rc: ReasonCode, _p: Properties | None
        ) -> None:
            connected.append(rc)
            if rc.is_failure:
                done.set()
                return
            client.subscribe(RESPONSE_TOPIC, qos=1)

        def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, _rcs: list[ReasonCode], _p: Properties | None) -> None:
            subscribed.set()

        def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
            try:
                body = json.loads(message.payload)
            except ValueError:
                return
            responses = body.get("responses") if isinstance(body, dict) else None
            if not isinstance(responses, list):
                return
            mine = [
                r
                for r in responses
                if isinstance(r, dict) and str(r.get("correlationData", "")).startswith(correlation)
            ]
            if mine:
                found.extend(mine)
                done.set()

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"yibao-dynsec-{secrets.token_hex(4)}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.username_pw_set(self._username, self._password)
        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        try:
            client.connect(self._host, self._port, keepalive=30)
        except OSError as exc:
            raise BrokerAdminError(f"cannot reach the broker at {self._host}:{self._port}: {exc}") from exc
        client.loop_start()
        try:
            if not subscribed.wait(self._timeout_s) and not done.is_set():
                raise BrokerAdminError(f"the broker at {self._host}:{self._port} did not accept the admin session")
            if connected and connected[0].is_failure:
                raise BrokerAdminError(f"the broker refused the admin login: {connected[0]}")
            client.publish(CONTROL_TOPIC, payload, qos=1)
            if not done.wait(self._timeout_s):
                raise BrokerAdminError("the broker did not answer the dynamic-security command in time")
        finally:
            client.disconnect()
            client.loop_stop()
        return found
