"""Operators acting in the browser (issue 5; I-03, D-03, B-01, B-14…B-17): the real system Chromium, driven by
Playwright, against the real app served over HTTP on SQLite and PostgreSQL.

A device admin signs in on /login (keyboard submit), sees its name and roles in the header, approves one pending
binding application and rejects another with reasons (the empty reason is refused in the page), and unbinds the
bound device from its device page; the database, the binding history, the queued commands and the audit chain show
exactly that. Also: the wrong-password, locked-account and must-change-password paths of the sign-in page, a regulator
who sees disabled buttons (and the server's 403 when the buttons are forced on), and a stale page that gets the
server's 409. On /catalogue: a regulator publishes the drug-usage rules from JSON and a catalogue version from a CSV
file (quoted cells, the page's own checks, the server's 422 and 409), and the roles that may not publish see no form
or disabled controls. Every request the page makes goes to this server only. Screenshots land in the test's tmp dir.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright
from sqlalchemy import Engine, select

from protocol import CommandKind, Envelope, PayloadType, SignedRecordKind
from protocol.binding import ApplicantVerification
from protocol.catalogue import DrugEntry
from protocol.evidence import sign_device_record
from protocol.gm.sm2 import SM2PrivateKey
from sync_server.accounts import Role
from sync_server.app import create_app
from sync_server.authz import PAGE_COOKIE
from sync_server.binding import record_binding_applications
from sync_server.db.engine import session_factory
from sync_server.db.models import (
    BindingApplication,
    BindingStatus,
    CatalogueVersion,
    Device,
    DeviceBindingHistory,
    DeviceKey,
    DrugRuleVersion,
    Institution,
    InstitutionKind,
    IssuedCommand,
)
from sync_server.settings import ServerSettings
from sync_server.store import register_devices, store_envelopes
from terminal.binding import binding_application_record
from terminal.verification import FaceDecision, FaceOutcome
from tests.http_serving import serving_url
from tests.sync_server.conftest import ADMIN_HEADERS, BOOT, T0, FakeClock
from tests.sync_server.test_accounts import GOOD, audit_events, make_account

pytestmark = pytest.mark.browser

DEVICE_A = "SIM-WEB-A"
DEVICE_B = "SIM-WEB-B"
CODE_A = "H31011500042"
CODE_B = "H31011500043"
ADMIN = "dev-wang"
TIMEOUT_MS = 15_000


# ---------------------------------------------------------------- seeding: two devices, one application each


def _signed_application(key: SM2PrivateKey, device_id: str, code: str, seq: int) -> Envelope:
    decision = FaceDecision(
        outcome=FaceOutcome.ACCEPTED,
        method="face_1to1",
        subject_ref=f"head-{device_id.lower()}",
        similarity=0.81,
        threshold=0.6,
        liveness=None,
        quality_issues=(),
        model_sha256="0" * 64,
        template_hash="ab" * 16,
        frames=5,
        duration_ms=900.0,
    )
    record = binding_application_record(
        decision,
        verification=ApplicantVerification.FACE_ID_CARD,
        institution_code=code,
        applicant_masked="张**",
        reason="新设备安装",
        applied_at=T0,
    )
    payload = sign_device_record(
        key, device_id=device_id, key_epoch=1, record_type=SignedRecordKind.BINDING_APPLICATION, record=record
    )
    return Envelope(
        device_id=device_id,
        seq=seq,
        message_id=uuid.uuid4(),
        device_time=T0,
        boot_id=BOOT,
        monotonic_ns=seq,
        payload_type=PayloadType.SIGNED_RECORD,
        payload=payload,
    )


def seed(engine: Engine) -> dict[str, int]:
    """Two registered institutions and two devices with one pending application each; {device_id: application id}."""
    with session_factory(engine, write_intent=True).begin() as session:
        for code, name in ((CODE_A, "浦东新区示例大药房"), (CODE_B, "浦东新区示例诊所")):
            session.add(
                Institution(code=code, name=name, kind=InstitutionKind.PHARMACY, region_code="310115", created_at=T0)
            )
        register_devices(session, {DEVICE_A, DEVICE_B}, now=T0)
        envelopes = []
        for device_id, code in ((DEVICE_A, CODE_A), (DEVICE_B, CODE_B)):
            key = SM2PrivateKey.generate()
            session.add(
                DeviceKey(
                    device_id=device_id,
                    key_epoch=1,
                    public_key=key.public_key.hex(),
                    fingerprint=key.public_key.fingerprint(),
                    created_at=T0,
                )
            )
            envelopes.append(_signed_application(key, device_id, code, seq=1))
        session.flush()
        store_envelopes(session, envelopes, received_at=T0)
        assert record_binding_applications(session, envelopes, now=T0).created == 2
    with session_factory(engine)() as session:
        return {row.device_id: row.id for row in session.scalars(select(BindingApplication))}


def rows(engine: Engine, model: Any) -> list[Any]:
    with session_factory(engine)() as session:
        return list(session.scalars(select(model).order_by(model.id)))


# ---------------------------------------------------------------- the browser


@contextmanager
def served(engine: Engine, db_url: str, data_dir: Path, clock: FakeClock | None = None) -> Iterator[str]:
    settings = ServerSettings(database_url=db_url, data_dir=data_dir)
    app = create_app(settings, engine=engine, start_ingest=False, clock=clock or FakeClock(T0))
    with serving_url(app, lifespan="on") as url:
        yield url


@contextmanager
def browser_page(base_url: str, *, javascript: bool = True) -> Iterator[Page]:
    """A fresh headless system Chromium (never a downloaded browser); afterwards, checks that every request the pages
    made went to `base_url` (no CDN, nothing fetched from elsewhere)."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian package 'chromium' is required (scripts/setup.sh --dev installs it)"
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context(
                locale="zh-CN", viewport={"width": 1400, "height": 1000}, java_script_enabled=javascript
            )
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            page.on("request", lambda request: requested.append(request.url))
            yield page
        finally:
            browser.close()
    assert requested
    assert all(url.startswith(base_url + "/") for url in requested), requested


def sign_in(page: Page, base_url: str, username: str, password: str = GOOD, *, next_path: str = "/bindings") -> None:
    page.goto(f"{base_url}/login?next={next_path}")
    page.get_by_label("用户名").fill(username)
    page.locator("#login-password").fill(password)
    page.locator("#login-password").press("Enter")  # keyboard submit


def application_row(page: Page, application_id: int) -> Any:
    return page.locator(f"#application-{application_id}")


# ---------------------------------------------------------------- the device admin's loop


def test_a_device_admin_approves_rejects_and_unbinds_in_the_browser(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    applications = seed(engine)
    app_a, app_b = applications[DEVICE_A], applications[DEVICE_B]
    make_account(engine, ADMIN, Role.DEVICE_ADMIN, name="王小明")
    data_dir = tmp_path / "data"
    with served(engine, db_url, data_dir) as url, browser_page(url) as page:
        # anonymous: the page is not shown; the browser is sent to sign in, and back afterwards
        page.goto(f"{url}/bindings")
        page.wait_for_url(f"{url}/login?next=%2Fbindings")
        expect(page.locator("#login-asked")).to_be_visible()
        expect(page.locator(f"#application-{app_a}")).to_have_count(0)
        page.get_by_label("用户名").fill(ADMIN)
        page.locator("#login-password").fill(GOOD)
        page.locator("#login-password").press("Enter")
        page.wait_for_url(f"{url}/bindings")
        expect(page.locator("#operator-name")).to_have_text(f"王小明（{ADMIN}）")
        expect(page.locator("#operator-roles")).to_contain_text("设备管理员 device_admin")
        expect(page.locator("#flash")).to_contain_text("登录成功")
        expect(page.locator("#decide-note")).to_be_hidden()
        token = page.evaluate("JSON.parse(sessionStorage.getItem('yibao.operator.session')).token")
        assert token.startswith("ys_")
        assert page.evaluate("document.cookie") == ""  # the page cookie is HttpOnly: no script reads it
        (cookie,) = page.context.cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == (PAGE_COOKIE, True, "Strict")
        assert cookie["value"] == token
        assert page.evaluate("localStorage.length") == 0
        page.screenshot(path=tmp_path / "bindings-signed-in.png", full_page=True)

        # the reason is mandatory: refused in the page, nothing sent
        row_a = application_row(page, app_a)
        row_a.get_by_role("button", name="批准").click()
        expect(row_a.locator(".message")).to_contain_text("请填写理由")
        expect(row_a.locator(".message")).to_contain_text("A reason is required")
        assert [r.status for r in rows(engine, BindingApplication)] == [BindingStatus.PENDING] * 2

        row_a.get_by_label("审批理由").fill("资料齐全，同意绑定")
        row_a.get_by_role("button", name="批准").click()
        expect(page.locator("#flash")).to_contain_text(f"已批准申请 {app_a}")  # after the reload
        expect(application_row(page, app_a)).to_have_count(0)
        expect(page.locator("#history tr.binding-change")).to_have_count(1)
        expect(page.locator("#history")).to_contain_text("资料齐全，同意绑定")

        row_b = application_row(page, app_b)
        row_b.get_by_label("审批理由").fill("非本机构负责人")
        row_b.get_by_label("联系方式").fill("12393")
        row_b.get_by_label("审批理由").press("Enter")  # Enter never decides by default
        expect(row_b.locator(".message")).to_contain_text("请点击")
        row_b.get_by_role("button", name="驳回").focus()
        page.keyboard.press("Enter")
        expect(page.locator("#flash")).to_contain_text(f"已驳回申请 {app_b}")
        expect(page.locator("#no-pending")).to_be_visible()
        page.screenshot(path=tmp_path / "bindings-decided.png", full_page=True)

        decided = {r.device_id: r for r in rows(engine, BindingApplication)}
        assert (decided[DEVICE_A].status, decided[DEVICE_A].decision_reason) == (
            BindingStatus.APPROVED,
            "资料齐全，同意绑定",
        )
        rejected = decided[DEVICE_B]
        assert (rejected.status, rejected.decision_reason) == (BindingStatus.REJECTED, "非本机构负责人")
        assert decided[DEVICE_A].decided_by == decided[DEVICE_B].decided_by == f"account:{ADMIN}"
        institutions = {i.code: i.id for i in rows(engine, Institution)}
        with session_factory(engine)() as session:
            device_a, device_b = session.get(Device, DEVICE_A), session.get(Device, DEVICE_B)
            assert device_a is not None
            assert device_b is not None
            assert (device_a.institution_id, device_b.institution_id) == (institutions[CODE_A], None)
        [bind] = rows(engine, DeviceBindingHistory)
        assert (bind.device_id, bind.action, bind.reason, bind.actor) == (
            DEVICE_A,
            "bind",
            "资料齐全，同意绑定",
            f"account:{ADMIN}",
        )
        assert (bind.application_id, bind.to_institution_id) == (app_a, institutions[CODE_A])
        commands = {c.device_id: c for c in rows(engine, IssuedCommand)}
        assert commands[DEVICE_A].kind == CommandKind.BINDING_DECISION.value
        assert (commands[DEVICE_A].args["approved"], commands[DEVICE_A].args["reason"]) == (True, "资料齐全，同意绑定")
        assert commands[DEVICE_A].command_id == bind.command_id
        rejection = commands[DEVICE_B].args
        assert (rejection["approved"], rejection["reason"], rejection["contact"]) == (False, "非本机构负责人", "12393")
        assert commands[DEVICE_A].args["contact"] is None

        # unbind from the bound device's page (the unbound one has no such form)
        page.goto(f"{url}/devices/{DEVICE_B}")
        expect(page.locator("#unbind-form")).to_have_count(0)
        page.goto(f"{url}/devices/{DEVICE_A}")
        expect(page.locator("#unbind-note")).to_be_hidden()
        reason = page.get_by_label("解绑理由")
        reason.fill("门店搬迁")
        reason.press("Enter")  # the form's only action: keyboard submit
        expect(page.locator("#flash")).to_contain_text("已解除绑定")
        expect(page.locator("#unbind-form")).to_have_count(0)
        expect(page.locator("dd.institution")).to_contain_text("未绑定")
        page.screenshot(path=tmp_path / "device-unbound.png", full_page=True)

        history = rows(engine, DeviceBindingHistory)
        assert [(h.action, h.reason) for h in history] == [("bind", "资料齐全，同意绑定"), ("unbind", "门店搬迁")]
        unbind_command = rows(engine, IssuedCommand)[-1]
        assert (unbind_command.kind, unbind_command.device_id, unbind_command.args["reason"]) == (
            CommandKind.UNBIND.value,
            DEVICE_A,
            "门店搬迁",
        )
        assert unbind_command.command_id == history[-1].command_id

        # signing out ends the server session and forgets the token
        page.get_by_role("button", name="退出登录").click()
        expect(page.locator("#sign-in-link")).to_be_visible()
        page.wait_for_url(f"{url}/login?next=%2Fdevices%2F{DEVICE_A}")  # the page is closed again
        assert page.evaluate("sessionStorage.getItem('yibao.operator.session')") is None
        assert page.context.cookies() == []
        me = httpx.get(f"{url}/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 401

    actions = [e["type"] for e in audit_events(data_dir)]
    for action in ("auth.login", "binding.approved", "binding.rejected", "binding.unbound", "auth.logout"):
        assert action in actions


# ---------------------------------------------------------------- the sign-in page's refusals


def test_wrong_password_lockout_and_a_password_that_must_be_changed(
    sqlite_engine: Engine, sqlite_url: str, tmp_path: Path
) -> None:
    make_account(sqlite_engine, ADMIN, Role.DEVICE_ADMIN)
    make_account(sqlite_engine, "dev-new", Role.DEVICE_ADMIN, must_change=True)
    with served(sqlite_engine, sqlite_url, tmp_path / "data") as url, browser_page(url) as page:
        sign_in(page, url, ADMIN, "Wrong-pass-2026")
        message = page.locator("#login-message")
        expect(message).to_contain_text("用户名或密码错误")
        expect(message).to_contain_text("Wrong username or password")
        assert page.url.endswith("/login?next=/bindings")
        assert page.evaluate("sessionStorage.getItem('yibao.operator.session')") is None
        page.screenshot(path=tmp_path / "login-wrong-password.png")

        for _ in range(3):
            sign_in(page, url, ADMIN, "Wrong-pass-2026")
            expect(message).to_contain_text("用户名或密码错误")
        sign_in(page, url, ADMIN, "Wrong-pass-2026")  # the fifth failure locks the account (423)...
        expect(message).to_contain_text("账户已锁定")
        sign_in(page, url, ADMIN, GOOD)  # ...even for the right password
        expect(message).to_contain_text("账户已锁定")
        expect(message).to_contain_text("The account is locked")
        assert page.evaluate("sessionStorage.getItem('yibao.operator.session')") is None

        # an initial password: the change form, its own checks, the policy's refusal, then signed in
        sign_in(page, url, "dev-new")
        form = page.locator("#password-form")
        expect(form).to_be_visible()
        expect(page.locator("#login-form")).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('yibao.operator.session')") is None
        page.get_by_label("当前密码").fill(GOOD)
        page.locator("#password-new").fill("Newer-pass-2027")
        page.get_by_label("再次输入新密码").fill("Other-pass-2027")
        page.get_by_label("再次输入新密码").press("Enter")
        expect(page.locator("#password-message")).to_contain_text("两次输入的新密码不一致")
        page.locator("#password-new").fill("weak")
        page.get_by_label("再次输入新密码").fill("weak")
        page.get_by_role("button", name="修改密码").click()
        expect(page.locator("#password-message")).to_contain_text("新密码未被接受")
        expect(page.locator("#password-message")).to_contain_text("shorter than 10")
        page.screenshot(path=tmp_path / "login-change-password.png")
        page.locator("#password-new").fill("Newer-pass-2027")
        page.get_by_label("再次输入新密码").fill("Newer-pass-2027")
        page.get_by_role("button", name="修改密码").click()
        page.wait_for_url(f"{url}/bindings")
        expect(page.locator("#flash")).to_contain_text("密码已修改")
        expect(page.locator("#operator-name")).to_have_text("dev-new")


# ---------------------------------------------------------------- roles and stale pages


def test_a_regulator_sees_disabled_buttons_and_a_stale_page_shows_the_servers_conflict(
    sqlite_engine: Engine, sqlite_url: str, tmp_path: Path
) -> None:
    applications = seed(sqlite_engine)
    app_a, app_b = applications[DEVICE_A], applications[DEVICE_B]
    make_account(sqlite_engine, "reg-sh", Role.REGULATOR, region_prefix="3101")
    make_account(sqlite_engine, ADMIN, Role.DEVICE_ADMIN)
    clock = FakeClock(T0)
    with served(sqlite_engine, sqlite_url, tmp_path / "data", clock) as url, browser_page(url) as page:
        sign_in(page, url, "reg-sh")
        page.wait_for_url(f"{url}/bindings")
        expect(page.locator("#operator-roles")).to_contain_text("监管人员 regulator")
        row_a = application_row(page, app_a)
        for name in ("批准", "驳回"):
            expect(row_a.get_by_role("button", name=name)).to_be_disabled()
        expect(row_a.get_by_label("审批理由")).to_be_disabled()
        expect(page.locator("#decide-note")).to_contain_text("没有设备管理员权限")
        page.screenshot(path=tmp_path / "bindings-regulator.png", full_page=True)

        # buttons forced on in the page change nothing: the server says 403 and the page shows it
        page.evaluate("document.querySelectorAll('form[data-action] *').forEach(c => c.disabled = false)")
        row_a.get_by_label("审批理由").fill("试图越权")
        row_a.get_by_role("button", name="批准").click()
        expect(row_a.locator(".message")).to_contain_text("无权限")
        expect(row_a.locator(".message")).to_contain_text("device_admin")
        assert [r.status for r in rows(sqlite_engine, BindingApplication)] == [BindingStatus.PENDING] * 2

        page.get_by_role("button", name="退出登录").click()
        expect(page.locator("#sign-in-link")).to_be_visible()
        sign_in(page, url, ADMIN)
        page.wait_for_url(f"{url}/bindings")
        row_b = application_row(page, app_b)
        expect(row_b.get_by_role("button", name="驳回")).to_be_enabled()
        # meanwhile someone decides it over the API: this page is now stale
        decided = httpx.post(
            f"{url}/api/v1/binding-applications/{app_b}/reject", json={"reason": "重复申请"}, headers=ADMIN_HEADERS
        )
        assert decided.status_code == 200, decided.text
        row_b.get_by_label("审批理由").fill("同意")
        row_b.get_by_role("button", name="批准").click()
        expect(row_b.locator(".message")).to_contain_text("已处理")
        expect(row_b.locator(".message")).to_contain_text("Conflict")
        page.screenshot(path=tmp_path / "bindings-conflict.png", full_page=True)
        # and then it reloads to show the current state
        expect(application_row(page, app_b)).to_have_count(0)
        expect(page.locator("#flash")).to_contain_text("已处理")

        # the session ends on the server (idle for longer than 30 min): the page says so and goes to sign in again
        clock.advance(31 * 60)
        row_a = application_row(page, app_a)
        row_a.get_by_label("审批理由").fill("资料齐全")
        row_a.get_by_role("button", name="批准").click()
        expect(row_a.locator(".message")).to_contain_text("登录已失效")
        page.wait_for_url(f"{url}/login?next=%2Fbindings")
        expect(page.locator("#sign-in-link")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('yibao.operator.session')") is None
    statuses = {r.device_id: r.status for r in rows(sqlite_engine, BindingApplication)}  # A was never decided
    assert statuses == {DEVICE_A: BindingStatus.PENDING, DEVICE_B: BindingStatus.REJECTED}


def test_without_the_script_the_pages_still_read_and_nothing_can_be_decided(
    sqlite_engine: Engine, sqlite_url: str, tmp_path: Path
) -> None:
    applications = seed(sqlite_engine)
    make_account(sqlite_engine, ADMIN, Role.DEVICE_ADMIN)
    with served(sqlite_engine, sqlite_url, tmp_path / "data") as url:
        with httpx.Client(base_url=url) as http:  # the script is this server's own file, served with the pages
            script = http.get("/static/operator.js")
            assert script.status_code == 200
            assert "javascript" in script.headers["content-type"]
            assert "sessionStorage" in script.text
            assert "localStorage.setItem" not in script.text
            assert "innerHTML" not in script.text
            assert "script-src 'self'" in http.get("/login").text
            signed_in = http.post("/api/v1/auth/login", json={"username": ADMIN, "password": GOOD})
            assert signed_in.status_code == 200
        with browser_page(url, javascript=False) as page:
            # a browser holding the page cookie (signed in with the script, then the script turned off)
            host = url.split("//", 1)[1].split(":", 1)[0]
            page.context.add_cookies(
                [
                    {
                        "name": PAGE_COOKIE,
                        "value": signed_in.json()["token"],
                        "domain": host,
                        "path": "/",
                        "httpOnly": True,
                        "sameSite": "Strict",
                    }
                ]
            )
            page.goto(f"{url}/bindings")
            row = application_row(page, applications[DEVICE_A])
            expect(row).to_contain_text(DEVICE_A)
            for name in ("批准", "驳回"):
                expect(row.get_by_role("button", name=name)).to_be_disabled()
            expect(page.locator("#decide-note")).to_be_visible()
            page.goto(f"{url}/login")
            expect(page.locator("noscript")).to_have_count(1)
            expect(page.get_by_label("用户名")).to_be_visible()
    assert [r.status for r in rows(sqlite_engine, BindingApplication)] == [BindingStatus.PENDING] * 2


# ---------------------------------------------------------------- the regulator's drug-usage rules (/catalogue)


def test_a_regulator_publishes_the_next_rule_set_on_the_catalogue_page(
    sqlite_engine: Engine, sqlite_url: str, tmp_path: Path
) -> None:
    make_account(sqlite_engine, "reg-rules", Role.REGULATOR, region_prefix="3101")
    make_account(sqlite_engine, ADMIN, Role.DEVICE_ADMIN)
    first = {
        "rules": [
            {
                "kind": "max_quantity_per_purchase",
                "rule_id": "FFGC-1",
                "title": "复方甘草片",
                "title_en": "compound liquorice tablets",
                "drugs": {"generic_names": ["复方甘草片"]},
                "action": "block",
                "max_quantity": 2,
            }
        ]
    }
    with served(sqlite_engine, sqlite_url, tmp_path / "data") as url, browser_page(url) as page:
        # a device admin reads the rules, cannot publish
        sign_in(page, url, ADMIN, next_path="/catalogue")
        page.wait_for_url(f"{url}/catalogue")
        expect(page.locator("#rules-version")).to_contain_text("尚未发布用药规则")
        expect(page.locator("#rules-publish")).to_be_disabled()
        expect(page.locator("#rules-note")).to_contain_text("没有监管人员权限")
        page.get_by_role("button", name="退出登录").click()
        page.wait_for_url(f"{url}/login?next=%2Fcatalogue")

        sign_in(page, url, "reg-rules", next_path="/catalogue")
        page.wait_for_url(f"{url}/catalogue")
        expect(page.locator("#rules-note")).to_be_hidden()
        field = page.locator("#rules-json")
        expect(field).to_be_enabled()
        # not JSON: said in words, nothing sent
        field.fill('{"rules": [')
        page.locator("#rules-publish").click()
        expect(page.locator("#rules-message")).to_contain_text("JSON 格式错误")
        # JSON the server refuses (a limit below 1): its reasons, nothing published
        broken = json.loads(json.dumps(first))
        broken["rules"][0]["max_quantity"] = 0
        field.fill(json.dumps(broken, ensure_ascii=False))
        page.locator("#rules-publish").click()
        expect(page.locator("#rules-message")).to_contain_text("规则未通过校验")
        expect(page.locator("#rules-message")).to_contain_text("max_quantity")
        # the first version
        field.fill(json.dumps(first, ensure_ascii=False))
        page.locator("#rules-publish").click()
        expect(page.locator("#flash")).to_contain_text("已发布第 1 版（1 条规则），已通知 0 台终端")
        expect(page.locator("#rules-version")).to_have_attribute("data-version", "1")
        row = page.locator('tr.rule[data-rule-id="FFGC-1"]')
        expect(row).to_contain_text("单次限量")
        expect(row).to_contain_text("max_quantity = 2")
        expect(row.locator(".rule-action")).to_contain_text("禁止")
        # the form now holds version 1: edit the limit there and publish version 2
        edited = json.loads(field.input_value())
        [rule] = edited["rules"]
        assert {k: rule[k] for k in first["rules"][0]} == {**first["rules"][0], "drugs": rule["drugs"]}
        assert rule["drugs"]["generic_names"] == ["复方甘草片"]
        edited["rules"][0]["max_quantity"] = 3
        field.fill(json.dumps(edited, ensure_ascii=False))
        page.locator("#rules-publish").click()
        expect(page.locator("#flash")).to_contain_text("已发布第 2 版")
        expect(page.locator('tr.rule[data-rule-id="FFGC-1"]')).to_contain_text("max_quantity = 3")
        page.screenshot(path=tmp_path / "catalogue-regulator.png", full_page=True)
        # the same again: nothing new
        page.locator("#rules-publish").click()
        expect(page.locator("#flash")).to_contain_text("与当前版本相同")
        expect(page.locator("#rules-version")).to_have_attribute("data-version", "2")
    with session_factory(sqlite_engine)() as session:
        versions = session.scalars(select(DrugRuleVersion.version).order_by(DrugRuleVersion.version)).all()
    assert versions == [1, 2]
    published = [e for e in audit_events(tmp_path / "data") if e["type"] == "drug_rules.published"]
    assert [e["version"] for e in published] == [1, 2]


# ---------------------------------------------------------------- a catalogue version from a file (/catalogue)

DRUG_COLUMNS = (
    "code,name,generic_name,dosage_form,specification,package,unit,manufacturer,approval_number,category,dispensing,"
    "price_fen,limit_note,homologous_herb"
)
# Excel's "CSV UTF-8": a byte order mark and CRLF; quoted cells with a comma in Chinese text, doubled quotes and a
# line break; empty cells (price_fen, limit_note, homologous_herb) left out of the entry.
DRUGS_CSV = (
    "\ufeff" + DRUG_COLUMNS + "\r\n"
    'XJ01CAA040A001010100534,阿莫西林胶囊,阿莫西林,胶囊剂,0.25g,24粒/盒,盒,"上海示例药业有限公司, 浦东分厂",'
    "国药准字H20003263,甲,rx,1250,,\r\n"
    'XR05DAF036A001010100001,"复方甘草片（""限量""）",复方甘草片,片剂,100片,100片/瓶,瓶,示例制药厂,国药准字H11020000,'
    '乙,otc_a,,"限门诊使用\r\n每次不超过 2 瓶",否\r\n'
)
DRUGS_PUBLISHED = [
    {
        "code": "XJ01CAA040A001010100534",
        "name": "阿莫西林胶囊",
        "generic_name": "阿莫西林",
        "dosage_form": "胶囊剂",
        "specification": "0.25g",
        "package": "24粒/盒",
        "unit": "盒",
        "manufacturer": "上海示例药业有限公司, 浦东分厂",
        "approval_number": "国药准字H20003263",
        "category": "甲",
        "dispensing": "rx",
        "price_fen": 1250,
    },
    {
        "code": "XR05DAF036A001010100001",
        "name": '复方甘草片（"限量"）',
        "generic_name": "复方甘草片",
        "dosage_form": "片剂",
        "specification": "100片",
        "package": "100片/瓶",
        "unit": "瓶",
        "manufacturer": "示例制药厂",
        "approval_number": "国药准字H11020000",
        "category": "乙",
        "dispensing": "otc_a",
        "limit_note": "限门诊使用\r\n每次不超过 2 瓶",
        "homologous_herb": False,
    },
]
OLD_DRUG = {**DRUGS_PUBLISHED[0], "code": "XA02BCA010A001010100001", "name": "奥美拉唑肠溶胶囊"}


def _publish_over_the_api(url: str, entries: list[dict[str, Any]], base_version: int) -> None:
    body = {"entries": [{"kind": "drug", **e} for e in entries], "base_version": base_version}
    published = httpx.post(f"{url}/api/v1/catalogues/drug/versions", json=body, headers=ADMIN_HEADERS)
    assert published.status_code == 201, published.text


def _drug_versions(engine: Engine) -> list[CatalogueVersion]:
    with session_factory(engine)() as session:
        return list(
            session.scalars(
                select(CatalogueVersion).where(CatalogueVersion.kind == "drug").order_by(CatalogueVersion.version)
            )
        )


def test_a_regulator_publishes_a_catalogue_version_from_a_csv_file(engine: Engine, db_url: str, tmp_path: Path) -> None:
    make_account(engine, "reg-cat", Role.REGULATOR, region_prefix="3101")
    make_account(engine, ADMIN, Role.DEVICE_ADMIN)
    with session_factory(engine, write_intent=True).begin() as session:
        pharmacy = Institution(
            code=CODE_A, name="浦东新区示例大药房", kind=InstitutionKind.PHARMACY, region_code="310115", created_at=T0
        )
        session.add(pharmacy)
        session.flush()
        pharmacy_id = pharmacy.id
    make_account(engine, "pharm-cat", Role.PHARMACIST, institution_id=pharmacy_id)
    files = tmp_path / "files"
    files.mkdir()
    good = files / "drugs.csv"
    good.write_bytes(DRUGS_CSV.encode())
    no_column = files / "drugs-no-dispensing.csv"  # a required column left out: found in the page
    no_column.write_text(
        "code,name,generic_name,dosage_form,specification,package,unit,manufacturer,approval_number,category\n"
        "XJ01CAA040A001010100534,阿莫西林胶囊,阿莫西林,胶囊剂,0.25g,24粒/盒,盒,示例药业,国药准字H20003263,甲\n",
        encoding="utf-8",
    )
    bad_value = files / "drugs-bad-category.csv"  # 丁 is no 医保目录类别: refused by the server, line 3
    bad_value.write_text(
        DRUG_COLUMNS + "\n"
        "XJ01CAA040A001010100534,阿莫西林胶囊,阿莫西林,胶囊剂,0.25g,24粒/盒,盒,示例药业,国药准字H20003263,甲,rx,,,\n"
        "XR05DAF036A001010100001,复方甘草片,复方甘草片,片剂,100片,100片/瓶,瓶,示例制药厂,国药准字H11020000,丁,rx,,,\n",
        encoding="utf-8",
    )
    data_dir = tmp_path / "data"
    with served(engine, db_url, data_dir) as url, browser_page(url) as page:
        publishes: list[str] = []  # the page's publish requests
        page.on("request", lambda r: publishes.append(r.url) if "/api/v1/catalogues/" in r.url else None)
        _publish_over_the_api(url, [OLD_DRUG], base_version=0)  # drug v1, before the page is opened

        sign_in(page, url, "reg-cat", next_path="/catalogue")
        page.wait_for_url(f"{url}/catalogue")
        expect(page.locator("#catalogue-note")).to_be_hidden()
        kind = page.locator("#catalogue-kind")
        file_field = page.get_by_label("目录文件")
        expect(kind).to_be_enabled()
        expect(file_field).to_be_enabled()
        expect(file_field).to_have_attribute("accept", ".json,.csv")
        # every catalogue kind, each with its own current version
        options = kind.locator("option")
        expect(options).to_have_count(3)
        assert [options.nth(i).get_attribute("value") for i in range(3)] == ["drug", "treatment", "institution"]
        assert [options.nth(i).get_attribute("data-version") for i in range(3)] == ["1", "0", "0"]
        expect(page.locator("#catalogue-message")).to_have_attribute("role", "alert")

        # nothing chosen: said, nothing sent
        page.locator("#catalogue-publish").click()
        expect(page.locator("#catalogue-message")).to_contain_text("请选择要发布的目录文件")
        expect(file_field).to_have_attribute("aria-invalid", "true")

        # the good file: read in the page, counted before anything is sent
        kind.select_option("drug")
        file_field.set_input_files(good)
        expect(page.locator("#catalogue-read")).to_contain_text("已读取 2 条（CSV），将作为医保药品目录第 2 版发布")
        expect(file_field).not_to_have_attribute("aria-invalid", "true")
        assert publishes == []
        page.screenshot(path=tmp_path / "catalogue-file-chosen.png", full_page=True)
        page.locator("#catalogue-publish").click()
        expect(page.locator("#flash")).to_contain_text(
            "已发布医保药品目录第 2 版（2 条；新增或修改 2 条，删除 1 条），已通知 0 台终端"
        )
        row = page.locator('tr.catalogue-version[data-kind="drug"][data-version="2"]')
        expect(row).to_have_count(1)
        expect(row).to_contain_text("医保药品目录")
        expect(row).to_contain_text("account:reg-cat")
        expect(kind.locator('option[value="drug"]')).to_have_attribute("data-version", "2")
        page.screenshot(path=tmp_path / "catalogue-published.png", full_page=True)
        versions = _drug_versions(engine)
        assert [(v.version, v.entry_count, v.upsert_count, v.deletion_count) for v in versions] == [
            (1, 1, 1, 0),
            (2, 2, 2, 1),
        ]
        expected = [DrugEntry.model_validate(e).model_dump(mode="json") for e in DRUGS_PUBLISHED]
        assert versions[1].snapshot == expected
        assert versions[1].published_by == "account:reg-cat"

        # the same file again: nothing new, said so
        file_field.set_input_files(good)
        expect(page.locator("#catalogue-read")).to_contain_text("已读取 2 条")
        page.locator("#catalogue-publish").click()
        expect(page.locator("#catalogue-message")).to_contain_text("与当前第 2 版完全相同，未发布新版本")
        expect(page.locator("#catalogue-publish")).to_be_enabled()

        # a required column missing: found in the page, nothing sent
        sent = len(publishes)
        file_field.set_input_files(no_column)
        expect(page.locator("#catalogue-read")).to_contain_text("缺少必填列：dispensing")
        expect(file_field).to_have_attribute("aria-invalid", "true")
        page.locator("#catalogue-publish").click()
        expect(page.locator("#catalogue-message")).to_contain_text("缺少必填列：dispensing，未发布")
        expect(page.locator("#catalogue-message")).to_contain_text("Required column(s) missing: dispensing")
        assert len(publishes) == sent

        # an invalid value: the server's 422, said by line and field, without the value
        file_field.set_input_files(bad_value)
        expect(page.locator("#catalogue-read")).to_contain_text("已读取 2 条")
        page.locator("#catalogue-publish").click()
        message = page.locator("#catalogue-message")
        expect(message).to_contain_text("目录未通过校验，未发布（共 1 处）")
        expect(message.locator("li")).to_have_text(["第 3 行（line 3） category：Input should be '甲', '乙' or '丙'"])
        assert "丁" not in message.inner_text()
        expect(file_field).to_have_attribute("aria-invalid", "true")
        page.screenshot(path=tmp_path / "catalogue-refused.png", full_page=True)
        assert len(publishes) == sent + 1
        assert [v.version for v in _drug_versions(engine)] == [1, 2]

        # someone publishes meanwhile: this page's base_version is stale, the server says 409
        _publish_over_the_api(url, [OLD_DRUG, *DRUGS_PUBLISHED], base_version=2)
        file_field.set_input_files(good)
        expect(page.locator("#catalogue-read")).to_contain_text("已读取 2 条")
        page.locator("#catalogue-publish").click()
        expect(message).to_contain_text("已有人发布了新版本，未发布")
        expect(message).to_contain_text("Reload the page")
        expect(message.get_by_role("link", name="刷新页面")).to_be_visible()
        assert [(v.version, v.entry_count) for v in _drug_versions(engine)] == [(1, 1), (2, 2), (3, 3)]

        # a pharmacist may not even read the page
        page.get_by_role("button", name="退出登录").click()
        page.wait_for_url(f"{url}/login?next=%2Fcatalogue")
        sign_in(page, url, "pharm-cat", next_path="/catalogue")
        page.wait_for_url(f"{url}/catalogue")
        expect(page.locator("#forbidden")).to_be_visible()
        expect(page.locator("#catalogue-form")).to_have_count(0)
        page.get_by_role("button", name="退出登录").click()
        page.wait_for_url(f"{url}/login?next=%2Fcatalogue")

        # a device admin publishes catalogues (but not the rules)
        sign_in(page, url, ADMIN, next_path="/catalogue")
        page.wait_for_url(f"{url}/catalogue")
        expect(page.locator("#catalogue-publish")).to_be_enabled()
        expect(page.locator("#catalogue-note")).to_be_hidden()
        expect(page.locator("#rules-publish")).to_be_disabled()
        columns = page.locator("#catalogue-columns")
        columns.get_by_text("各目录的 CSV 列").click()
        expect(columns.locator('tr[data-kind="institution"]')).to_contain_text("address may be empty")
        expect(columns.locator('tr[data-kind="drug"]')).to_contain_text("category (甲 / 乙 / 丙)")
        page.screenshot(path=tmp_path / "catalogue-device-admin.png", full_page=True)
        # a second tab signed in by the page cookie only holds no token: every control is off, sign in is offered
        other = page.context.new_page()
        other.goto(f"{url}/catalogue")
        expect(other.locator("#operator-name")).to_contain_text(ADMIN)
        for control in ("#catalogue-kind", "#catalogue-file", "#catalogue-publish"):
            expect(other.locator(control)).to_be_disabled()
        expect(other.locator("#catalogue-note")).to_contain_text("发布需要监管人员或设备管理员账号")
        other.screenshot(path=tmp_path / "catalogue-no-token.png", full_page=True)
        other.close()
    published = [e for e in audit_events(data_dir) if e["type"] == "catalogue.published"]
    assert [(e["kind"], e["version"], e["admin"]) for e in published] == [
        ("drug", 1, "bootstrap"),
        ("drug", 2, "account:reg-cat"),
        ("drug", 3, "bootstrap"),
    ]
    assert (published[1]["entries"], published[1]["upserts"], published[1]["deletions"]) == (2, 2, 1)
