"""Operator accounts: the password policy, lockout and expiry with an injected clock, password history, 三员
separation, login / logout / me over real HTTP, admin actions in a verifiable audit chain, and the CLI.

Runs against SQLite and PostgreSQL (`engine`). Shared helpers (`accounts_app`, `make_account`, `login`) are used by
test_authz_matrix.py and test_masking.py too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, select

from protocol.gm.audit_chain import load_chain_key, verify_chain
from sync_server import accounts
from sync_server.accounts import (
    AccountLockedError,
    AuthenticationError,
    PasswordPolicy,
    PasswordPolicyError,
    Role,
    RoleConflictError,
)
from sync_server.app import create_app
from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.models import Account, Institution, InstitutionKind
from sync_server.settings import ServerSettings
from tests.sync_server.conftest import T0, FakeClock, serving

POLICY = PasswordPolicy()
GOOD = "Kiosk-2026-pass"


def make_institution(engine: Engine, *, code: str = "H31011500001", region: str = "310115") -> int:
    with session_factory(engine, write_intent=True).begin() as session:
        inst = Institution(
            code=code, name="示例大药房", kind=InstitutionKind.PHARMACY, region_code=region, created_at=T0
        )
        session.add(inst)
        session.flush()
        return inst.id


def make_account(
    engine: Engine,
    username: str,
    *roles: Role,
    password: str = GOOD,
    institution_id: int | None = None,
    region_prefix: str | None = None,
    must_change: bool = False,
    now: datetime = T0,
    **personal: str,
) -> None:
    with session_factory(engine, write_intent=True).begin() as session:
        accounts.create_account(
            session,
            username=username,
            roles=frozenset(roles),
            password=password,
            policy=POLICY,
            now=now,
            created_by="test",
            institution_id=institution_id,
            region_prefix=region_prefix,
            must_change=must_change,
            **personal,  # name / phone / id_number only
        )


@contextmanager
def accounts_app(engine: Engine, clock: FakeClock, data_dir: Path) -> Iterator[httpx.Client]:
    """The real app on `engine`, served over HTTP; the client sends no credentials."""
    settings = ServerSettings(data_dir=data_dir)
    app = create_app(settings, engine=engine, start_ingest=False, clock=clock)
    with serving(app, admin=False) as client:
        yield client


def login(client: httpx.Client, username: str, password: str = GOOD) -> dict[str, str]:
    resp = client.post("/api/v1/auth/login", json={"username": username, "password": password})
    assert resp.status_code == 200, resp.text
    # The page cookie the login set stays out of the client's jar: the callers here say who they are by the header
    # they send (tests/sync_server/test_web.py tests the cookie).
    client.cookies.clear()
    return {"Authorization": f"Bearer {resp.json()['token']}"}


def audit_events(data_dir: Path) -> list[dict[str, object]]:
    chain = data_dir / "audit" / "server-audit.jsonl"
    report = verify_chain(chain, load_chain_key(data_dir / "audit" / "chain.key"))
    assert report.ok, report.detail
    return [json.loads(line)["event"] for line in chain.read_text().splitlines()]


# ---------------------------------------------------------------- policy (pure)


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("Ab1-short", "shorter than 10"),
        ("alllowercaseletters", "uses 1 of the 4 character classes"),
        ("lowerandUPPERonly", "uses 2 of the 4"),
        ("Xx-alice-2026", "contains the username"),
    ],
)
def test_weak_passwords_are_refused_with_the_reason(password: str, reason: str) -> None:
    problems = accounts.password_problems(password, username="alice", policy=POLICY)
    assert any(reason in p for p in problems), problems


def test_acceptable_and_generated_passwords_pass_the_policy() -> None:
    assert accounts.password_problems(GOOD, username="alice", policy=POLICY) == []
    assert accounts.password_problems("lower-and-digits-42", username="alice", policy=POLICY) == []  # 3 of 4
    generated = accounts.generate_password(POLICY)
    assert accounts.password_problems(generated, username="alice", policy=POLICY) == []
    assert accounts.hash_password(GOOD).startswith("$argon2id$")


@pytest.mark.parametrize(
    ("roles", "institution", "region", "message"),
    [
        ({Role.DEVICE_ADMIN, Role.SECURITY_ADMIN}, None, None, "三员 separation"),
        ({Role.DEVICE_ADMIN, Role.AUDITOR}, None, None, "三员 separation"),
        ({Role.SECURITY_ADMIN, Role.AUDITOR}, None, None, "三员 separation"),
        ({Role.AUDITOR, Role.REGULATOR}, None, "3201", "combines with no other role"),
        ({Role.PHARMACIST}, None, None, "need an institution"),
        ({Role.REGULATOR}, None, None, "region scope"),
        ({Role.REGULATOR, Role.PHARMACIST}, 1, "3201", "regulated institution"),
        ({Role.DEVICE_ADMIN}, 1, None, "only institution roles"),
        (set(), None, None, "at least one role"),
    ],
)
def test_role_conflicts_are_refused(
    roles: set[Role], institution: int | None, region: str | None, message: str
) -> None:
    with pytest.raises(RoleConflictError, match=message):
        accounts.check_roles(frozenset(roles), institution_id=institution, region_prefix=region)


def test_allowed_role_combinations() -> None:
    accounts.check_roles(frozenset({Role.INSTITUTION_HEAD, Role.PHARMACIST}), institution_id=1, region_prefix=None)
    accounts.check_roles(frozenset({Role.REGULATOR}), institution_id=None, region_prefix="3201")


# ---------------------------------------------------------------- domain against the databases


def test_lockout_and_its_expiry_with_an_injected_clock(engine: Engine) -> None:
    make_account(engine, "carol", Role.DEVICE_ADMIN)
    policy = PasswordPolicy(max_failures=3, lockout_s=900)
    sessions = session_factory(engine, write_intent=True)
    now = T0
    for attempt in range(3):
        with sessions() as session:
            with pytest.raises(AuthenticationError) as caught:
                accounts.authenticate(session, "carol", "wrong-Pass-1", policy=policy, now=now)
            session.commit()
        assert isinstance(caught.value, AccountLockedError) == (attempt == 2)
    with sessions() as session, pytest.raises(AccountLockedError):  # even the right password, while locked
        accounts.authenticate(session, "carol", GOOD, policy=policy, now=now.replace(minute=14))
    with sessions.begin() as session:
        later = now.replace(minute=15, second=1)
        assert accounts.authenticate(session, "carol", GOOD, policy=policy, now=later).username == "carol"
    with sessions() as session:
        row = session.scalar(select(Account).where(Account.username == "carol"))
        assert row is not None
        assert row.failed_logins == 0
        assert row.locked_until is None
        with pytest.raises(AuthenticationError, match="wrong username or password"):
            accounts.authenticate(session, "nobody", GOOD, policy=policy, now=now)


def test_password_history_and_expiry(engine: Engine) -> None:
    make_account(engine, "dave", Role.AUDITOR)
    policy = PasswordPolicy(history=2, max_age_days=90)
    sessions = session_factory(engine, write_intent=True)
    with sessions.begin() as session:
        dave = accounts.get_account(session, "dave")
        assert not accounts.password_expired(dave, policy=policy, now=T0.replace(month=5, day=29))  # 89 days
        assert accounts.password_expired(dave, policy=policy, now=T0.replace(month=5, day=30))  # 90 days
        with pytest.raises(PasswordPolicyError, match="one of the last 2 passwords"):
            accounts.change_password(session, dave, old=GOOD, new=GOOD, policy=policy, now=T0)
        with pytest.raises(AuthenticationError, match="current password is wrong"):
            accounts.change_password(session, dave, old="Wrong-pass-1", new="Second-pass-2", policy=policy, now=T0)
        accounts.change_password(session, dave, old=GOOD, new="Second-pass-2", policy=policy, now=T0)
        with pytest.raises(PasswordPolicyError, match="one of the last 2"):
            accounts.change_password(session, dave, old="Second-pass-2", new=GOOD, policy=policy, now=T0)
        accounts.change_password(session, dave, old="Second-pass-2", new="Third-pass-3", policy=policy, now=T0)
        accounts.change_password(session, dave, old="Third-pass-3", new=GOOD, policy=policy, now=T0)  # 3rd back: ok
        assert not accounts.password_expired(dave, policy=policy, now=T0.replace(month=5, day=29))


# ---------------------------------------------------------------- over HTTP


def test_login_me_logout_idle_timeout_and_expired_password(engine: Engine, clock: FakeClock, tmp_path: Path) -> None:
    make_account(
        engine, "erin", Role.SECURITY_ADMIN, name="王小明", phone="13812345678", id_number="320102199001011234"
    )
    make_account(engine, "fresh", Role.AUDITOR, must_change=True)
    with accounts_app(engine, clock, tmp_path / "data") as client:
        bad = client.post("/api/v1/auth/login", json={"username": "erin", "password": "Wrong-pass-1"})
        assert bad.status_code == 401
        assert "password" not in json.dumps(bad.json()).replace("username or password", "")
        auth = login(client, "erin")
        me = client.get("/api/v1/auth/me", headers=auth).json()
        assert me["roles"] == ["security_admin"]
        assert me["name"] == "王小明"
        assert "password_hash" not in me
        assert client.post("/api/v1/auth/logout", headers=auth).status_code == 204
        assert client.get("/api/v1/auth/me", headers=auth).status_code == 401

        auth = login(client, "erin")
        for _ in range(3):  # in use: each use pushes the idle timeout back (40 min in all, idle limit 30 min)
            clock.advance(POLICY.session_idle_s * 2 / 3)
            assert client.get("/api/v1/auth/me", headers=auth).status_code == 200
        clock.advance(POLICY.session_idle_s + 1)
        assert client.get("/api/v1/auth/me", headers=auth).status_code == 401  # idle too long

        # a password set by someone else (or older than max_age_days) must be changed before anything else
        fresh = client.post("/api/v1/auth/login", json={"username": "fresh", "password": GOOD}).json()
        assert fresh["must_change_password"] is True
        auth = {"Authorization": f"Bearer {fresh['token']}"}
        assert client.get("/api/v1/audit", headers=auth).status_code == 403
        weak = client.post("/api/v1/auth/password", headers=auth, json={"old_password": GOOD, "new_password": "weak"})
        assert weak.status_code == 422
        assert "shorter than 10" in weak.json()["detail"]
        changed = client.post(
            "/api/v1/auth/password", headers=auth, json={"old_password": GOOD, "new_password": "Newer-pass-99"}
        )
        assert changed.status_code == 204
        assert client.get("/api/v1/audit", headers=auth).status_code == 200

        auth = login(client, "erin")
        clock.advance(91 * 86400)  # the password is now older than 90 days
        auth = login(client, "erin")
        assert client.get("/api/v1/accounts", headers=auth).status_code == 403
        assert client.get("/api/v1/auth/me", headers=auth).status_code == 200


def test_security_admin_manages_accounts_and_everything_is_audited(
    engine: Engine, clock: FakeClock, tmp_path: Path
) -> None:
    inst = make_institution(engine)
    make_account(engine, "sec", Role.SECURITY_ADMIN)
    make_account(engine, "aud", Role.AUDITOR)
    data = tmp_path / "data"
    with accounts_app(engine, clock, data) as client:
        sec = login(client, "sec")
        body = {"username": "phil", "roles": ["pharmacist"], "password": "Pharm-2026-x", "institution_id": inst}
        made = client.post("/api/v1/accounts", headers=sec, json=body)
        assert made.status_code == 201, made.text
        assert made.json()["must_change_password"] is True
        assert "password" not in made.json()
        conflict = client.post(
            "/api/v1/accounts",
            headers=sec,
            json={"username": "boss", "roles": ["device_admin", "auditor"], "password": "Boss-2026-xy"},
        )
        assert conflict.status_code == 422
        assert "三员" in conflict.json()["detail"]
        weak = client.post("/api/v1/accounts", headers=sec, json={**body, "username": "weak", "password": "weakweak"})
        assert weak.status_code == 422
        assert "password refused" in weak.json()["detail"]
        assert client.post("/api/v1/accounts", headers=sec, json=body).status_code == 409
        roles = client.put("/api/v1/accounts/aud/roles", headers=sec, json={"roles": ["auditor", "security_admin"]})
        assert roles.status_code == 422
        assert client.put("/api/v1/accounts/sec/roles", headers=sec, json={"roles": ["auditor"]}).status_code == 422
        reset = client.post("/api/v1/accounts/phil/password-reset", headers=sec, json={"password": "Reset-2026-zz"})
        assert reset.status_code == 200
        assert reset.json()["must_change_password"] is True
        assert client.post("/api/v1/accounts/phil/disable", headers=sec).status_code == 200
        refused = client.post("/api/v1/auth/login", json={"username": "phil", "password": "Reset-2026-zz"})
        assert refused.status_code == 401
        assert "disabled" in refused.json()["detail"]
        assert client.post("/api/v1/accounts/phil/enable", headers=sec).status_code == 200

        aud = login(client, "aud")
        assert client.post("/api/v1/accounts/phil/disable", headers=aud).status_code == 403  # the auditor reads only
        log = client.get("/api/v1/audit", headers=aud).json()
        assert log["intact"] is True
        assert client.get("/api/v1/audit", headers=sec).status_code == 403  # 三员: not the security admin
    types = [e["type"] for e in audit_events(data)]
    for expected in (
        "account.created",
        "account.create_refused",
        "account.roles_refused",
        "account.password_reset",
        "account.disabled",
        "account.enabled",
        "auth.login",
        "auth.login_failed",
        "audit.read",
    ):
        assert expected in types, expected
    assert "Reset-2026-zz" not in (data / "audit" / "server-audit.jsonl").read_text()


def test_lockout_over_http(engine: Engine, clock: FakeClock, tmp_path: Path) -> None:
    make_account(engine, "gina", Role.AUDITOR)
    with accounts_app(engine, clock, tmp_path / "data") as client:
        codes = [
            client.post("/api/v1/auth/login", json={"username": "gina", "password": "Wrong-pass-1"}).status_code
            for _ in range(POLICY.max_failures)
        ]
        assert codes == [401] * (POLICY.max_failures - 1) + [423]
        assert client.post("/api/v1/auth/login", json={"username": "gina", "password": GOOD}).status_code == 423
        clock.advance(POLICY.lockout_s)
        login(client, "gina")


# ---------------------------------------------------------------- CLI


def test_cli_creates_an_account_with_a_one_time_password(sqlite_url: str, tmp_path: Path) -> None:
    def yibao(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "yibao", "--log-level", "warning", "server", "account", "create", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "YIBAO_SERVER_DATABASE_URL": sqlite_url},
        )

    made = yibao("--username", "first-sec", "--role", "security_admin")
    assert made.returncode == 0, made.stderr
    password = made.stdout.strip()
    assert len(password) >= 16
    typed = yibao("--username", "first-aud", "--role", "auditor", "--password-stdin", stdin="Audit-2026-pw\n")
    assert typed.returncode == 0, typed.stderr
    assert typed.stdout == ""  # a password the operator typed is never echoed
    conflict = yibao("--username", "both", "--role", "auditor", "--role", "device_admin", stdin="")
    assert conflict.returncode == 2
    assert "三员" in conflict.stderr
    engine = create_db_engine(sqlite_url)
    try:
        with session_factory(engine, write_intent=True).begin() as session:
            sec = accounts.authenticate(session, "first-sec", password, policy=POLICY, now=T0.replace(year=2030))
            assert sec.must_change_password
            assert sec.roles == ["security_admin"]
            accounts.authenticate(session, "first-aud", "Audit-2026-pw", policy=POLICY, now=T0.replace(year=2030))
    finally:
        engine.dispose()
    events = audit_events(tmp_path / "server-data")
    assert [e["type"] for e in events] == ["account.created", "account.created"]
