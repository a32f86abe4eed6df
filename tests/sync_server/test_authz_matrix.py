"""The role x endpoint authorisation matrix, tested in full: for EVERY route the app serves and EVERY principal
(anonymous, the bootstrap token, a database admin token, one account per role), a real request with a real token over
HTTP must be refused (401 anonymous, 403 wrong role) or let through (anything but 401/403) exactly as
`sync_server.authz.ROUTE_POLICIES` declares; plus the start-up check and regulators' region scope.

Runs against SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from sync_server import authz
from sync_server.accounts import Role
from sync_server.app import create_app
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.migrate import upgrade
from sync_server.db.models import Institution, InstitutionKind
from sync_server.errors import ConfigurationError
from sync_server.provisioning import create_admin_token
from sync_server.settings import ServerSettings
from tests.sync_server.conftest import INSTITUTION_CODE, T0, TEST_ADMIN_TOKEN, FakeClock, pg_schema, seed_fleet, serving
from tests.sync_server.signed_requests import DeviceSigner, Signer, enrol_with_session, make_his_client, signed
from tests.sync_server.test_accounts import login, make_account

ROLE_ACCOUNTS = {
    Role.DEVICE_ADMIN: "m-devadmin",
    Role.INSTITUTION_HEAD: "m-head",
    Role.PHARMACIST: "m-pharm",
    Role.CASHIER: "m-cashier",
    Role.REGULATOR: "m-regulator",
    Role.SECURITY_ADMIN: "m-secadmin",
    Role.AUDITOR: "m-auditor",
}
PATH_VALUES = {
    "device_id": "kiosk-001",
    "command_id": str(uuid.uuid4()),
    "username": "nobody-here",
    "application_id": "999999",
    "code": "H00000000000",
    "client_id": "his-0000000000000000",
    "rx_no": "RX-NOBODY-0001",
    "prescription_id": "999999",
    "kind": "drug",
    "query": "person_info",
    "settlement_no": "SETL-NONE",
    "relationship_id": "999999",
}
LAST = "POST /api/v1/auth/logout"
"""Tested after every other route: it ends the session it is called with."""


@dataclass(frozen=True)
class Caller:
    label: str
    roles: frozenset[Role] | None
    """None: no role (anonymous, or a terminal, which has no role: it signs device-API requests)."""
    headers: dict[str, str]
    signer: Signer | None = None
    """Signs each request (a HIS client, a terminal on the device API)."""


@dataclass
class Served:
    app: FastAPI
    client: httpx.Client
    callers: list[Caller]
    other_region: dict[str, str]
    """A regulator of 3201 (the seeded institution is in 310115)."""


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with ExitStack() as stack:
        if request.param == "sqlite":
            db_url = f"sqlite:///{tmp_path_factory.mktemp('matrix') / 'server.sqlite3'}"
        else:
            db_url = stack.enter_context(pg_schema(request.getfixturevalue("pg_database")))
        upgrade(db_url)
        engine = create_db_engine(db_url)
        stack.callback(engine.dispose)
        seed_fleet(engine)  # kiosk-001 at an institution in 310115
        with session_factory(engine, write_intent=True).begin() as session:
            institution_id = session.query(Institution.id).one()[0]
            session.add(
                Institution(
                    code="H32010000001",
                    name="南京示例药房",
                    kind=InstitutionKind.PHARMACY,
                    region_code="320102",
                    created_at=T0,
                )
            )
            admin_token = create_admin_token(session, name="matrix-ops", now=T0)
        for role, username in ROLE_ACCOUNTS.items():
            make_account(
                engine,
                username,
                role,
                institution_id=institution_id
                if role in {Role.INSTITUTION_HEAD, Role.PHARMACIST, Role.CASHIER}
                else None,
                region_prefix="3101" if role is Role.REGULATOR else None,
            )
        make_account(engine, "m-regulator-js", Role.REGULATOR, region_prefix="3201")
        settings = ServerSettings(
            database_url=db_url,
            bootstrap_admin_token=SecretStr(TEST_ADMIN_TOKEN),
            data_dir=tmp_path_factory.mktemp("matrix-data"),
        )
        app = create_app(settings, engine=engine, start_ingest=False, clock=FakeClock(T0))
        client = stack.enter_context(serving(app, admin=False))
        callers = [
            Caller("anonymous", None, {}),
            Caller("bootstrap token", frozenset({Role.DEVICE_ADMIN}), {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}),
            Caller("admin token", frozenset({Role.DEVICE_ADMIN}), {"Authorization": f"Bearer {admin_token}"}),
        ]
        callers += [
            Caller(f"account {role}", frozenset({role}), login(client, name)) for role, name in ROLE_ACCOUNTS.items()
        ]
        his = make_his_client(client, INSTITUTION_CODE, admin_headers={"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"})
        callers.append(Caller("HIS client", frozenset({Role.HIS_CLIENT}), {}, his))
        device = enrol_with_session(
            client, FakeClock(T0), "kiosk-matrix", admin_headers={"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
        )
        callers.append(Caller("terminal", None, {}, DeviceSigner(device.device_id, device.session)))
        yield Served(app, client, callers, login(client, "m-regulator-js"))


def _request(client: httpx.Client, key: str, caller: Caller) -> httpx.Response:
    method, path = key.split(" ", 1)
    headers = caller.headers
    if method == "MOUNT":
        return client.get(f"{path}/style.css", headers=headers)
    url = path.format(**PATH_VALUES)
    body: dict[str, object] | None = {} if method in {"POST", "PUT", "PATCH"} else None
    if caller.signer is not None:
        return signed(client, caller.signer, method, url, clock=FakeClock(T0), json_body=body, headers=headers)
    return client.request(method, url, headers=headers, json=body)


def _expected_allowed(policy: authz.Policy, caller: Caller) -> bool:
    if policy.kind == "device_session":
        return isinstance(caller.signer, DeviceSigner)
    if policy.kind != "roles":
        return True
    return caller.roles is not None and policy.allows(caller.roles)


def test_every_route_for_every_role(served: Served) -> None:
    keys = sorted(authz.route_keys(served.app), key=lambda k: (k == LAST, k))
    assert set(keys) == set(authz.ROUTE_POLICIES)
    wrong: list[str] = []
    allowed_cells = 0
    for key in keys:
        policy = authz.ROUTE_POLICIES[key]
        for caller in served.callers:
            response = _request(served.client, key, caller)
            status = response.status_code
            if status == 303:
                assert response.headers["location"].startswith("/login?next="), key
            expect_allowed = _expected_allowed(policy, caller)
            if expect_allowed:
                allowed_cells += 1
                if status in {401, 403}:
                    wrong.append(f"{key} as {caller.label}: {status}, expected allowed")
            else:
                expected = 401 if caller.roles is None or policy.kind == "device_session" else 403
                if policy.page and caller.roles is None:
                    expected = 303  # a page sends the browser to /login instead
                if status != expected:
                    wrong.append(f"{key} as {caller.label}: {status}, expected {expected}")
    assert wrong == []
    assert len(keys) * len(served.callers) >= 40 * 10  # the whole matrix ran, not a sample of it
    assert 0 < allowed_cells < len(keys) * len(served.callers)


def test_regulators_see_only_their_region(served: Served) -> None:
    client = served.client
    # a session of its own (the matrix test logs its sessions out)
    regulator = login(client, ROLE_ACCOUNTS[Role.REGULATOR])
    ours = client.get("/api/v1/devices", headers=regulator).json()
    assert [d["device_id"] for d in ours["items"]] == ["kiosk-001"]  # kiosk-002/003 belong to no institution
    assert ours["total"] == 1
    assert client.get("/api/v1/devices/kiosk-001", headers=regulator).status_code == 200
    assert client.get("/api/v1/devices/kiosk-002", headers=regulator).status_code == 404
    assert [i["region_code"] for i in client.get("/api/v1/institutions", headers=regulator).json()["items"]] == [
        "310115"
    ]
    other = login(client, "m-regulator-js")
    assert client.get("/api/v1/devices", headers=other).json() == {"items": [], "total": 0}
    assert client.get("/api/v1/devices/kiosk-001", headers=other).status_code == 404
    day = {"day": "2026-03-01"}
    assert client.get("/api/v1/devices/kiosk-001/reconciliation", headers=other, params=day).status_code == 404
    admin = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
    assert client.get("/api/v1/devices", headers=admin).json()["total"] == 4  # unscoped (+ the matrix terminal)
    assert client.get("/api/v1/institutions", headers=admin).json()["total"] == 2


def test_the_table_keeps_the_three_administrators_apart() -> None:
    """三员 (B-17) as the table states it: the auditor reads and changes nothing but its own password; the device
    admin cannot read the audit log or manage accounts; the security admin reaches no device or business route."""

    def reachable(role: Role) -> set[str]:
        return {k for k, p in authz.ROUTE_POLICIES.items() if p.kind == "roles" and role in p.roles}

    own = {"POST /api/v1/auth/logout", "GET /api/v1/auth/me", "POST /api/v1/auth/password"}
    auditor = reachable(Role.AUDITOR) - own
    assert auditor == {
        "GET /api/v1/audit",
        "GET /api/v1/accounts",
        "GET /api/v1/accounts/{username}",
        "GET /api/v1/password-policy",
    }
    device_admin = reachable(Role.DEVICE_ADMIN)
    assert not {k for k in device_admin if "/audit" in k or "/accounts" in k or "/reveal" in k}
    security = reachable(Role.SECURITY_ADMIN) - own
    assert all("/accounts" in k or k in {"GET /api/v1/password-policy", "POST /api/v1/reveal"} for k in security)
    assert not reachable(Role.SECURITY_ADMIN) & reachable(Role.AUDITOR) - own - {
        "GET /api/v1/accounts",
        "GET /api/v1/accounts/{username}",
        "GET /api/v1/password-policy",
    }


def test_an_undeclared_route_or_a_stale_policy_stops_the_app(tmp_path: Path) -> None:
    app = create_app(ServerSettings(data_dir=tmp_path))
    authz.check_route_policies(app)  # the real app is fully declared

    @app.get("/api/v1/forgotten")
    def forgotten() -> dict[str, str]:
        return {}

    with pytest.raises(ConfigurationError, match=r"routes without an authorisation policy.*GET /api/v1/forgotten"):
        authz.check_route_policies(app)


def test_create_app_refuses_to_start_with_a_stale_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(authz.ROUTE_POLICIES, "DELETE /api/v1/nowhere", authz.PUBLIC)
    with pytest.raises(ConfigurationError, match="policies for routes the app does not serve"):
        create_app(ServerSettings(data_dir=tmp_path))
    monkeypatch.delitem(authz.ROUTE_POLICIES, "DELETE /api/v1/nowhere")
    monkeypatch.delitem(authz.ROUTE_POLICIES, "GET /api/v1/audit")
    with pytest.raises(ConfigurationError, match="GET /api/v1/audit"):
        create_app(ServerSettings(data_dir=tmp_path))


def test_the_documented_matrix_is_the_code() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "accounts.md").read_text(encoding="utf-8")
    assert authz.matrix_markdown() in doc


def test_the_openapi_document_states_each_routes_security_from_its_policy(tmp_path: Path) -> None:
    """HIS operations ask for the HIS signature, device-API ones for the terminal's, operator ones for a bearer
    token, public ones for nothing: what `authorize` enforces, not what the handlers happen to declare."""
    document = create_app(ServerSettings(data_dir=tmp_path), start_ingest=False).openapi()
    schemes = document["components"]["securitySchemes"]
    assert set(schemes) == {"HTTPBearer", "HisSignature", "DeviceSignature"}
    security = {
        f"{method.upper()} {path}": operation.get("security")
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }
    assert security["POST /his/v1/purchases"] == [{"HisSignature": []}]
    assert security["GET /his/v1/ping"] == [{"HisSignature": []}]
    assert security["GET /device/v1/whoami"] == [{"DeviceSignature": []}]
    assert security["GET /api/v1/purchases"] == [{"HTTPBearer": []}]
    assert security["GET /healthz"] is None
    assert security["POST /api/v1/auth/login"] is None
    for key, needs in security.items():
        policy = authz.policy_for(*key.split(" ", 1))
        assert policy is not None, key
        assert (needs is None) == (policy.kind in ("public", "device")), key
