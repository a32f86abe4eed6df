"""ServerSettings: fail-closed validation, environment prefix, placeholder secrets refused in prod."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from sync_server.settings import ServerSettings

STRONG = "k" * 40


def test_defaults_are_the_documented_ones() -> None:
    s = ServerSettings()
    assert s.environment == "dev"
    assert s.database_url == "sqlite:///./var/yibao-server.sqlite3"
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8000)
    assert s.topic_prefix == "yibao/v1"
    assert s.heartbeat_timeout_factor == 3.0
    assert (s.ingest_batch_size, s.ingest_flush_interval_s) == (500, 0.05)
    assert s.auto_register_devices is True
    assert s.mqtt_client_id.startswith("yibao-ingest-")


def test_every_field_is_described() -> None:
    missing = [name for name, f in ServerSettings.model_fields.items() if not f.description]
    assert missing == []


def test_reads_the_environment_with_its_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YIBAO_SERVER_HTTP_PORT", "9123")
    monkeypatch.setenv("YIBAO_SERVER_AUTO_REGISTER_DEVICES", "false")
    s = ServerSettings()
    assert s.http_port == 9123
    assert s.auto_register_devices is False


@pytest.mark.parametrize("secret", ["changeme", "ChangeThis", "", "  secret  ", "short-but-not-a-placeholder"])
def test_prod_refuses_placeholder_or_short_secrets(secret: str) -> None:
    with pytest.raises(ValidationError, match="secret_key is a placeholder"):
        ServerSettings(environment="prod", secret_key=SecretStr(secret))


def test_prod_accepts_a_real_secret_and_dev_accepts_the_placeholder() -> None:
    prod = ServerSettings(environment="prod", secret_key=SecretStr(STRONG), server_key_passphrase=SecretStr("p" * 40))
    assert prod.secret_key_is_placeholder is False
    assert prod.effective_uplink_security == "required"
    dev = ServerSettings(environment="dev")
    assert dev.secret_key_is_placeholder is True
    assert dev.effective_uplink_security == "optional"
    assert dev.broker_managed is False


def test_prod_refuses_the_placeholder_server_key_passphrase_and_optional_uplink_security() -> None:
    with pytest.raises(ValidationError, match="server_key_passphrase is a placeholder"):
        ServerSettings(environment="prod", secret_key=SecretStr(STRONG))
    with pytest.raises(ValidationError, match="uplink_security 'optional' is refused in prod"):
        ServerSettings(
            environment="prod",
            secret_key=SecretStr(STRONG),
            server_key_passphrase=SecretStr("p" * 40),
            uplink_security="optional",
        )


def test_broker_admin_needs_both_user_and_password() -> None:
    with pytest.raises(ValidationError, match="broker_admin_username and broker_admin_password"):
        ServerSettings(broker_admin_username="admin")


def test_the_secret_is_not_shown_in_repr() -> None:
    assert STRONG not in repr(ServerSettings(secret_key=SecretStr(STRONG)))


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ServerSettings.model_validate({"http_prot": 80})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("topic_prefix", "yibao/+/v1"),
        ("topic_prefix", "yibao/v1/"),
        ("topic_prefix", "$SYS"),
        ("database_url", "not a url"),
        ("http_port", 70000),
        ("heartbeat_timeout_factor", 0.5),
        ("ingest_batch_size", 0),
        ("display_timezone", "Mars/Olympus"),
        ("environment", "staging"),
    ],
)
def test_bad_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        ServerSettings.model_validate({field: value})
