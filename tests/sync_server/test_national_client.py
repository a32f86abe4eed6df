"""The server's `HttpNationalPlatform` against the national-platform simulator over real HTTP (uvicorn on a loopback
socket): typed results by each 就诊凭证, sign-in handling, every refusal as its typed error, signatures and SM4 both
ways, and the network's failures as `UnreachableError`."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from hardware_sim.national_platform import (
    INSUTYPE_EMPLOYEE,
    NationalPlatformSimulator,
    create_app,
)
from protocol.gm import sm4
from protocol.gm.sm2 import SM2PrivateKey
from sync_server.national import (
    CHINA_TZ,
    REASON_ERRORS,
    BadSignatureError,
    CertType,
    CredentialRejectedError,
    GatewayRejectedError,
    HttpNationalPlatform,
    MessageRejectedError,
    MsgidSequence,
    NationalPlatform,
    NationalPlatformSettings,
    PersonNotFoundError,
    ProtocolViolationError,
    RefusedError,
    SignatureRejectedError,
    SignInRequiredError,
    UnreachableError,
    refusal,
)
from tests.hardware_sim.test_evoucher import StepClock
from tests.http_serving import serving_url

CODE = "P32058300001"
SECRET = "paas-secret-token-0123456789"


class Rig:
    """One simulator served over HTTP, one registered pharmacy, and a factory for clients."""

    def __init__(self, url: str, sim: NationalPlatformSimulator, app: FastAPI, clock: StepClock) -> None:
        self.url, self.sim, self.app, self.clock = url, sim, app, clock
        self.key = SM2PrivateKey.generate()
        self.sm4_key = sm4.generate_key()
        sim.register_institution(
            CODE, "康民大药房", self.key.public_key, paasid="paas-kangmin", paas_secret=SECRET, sm4_key=self.sm4_key
        )

    def settings(self, **overrides: Any) -> NationalPlatformSettings:
        values: dict[str, Any] = {
            "base_url": self.url,
            "paasid": "paas-kangmin",
            "paas_secret": SECRET,
            "fixmedins_code": CODE,
            "fixmedins_name": "康民大药房",
            "mdtrtarea_admvs": "320583",
            "opter": "op01",
            "opter_name": "自助终端",
            "opter_type": "2",
            "timeout_s": 5.0,
            "platform_public_key_hex": self.sim.public_key.hex(),
        }
        values.update(overrides)
        return NationalPlatformSettings.model_validate(values)

    def client(
        self, *, key: SM2PrivateKey | None = None, auto_sign_in: bool = True, **overrides: Any
    ) -> HttpNationalPlatform:
        # The test clock stands still, so each new client (its sequence starts at 0001) gets its own second.
        self.clock.advance(1)
        return HttpNationalPlatform(
            self.settings(**overrides), key or self.key, clock=self.clock, auto_sign_in=auto_sign_in
        )


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, NationalPlatformSimulator, FastAPI, StepClock]]:
    clock = StepClock()
    sim = NationalPlatformSimulator(clock, people=30)
    app = create_app(sim)
    with serving_url(app) as url:
        yield url, sim, app, clock


@pytest.fixture
def rig(served: tuple[str, NationalPlatformSimulator, FastAPI, StepClock]) -> Rig:
    url, sim, app, clock = served
    app.state.delay_s = 0.0
    sim.reachable = True
    clock.advance(3600)  # each test in its own hour: msgids of earlier tests never collide
    return Rig(url, sim, app, clock)


def test_sign_in_then_person_info_by_each_certificate(rig: Rig) -> None:
    person = next(p for p in rig.sim.people if p.enrolment.insutype == INSUTYPE_EMPLOYEE)
    with rig.client(encrypt_output=False) as client:
        platform: NationalPlatform = client
        signed = platform.sign_in()
        assert len(signed.sign_no) == 30
        assert client.sign_no == signed.sign_no
        by_token = platform.person_info(CertType.EC_TOKEN, rig.sim.issue_ec_token(person.psn_no))
        by_id = platform.person_info(CertType.ID_CARD, person.certno)
        by_card = platform.person_info(CertType.SS_CARD, person.card_no, card_sn=person.card_sn)
    assert by_token == by_id == by_card
    base, insu = by_id.baseinfo, by_id.insuinfo[0]
    assert (base.psn_no, base.certno, base.psn_name, base.brdy) == (
        person.psn_no,
        person.certno,
        person.psn_name,
        person.brdy,
    )
    assert base.age == person.age_on(rig.clock.now().astimezone(CHINA_TZ).date())
    assert (insu.insutype, insu.balc, insu.insuplc_admdvs) == (INSUTYPE_EMPLOYEE, person.balance, person.certno[:6])


def test_queries_with_encrypted_signed_outputs(rig: Rig) -> None:
    person = next(p for p in rig.sim.people if p.enrolment.insutype == INSUTYPE_EMPLOYEE and p.settlements)
    today = rig.clock.now().astimezone(CHINA_TZ).date()
    begin = today - timedelta(days=366)
    with rig.client(encrypt_output=True, sm4_key_hex=rig.sm4_key.hex()) as client:
        # No explicit sign-in: the client signs in before its first business call.
        info = client.person_info(CertType.ID_CARD, person.certno)
        settlements = client.settlements(info.baseinfo.psn_no, begin, today)
        credits = client.account_credits(info.baseinfo.psn_no, begin, today)
        contributions = client.contributions(info.baseinfo.psn_no, begin, today)
        pharmacies = client.institutions("2")
        everything = client.institutions()
    assert [s.setl_id for s in settlements] == [s.setl_id for s in person.settlements]
    assert all(s.medfee_sumamt == s.fund_pay_sumamt + s.acct_pay + s.psn_cash_pay for s in settlements)
    assert sum((c.crdt_amt for c in credits), Decimal(0)) == sum((c.crdt_amt for c in person.credits), Decimal(0))
    assert len(contributions) == len(person.contributions)
    assert {i.fixmedins_type for i in pharmacies} == {"2"}
    assert len(everything) == len(rig.sim.institutions) > len(pharmacies)
    assert rig.sim.stats.calls["9001"] >= 1


def test_sign_in_order_and_lapsed_sign_in(rig: Rig) -> None:
    person = rig.sim.people[0]
    with rig.client(auto_sign_in=False) as manual:
        with pytest.raises(SignInRequiredError) as refused:
            manual.person_info(CertType.ID_CARD, person.certno)
        assert (refused.value.infcode, refused.value.reason) == (-1, "SIGN_IN_REQUIRED")
        manual.sign_in()
        assert manual.person_info(CertType.ID_CARD, person.certno).baseinfo.psn_no == person.psn_no
        rig.sim.expire_sign_ins()
        with pytest.raises(SignInRequiredError):
            manual.person_info(CertType.ID_CARD, person.certno)
    with rig.client() as auto:
        auto.sign_in()
        first = auto.sign_no
        rig.sim.expire_sign_ins()
        # The platform forgot the sign-in: the client signs in once more and the query goes through.
        assert auto.person_info(CertType.ID_CARD, person.certno).baseinfo.psn_no == person.psn_no
        assert auto.sign_no != first
        auto.sign_out()
        assert auto.sign_no == ""


def test_replayed_msgid_is_a_message_rejection(rig: Rig) -> None:
    # Two processes calling for one institution with the same sequence in the same second collide (the clock
    # stands still here); the platform refuses the second, and distinct worker indexes avoid it.
    with rig.client() as one, rig.client() as two:
        one.sign_in()
        with pytest.raises(MessageRejectedError) as refused:
            two.sign_in()
        assert refused.value.reason == "MSGID_REPLAYED"
    with rig.client(msgid_worker=0, msgid_workers=2) as one, rig.client(msgid_worker=1, msgid_workers=2) as two:
        for _ in range(3):
            one.sign_in()
            two.sign_in()


def test_forged_signature_refused(rig: Rig) -> None:
    with rig.client(key=SM2PrivateKey.generate()) as impostor, pytest.raises(SignatureRejectedError):
        impostor.sign_in()
    with rig.client(paas_secret="wrong-secret-wrong-secret") as client, pytest.raises(GatewayRejectedError) as gate:
        client.sign_in()
    assert "[GATEWAY]" in gate.value.err_msg
    with rig.client(fixmedins_code="P99999999999") as stranger, pytest.raises(MessageRejectedError):
        stranger.sign_in()


def test_credentials_refused(rig: Rig) -> None:
    person = rig.sim.people[2]
    with rig.client() as client:
        token = rig.sim.issue_ec_token(person.psn_no)
        with pytest.raises(CredentialRejectedError):
            client.person_info(CertType.EC_TOKEN, "0" * 40)
        rig.clock.advance(301)
        with pytest.raises(CredentialRejectedError) as expired:
            client.person_info(CertType.EC_TOKEN, token)
        assert expired.value.reason == "EC_TOKEN_INVALID"
        with pytest.raises(CredentialRejectedError):
            client.person_info(CertType.SS_CARD, person.card_no, card_sn="F" * 32)
        with pytest.raises(PersonNotFoundError):
            client.person_info(CertType.ID_CARD, "11010519491231002X")
        with pytest.raises(PersonNotFoundError):
            client.settlements("nobody", rig.clock.now().date() - timedelta(days=30), rig.clock.now().date())


def test_answers_that_are_not_authentic(rig: Rig) -> None:
    person = rig.sim.people[0]
    other_platform = SM2PrivateKey.generate().public_key.hex()
    with rig.client(platform_public_key_hex=other_platform) as client, pytest.raises(BadSignatureError):
        client.sign_in()
    with (
        rig.client(encrypt_output=True, sm4_key_hex=sm4.generate_key().hex()) as client,
        pytest.raises(BadSignatureError),
    ):
        client.person_info(CertType.ID_CARD, person.certno)
    # Without the platform's key configured the client does not check, and still decrypts with the right key.
    with rig.client(platform_public_key_hex=None, encrypt_output=True, sm4_key_hex=rig.sm4_key.hex()) as client:
        assert client.person_info(CertType.ID_CARD, person.certno).baseinfo.certno == person.certno


@pytest.mark.parametrize("reason", [*sorted(REASON_ERRORS), "SOMETHING_NEW", ""])
def test_every_refusal_reason_maps_to_a_typed_error(reason: str) -> None:
    err_msg = f"[{reason}] 文本" if reason else "交易失败"
    error = refusal(-1, err_msg)
    assert isinstance(error, RefusedError)
    assert type(error) is REASON_ERRORS.get(reason, RefusedError)
    assert (error.infcode, error.err_msg) == (-1, err_msg)


def test_timeouts_outages_and_dead_servers_are_unreachable(rig: Rig) -> None:
    with rig.client(timeout_s=0.3) as client:
        client.sign_in()
        rig.app.state.delay_s = 1.0
        started = time.monotonic()
        with pytest.raises(UnreachableError):
            client.institutions()
        assert time.monotonic() - started < 0.9
        rig.app.state.delay_s = 0.0
        rig.sim.reachable = False
        with pytest.raises(UnreachableError):
            client.institutions()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with rig.client(base_url=dead, timeout_s=0.5) as client, pytest.raises(UnreachableError):
        client.sign_in()


def test_malformed_answers_are_protocol_violations(rig: Rig) -> None:
    def not_json(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"<html>gateway</html>")

    def no_refmsgid(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"infcode": 0, "output": {}})

    def teapot(request: httpx.Request) -> httpx.Response:
        return httpx.Response(418, content=b"")

    for handler in (not_json, no_refmsgid, teapot):
        transport = httpx.Client(base_url="http://platform.invalid", transport=httpx.MockTransport(handler))
        settings = rig.settings(platform_public_key_hex=None)
        with (
            HttpNationalPlatform(settings, rig.key, clock=rig.clock, client=transport) as client,
            pytest.raises(ProtocolViolationError),
        ):
            client.sign_in()


def test_msgid_format_and_per_day_sequence() -> None:
    clock = StepClock()  # 2026-12-01 09:00 UTC = 17:00 Beijing
    ids = MsgidSequence(CODE, clock)
    first, second = ids.next(), ids.next()
    assert first == f"{CODE}20261201170000" + "0001"
    assert second.endswith("0002")
    assert len(first) == 30
    clock.advance(7 * 3600)  # past Beijing midnight: the sequence starts again
    assert ids.next() == f"{CODE}20261202000000" + "0001"
    workers = [MsgidSequence(CODE, clock, worker=k, workers=3) for k in range(3)]
    seen = {w.next()[-4:] for w in workers for _ in range(100)}
    assert len(seen) == 300


def test_msgids_stay_unique_across_threads() -> None:
    ids = MsgidSequence(CODE, StepClock())
    out: list[str] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [ids.next() for _ in range(500)]
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == len(out) == 4000


def test_settings_fail_closed(rig: Rig) -> None:
    with pytest.raises(ValueError, match="msgid_worker"):
        rig.settings(msgid_worker=2, msgid_workers=2)
    with pytest.raises(ValueError, match="sm4_key_hex"):
        rig.settings(encrypt_output=True)
    with pytest.raises(ValueError, match="32 hex"):
        rig.settings(sm4_key_hex="abcd")
    with pytest.raises(ValueError, match="SM2 public key"):
        rig.settings(platform_public_key_hex="04" + "00" * 64)
    with pytest.raises(ValueError, match="extra"):
        rig.settings(unknown_knob=1)
    assert "paas-secret" not in repr(rig.settings())


def test_a_gateway_page_is_a_gateway_rejection(rig: Rig) -> None:
    def html_401(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, content=b"<html>401 Unauthorized</html>")

    transport = httpx.Client(base_url="http://platform.invalid", transport=httpx.MockTransport(html_401))
    settings = rig.settings(platform_public_key_hex=None)
    with (
        HttpNationalPlatform(settings, rig.key, clock=rig.clock, client=transport) as client,
        pytest.raises(GatewayRejectedError) as refused,
    ):
        client.sign_in()
    assert refused.value.reason == "GATEWAY"
    assert "401" in refused.value.err_msg
