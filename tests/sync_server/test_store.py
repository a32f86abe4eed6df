"""store_envelopes: each envelope stored exactly once, on both insert paths and both databases; device activity and
presence updates that only move forward."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from protocol import DeviceStatusMessage, Envelope, LinkState
from sync_server.db.engine import session_factory
from sync_server.db.models import (
    Device,
    DevicePresence,
    Event,
    LinkStateColumn,
    PresenceReason,
    RegistrationState,
)
from sync_server.store import (
    StoreMethod,
    StoreResult,
    apply_statuses,
    record_device_activity,
    store_envelopes,
    sweep_offline,
)
from tests.sync_server.conftest import BOOT, T0, envelope, heartbeat

METHODS = [StoreMethod.AUTO, StoreMethod.FAST, StoreMethod.PORTABLE]


def _store(engine: Engine, envelopes: Sequence[Envelope], method: StoreMethod) -> StoreResult:
    with session_factory(engine, write_intent=True).begin() as session:
        return store_envelopes(session, envelopes, received_at=T0, method=method)


def _rows(engine: Engine, device_id: str) -> list[tuple[int, uuid.UUID]]:
    with session_factory(engine)() as session:
        return [
            (seq, mid)
            for seq, mid in session.execute(
                select(Event.seq, Event.message_id).where(Event.device_id == device_id).order_by(Event.seq)
            )
        ]


@pytest.mark.parametrize("method", METHODS)
def test_the_same_envelope_twice_is_stored_once(engine: Engine, method: StoreMethod) -> None:
    env = envelope("dev-a", 1)
    assert _store(engine, [env], method) == StoreResult(stored=1, duplicates=0)
    assert _store(engine, [env], method) == StoreResult(stored=0, duplicates=1, conflicts=0)
    assert _rows(engine, "dev-a") == [(1, env.message_id)]


@pytest.mark.parametrize("method", METHODS)
def test_same_seq_with_another_message_id_keeps_the_first(engine: Engine, method: StoreMethod) -> None:
    first = envelope("dev-a", 7)
    _store(engine, [first], method)
    assert _store(engine, [envelope("dev-a", 7)], method) == StoreResult(stored=0, duplicates=1, conflicts=1)
    assert _rows(engine, "dev-a") == [(7, first.message_id)]


@pytest.mark.parametrize("method", METHODS)
def test_same_message_id_under_another_seq_keeps_the_first(engine: Engine, method: StoreMethod) -> None:
    first = envelope("dev-a", 3)
    _store(engine, [first], method)
    again = envelope("dev-a", 4, message_id=first.message_id)
    assert _store(engine, [again], method) == StoreResult(stored=0, duplicates=1, conflicts=1)
    assert _rows(engine, "dev-a") == [(3, first.message_id)]


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_with_internal_duplicates(engine: Engine, method: StoreMethod) -> None:
    a, b = envelope("dev-a", 1), envelope("dev-a", 2)
    b_conflict = envelope("dev-a", 2)
    already = envelope("dev-b", 1)
    _store(engine, [already], method)
    result = _store(engine, [a, a, b, already, b_conflict, a], method)
    assert result == StoreResult(stored=2, duplicates=4, conflicts=1)
    assert _rows(engine, "dev-a") == [(1, a.message_id), (2, b.message_id)]
    assert _rows(engine, "dev-b") == [(1, already.message_id)]


@pytest.mark.parametrize("method", METHODS)
def test_stored_rows_keep_the_envelope(engine: Engine, method: StoreMethod) -> None:
    env = envelope("dev-a", 5, heartbeat(outbox_depth=3))
    _store(engine, [env], method)
    with session_factory(engine)() as session:
        row = session.scalars(select(Event)).one()
        device = session.get(Device, "dev-a")
    assert (row.device_id, row.seq, row.message_id, row.payload_type) == ("dev-a", 5, env.message_id, "heartbeat")
    assert row.device_time == env.device_time
    assert row.received_at == T0
    assert row.boot_id == BOOT
    assert row.monotonic_ns == env.monotonic_ns
    assert row.payload == env.payload.model_dump(mode="json")
    assert device is not None
    assert device.registration is RegistrationState.UNPROVISIONED
    assert device.link_state is LinkStateColumn.OFFLINE


def test_an_empty_batch_does_nothing(engine: Engine) -> None:
    assert _store(engine, [], StoreMethod.AUTO) == StoreResult(0, 0)


@pytest.mark.parametrize("method", METHODS)
def test_concurrent_writers_store_each_envelope_once(engine: Engine, method: StoreMethod) -> None:
    envelopes = [envelope("dev-race", seq) for seq in range(1, 51)]
    barrier = threading.Barrier(3)

    def worker() -> StoreResult:
        barrier.wait()
        return _store(engine, envelopes, method)

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(worker) for _ in range(3)]
        results = [f.result(timeout=30) for f in futures]
    assert sum(r.stored for r in results) == 50
    assert sum(r.duplicates for r in results) == 100
    assert len(_rows(engine, "dev-race")) == 50


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    picks=st.lists(st.integers(min_value=0, max_value=11), min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=5),
    portable=st.booleans(),
)
def test_any_redelivery_pattern_stores_each_record_once(
    sqlite_engine: Engine, picks: list[int], cuts: list[int], portable: bool
) -> None:
    device = f"dev-{uuid.uuid4().hex[:12]}"
    pool = [envelope(device, seq) for seq in range(1, 13)]
    deliveries = [pool[i] for i in picks]
    bounds = sorted({0, len(deliveries), *(c for c in cuts if c < len(deliveries))})
    method = StoreMethod.PORTABLE if portable else StoreMethod.AUTO
    total = StoreResult(0, 0)
    for lo, hi in itertools.pairwise(bounds):
        total = total + _store(sqlite_engine, deliveries[lo:hi], method)
    distinct = set(picks)
    assert total.stored == len(distinct)
    assert total.stored + total.duplicates == len(deliveries)
    assert total.conflicts == 0
    assert [seq for seq, _ in _rows(sqlite_engine, device)] == sorted(i + 1 for i in distinct)


# ---------------------------------------------------------------- device activity and presence


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    assert device is not None
    return device


def test_heartbeats_move_forward_by_seq_only(engine: Engine) -> None:
    sessions = session_factory(engine, write_intent=True)
    newer = envelope("dev-h", 9, heartbeat(software_version="2.0.0", outbox_depth=1))
    older = envelope("dev-h", 4, heartbeat(software_version="1.0.0", outbox_depth=99))
    with sessions.begin() as session:
        store_envelopes(session, [newer], received_at=T0)
        record_device_activity(session, [newer], received_at=T0, heartbeat_timeout_factor=3.0)
    later = T0 + timedelta(seconds=5)
    with sessions.begin() as session:  # the older one is redelivered late
        store_envelopes(session, [older], received_at=later)
        record_device_activity(session, [older], received_at=later, heartbeat_timeout_factor=3.0)
    with sessions() as session:
        d = _device(session, "dev-h")
        assert d.software_version == "2.0.0"
        assert d.last_heartbeat is not None
        assert d.last_heartbeat["outbox_depth"] == 1
        assert d.last_heartbeat_seq == 9
        assert d.last_heartbeat_at == T0
        assert d.heartbeat_expires_at == T0 + timedelta(seconds=30)
        assert d.last_seen_at == later
        assert d.last_seq == 9


def test_online_needs_the_link_and_a_fresh_heartbeat(engine: Engine) -> None:
    sessions = session_factory(engine, write_intent=True)
    online = DeviceStatusMessage(device_id="dev-p", state=LinkState.ONLINE, boot_id=BOOT, at=T0)
    hb = envelope("dev-p", 1, heartbeat(interval_s=10))
    with sessions.begin() as session:
        store_envelopes(session, [hb], received_at=T0)
        record_device_activity(session, [hb], received_at=T0, heartbeat_timeout_factor=3.0)
        assert _device(session, "dev-p").online is False  # heartbeat but link unknown (offline)
        apply_statuses(session, [online], received_at=T0)
        assert _device(session, "dev-p").online is True
    with sessions.begin() as session:
        assert sweep_offline(session, now=T0 + timedelta(seconds=29)) == []
    with sessions.begin() as session:
        assert sweep_offline(session, now=T0 + timedelta(seconds=30)) == ["dev-p"]
        assert _device(session, "dev-p").online is False
        assert _device(session, "dev-p").link_state is LinkStateColumn.ONLINE
    hb2 = envelope("dev-p", 2, heartbeat(interval_s=10))
    t2 = T0 + timedelta(seconds=40)
    with sessions.begin() as session:
        store_envelopes(session, [hb2], received_at=t2)
        record_device_activity(session, [hb2], received_at=t2, heartbeat_timeout_factor=3.0)
        assert _device(session, "dev-p").online is True
        will = DeviceStatusMessage(device_id="dev-p", state=LinkState.OFFLINE, boot_id=BOOT)
        apply_statuses(session, [will], received_at=t2)
        assert _device(session, "dev-p").online is False
        assert _device(session, "dev-p").link_state is LinkStateColumn.OFFLINE
    # every change of the flag is in the presence history, with what moved it and when (the timeout at the missed
    # deadline, T0 + 30 s, not when the sweep noticed it)
    with sessions() as session:
        history = session.execute(
            select(DevicePresence.online, DevicePresence.at, DevicePresence.reason)
            .where(DevicePresence.device_id == "dev-p")
            .order_by(DevicePresence.id)
        ).all()
    assert [tuple(row) for row in history] == [
        (True, T0, PresenceReason.STATUS),
        (False, T0 + timedelta(seconds=30), PresenceReason.TIMEOUT),
        (True, t2, PresenceReason.HEARTBEAT),
        (False, t2, PresenceReason.STATUS),
    ]


def test_statuses_apply_in_arrival_order(engine: Engine) -> None:
    sessions = session_factory(engine, write_intent=True)
    with sessions.begin() as session:
        store_envelopes(session, [envelope("dev-s", 1)], received_at=T0)
        apply_statuses(
            session,
            [
                DeviceStatusMessage(device_id="dev-s", state=LinkState.OFFLINE, boot_id=BOOT),
                DeviceStatusMessage(device_id="dev-s", state=LinkState.ONLINE, boot_id=uuid.uuid4(), at=T0),
            ],
            received_at=T0,
        )
    with sessions() as session:
        assert _device(session, "dev-s").link_state is LinkStateColumn.ONLINE
        assert _device(session, "dev-s").link_state_at == T0
        assert session.scalar(select(func.count()).select_from(Device)) == 1
