"""Session keys on the device: handshake against the real server-side protocol code, persistence across restart,
rotation (time, command, silence), and sealing/opening of frames in the sync loop."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from hardware_sim import simulated_peripherals
from protocol import AuditEvent, AuditOutcome, CommandKind, DeviceCommand, Topics, decode_envelope
from protocol.downlink import UplinkAck
from protocol.evidence import verify_device_record
from protocol.gm.audit_chain import load_chain_key, verify_chain
from protocol.gm.errors import DecryptionFailedError
from protocol.payloads import SignedRecord, SignedRecordKind
from protocol.secure import Direction, open_frame, parse_frame, seal_frame
from terminal.commands import CommandApplier, TerminalFacts, default_handlers
from terminal.errors import TerminalError
from terminal.identity import IdentityStore, SecurityLog
from terminal.outbox import Outbox, OutboxStatus
from terminal.runtime import build_runtime
from terminal.session import SessionManager, SessionOpener, SessionSealer, TerminalSecurity, enrol_device
from terminal.sync import DownlinkReceiver, UplinkDelivery
from tests.terminal.conftest import FakeClock, outbox_config, terminal_config
from tests.terminal.fakes import TOPIC, ScriptedLink
from tests.terminal.identity_server import PlayedServer

PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> PlayedServer:
    return PlayedServer(clock)


@pytest.fixture
def store(tmp_path: Path, server: PlayedServer) -> IdentityStore:
    store = IdentityStore(tmp_path / "identity", PASSPHRASE, iterations=1000)
    enrol_device(store, server.register("SIM-0001"), server, hardware_id="board-1", now=server.now())
    return store


def manager(
    store: IdentityStore, server: PlayedServer, clock: FakeClock, log: SecurityLog | None = None
) -> SessionManager:
    return SessionManager(store.load(), store, server, clock, log=log)


def test_handshake_agrees_the_servers_key_and_survives_restart(
    store: IdentityStore, server: PlayedServer, clock: FakeClock
) -> None:
    first = manager(store, server, clock)
    assert first.current() is None
    assert first.due() == "no session key"
    assert first.maintain()
    key = first.current()
    assert key is not None
    assert server.granted[key.key_id].key == key.key
    second = manager(store, server, clock)  # a restart: the sealed key is read back
    assert second.current() == key
    assert second.due() is None
    assert second.maintain()
    assert server.handshakes == 1


def test_rotation_after_rotate_after_s_and_on_request(
    store: IdentityStore, server: PlayedServer, clock: FakeClock
) -> None:
    sessions = manager(store, server, clock)
    sessions.maintain()
    first = sessions.current()
    clock.advance(server.rotate_after_s - 1)
    sessions.maintain()
    assert sessions.current() == first
    clock.advance(2)
    sessions.maintain()
    second = sessions.current()
    assert second is not None
    assert first is not None
    assert second.key_id != first.key_id
    assert sessions.key_for(first.key_id) == first  # the previous key still opens late downlink frames
    sessions.request_rotation("rotate_keys command")
    sessions.maintain()
    third = sessions.current()
    assert third is not None
    assert third.key_id != second.key_id
    assert server.handshakes == 3


def test_silence_from_the_server_rotates_at_most_once_per_window(
    store: IdentityStore, server: PlayedServer, clock: FakeClock
) -> None:
    sessions = manager(store, server, clock)
    sessions.maintain()
    sessions.unacknowledged(5)
    sessions.maintain()
    sessions.unacknowledged(5)
    sessions.maintain()
    assert server.handshakes == 2
    clock.advance(301)
    sessions.unacknowledged(5)
    sessions.maintain()
    assert server.handshakes == 3


def test_refused_handshake_backs_off_and_keeps_no_key(
    store: IdentityStore, server: PlayedServer, clock: FakeClock
) -> None:
    server.refuse_sessions = True
    sessions = manager(store, server, clock)
    assert not sessions.maintain()
    assert not sessions.maintain()  # within the back-off: no second attempt
    assert sessions.stats().failures == 1
    clock.advance(1.1)
    assert not sessions.maintain()
    assert sessions.stats().failures == 2
    server.refuse_sessions = False
    clock.advance(2.1)
    assert sessions.maintain()


@pytest.fixture
def outbox(tmp_path: Path, clock: FakeClock) -> Iterator[Outbox]:
    box = Outbox.open(
        outbox_config(tmp_path / "outbox.sqlite3"), device_id="SIM-0001", boot_id=uuid.uuid4(), clock=clock
    )
    yield box
    box.close()


def test_delivery_seals_each_record_and_the_server_key_opens_it(
    store: IdentityStore, server: PlayedServer, clock: FakeClock, outbox: Outbox
) -> None:
    sessions = manager(store, server, clock)
    link = ScriptedLink(clock)
    delivery = UplinkDelivery(
        outbox,
        link,
        topic=TOPIC,
        batch_size=10,
        publish_timeout_s=5,
        clock=clock,
        sealer=SessionSealer(sessions, clock=clock),
    )
    outbox.enqueue(AuditEvent(category="system", action="a", outcome=AuditOutcome.INFO))
    assert delivery.deliver_batch() == 0
    assert link.published == []  # no key yet: nothing goes out in plaintext, the record waits
    assert {row.status for row in outbox.rows()} == {OutboxStatus.PENDING}
    sessions.maintain()
    outbox.enqueue(AuditEvent(category="system", action="b", outcome=AuditOutcome.INFO))
    while delivery.deliver_batch():
        pass
    assert len(link.published) == 2
    for frame in link.published:
        header = parse_frame(frame)
        server_key = server.granted[header.key_id]
        envelope = decode_envelope(open_frame(server_key.key, "SIM-0001", frame))
        assert header.counter == envelope.seq
        assert header.direction is Direction.UPLINK
        with pytest.raises(DecryptionFailedError):  # moved to another device's topic: refused
            open_frame(server_key.key, "SIM-0002", frame)
    assert {row.status for row in outbox.rows()} == {OutboxStatus.SENT}


def test_downlink_opens_sealed_frames_and_refuses_plaintext_stale_and_reflected(
    store: IdentityStore, server: PlayedServer, clock: FakeClock, outbox: Outbox
) -> None:
    sessions = manager(store, server, clock)
    sessions.maintain()
    log = SecurityLog.open(store.directory / "log", clock)
    facts = TerminalFacts(software_version="1", config_version="1")
    applier = CommandApplier(
        outbox,
        device_id="SIM-0001",
        clock=clock,
        handlers=default_handlers(outbox, facts, clock, request_rotation=sessions.request_rotation),
    )
    topics = Topics()
    receiver = DownlinkReceiver(
        outbox,
        device_id="SIM-0001",
        topics=topics,
        commands=applier,
        opener=SessionOpener(sessions, clock=clock, log=log),
    )
    key = sessions.current()
    assert key is not None
    server_key = server.granted[key.key_id]
    command = DeviceCommand(
        command_id=uuid.uuid4(),
        device_id="SIM-0001",
        kind=CommandKind.ROTATE_KEYS,
        issued_at=clock.now(),
        expires_at=clock.now() + timedelta(hours=1),
    )
    plain = command.to_bytes()
    topic = topics.downlink("SIM-0001")
    receiver.process([(topic, plain)])
    assert receiver.stats().refused == 1
    assert receiver.stats().commands_answered == 0
    stale = seal_frame(server_key, "SIM-0001", Direction.DOWNLINK, 1, plain, sent_at=clock.now() - timedelta(hours=1))
    reflected = seal_frame(server_key, "SIM-0001", Direction.UPLINK, 1, plain, sent_at=clock.now())
    receiver.process([(topic, stale), (topic, reflected)])
    assert receiver.stats().refused == 3
    fresh = seal_frame(server_key, "SIM-0001", Direction.DOWNLINK, 2, plain, sent_at=clock.now())
    receiver.process([(topic, fresh)])
    assert receiver.stats().commands_answered == 1
    assert (sessions.due() or "").startswith("rotate_keys command")
    ack = UplinkAck(device_id="SIM-0001", acked_through_seq=0, server_time=clock.now()).to_bytes()
    assert is_refused_without_key(receiver, topic, ack)
    log.close()


def is_refused_without_key(receiver: DownlinkReceiver, topic: str, payload: bytes) -> bool:
    before = receiver.stats().refused
    receiver.process([(topic, payload)])
    return receiver.stats().refused == before + 1


def test_an_enrolled_runtime_signs_records_carries_out_rotate_keys_and_chains_it(
    tmp_path: Path, store: IdentityStore, server: PlayedServer, clock: FakeClock
) -> None:
    log = SecurityLog.open(store.directory, clock)
    sessions = manager(store, server, clock, log)
    sessions.maintain()
    security = TerminalSecurity(sessions.identity, sessions, log)
    link = ScriptedLink(clock)
    runtime = build_runtime(terminal_config(tmp_path), simulated_peripherals(), clock, link=link, security=security)
    try:
        envelope = runtime.record_signed(SignedRecordKind.REVIEW_DECISION, {"prescription": "rx-1", "decision": "ok"})
        assert isinstance(envelope.payload, SignedRecord)
        verify_device_record(envelope.payload, device_id="SIM-0001", device_key=server.keys["SIM-0001"][1])
        command = DeviceCommand(
            command_id=uuid.uuid4(),
            device_id="SIM-0001",
            kind=CommandKind.ROTATE_KEYS,
            issued_at=clock.now(),
            expires_at=clock.now() + timedelta(hours=1),
        )
        key = sessions.current()
        assert key is not None
        frame = seal_frame(
            server.granted[key.key_id], "SIM-0001", Direction.DOWNLINK, 1, command.to_bytes(), sent_at=clock.now()
        )
        downlink = runtime.sync.downlink
        assert downlink is not None
        downlink.process([(Topics().downlink("SIM-0001"), frame)])
        assert downlink.stats().commands_answered == 1
        sessions.maintain()
        assert server.handshakes == 2  # the command made the terminal agree a new key
        # An enrolled runtime keeps the synced catalogues beside its outbox and takes catalogue_update notices.
        assert runtime.catalogue is not None
        assert runtime.catalogue_sync is not None
        notice = DeviceCommand(
            command_id=uuid.uuid4(),
            device_id="SIM-0001",
            kind=CommandKind.CATALOGUE_UPDATE,
            issued_at=clock.now(),
            expires_at=clock.now() + timedelta(hours=1),
            args={"kind": "drug", "version": 1, "content_hash": "0" * 64},
        )
        fresh = sessions.current()
        assert fresh is not None
        sealed = seal_frame(
            server.granted[fresh.key_id], "SIM-0001", Direction.DOWNLINK, 1, notice.to_bytes(), sent_at=clock.now()
        )
        downlink.process([(Topics().downlink("SIM-0001"), sealed)])
        assert downlink.stats().commands_answered == 2
        assert runtime.catalogue_sync.handle_notice(notice).detail == "drug v1: fetch scheduled"
        while runtime.sync.delivery.deliver_batch():
            pass
        assert link.published
        assert all(parse_frame(frame).key_id in server.granted for frame in link.published)
    finally:
        runtime.stop()
    chain = next(store.directory.glob("audit-*.jsonl"))
    assert verify_chain(chain, load_chain_key(store.directory / "audit.key")).ok
    events = [json.loads(line)["event"]["type"] for line in chain.read_text().splitlines()]
    assert "identity.enrolled" not in events  # enrol_device in the fixture ran without a log
    assert {"session.established", "session.rotation_requested", "command.applied"} <= set(events)
    applied = [json.loads(line)["event"] for line in chain.read_text().splitlines()]
    notices = [e for e in applied if e["type"] == "command.applied" and e["kind"] == "catalogue_update"]
    assert [e["outcome"] for e in notices] == ["applied"]


def test_signed_records_need_an_identity(tmp_path: Path, clock: FakeClock) -> None:
    runtime = build_runtime(terminal_config(tmp_path), simulated_peripherals(), clock, link=ScriptedLink(clock))
    try:
        with pytest.raises(TerminalError, match="enrolled device identity"):
            runtime.record_signed(SignedRecordKind.SIGN_IN, {"pharmacist": "p-1"})
    finally:
        runtime.stop()
