"""Downlink commands on the terminal: each command id is carried out at most once and answered exactly once, across
restarts; expired, malformed and other-device commands are never carried out; the v2 -> v3 outbox migration."""

from __future__ import annotations

import logging
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from hardware_sim import simulated_peripherals
from protocol import (
    AuditEvent,
    AuditOutcome,
    Clock,
    CommandKind,
    CommandOutcome,
    CommandResult,
    DeviceCommand,
    PayloadType,
    Topics,
)
from protocol.downlink import COMMAND_ARGS_MODELS
from terminal.commands import (
    NOT_SUPPORTED_YET,
    CommandApplier,
    CommandHandler,
    Disposition,
    HandlerOutcome,
    TerminalFacts,
    default_handlers,
)
from terminal.outbox import Outbox, OutboxStatus, ResultDelivery
from terminal.runtime import build_runtime
from terminal.sync import DownlinkReceiver
from tests.terminal.conftest import DEVICE_ID, FakeClock, UplinkRecorder, open_outbox, terminal_config, wait_until
from yibao.broker import MosquittoBroker

TOPICS = Topics()
FACTS = TerminalFacts(software_version="1.2.3", config_version="cfg-7")


def command(
    clock: Clock,
    kind: CommandKind = CommandKind.PING,
    *,
    ttl_s: float = 300,
    device_id: str = DEVICE_ID,
    args: dict[str, Any] | None = None,
    command_id: uuid.UUID | None = None,
) -> DeviceCommand:
    now = clock.now()
    return DeviceCommand(
        command_id=command_id or uuid.uuid4(),
        device_id=device_id,
        kind=kind,
        issued_at=now - timedelta(seconds=1),
        expires_at=now + timedelta(seconds=ttl_s),
        args=args or {},
    )


def results(outbox: Outbox) -> list[CommandResult]:
    """The CommandResult records held in the outbox, lowest seq first (decoded from the stored envelopes)."""
    found = []
    for row in outbox.rows():
        if row.payload_type == PayloadType.COMMAND_RESULT.value:
            found.append(row.seq)
    claimed = {r.seq: r.envelope.payload for r in outbox.claim(1000)}
    outbox.release(claimed, "test looked", backoff=False)
    return [p for seq, p in sorted(claimed.items()) if seq in found and isinstance(p, CommandResult)]


def applier(outbox: Outbox, clock: FakeClock, **handlers: CommandHandler) -> CommandApplier:
    registry = default_handlers(outbox, FACTS, clock)
    registry.update({CommandKind(k): h for k, h in handlers.items()})
    return CommandApplier(outbox, device_id=DEVICE_ID, clock=clock, handlers=registry)


@pytest.fixture
def outbox(tmp_path: Path, clock: FakeClock) -> Iterator[Outbox]:
    with open_outbox(tmp_path / "outbox.sqlite3", clock) as ob:
        yield ob


class CountingHandler:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, command: DeviceCommand) -> HandlerOutcome:
        self.calls += 1
        return HandlerOutcome(CommandOutcome.APPLIED, "counted")


def test_ping_is_answered_once_and_a_redelivery_is_not_carried_out_again(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="terminal.commands")
    path = tmp_path / "outbox.sqlite3"
    counting = CountingHandler()
    ping = command(clock)
    with open_outbox(path, clock) as outbox:
        commands = applier(outbox, clock, ping=counting)
        assert commands.apply(ping) is Disposition.ANSWERED
        [result] = results(outbox)
        assert (result.command_id, result.outcome, result.detail) == (
            ping.command_id,
            CommandOutcome.APPLIED,
            "counted",
        )
        answer = outbox.command_answer(ping.command_id)
        assert answer is not None
        assert answer.outcome is CommandOutcome.APPLIED
        assert commands.apply(ping) is Disposition.REDELIVERED
        assert counting.calls == 1
        assert len(results(outbox)) == 1, "no second answer"
        # The answer reached the broker but not the server: the same record (same seq) goes out again.
        [claimed] = outbox.claim()
        outbox.mark_sent([claimed.seq])
        assert outbox.resend_command_result(answer.result_seq) is ResultDelivery.REQUEUED
        assert {r.seq: r.status for r in outbox.rows()} == {answer.result_seq: OutboxStatus.PENDING}
        outbox.mark_acked_through(answer.result_seq)
        assert outbox.resend_command_result(answer.result_seq) is ResultDelivery.STORED_ON_SERVER
    # Restart: a new process, a new applier, the same file.
    with open_outbox(path, clock) as outbox:
        commands = applier(outbox, clock, ping=counting)
        assert commands.apply(ping) is Disposition.REDELIVERED
        assert counting.calls == 1, "remembered across the restart"
        assert outbox.stats().depth == 0, "the server has the answer already: nothing re-sent"
        assert outbox.answered_commands() == 1
    assert "not carried out again" in caplog.text


def test_an_expired_command_is_answered_expired_and_never_carried_out(outbox: Outbox, clock: FakeClock) -> None:
    counting = CountingHandler()
    commands = applier(outbox, clock, ping=counting)
    late = command(clock, ttl_s=5)
    clock.advance(5)
    assert commands.apply(late) is Disposition.ANSWERED
    assert counting.calls == 0
    [result] = results(outbox)
    assert result.outcome is CommandOutcome.EXPIRED
    assert commands.apply(late) is Disposition.REDELIVERED
    assert len(results(outbox)) == 1


def test_kinds_not_supported_yet_and_bad_arguments_are_rejected(outbox: Outbox, clock: FakeClock) -> None:
    commands = applier(outbox, clock)
    # Kinds with a closed argument model have their arguments checked first (tests/terminal/test_binding.py).
    unsupported = [command(clock, kind) for kind in CommandKind if kind not in COMMAND_ARGS_MODELS]
    bad_args = command(clock, CommandKind.LOG_REQUEST, args={"window_s": 1})
    for c in [*unsupported, bad_args]:
        assert commands.apply(c) is Disposition.ANSWERED
    answers = {r.command_id: r for r in results(outbox)}
    for c in unsupported:
        assert (answers[c.command_id].outcome, answers[c.command_id].detail) == (
            CommandOutcome.REJECTED,
            NOT_SUPPORTED_YET,
        )
    assert answers[bad_args.command_id].outcome is CommandOutcome.REJECTED
    assert "window_s" in answers[bad_args.command_id].detail
    assert commands.stats().by_outcome == {"rejected": len(unsupported) + 1}


def test_a_failing_handler_becomes_a_failed_answer(outbox: Outbox, clock: FakeClock) -> None:
    def broken(command: DeviceCommand) -> HandlerOutcome:
        raise RuntimeError("boom")

    commands = applier(outbox, clock, ping=broken)
    assert commands.apply(command(clock)) is Disposition.ANSWERED
    [result] = results(outbox)
    assert (result.outcome, result.detail) == (CommandOutcome.FAILED, "handler error: RuntimeError")


def test_log_request_queues_a_state_summary_with_its_answer_in_one_transaction(
    outbox: Outbox, clock: FakeClock
) -> None:
    outbox.enqueue_many(
        [AuditEvent(category="system", action="test.record", outcome=AuditOutcome.INFO) for _ in range(3)]
    )
    commands = applier(outbox, clock)
    request = command(clock, CommandKind.LOG_REQUEST, args={"window_s": 600})
    assert commands.apply(request) is Disposition.ANSWERED
    claimed = outbox.claim(100)
    payloads = [c.envelope.payload for c in claimed]
    summary, result = payloads[-2], payloads[-1]
    assert isinstance(summary, AuditEvent)
    assert isinstance(result, CommandResult)
    assert claimed[-1].seq == claimed[-2].seq + 1, "summary and answer were written together"
    assert summary.action == "terminal.state_summary"
    assert summary.detail["software_version"] == "1.2.3"
    assert summary.detail["config_version"] == "cfg-7"
    assert summary.detail["window_s"] == 600
    assert summary.detail["recent_audit_event"] == 3
    assert summary.detail["outbox_depth"] == 3
    assert summary.actor is None
    assert summary.subject is None
    assert result.outcome is CommandOutcome.APPLIED


def test_answered_ids_are_never_forgotten(tmp_path: Path, outbox: Outbox, clock: FakeClock) -> None:
    applier(outbox, clock).apply(command(clock))
    with closing(sqlite3.connect(tmp_path / "outbox.sqlite3", isolation_level=None)) as db:
        with pytest.raises(sqlite3.IntegrityError, match="never forgotten"):
            db.execute("DELETE FROM applied_commands")
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("UPDATE applied_commands SET outcome = 'lost'")


def test_receiver_refuses_malformed_and_other_device_commands_and_counts_them(
    outbox: Outbox, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="terminal.sync")
    counting = CountingHandler()
    commands = applier(outbox, clock, ping=counting)
    receiver = DownlinkReceiver(outbox, device_id=DEVICE_ID, topics=TOPICS, commands=commands)
    own = TOPICS.downlink(DEVICE_ID)
    good = command(clock)
    receiver.process(
        [
            (own, command(clock, device_id="SIM-0002").to_bytes()),
            (own, b'{"type": "command", "kind": "ping"}'),
            (TOPICS.downlink("SIM-0002"), command(clock).to_bytes()),
            (own, good.to_bytes()),
            (own, good.to_bytes()),
        ]
    )
    stats = receiver.stats()
    assert (stats.received, stats.refused, stats.commands_answered, stats.commands_redelivered) == (5, 3, 1, 1)
    assert counting.calls == 1
    assert [r.command_id for r in results(outbox)] == [good.command_id]
    assert len([r for r in caplog.records if "refused a message" in r.getMessage()]) == 1, "logged once"


def test_a_receiver_without_an_applier_refuses_commands(outbox: Outbox, clock: FakeClock) -> None:
    receiver = DownlinkReceiver(outbox, device_id=DEVICE_ID, topics=TOPICS)
    receiver.process([(TOPICS.downlink(DEVICE_ID), command(clock).to_bytes())])
    assert receiver.stats().refused == 1
    assert outbox.stats().depth == 0


# ---------------------------------------------------------------------- schema v2 -> v3


@contextmanager
def raw_db(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        yield conn


def test_version_2_file_gains_applied_commands_keeping_every_record(tmp_path: Path, clock: FakeClock) -> None:
    """A v2 file is today's file without `applied_commands` (v3 only added that table), so it is made by removing it
    from a fresh file carrying records in every status."""
    path = tmp_path / "v2.sqlite3"
    with open_outbox(path, clock) as outbox:
        records = [AuditEvent(category="system", action="t", outcome=AuditOutcome.INFO) for _ in range(4)]
        seqs = [e.seq for e in outbox.enqueue_many(records)]
        outbox.claim(3)
        outbox.mark_sent(seqs[:2])
        outbox.mark_acked_through(1)
    with raw_db(path) as db:
        db.execute("DROP TRIGGER applied_commands_are_never_forgotten")
        db.execute("DROP TABLE applied_commands")
        db.execute("PRAGMA user_version = 2")
        before = db.execute("SELECT seq, status, envelope FROM outbox ORDER BY seq").fetchall()
    with open_outbox(path, clock) as outbox:
        assert {r.seq: r.status for r in outbox.rows()} == {
            1: OutboxStatus.ACKED,
            2: OutboxStatus.SENT,
            3: OutboxStatus.PENDING,  # was in flight: recovered at open, as always
            4: OutboxStatus.PENDING,
        }
        ping = command(clock)
        assert applier(outbox, clock).apply(ping) is Disposition.ANSWERED
        assert outbox.command_answer(ping.command_id) is not None
        assert outbox.integrity_check() == ["ok"]
    with raw_db(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        after = db.execute("SELECT seq, status, envelope FROM outbox WHERE seq <= 4 ORDER BY seq").fetchall()
        assert [(s, e) for s, _, e in after] == [(s, e) for s, _, e in before], "records kept byte for byte"
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        assert {"applied_commands", "applied_commands_are_never_forgotten", "outbox_legal_transition"} <= names
    with open_outbox(path, clock) as again:
        assert again.answered_commands() == 1, "opening a migrated file again is a no-op"


# ---------------------------------------------------------------------- through a real broker


def test_a_command_on_the_downlink_topic_is_answered_through_the_uplink(
    tmp_path: Path, broker: MosquittoBroker, recorder: UplinkRecorder
) -> None:
    rt = build_runtime(terminal_config(tmp_path, broker), simulated_peripherals())
    server = Client(CallbackAPIVersion.VERSION2, client_id="fake-server", protocol=MQTTProtocolVersion.MQTTv5)
    online = threading.Event()  # the terminal says 'online' only after its downlink subscription is in place
    server.on_message = lambda _c, _u, m: online.set() if b'"online"' in m.payload else None
    server.connect(broker.host, broker.port)
    server.subscribe(TOPICS.status(DEVICE_ID), qos=1)
    server.loop_start()
    try:
        rt.start()
        assert online.wait(30), "the terminal never announced itself online"
        ping = command(rt.clock)
        for _ in range(2):  # delivered twice: answered once
            server.publish(TOPICS.downlink(DEVICE_ID), ping.to_bytes(), qos=1).wait_for_publish(5)

        def answers() -> list[CommandResult]:
            return [
                e.payload
                for e in recorder.uplinks(PayloadType.COMMAND_RESULT)
                if isinstance(e.payload, CommandResult) and e.payload.command_id == ping.command_id
            ]

        assert wait_until(lambda: len(answers()) >= 1)
        downlink = rt.sync.downlink
        assert downlink is not None
        assert wait_until(lambda: downlink.stats().commands_redelivered == 1)
        assert {a.outcome for a in answers()} == {CommandOutcome.APPLIED}
        assert len({e.seq for e in recorder.uplinks(PayloadType.COMMAND_RESULT)}) == 1, "one answer record"
    finally:
        rt.stop()
        server.disconnect()
        server.loop_stop()
