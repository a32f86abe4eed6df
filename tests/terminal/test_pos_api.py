"""The POS API over real HTTP (uvicorn in a thread on a free port, httpx), with the real HMAC-SM3 signature, the
real SQLite state and outbox, the e-voucher simulator behind the real `EVoucherService`, and a `BuyerVerifier`
built from the simulators (card data from `hardware_sim.idcard_sim`, face results scripted through the seam)."""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from drivers.idcard import IdCardData, IdCardReader
from drivers.serial_link import SerialLink
from hardware_sim import simulated_peripherals
from hardware_sim.evoucher import EVoucherSimulator, Insured, synthetic_insured
from hardware_sim.idcard_sim import IdCardSimulator, synthetic_card
from hardware_sim.pty_device import PtyDevice
from models.face import FaceEngine
from protocol import SystemClock
from protocol.gm.sm3 import sm3_digest
from protocol.request_signing import sign_request
from terminal.config import PosApiConfig
from terminal.devices import KioskDevices
from terminal.errors import OutboxFullError
from terminal.evoucher import EVoucherAccepted, EVoucherService, TerminalContext
from terminal.outbox import Outbox
from terminal.pos_api import (
    AgentCheck,
    BuyerCheck,
    BuyerIdentity,
    BuyerMethod,
    PosApiServer,
    PosSecretError,
    PosState,
    PosVerificationService,
    RuntimeBuyerVerifier,
    Status,
    VerificationRequest,
    attach_pos_api,
    build_pos_server,
    load_pos_clients,
)
from terminal.proxy import ProxyRelationship, SqliteProxyRegistry, person_ref
from terminal.runtime import build_runtime
from tests.terminal.conftest import DEVICE_ID, FakeClock, open_outbox, terminal_config
from tests.terminal.fakes import ScriptedLink
from tests.terminal.test_verification import Rig as FaceRig
from tests.terminal.test_verification import engine, photo

__all__ = ["engine"]  # the module-scoped real face engine fixture, shared with test_verification

CLIENT = "his-01"


@dataclass
class SimVerifier:
    """A `BuyerVerifier` from the simulators: e-voucher codes from the simulated phone through the real service,
    the ID card from the card simulator's synthetic data, the agent's face as whoever the test puts in front."""

    evoucher: EVoucherService
    platform: EVoucherSimulator
    account: str
    card: IdCardData
    agent_in_front: str | None = None
    block: bool = False
    calls: list[str] = field(default_factory=list)

    def verify_buyer(self, method: BuyerMethod, cancel: threading.Event, *, with_face: bool = True) -> BuyerCheck:
        self.calls.append(method.value)
        if self.block:
            cancel.wait(10)
            return BuyerCheck(None, "id_card", "cancelled")
        if method is BuyerMethod.EVOUCHER:
            outcome = self.evoucher.verify(self.platform.issue_code(self.account), source="scanner")
            if not isinstance(outcome, EVoucherAccepted):
                return BuyerCheck(None, "evoucher", f"evoucher_{outcome.reason.value}")
            p = outcome.identity
            return BuyerCheck(BuyerIdentity(p.name, p.id_type.value, p.id_number, p.insured_region), "evoucher")
        identity = BuyerIdentity(self.card.name, "01", self.card.id_number)
        return BuyerCheck(identity, "id_card+face_1to1" if with_face else "id_card")

    def verify_agent_face(self, candidate_refs: Sequence[str], cancel: threading.Event) -> AgentCheck:
        if self.agent_in_front is None or self.agent_in_front not in candidate_refs:
            return AgentCheck(None, "face_1toN", "agent_not_registered")
        return AgentCheck(self.agent_in_front, "face_1toN")


@dataclass
class Rig:
    server: PosApiServer
    config: PosApiConfig
    secret: bytes
    verifier: SimVerifier
    registry: SqliteProxyRegistry
    outbox: Outbox
    person: Insured
    http: httpx.Client

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        secret: bytes | None = None,
        client: str = CLIENT,
        timestamp: int | None = None,
        nonce: str | None = None,
    ) -> httpx.Response:
        raw = b"" if body is None else json.dumps(body).encode()
        ts = str(int(time.time()) if timestamp is None else timestamp)
        nonce = nonce or uuid.uuid4().hex
        headers = {
            "X-POS-Client": client,
            "X-POS-Timestamp": ts,
            "X-POS-Nonce": nonce,
            "X-POS-Signature": sign_request(secret or self.secret, method, path, ts, nonce, raw),
            "Content-Type": "application/json",
        }
        return self.http.request(method, path, content=raw, headers=headers)

    def verify(self, body: dict[str, Any]) -> dict[str, Any]:
        started = self.call("POST", "/pos/v1/verifications", body)
        assert started.status_code == 202, started.text
        vid = started.json()["verification_id"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = self.call("GET", f"/pos/v1/verifications/{vid}")
            assert answer.status_code == 200, answer.text
            if answer.json()["status"] != "pending":
                result: dict[str, Any] = answer.json()
                return result
            time.sleep(0.02)
        raise AssertionError("verification still pending")


def _config(tmp_path: Path, secret: bytes, **extra: Any) -> PosApiConfig:
    secret_file = tmp_path / "his-01.secret"
    secret_file.write_bytes(secret + b"\n")
    secret_file.chmod(0o600)
    return PosApiConfig.model_validate(
        {
            "enabled": True,
            "host": "127.0.0.1",
            "state": tmp_path / "pos_api.sqlite3",
            "clients": [
                {"client_id": CLIENT, "secret_file": secret_file, "secret_sm3": sm3_digest(secret).hex()},
            ],
            **extra,
        }
    )


def _start(config: PosApiConfig, verifier: SimVerifier, registry: SqliteProxyRegistry, outbox: Outbox) -> PosApiServer:
    server = build_pos_server(
        config,
        device_id=DEVICE_ID,
        verifier=verifier,
        registry=registry,
        record=outbox.enqueue,
        clock=SystemClock(),
        port=0,
    )
    server.start()
    return server


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    clock = SystemClock()
    platform = EVoucherSimulator(clock)
    person = synthetic_insured(1, seed=11)[0]
    account = platform.enrol(person)
    outbox = open_outbox(tmp_path / "outbox.sqlite3")
    service = EVoucherService(platform, TerminalContext("H32058300001", DEVICE_ID), outbox.enqueue, clock)
    verifier = SimVerifier(service, platform, account, synthetic_card(3))
    registry = SqliteProxyRegistry(tmp_path / "proxy.sqlite3")
    secret = secrets.token_hex(32).encode()
    config = _config(tmp_path, secret)
    server = _start(config, verifier, registry, outbox)
    http = httpx.Client(base_url=f"http://127.0.0.1:{server.bound_port}", timeout=5.0)
    built = Rig(server, config, secret, verifier, registry, outbox, person, http)
    try:
        yield built
    finally:
        built.http.close()  # the test may have restarted the server with a new client
        built.server.stop()
        registry.close()
        outbox.close()


def _events(outbox: Outbox) -> list[bytes]:
    return [c.wire for c in outbox.claim(1000)]


def test_signed_request_verifies_the_buyer_with_a_transaction_code(rig: Rig) -> None:
    result = rig.verify({"method": "id_card_face"})
    assert result["status"] == "verified"
    assert result["check"] == "id_card+face_1to1"
    identity = result["identity"]
    card = rig.verifier.card
    assert identity["certno"] == card.id_number[:4] + "*" * 10 + card.id_number[-4:]
    assert identity["psn_name"].startswith(card.name[0])
    assert "*" in identity["psn_name"]
    assert identity["psn_cert_type"] == "01"
    code = result["transaction_code"]
    assert code.startswith(DEVICE_ID)
    assert len(code) == len(DEVICE_ID) + 14 + 4
    assert code[len(DEVICE_ID) :].isdigit()


def test_evoucher_buyer_carries_the_insured_region(rig: Rig) -> None:
    result = rig.verify({"method": "evoucher"})
    assert result["status"] == "verified", result
    assert result["identity"]["insuplc_admdvs"] == rig.person.insured_region
    assert result["identity"]["person_ref"] == person_ref("01", rig.person.id_number)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"secret": b"x" * 64}, "bad_signature"),
        ({"timestamp": -120}, "stale_timestamp"),
        ({"timestamp": +120}, "stale_timestamp"),
        ({"client": "his-99"}, "unknown_client"),
    ],
)
def test_bad_requests_get_401(rig: Rig, change: dict[str, Any], code: str) -> None:
    if "timestamp" in change:  # seconds from now, taken when the test runs (not when it is collected)
        change = {"timestamp": int(time.time()) + change["timestamp"]}
    answer = rig.call("POST", "/pos/v1/verifications", {"method": "id_card_face"}, **change)
    assert answer.status_code == 401
    assert answer.json()["detail"]["code"] == code
    assert rig.verifier.calls == []


def test_missing_headers_and_tampered_body_get_401(rig: Rig) -> None:
    bare = rig.http.post("/pos/v1/verifications", json={"method": "id_card_face"})
    assert bare.status_code == 401
    assert bare.json()["detail"]["code"] == "missing_header"
    ts, nonce = str(int(time.time())), uuid.uuid4().hex
    signed_for = json.dumps({"method": "evoucher"}).encode()
    headers = {
        "X-POS-Client": CLIENT,
        "X-POS-Timestamp": ts,
        "X-POS-Nonce": nonce,
        "X-POS-Signature": sign_request(rig.secret, "POST", "/pos/v1/verifications", ts, nonce, signed_for),
    }
    sent = json.dumps({"method": "id_card_face"}).encode()
    answer = rig.http.post("/pos/v1/verifications", content=sent, headers=headers)
    assert answer.status_code == 401
    assert answer.json()["detail"]["code"] == "bad_signature"


def test_replayed_nonce_is_refused_even_after_a_restart(rig: Rig) -> None:
    nonce = uuid.uuid4().hex
    ts = int(time.time())
    first = rig.call("POST", "/pos/v1/verifications", {"method": "id_card_face"}, nonce=nonce, timestamp=ts)
    assert first.status_code == 202
    again = rig.call("POST", "/pos/v1/verifications", {"method": "id_card_face"}, nonce=nonce, timestamp=ts)
    assert again.status_code == 401
    assert again.json()["detail"]["code"] == "replayed_nonce"
    rig.server.stop()
    rig.http.close()
    rig.server = _start(rig.config, rig.verifier, rig.registry, rig.outbox)
    rig.http = httpx.Client(base_url=f"http://127.0.0.1:{rig.server.bound_port}", timeout=5.0)
    after = rig.call("GET", "/pos/v1/verifications/x", nonce=nonce, timestamp=ts)
    assert after.status_code == 401
    assert after.json()["detail"]["code"] == "replayed_nonce"


def test_proxy_with_a_registered_relationship_is_verified(rig: Rig) -> None:
    agent = synthetic_insured(2, seed=12)[1]
    agent_ref = person_ref("01", agent.id_number)
    beneficiary_ref = person_ref("01", rig.person.id_number)
    rig.registry.register(ProxyRelationship(beneficiary_ref, agent_ref, relationship_id="REL-1"))
    rig.verifier.agent_in_front = agent_ref
    result = rig.verify({"method": "evoucher", "proxy": {"agent": {"method": "face_live"}}})
    assert result["status"] == "verified", result
    assert result["proxy"] is True
    assert result["identity"]["person_ref"] == beneficiary_ref
    assert result["agent"] == {
        "method": "face_live",
        "check": "face_1toN",
        "person_ref": agent_ref,
        "psn_name": None,
        "psn_cert_type": None,
        "certno": None,
    }
    assert result["relationship_id"] == "REL-1"
    assert result["transaction_code"]


def test_proxy_without_a_relationship_is_refused_with_a_reason(rig: Rig) -> None:
    rig.verifier.agent_in_front = person_ref("01", synthetic_insured(2, seed=12)[1].id_number)
    result = rig.verify({"method": "evoucher", "proxy": {"agent": {"method": "face_live"}}})
    assert result["status"] == "refused"
    assert result["reason"] == "no_proxy_relationship"
    assert result["transaction_code"] is None
    # A relationship with someone else: the face in front is not that agent.
    other = person_ref("01", synthetic_insured(3, seed=13)[2].id_number)
    rig.registry.register(ProxyRelationship(person_ref("01", rig.person.id_number), other))
    result = rig.verify({"method": "evoucher", "proxy": {"agent": {"method": "face_live"}}})
    assert result["status"] == "refused"
    assert result["reason"] == "agent_not_registered"


def test_manual_agent_is_validated_and_masked(rig: Rig) -> None:
    agent = synthetic_insured(4, seed=14)[3]
    bad = agent.id_number[:17] + ("0" if agent.id_number[17] != "0" else "1")
    manual = {"method": "manual", "psn_name": agent.name, "certno": bad}
    body = {"method": "evoucher", "proxy": {"agent": manual}}
    refused = rig.call("POST", "/pos/v1/verifications", body)
    assert refused.status_code == 422
    assert "check digit" in refused.text
    assert bad not in refused.text
    assert agent.name not in refused.text
    assert rig.verifier.calls == []
    manual["certno"] = agent.id_number
    result = rig.verify(body)
    assert result["status"] == "verified", result
    assert result["agent"]["method"] == "manual"
    assert result["agent"]["certno"] == agent.id_number[:4] + "*" * 10 + agent.id_number[-4:]
    assert agent.name not in json.dumps(result)


def test_busy_and_cancel(rig: Rig) -> None:
    rig.verifier.block = True
    started = rig.call("POST", "/pos/v1/verifications", {"method": "id_card_face"})
    assert started.status_code == 202
    vid = started.json()["verification_id"]
    busy = rig.call("POST", "/pos/v1/verifications", {"method": "evoucher"})
    assert busy.status_code == 409
    assert busy.json()["detail"]["code"] == "kiosk_busy"
    cancelled = rig.call("POST", f"/pos/v1/verifications/{vid}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert rig.call("GET", "/pos/v1/verifications/nope").status_code == 404
    rig.verifier.block = False
    assert rig.verify({"method": "id_card_face"})["status"] == "verified"


def test_transaction_codes_are_unique_and_survive_a_restart(tmp_path: Path) -> None:
    clock = SystemClock()
    now = clock.now()
    state = PosState(tmp_path / "state.sqlite3", DEVICE_ID)
    first = [state.next_transaction_code(now) for _ in range(50)]
    state.close()
    state = PosState(tmp_path / "state.sqlite3", DEVICE_ID)
    second = [state.next_transaction_code(now) for _ in range(50)]
    state.close()
    assert len(set(first + second)) == 100
    assert first[-1][-4:] == "0050"
    assert second[0][-4:] == "0051"


def test_outbox_events_and_logs_hold_no_name_or_id_number(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    agent = synthetic_insured(4, seed=14)[3]
    rig.verify({"method": "id_card_face"})
    rig.verify({"method": "evoucher"})
    manual = {"method": "manual", "psn_name": agent.name, "certno": agent.id_number}
    rig.verify({"method": "evoucher", "proxy": {"agent": manual}})
    wires = _events(rig.outbox)
    pos_events = [json.loads(w) for w in wires if b"pos.verify" in w]
    assert len(pos_events) == 3
    text = b"\n".join(wires).decode()
    for secret in (rig.verifier.card.name, rig.verifier.card.id_number, rig.person.name, rig.person.id_number):
        assert secret not in text
        assert json.dumps(secret)[1:-1] not in text  # nor as a JSON \\u escape
    assert agent.name not in text
    assert agent.id_number not in text
    assert "POS verification" in caplog.text
    for secret in (rig.verifier.card.name, rig.verifier.card.id_number, agent.name, agent.id_number):
        assert secret not in caplog.text


def test_secret_file_must_be_private_and_match(tmp_path: Path) -> None:
    secret = secrets.token_hex(32).encode()
    config = _config(tmp_path, secret)
    assert load_pos_clients(config)[0].client_id == CLIENT
    config.clients[0].secret_file.chmod(0o644)
    with pytest.raises(PosSecretError, match="readable by others"):
        load_pos_clients(config)
    config.clients[0].secret_file.chmod(0o600)
    config.clients[0].secret_file.write_bytes(b"y" * 64)
    with pytest.raises(PosSecretError, match="does not match"):
        load_pos_clients(config)


def test_openapi_documents_the_endpoints(rig: Rig) -> None:
    schema = rig.server.app.openapi()
    assert {"/pos/v1/verifications", "/pos/v1/verifications/{verification_id}"} <= set(schema["paths"])
    assert "/pos/v1/verifications/{verification_id}/cancel" in schema["paths"]
    examples = schema["components"]["schemas"]["VerificationRequest"]["examples"]
    assert any("proxy" in e for e in examples)


def test_documented_signature_example() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "pos-api.md").read_text(encoding="utf-8")
    snippet = doc.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "docs/pos-api.md", "exec"), namespace)  # noqa: S102 - our own documentation's example
    body = b'{"method":"id_card_face"}'
    ours = sign_request(
        b"demo-secret-0123456789abcdefghijklmnop",
        "POST",
        "/pos/v1/verifications",
        "1767605400",
        "3f9c1e0a7b2d4c6e8f10a2b4c6d8e0f1",
        body,
    )
    assert ours == namespace["headers"]["X-POS-Signature"]
    assert ours in doc
    assert sm3_digest(b"demo-secret-0123456789abcdefghijklmnop").hex() in doc


# ---------------------------------------------------------------------------------------------------- runtime


def test_the_runtime_starts_and_stops_the_server(tmp_path: Path) -> None:
    clock = FakeClock()
    runtime = build_runtime(
        terminal_config(tmp_path), simulated_peripherals(), clock, link=ScriptedLink(clock, connected=False)
    )
    secret = secrets.token_hex(32).encode()
    platform = EVoucherSimulator(SystemClock())
    verifier = SimVerifier(
        EVoucherService(platform, TerminalContext("H1", DEVICE_ID), runtime.outbox.enqueue),
        platform,
        platform.enrol(synthetic_insured(1)[0]),
        synthetic_card(1),
    )
    runtime.pos_api = build_pos_server(
        _config(tmp_path, secret),
        device_id=runtime.config.device_id,
        verifier=verifier,
        registry=SqliteProxyRegistry(),
        record=lambda e: runtime.record_audits([e]),
        clock=SystemClock(),
        port=0,
    )
    runtime.start()
    try:
        port = runtime.pos_api.bound_port
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as http:
            assert http.get("/pos/v1/verifications/x").status_code == 401
    finally:
        runtime.stop()
    with pytest.raises(httpx.ConnectError), httpx.Client(timeout=2.0) as http:
        http.get(f"http://127.0.0.1:{port}/pos/v1/verifications/x")


# ---------------------------------------------------------------------------------------------------- the real verifier


def test_runtime_verifier_reads_the_id_card_and_matches_the_enrolled_face(engine: FaceEngine, tmp_path: Path) -> None:
    card = synthetic_card(5)
    sim = IdCardSimulator(card)
    shown: list[str] = []
    with PtyDevice(sim, link_path=tmp_path / "ttyUSB-idcard", name="idcard-sim") as device:
        reader = IdCardReader(SerialLink(device.path), command_timeout_s=0.3, poll_interval_s=0.02)
        devices = KioskDevices(id_card_reader=reader, ss_card_reader=None, qr_scanner=None, camera=None)
        try:
            holder = person_ref("01", card.id_number)
            assert FaceRig(engine, tmp_path, photo("obama_a")).verifier.enrol(holder).accepted
            same = FaceRig(engine, tmp_path, photo("obama_b"))
            verifier = RuntimeBuyerVerifier(devices, None, same.verifier, show=lambda zh, en: shown.append(en))
            check = verifier.verify_buyer(BuyerMethod.ID_CARD_FACE, threading.Event())
            assert check.verified, check
            assert check.check == "id_card+face_1to1"
            assert check.identity is not None
            assert check.identity.certno == card.id_number
            other = FaceRig(engine, tmp_path, photo("biden_b"))
            refused = RuntimeBuyerVerifier(devices, None, other.verifier).verify_buyer(
                BuyerMethod.ID_CARD_FACE, threading.Event()
            )
            assert (refused.verified, refused.reason) == (False, "face_no_match")
            # A holder without an enrolled template: only liveness, and the check says so.
            sim.place(synthetic_card(6))
            live = FaceRig(engine, tmp_path, photo("biden_b"))
            weaker = RuntimeBuyerVerifier(devices, None, live.verifier).verify_buyer(
                BuyerMethod.ID_CARD_FACE, threading.Event()
            )
            assert weaker.verified, weaker
            assert weaker.check == "id_card+liveness_only"
            assert live.events[-1].action == "face_liveness"
        finally:
            reader.close()
    assert "Please place your ID card on the reader" in shown


def test_runtime_verifier_agent_face_must_be_a_registered_agent(engine: FaceEngine, tmp_path: Path) -> None:
    assert FaceRig(engine, tmp_path, photo("obama_a")).verifier.enrol("agent-a").accepted
    assert FaceRig(engine, tmp_path, photo("rose_a")).verifier.enrol("agent-b").accepted
    front = FaceRig(engine, tmp_path, photo("rose_b"))
    verifier = RuntimeBuyerVerifier(None, None, front.verifier)
    assert verifier.verify_agent_face(["agent-b"], threading.Event()).agent_ref == "agent-b"
    front = FaceRig(engine, tmp_path, photo("rose_b"))
    refused = RuntimeBuyerVerifier(None, None, front.verifier).verify_agent_face(["agent-a"], threading.Event())
    assert (refused.agent_ref, refused.reason) == (None, "agent_not_registered")
    nobody = RuntimeBuyerVerifier(None, None, front.verifier).verify_agent_face(["agent-x"], threading.Event())
    assert nobody.reason == "agent_not_enrolled"


def test_runtime_verifier_without_devices_refuses_cleanly() -> None:
    verifier = RuntimeBuyerVerifier(None, None, None)
    assert verifier.verify_buyer(BuyerMethod.EVOUCHER, threading.Event()).reason == "evoucher_unavailable"
    assert verifier.verify_buyer(BuyerMethod.SS_CARD_FACE, threading.Event()).reason == "device_unavailable"
    assert verifier.verify_agent_face(["x"], threading.Event()).reason == "face_unavailable"


def test_a_verified_outcome_the_outbox_refuses_is_not_given_to_the_pos(tmp_path: Path) -> None:
    def refuse(_event: object) -> None:
        raise OutboxFullError("outbox full")

    platform = EVoucherSimulator(SystemClock())
    account = platform.enrol(synthetic_insured(1)[0])
    events: list[object] = []
    evoucher = EVoucherService(platform, TerminalContext("H1", DEVICE_ID), events.append)
    verifier = SimVerifier(evoucher, platform, account, synthetic_card(2))
    state = PosState(tmp_path / "state.sqlite3", DEVICE_ID)
    service = PosVerificationService(verifier, SqliteProxyRegistry(), state, refuse, SystemClock())
    try:
        item = service.start(CLIENT, VerificationRequest.model_validate({"method": "id_card_face"}))
        deadline = time.monotonic() + 5
        while service.get(CLIENT, item.id).status is Status.PENDING and time.monotonic() < deadline:
            time.sleep(0.01)
        view = service.get(CLIENT, item.id)
        assert (view.status, view.reason, view.transaction_code) == (Status.REFUSED, "not_recorded", None)
    finally:
        service.close()
        state.close()


def test_proxy_needs_the_beneficiarys_evoucher(rig: Rig) -> None:
    answer = rig.call(
        "POST", "/pos/v1/verifications", {"method": "id_card_face", "proxy": {"agent": {"method": "face_live"}}}
    )
    assert answer.status_code == 422
    assert "beneficiary" in answer.text
    unknown = rig.call("POST", "/pos/v1/verifications", {"method": "fingerprint"})
    assert unknown.status_code == 422


def test_attach_pos_api_follows_the_enabled_flag(tmp_path: Path) -> None:
    clock = FakeClock()
    plain = build_runtime(terminal_config(tmp_path / "a"), simulated_peripherals(), clock, link=ScriptedLink(clock))
    try:
        assert attach_pos_api(plain) is None
        assert plain.pos_api is None
    finally:
        plain.stop()
    config = terminal_config(tmp_path / "b")
    pos = _config(tmp_path, secrets.token_hex(32).encode()).model_copy(update={"port": _free_port()})
    runtime = build_runtime(
        config.model_copy(update={"pos_api": pos}), simulated_peripherals(), clock, link=ScriptedLink(clock)
    )
    server = attach_pos_api(runtime)
    assert server is not None
    assert runtime.pos_api is server
    runtime.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.bound_port}", timeout=5.0) as http:
            answer = http.post("/pos/v1/verifications", json={"method": "id_card_face"})
            assert answer.status_code == 401
    finally:
        runtime.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
