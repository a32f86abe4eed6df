"""`sync_server.store` under concurrent writers (several ingest worker processes on one database).

Two transactions that both inserted records of the same devices (each holding the foreign key's FOR KEY SHARE on the
device rows) then both lock those devices: FOR UPDATE would deadlock them; FOR NO KEY UPDATE serialises them. And the
batched ack walk must still see a hole whose next stored seq lies beyond its read window.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from sync_server.db.engine import create_db_engine, session_factory
from sync_server.db.migrate import upgrade
from sync_server.db.models import Device
from sync_server.store import ACK_WALK_CHUNK, AckState, advance_acks, record_device_activity, store_envelopes
from tests.sync_server.conftest import T0, envelope


@pytest.mark.postgres
def test_two_transactions_storing_the_same_devices_do_not_deadlock(pg_url: str) -> None:
    upgrade(pg_url)
    engine = create_db_engine(pg_url)
    sessions = session_factory(engine, write_intent=True)
    both_inserted = threading.Barrier(2, timeout=10)
    results: dict[str, list[AckState]] = {}
    errors: list[Exception] = []

    def worker(name: str, seqs: range) -> None:
        envs = [envelope(device, seq) for device in ("dev-b", "dev-a") for seq in seqs]
        try:
            with sessions.begin() as session:
                store_envelopes(session, envs, received_at=T0)
                both_inserted.wait()  # both now hold FOR KEY SHARE on dev-a and dev-b through the foreign key
                record_device_activity(session, envs, received_at=T0, heartbeat_timeout_factor=3.0)
                results[name] = advance_acks(session, {"dev-a", "dev-b"}, now=T0, gap_alarm_after_s=300)
        except (SQLAlchemyError, threading.BrokenBarrierError) as exc:
            errors.append(exc)

    try:
        with sessions.begin() as session:  # the devices exist before the race, as they do in steady state
            store_envelopes(session, [envelope("dev-a", 1), envelope("dev-b", 1)], received_at=T0)
        threads = [
            threading.Thread(target=worker, args=("first", range(2, 6))),
            threading.Thread(target=worker, args=("second", range(6, 10))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert sorted(results) == ["first", "second"]
        with sessions.begin() as session:
            devices = session.scalars(select(Device).order_by(Device.device_id)).all()
            assert [(d.device_id, d.acked_through_seq, d.last_seq, d.seq_gap_from) for d in devices] == [
                ("dev-a", 9, 9, None),
                ("dev-b", 9, 9, None),
            ]
        # Whichever committed first saw a hole (the other's seqs were not visible yet) or not; the last one saw all.
        finals = {max(s.acked_through_seq for s in states) for states in results.values()}
        assert 9 in finals
    finally:
        engine.dispose()


def test_a_hole_whose_next_stored_seq_lies_beyond_the_read_window_is_found(engine: Engine) -> None:
    sessions = session_factory(engine, write_intent=True)
    far = ACK_WALK_CHUNK * 2 + 5
    envs = [envelope("kiosk-far", seq) for seq in [*range(1, 11), far]]
    with sessions.begin() as session:
        store_envelopes(session, envs, received_at=T0)
        record_device_activity(session, envs, received_at=T0, heartbeat_timeout_factor=3.0)
        (state,) = advance_acks(session, {"kiosk-far"}, now=T0, gap_alarm_after_s=300)
    assert (state.acked_through_seq, state.gap_from, state.gap_to, state.gap_opened) == (10, 11, far - 1, True)
    filler = [envelope("kiosk-far", seq) for seq in range(11, far)]
    with sessions.begin() as session:
        store_envelopes(session, filler, received_at=T0 + timedelta(seconds=1))
        record_device_activity(session, filler, received_at=T0, heartbeat_timeout_factor=3.0)
        (state,) = advance_acks(session, {"kiosk-far"}, now=T0, gap_alarm_after_s=300)
    assert (state.acked_through_seq, state.gap_from) == (far, None)
