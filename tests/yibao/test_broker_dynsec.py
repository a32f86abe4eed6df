"""The dynamic-security broker: device users confined to their own topics, the server's user, and what Mosquitto
2.0.11 actually checks (shared subscriptions keep their `$share/<group>/` prefix in the ACL check; deleting a client
disconnects it at once)."""

from __future__ import annotations

from protocol import Topics
from sync_server.broker_admin import DynsecAdmin
from tests.mqtt_probe import PUBLISH_OK, Probe, connack_of
from yibao.broker import MosquittoBroker

TOPICS = Topics()
A, B = "kiosk-901", "kiosk-902"
PW_A, PW_B = "password-of-a-0123456789", "password-of-b-0123456789"


def admin(broker: MosquittoBroker) -> DynsecAdmin:
    return DynsecAdmin(broker.host, broker.port, broker.admin_username, broker.admin_password, topics=TOPICS)


def test_device_credentials_reach_only_the_devices_own_topics(secure_broker: MosquittoBroker) -> None:
    dynsec = admin(secure_broker)
    assert dynsec.add_device(A, PW_A) == "created"
    assert dynsec.add_device(B, PW_B) == "created"
    a = Probe(secure_broker.host, secure_broker.port, A, PW_A)
    try:
        assert a.wait_connected() == "Success"
        assert a.publish(TOPICS.uplink(A), b"x") in PUBLISH_OK
        assert a.publish(TOPICS.status(A), b"x") in PUBLISH_OK
        assert a.subscribe(TOPICS.downlink(A)) == "Granted QoS 1"
        # nothing of B's, nor anything the server does
        assert a.publish(TOPICS.uplink(B), b"x") == "Not authorized"
        assert a.publish(TOPICS.status(B), b"x") == "Not authorized"
        assert a.publish(TOPICS.downlink(A), b"x") == "Not authorized"
        assert a.subscribe(TOPICS.downlink(B)) == "Not authorized"
        assert a.subscribe(TOPICS.all_uplinks) == "Not authorized"
    finally:
        a.close()
    for user, password in [(A, "wrong-password-0000000"), (None, None), ("nobody-1", PW_A)]:
        assert connack_of(secure_broker.host, secure_broker.port, user, password) == "Not authorized"


def test_the_servers_user_and_how_shared_subscriptions_are_checked(secure_broker: MosquittoBroker) -> None:
    server = Probe(secure_broker.host, secure_broker.port, secure_broker.server_username, secure_broker.server_password)
    try:
        assert server.wait_connected() == "Success"
        assert server.subscribe(TOPICS.all_uplinks_shared) == "Granted QoS 1"
        assert server.subscribe(TOPICS.all_statuses) == "Granted QoS 1"
        assert server.publish(TOPICS.downlink(A), b"x") in PUBLISH_OK
        assert server.publish(TOPICS.uplink(A), b"x") == "Not authorized"
    finally:
        server.close()
    # Without the `$share/+/…` pattern the shared subscription is refused although the plain filter is allowed:
    # Mosquitto 2.0.11 checks the filter with its $share prefix.
    admin(secure_broker).execute(
        [
            {
                "command": "removeRoleACL",
                "rolename": "yibao-server",
                "acltype": "subscribePattern",
                "topic": f"$share/+/{TOPICS.all_uplinks}",
            }
        ]
    )
    again = Probe(secure_broker.host, secure_broker.port, secure_broker.server_username, secure_broker.server_password)
    try:
        assert again.wait_connected() == "Success"
        assert again.subscribe(TOPICS.all_uplinks_shared) == "Not authorized"
    finally:
        again.close()


def test_a_new_password_or_removal_disconnects_the_device(secure_broker: MosquittoBroker) -> None:
    dynsec = admin(secure_broker)
    dynsec.add_device(A, PW_A)
    first = Probe(secure_broker.host, secure_broker.port, A, PW_A)
    try:
        assert first.wait_connected() == "Success"
        dynsec.set_password(A, PW_B)  # key rotation: the old session ends, the old password stops working
        assert first.gone.wait(5), "the broker kept the client connected after its password changed"
    finally:
        first.close()
    assert connack_of(secure_broker.host, secure_broker.port, A, PW_A) == "Not authorized"
    second = Probe(secure_broker.host, secure_broker.port, A, PW_B)
    try:
        assert second.wait_connected() == "Success"
        assert dynsec.remove_device(A) == "deleted"  # revocation
        assert second.gone.wait(5), "the broker did not disconnect the deleted client"
        assert second.disconnect_reason == "Administrative action"
    finally:
        second.close()
    assert connack_of(secure_broker.host, secure_broker.port, A, PW_B) == "Not authorized"
    assert dynsec.remove_device(A) == "deleted"  # idempotent
