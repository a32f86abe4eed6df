"""Back-office statistics (D-04, docs/statistics.md) on SQLite and PostgreSQL: a seeded fleet over three 医保区划
(310115 and 310104 in Shanghai, 320102 in Nanjing) plus an unbound device, with devices online/offline/revoked,
heartbeats around local-day boundaries, binding history and identity audit events of every method; exact figures
from the query functions, over real HTTP per role and region scope, and the page in headless Chromium."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from playwright.sync_api import sync_playwright
from pydantic import SecretStr
from sqlalchemy import Engine

from models.liveness import LivenessDecision
from protocol import AuditEvent, AuditOutcome
from sync_server.accounts import Role
from sync_server.app import create_app
from sync_server.db.engine import session_factory
from sync_server.db.models import (
    Device,
    DeviceBindingHistory,
    DevicePresence,
    Event,
    Institution,
    InstitutionKind,
    LinkStateColumn,
    PrescriptionRow,
    PrescriptionState,
    PresenceReason,
    RegistrationState,
)
from sync_server.settings import ServerSettings
from sync_server.statistics import (
    CARD_METHODS,
    DayRange,
    DeviceFigures,
    OutOfScopeError,
    Scope,
    StatisticsError,
    device_statistics,
    methods_of,
    prescription_filings,
    verification_statistics,
)
from sync_server.store import store_envelopes
from terminal.evoucher import IdentityMethod, RefusalReason, refusal_event
from terminal.pos_api import BuyerMethod
from terminal.verification import FaceDecision, FaceOutcome
from tests.http_serving import serving_url
from tests.sync_server.conftest import BOOT, TEST_ADMIN_TOKEN, FakeClock, envelope, serving
from tests.sync_server.test_accounts import GOOD, login, make_account

TZ = ZoneInfo("Asia/Shanghai")
NOW = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)  # 18:00 in Shanghai on 2026-03-10
D8, D9, D10 = date(2026, 3, 8), date(2026, 3, 9), date(2026, 3, 10)
DAYS = DayRange(D8, D10, TZ)
HOUR = 3600.0
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


def local(day: date, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=TZ)


@dataclass
class Fleet:
    institution_ids: dict[str, int]


INSTITUTIONS = {
    "A": ("H31011500001", "310115"),
    "B": ("H31011500002", "310115"),  # no device: not covered
    "C": ("H31010400001", "310104"),
    "D": ("H32010200001", "320102"),
    "E": ("H32010200002", "320102"),  # only a revoked device: not covered
}


def _device(
    device_id: str,
    institution: int | None,
    state: RegistrationState,
    *,
    online: bool,
    first_seen: datetime,
    revoked_at: datetime | None = None,
    enrolled_at: datetime | None = None,
    interval_s: float | None = None,
) -> Device:
    return Device(
        device_id=device_id,
        institution_id=institution,
        registration=state,
        link_state=LinkStateColumn.ONLINE if online else LinkStateColumn.OFFLINE,
        link_state_at=first_seen,
        online=online,
        first_seen_at=first_seen,
        heartbeat_expires_at=NOW + timedelta(seconds=20) if online else NOW - timedelta(minutes=5),
        last_seq=0,
        acked_through_seq=0,
        created_at=first_seen,
        revoked_at=revoked_at,
        enrolled_at=enrolled_at,
        last_heartbeat=None if interval_s is None else {"type": "heartbeat", "interval_s": interval_s},
    )


class _Events:
    def __init__(self) -> None:
        self.seq: dict[str, int] = {}
        self.rows: list[Event] = []

    def add(self, device_id: str, when: datetime, payload: dict[str, Any], payload_type: str) -> None:
        seq = self.seq[device_id] = self.seq.get(device_id, 0) + 1
        self.rows.append(
            Event(
                device_id=device_id,
                seq=seq,
                message_id=uuid.uuid4(),
                payload_type=payload_type,
                device_time=when,
                received_at=when,
                boot_id=BOOT,
                monotonic_ns=seq,
                payload=payload,
            )
        )

    def heartbeat(self, device_id: str, when: datetime) -> None:
        self.add(device_id, when, {"type": "heartbeat", "interval_s": 10.0}, "heartbeat")

    def audit(
        self, device_id: str, when: datetime, action: str, outcome: str, category: str = "identity", **detail: Any
    ) -> None:
        event = AuditEvent(category=category, action=action, outcome=AuditOutcome(outcome), detail=detail)
        self.add(device_id, when, event.model_dump(mode="json"), "audit_event")


def seed(engine: Engine) -> Fleet:
    long_ago = NOW - timedelta(days=10)
    with session_factory(engine, write_intent=True).begin() as session:
        ids: dict[str, int] = {}
        for key, (code, region) in INSTITUTIONS.items():
            row = Institution(
                code=code,
                name=f"示例机构 {key}",
                kind=InstitutionKind.PHARMACY,
                region_code=region,
                created_at=long_ago,
            )
            session.add(row)
            session.flush()
            ids[key] = row.id
        session.add_all(
            [
                _device(
                    "k-a1", ids["A"], RegistrationState.ENROLLED, online=True, first_seen=long_ago, interval_s=HOUR
                ),
                _device(
                    "k-a2", ids["A"], RegistrationState.ENROLLED, online=False, first_seen=long_ago, interval_s=HOUR
                ),
                _device(
                    "k-c1",
                    ids["C"],
                    RegistrationState.ENROLLED,
                    online=True,
                    first_seen=local(D9, 12),
                    enrolled_at=local(D9, 13),
                    interval_s=2 * HOUR,
                ),
                _device("k-d1", ids["D"], RegistrationState.REGISTERED, online=False, first_seen=long_ago),
                _device(
                    "k-e1",
                    ids["E"],
                    RegistrationState.REVOKED,
                    online=False,
                    first_seen=long_ago,
                    revoked_at=local(D9, 3),
                ),
                _device("k-x1", None, RegistrationState.ENROLLED, online=True, first_seen=long_ago, interval_s=HOUR),
            ]
        )
        session.flush()
        ev = _Events()
        # heartbeats: the local-day boundaries are Shanghai midnight (16:00 UTC the day before)
        ev.heartbeat("k-a1", local(D8, 0, 0, 0) - timedelta(seconds=1))  # 2026-03-07: outside the range
        ev.heartbeat("k-a1", local(D8, 0, 0, 0))
        ev.heartbeat("k-a1", local(D8, 9))
        ev.heartbeat("k-a2", local(D8, 23, 59, 59))
        ev.heartbeat("k-a1", local(D9, 9))
        for minute in (1, 2, 3):
            ev.heartbeat("k-x1", local(D9, 10, minute))
        ev.heartbeat("k-a1", local(D10, 9))
        ev.heartbeat("k-c1", local(D10, 9))
        # the presence history (what ingest and the sweeper write when a device's online flag changes)
        for device_id, online, at in (
            ("k-e1", True, local(D8, 1) - timedelta(days=1)),  # before the range: nothing in it
            ("k-e1", False, local(D8, 2) - timedelta(days=1)),
            ("k-a1", True, local(D8, 0) - timedelta(hours=4)),  # online at the range's start
            ("k-a1", False, local(D8, 6)),
            ("k-a2", True, local(D8, 23)),  # across midnight: 1 h on each day
            ("k-a2", False, local(D9, 1)),
            ("k-a1", True, local(D9, 12)),  # still online now
            ("k-c1", True, local(D9, 12)),
            ("k-x1", True, local(D10, 6)),
            ("k-d1", True, local(D10, 17)),  # its heartbeat deadline (17:55) passed; the sweeper has not run yet
        ):
            session.add(DevicePresence(device_id=device_id, online=online, at=at, reason=PresenceReason.STATUS))
        # identity audit events
        ev.audit("k-a1", local(D8, 0) - timedelta(hours=1), "face_1to1", "success", method="face_1to1")  # outside
        ev.audit("k-a1", local(D8, 10), "face_1to1", "success", decision="accepted", method="face_1to1")
        ev.audit("k-a1", local(D8, 11), "face_1to1", "success", decision="accepted", method="face_1to1")
        ev.audit("k-a1", local(D8, 12), "face_1to1", "failure", decision="no_match", method="face_1to1")
        ev.audit("k-a1", local(D9, 10), "face_1toN", "success", decision="accepted", method="face_1toN")
        ev.audit("k-a1", local(D9, 11), "terminal.started", "info", category="system")
        ev.audit("k-d1", local(D9, 10), "face_1to1", "failure", decision="liveness_failed", method="face_1to1")
        ev.audit("k-x1", local(D9, 10), "evoucher.decode.accepted", "success", method="evoucher", source="camera")
        ev.audit("k-a1", local(D10, 8), "evoucher.decode.accepted", "success", method="evoucher", source="scanner")
        ev.audit("k-a1", local(D10, 8), "evoucher.decode.refused", "failure", method="evoucher", reason="expired")
        ev.audit("k-a1", local(D10, 8), "evoucher.consume.accepted", "success", business="query")  # not counted
        ev.audit("k-a1", local(D10, 9), "pos.verify", "success", method="id_card_face", proxy=False, reason=None)
        ev.audit("k-a1", local(D10, 9), "pos.verify", "failure", method="ss_card_face", proxy=False, reason="timeout")
        ev.audit(
            "k-a1", local(D10, 9), "pos.verify", "success", method="evoucher", proxy=True, agent_method="face_live"
        )
        ev.audit("k-c1", local(D10, 10), "face_liveness", "success", decision="accepted", method="face_liveness")
        ev.audit("k-c1", local(D10, 10), "face_enrol", "success", method="face_enrol")  # not a verification
        session.add_all(ev.rows)
        changes = [
            ("k-a1", local(date(2026, 3, 6), 10), "bind", None, ids["A"]),  # outside the range
            ("k-a2", local(D8, 10), "bind", None, ids["A"]),
            ("k-x1", local(D9, 11), "unbind", ids["D"], None),
            ("k-c1", local(D9, 12), "bind", None, ids["C"]),
        ]
        for device_id, at, action, src, dst in changes:
            session.add(
                DeviceBindingHistory(
                    device_id=device_id,
                    at=at,
                    actor="test",
                    action=action,
                    from_institution_id=src,
                    to_institution_id=dst,
                    reason="test",
                )
            )
    return Fleet(ids)


@pytest.fixture
def fleet(engine: Engine) -> Fleet:
    return seed(engine)


def _figures(regions: list[DeviceFigures]) -> dict[str | None, tuple[int, ...]]:
    return {
        f.region_code: (f.institutions, f.institutions_covered, f.devices, f.enrolled, f.revoked, f.bound, f.online)
        for f in regions
    }


# ---------------------------------------------------------------------------------------------------- functions


def test_device_figures_by_region_and_day(engine: Engine, fleet: Fleet) -> None:
    with session_factory(engine)() as session:
        stats = device_statistics(session, Scope(), DAYS, now=NOW)
    t = stats.total
    assert (t.institutions, t.institutions_covered, t.institutions_uncovered, t.coverage_rate) == (5, 3, 2, 0.6)
    assert (t.devices, t.unprovisioned, t.registered, t.enrolled, t.revoked, t.bound, t.online) == (6, 0, 1, 4, 1, 5, 3)
    assert t.online_rate == 0.6  # 3 online of 5 not revoked
    # institutions, covered, devices, enrolled, revoked, bound, online
    assert _figures(stats.regions) == {
        "31": (3, 2, 3, 3, 0, 3, 2),
        "3101": (3, 2, 3, 3, 0, 3, 2),
        "310104": (1, 1, 1, 1, 0, 1, 1),
        "310115": (2, 1, 2, 2, 0, 2, 1),
        "32": (2, 1, 2, 0, 1, 2, 0),
        "3201": (2, 1, 2, 0, 1, 2, 0),
        "320102": (2, 1, 2, 0, 1, 2, 0),
    }
    assert [(f.region_code, f.level) for f in stats.regions] == [
        ("31", 2),
        ("3101", 4),
        ("310104", 6),
        ("310115", 6),
        ("32", 2),
        ("3201", 4),
        ("320102", 6),
    ]
    by_code = {f.region_code: f for f in stats.regions}
    assert by_code["3101"].online_rate == 0.6667
    assert by_code["310115"].coverage_rate == 0.5
    assert by_code["320102"].online_rate == 0.0  # the registered device is offline; the revoked one does not count
    assert stats.unbound is not None
    assert (stats.unbound.devices, stats.unbound.bound, stats.unbound.online, stats.unbound.online_rate) == (
        1,
        0,
        1,
        1.0,
    )
    days = [(d.day, d.devices_known, d.devices_reporting, d.heartbeats, d.binds, d.unbinds) for d in stats.daily]
    assert days == [
        (D8, 5, 2, 3, 1, 0),  # k-c1 not seen yet; midnight heartbeat counts, the one a second before does not
        (D9, 6, 2, 4, 1, 1),
        (D10, 5, 2, 2, 0, 0),  # k-e1 was revoked on 03-09
    ]
    assert [d.reporting_rate for d in stats.daily] == [0.4, 0.3333, 0.4]
    # time online from the presence history over known devices x the day: 03-08 (6 + 1) h of 5 x 24 h; 03-09
    # (12 + 1 + 12) h of 6 x 24 h; 03-10 (18 + 18 + 12 h + 55 min up to k-d1's missed deadline) of 5 x the 18 h
    # elapsed by now
    assert [d.online_time_rate for d in stats.daily] == [0.0583, 0.1736, 0.5435]
    assert [(d.devices_added, d.devices_enrolled, d.devices_revoked) for d in stats.daily] == [
        (0, 0, 0),
        (1, 1, 1),
        (0, 0, 0),
    ]


def test_device_figures_of_a_region_and_of_an_institution(engine: Engine, fleet: Fleet) -> None:
    with session_factory(engine)() as session:
        shanghai = device_statistics(session, Scope("3101"), DAYS, now=NOW)
        head = device_statistics(session, Scope(institution_id=fleet.institution_ids["A"]), DAYS, now=NOW)
        nanjing = device_statistics(session, Scope("32"), DAYS, now=NOW)
    assert shanghai.unbound is None
    assert set(_figures(shanghai.regions)) == {"3101", "310104", "310115"}  # not "31": only part of it is in scope
    assert (shanghai.total.institutions, shanghai.total.devices, shanghai.total.online) == (3, 3, 2)
    assert [(d.devices_known, d.devices_reporting, d.binds, d.unbinds) for d in shanghai.daily] == [
        (2, 2, 1, 0),
        (3, 1, 1, 0),
        (3, 2, 0, 0),
    ]
    assert (head.total.institutions, head.total.institutions_covered, head.total.devices, head.total.online) == (
        1,
        1,
        2,
        1,
    )
    assert [(d.devices_reporting, d.binds) for d in head.daily] == [(2, 1), (1, 0), (1, 0)]
    # the unbinding of k-x1 from D counts in Nanjing (its old institution) although k-x1 is bound nowhere now
    assert [(d.binds, d.unbinds) for d in nanjing.daily] == [(0, 0), (0, 1), (0, 0)]
    assert [d.devices_known for d in nanjing.daily] == [2, 2, 1]


def test_verification_figures_per_method_day_and_region(engine: Engine, fleet: Fleet) -> None:
    with session_factory(engine)() as session:
        stats = verification_statistics(session, Scope(), DAYS)
        shanghai = verification_statistics(session, Scope("3101"), DAYS)
        head = verification_statistics(session, Scope(institution_id=fleet.institution_ids["C"]), DAYS)
    assert stats.events_read == 15  # every audit event of the range; the two outside it are not read
    assert stats.attempts == 12
    totals = {m.method: (m.outcome.success, m.outcome.failure) for m in stats.methods}
    assert totals == {
        "face_1to1": (2, 2),
        "face_1toN": (1, 0),
        "face_liveness": (1, 0),
        "evoucher": (2, 1),
        "id_card": (1, 0),
        "ss_card": (0, 1),
        "pos": (2, 1),
        "proxy": (1, 0),
    }
    reasons = {m.method: m.failure_reasons for m in stats.methods if m.failure_reasons}
    assert reasons == {
        "face_1to1": {"no_match": 1, "liveness_failed": 1},
        "evoucher": {"expired": 1},
        "ss_card": {"timeout": 1},
        "pos": {"timeout": 1},
    }
    assert next(m for m in stats.methods if m.method == "face_1to1").outcome.success_rate == 0.5
    daily = {d.day: {k: (c.success, c.failure) for k, c in d.by_method.items() if c.attempts} for d in stats.daily}
    assert daily == {
        D8: {"face_1to1": (2, 1)},
        D9: {"face_1toN": (1, 0), "face_1to1": (0, 1), "evoucher": (1, 0)},
        D10: {
            "evoucher": (1, 1),
            "pos": (2, 1),
            "id_card": (1, 0),
            "ss_card": (0, 1),
            "proxy": (1, 0),
            "face_liveness": (1, 0),
        },
    }
    regions = {
        (r.region_code, r.level): {k: c.attempts for k, c in r.by_method.items() if c.attempts} for r in stats.regions
    }
    assert regions[("310115", 6)] == {
        "face_1to1": 3,
        "face_1toN": 1,
        "evoucher": 2,
        "id_card": 1,
        "ss_card": 1,
        "pos": 3,
        "proxy": 1,
    }
    assert regions[("310104", 6)] == {"face_liveness": 1}
    assert regions[("3101", 4)]["face_liveness"] == 1
    assert regions[("320102", 6)] == {"face_1to1": 1}
    assert regions[(None, 0)] == {"evoucher": 1}
    assert [key for key in regions if key[0] is not None and key[0].startswith("32")] == [
        ("32", 2),
        ("3201", 4),
        ("320102", 6),
    ]
    # scoped: Nanjing's and the unbound device's events are not counted
    scoped = {m.method: (m.outcome.success, m.outcome.failure) for m in shanghai.methods}
    assert scoped["face_1to1"] == (2, 1)
    assert scoped["evoucher"] == (1, 1)
    assert shanghai.attempts == 10
    assert [r.region_code for r in shanghai.regions] == ["3101", "310104", "310115"]
    assert head.attempts == 1
    assert {m.method: m.outcome.attempts for m in head.methods if m.outcome.attempts} == {"face_liveness": 1}


def test_what_each_audit_event_counts_for() -> None:
    assert methods_of("face_1to1", {}) == ("face_1to1",)
    assert methods_of("face_enrol", {}) == ()
    assert methods_of("evoucher.consume.refused", {"method": "evoucher"}) == ()
    assert methods_of("pos.verify", {"method": "evoucher", "proxy": True}) == ("pos", "proxy")
    assert methods_of("pos.verify", {"method": "ss_card_face", "proxy": False}) == ("pos", "ss_card")
    assert methods_of("outbox.full", {"method": "face_1to1"}) == ()


def test_the_events_the_terminal_code_builds_are_counted_after_real_storage(engine: Engine) -> None:
    """Guards against drift between the terminal's audit events and what the statistics count: the events are built
    by terminal/verification.py, terminal/evoucher.py and terminal/pos_api.py themselves and stored by ingest."""
    face = FaceDecision(
        outcome=FaceOutcome.NO_MATCH,
        method="face_1to1",
        subject_ref="ref-0001",
        similarity=0.21,
        threshold=0.5,
        liveness=LivenessDecision(live=True, scores={"rgb": 0.9}, failed=[], method="rgb+challenge"),
        quality_issues=(),
        model_sha256="ab" * 32,
        template_hash=None,
        frames=7,
        duration_ms=812.0,
    )
    refused = refusal_event(RefusalReason.OFFLINE, source="scanner", step="decode", latency_ms=3.0)
    consumed_refusal = refusal_event(RefusalReason.TOKEN_USED, source="camera", step="consume", latency_ms=3.0)
    events = [face.audit_event(), refused, consumed_refusal]
    when = local(D9, 10)
    envelopes = [envelope("k-real", n, e, device_time=when) for n, e in enumerate(events, start=1)]
    with session_factory(engine, write_intent=True).begin() as session:
        store_envelopes(session, envelopes, received_at=NOW)
    with session_factory(engine)() as session:
        stats = verification_statistics(session, Scope(), DAYS)
    counted = {m.method: (m.outcome.failure, m.failure_reasons) for m in stats.methods if m.outcome.attempts}
    assert counted == {"face_1to1": (1, {"no_match": 1}), "evoucher": (1, {"offline": 1})}
    assert stats.regions[0].region_code is None  # k-real is bound to no institution
    # every buyer method the POS API offers is counted under a method (e-voucher by its own decode event)
    assert {m.value for m in BuyerMethod} - set(CARD_METHODS) == {"evoucher"}
    assert IdentityMethod.SOCIAL_SECURITY_CARD_FACE.value in CARD_METHODS


def test_prescription_filings_are_counted_per_day_status_and_prescriber(engine: Engine, fleet: Fleet) -> None:
    with session_factory(engine)() as session:
        empty = prescription_filings(session, Scope(), DAYS)
    assert (empty.filed, empty.by_status, empty.top_prescribing_institutions) == (0, {}, [])
    assert [(d.day, d.filed) for d in empty.daily] == [(D8, 0), (D9, 0), (D10, 0)]
    ids = fleet.institution_ids
    rows = [
        (ids["A"], PrescriptionState.APPROVED, local(D8, 9), "H11"),
        (ids["A"], PrescriptionState.PENDING, local(D10, 9), "H11"),
        (ids["C"], PrescriptionState.REJECTED, local(D10, 10), "H22"),
        (ids["D"], PrescriptionState.APPROVED, local(D9, 9), "H11"),
        (ids["A"], PrescriptionState.APPROVED, local(D8, 0) - timedelta(seconds=1), "H11"),  # outside
    ]
    with session_factory(engine, write_intent=True).begin() as session:
        session.add_all(
            PrescriptionRow(
                institution_id=i,
                rx_no=f"RX{n}",
                request_digest="0" * 64,
                content_digest="0" * 64,
                body={},
                prescribing_institution_code=code,
                prescriber_code="D1",
                prescribed_at=at,
                patient_ref=f"pt-{n}",
                status=state,
                registered_at=at,
                registered_by="his:test",
                refused_decisions=0,
            )
            for n, (i, state, at, code) in enumerate(rows)
        )
    with session_factory(engine)() as session:
        filed = prescription_filings(session, Scope(), DAYS)
        shanghai = prescription_filings(session, Scope("3101"), DAYS)
    assert filed.filed == 4
    assert filed.by_status == {"approved": 2, "pending": 1, "rejected": 1}
    assert [(d.day, d.filed) for d in filed.daily] == [(D8, 1), (D9, 1), (D10, 2)]
    assert [(p.prescribing_institution_code, p.filed) for p in filed.top_prescribing_institutions] == [
        ("H11", 3),
        ("H22", 1),
    ]
    assert shanghai.filed == 3


def test_day_ranges_and_region_narrowing() -> None:
    assert DayRange.of(None, None, today=D10, tz=TZ).days()[0] == date(2026, 3, 4)
    assert DayRange.of(D8, None, today=D10, tz=TZ).last == date(2026, 3, 14)
    with pytest.raises(StatisticsError, match="after"):
        DayRange.of(D10, D8, today=D10, tz=TZ)
    with pytest.raises(StatisticsError, match="at most 31"):
        DayRange.of(date(2026, 1, 1), date(2026, 2, 1), today=D10, tz=TZ)
    assert Scope("3101").narrowed("310115") == Scope("310115")
    assert Scope("3101").narrowed("31") == Scope("3101")
    assert Scope().narrowed("32") == Scope("32")
    with pytest.raises(OutOfScopeError):
        Scope("3101").narrowed("32")


# ---------------------------------------------------------------------------------------------------- over HTTP


@pytest.fixture
def api(engine: Engine, db_url: str, fleet: Fleet, tmp_path: Path) -> Iterator[tuple[httpx.Client, Fleet]]:
    make_account(engine, "st-regulator", Role.REGULATOR, region_prefix="3101", now=NOW)
    make_account(engine, "st-head", Role.INSTITUTION_HEAD, institution_id=fleet.institution_ids["A"], now=NOW)
    make_account(engine, "st-pharmacist", Role.PHARMACIST, institution_id=fleet.institution_ids["A"], now=NOW)
    settings = ServerSettings(
        database_url=db_url, bootstrap_admin_token=SecretStr(TEST_ADMIN_TOKEN), data_dir=tmp_path / "data"
    )
    app = create_app(settings, engine=engine, start_ingest=False, clock=FakeClock(NOW))
    with serving(app, admin=False) as client:
        yield client, fleet


RANGE = {"first_day": "2026-03-08", "last_day": "2026-03-10"}


def test_api_scopes_each_role(api: tuple[httpx.Client, Fleet]) -> None:
    client, _ = api
    regulator, head = login(client, "st-regulator"), login(client, "st-head")
    admin_view = client.get("/api/v1/statistics/devices", headers=ADMIN, params=RANGE)
    assert admin_view.status_code == 200, admin_view.text
    assert admin_view.json()["total"]["devices"] == 6
    assert admin_view.json()["unbound"]["devices"] == 1
    assert [d["day"] for d in admin_view.json()["daily"]] == ["2026-03-08", "2026-03-09", "2026-03-10"]
    ours = client.get("/api/v1/statistics/devices", headers=regulator, params=RANGE).json()
    assert (ours["total"]["institutions"], ours["total"]["devices"], ours["unbound"]) == (3, 3, None)
    assert ours["scope"] == {"region_prefix": "3101", "institution_id": None}
    narrowed = client.get("/api/v1/statistics/devices", headers=regulator, params={**RANGE, "region": "310104"})
    assert narrowed.json()["total"]["devices"] == 1
    broader = client.get("/api/v1/statistics/devices", headers=regulator, params={**RANGE, "region": "31"})
    assert broader.json()["scope"]["region_prefix"] == "3101"
    outside = client.get("/api/v1/statistics/verifications", headers=regulator, params={**RANGE, "region": "32"})
    assert outside.status_code == 403
    assert "outside" in outside.json()["detail"]
    verifications = client.get("/api/v1/statistics/verifications", headers=regulator, params=RANGE).json()
    assert verifications["attempts"] == 10
    own = client.get("/api/v1/statistics/verifications", headers=head, params=RANGE).json()
    assert own["scope"]["institution_id"] is not None
    assert {m["method"]: m["outcome"]["attempts"] for m in own["methods"] if m["outcome"]["attempts"]} == {
        "face_1to1": 3,
        "face_1toN": 1,
        "evoucher": 2,
        "id_card": 1,
        "ss_card": 1,
        "pos": 3,
        "proxy": 1,
    }
    head_devices = client.get("/api/v1/statistics/devices", headers=head, params=RANGE).json()
    assert (head_devices["total"]["institutions"], head_devices["total"]["devices"]) == (1, 2)
    rx = client.get("/api/v1/statistics/prescriptions", headers=regulator, params=RANGE).json()
    assert (rx["filed"], len(rx["daily"])) == (0, 3)
    # device_admin: devices only; other roles: nothing
    assert client.get("/api/v1/statistics/verifications", headers=ADMIN).status_code == 403
    assert client.get("/api/v1/statistics/prescriptions", headers=ADMIN).status_code == 403
    pharmacist = login(client, "st-pharmacist")
    assert client.get("/api/v1/statistics/devices", headers=pharmacist).status_code == 403
    assert client.get("/api/v1/statistics/devices").status_code == 401


def test_api_refuses_bad_ranges_and_regions_with_4xx(api: tuple[httpx.Client, Fleet]) -> None:
    client, _ = api
    url = "/api/v1/statistics/devices"
    reversed_range = client.get(url, headers=ADMIN, params={"first_day": "2026-03-10", "last_day": "2026-03-08"})
    assert reversed_range.status_code == 422
    too_long = client.get(url, headers=ADMIN, params={"first_day": "2026-01-01", "last_day": "2026-03-10"})
    assert too_long.status_code == 422
    assert "31" in too_long.json()["detail"]
    assert client.get(url, headers=ADMIN, params={"region": "3"}).status_code == 422
    assert client.get(url, headers=ADMIN, params={"region": "31x"}).status_code == 422
    assert client.get(url, headers=ADMIN, params={"first_day": "not-a-day"}).status_code == 422
    default = client.get(url, headers=ADMIN).json()["range"]
    assert (default["first_day"], default["last_day"], default["timezone"]) == (
        "2026-03-04",
        "2026-03-10",
        "Asia/Shanghai",
    )


# ---------------------------------------------------------------------------------------------------- the page


def _cells(html: str, marker: str) -> str:
    start = html.index(marker)
    return html[start : html.index("</tr>", start)]


def test_page_shows_each_role_what_its_api_shows(api: tuple[httpx.Client, Fleet]) -> None:
    client, _ = api
    admin = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
    resp = client.get("/statistics", params=RANGE, headers=admin)
    assert resp.status_code == 200
    html = resp.text
    assert 'id="kpi-devices">6<' in html
    assert 'id="kpi-online-rate">60.0%<' in html
    assert 'id="kpi-covered">3 / 5<' in html
    row = _cells(html, 'data-region="310115"')
    assert "50.0%" in row
    assert 'style="width: 50.0%"' in row
    day9 = _cells(html, 'data-day="2026-03-09"')
    assert 'data-figure="unbinds">1<' in day9
    assert 'data-figure="revoked">1<' in day9
    assert 'data-figure="online-time">17.4% ' in day9
    # a device admin may read the device figures only (as GET /api/v1/statistics/verifications answers it 403)
    assert 'id="verifications-section"' not in html
    assert 'id="prescriptions-section"' not in html
    assert 'id="sections-hidden"' in html
    scoped = client.get("/statistics", params={**RANGE, "region": "32"}, headers=admin).text
    assert 'id="kpi-devices">2<' in scoped
    assert 'data-region="310115"' not in scoped
    assert client.get("/statistics", params={"region": "3"}, headers=admin).status_code == 422
    wrong_range = {"first_day": "2026-03-10", "last_day": "2026-03-01"}
    assert client.get("/statistics", params=wrong_range, headers=admin).status_code == 422
    # a regulator: its region, all three sections, the same figures as its API
    regulator = login(client, "st-regulator")
    page = client.get("/statistics", params=RANGE, headers=regulator).text
    methods = client.get("/api/v1/statistics/verifications", headers=regulator, params=RANGE).json()["methods"]
    face = next(m for m in methods if m["method"] == "face_1to1")
    assert f'data-figure="attempts">{face["outcome"]["attempts"]} ' in _cells(page, 'data-method="face_1to1"')
    devices = client.get("/api/v1/statistics/devices", headers=regulator, params=RANGE).json()
    assert f'id="kpi-devices">{devices["total"]["devices"]}<' in page
    assert 'id="prescriptions-section"' in page
    assert client.get("/statistics", params={"region": "32"}, headers=regulator).status_code == 403
    # an institution head: its institution only
    head = login(client, "st-head")
    own = client.get("/api/v1/statistics/devices", headers=head, params=RANGE).json()
    assert f'id="kpi-devices">{own["total"]["devices"]}<' in client.get("/statistics", params=RANGE, headers=head).text
    assert client.get("/statistics", headers=login(client, "st-pharmacist")).status_code == 403


@pytest.mark.browser
def test_page_renders_in_chromium(sqlite_engine: Engine, sqlite_url: str, tmp_path: Path) -> None:
    """The page as a signed-in regulator's browser gets it: through the sign-in page (the page cookie), in the
    system Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian package 'chromium' is required (scripts/setup.sh --dev installs it)"
    seed(sqlite_engine)
    make_account(sqlite_engine, "st-chromium", Role.REGULATOR, region_prefix="31", now=NOW)
    app = create_app(
        ServerSettings(database_url=sqlite_url, data_dir=tmp_path / "data"),
        engine=sqlite_engine,
        start_ingest=False,
        clock=FakeClock(NOW),
    )
    shot = tmp_path / "statistics.png"
    with serving_url(app, lifespan="on") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_context(locale="zh-CN", viewport={"width": 1400, "height": 2400}).new_page()
            target = "/statistics?first_day=2026-03-08&last_day=2026-03-10"
            page.goto(url + target)
            assert page.url.startswith(f"{url}/login?next=")  # not signed in: sent to sign in first
            page.locator("#login-username").fill("st-chromium")
            page.locator("#login-password").fill(GOOD)
            page.locator("#login-password").press("Enter")
            page.wait_for_url(url + target)
            dom = page.content()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert 'id="kpi-devices">' in dom
    assert 'data-method="proxy"' in dom
    assert all(section in dom for section in ("设备情况", "验证方式", "处方备案"))
    assert shot.stat().st_size > 10_000  # a real rendering, not an empty image
