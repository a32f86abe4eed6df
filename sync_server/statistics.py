"""Back-office statistics (D-04): device figures (coverage, registration, binding, presence, daily reporting and
binding changes), verification-method figures from the terminals' identity audit events, and prescription filings.

Owns the definitions of every figure (docs/statistics.md says what each one means, its source and its limits), the
scoping of a caller (`Scope`: a regulator's 医保区划 prefix, an institution head's institution) and the day range
(`DayRange`: local days in the server's display time zone, at most `MAX_DAYS`). The SQL is portable on purpose:
plain GROUP BY / COUNT over indexed columns, no date or JSON functions (they differ between SQLite, PostgreSQL and
Dameng/Kingbase-class databases); day buckets and JSON payloads are handled in Python over rows bounded by the range.

It must never write, and never return personal data: figures are counts; failure reasons are the terminals' reason
codes (never a subject reference).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.orm import Session, aliased

from protocol import PayloadType
from sync_server.db.models import (
    Device,
    DeviceBindingHistory,
    DevicePresence,
    Event,
    Institution,
    LinkStateColumn,
    PrescriptionRow,
    RegistrationState,
)

MAX_DAYS: Final = 31
"""Longest day range one request may ask for: daily figures scan the events of the range."""
DEFAULT_DAYS: Final = 7
REGION_LEVELS: Final = (2, 4, 6)
"""医保区划 prefixes figures are rolled up to: province (2 digits), city (4), county/district (6)."""
MAX_REASONS: Final = 20
"""Distinct failure reasons kept per method (the rest are counted under 'other')."""
REGION_PATTERN: Final = r"^[0-9]{2}([0-9]{2}){0,2}$"


class StatisticsError(ValueError):
    """A statistics request that cannot be answered as asked (bad range, region outside the caller's scope)."""


class OutOfScopeError(StatisticsError):
    """The requested region lies outside the caller's region."""


# ---------------------------------------------------------------------------------------------- scope and range


@dataclass(frozen=True)
class Scope:
    """What a caller may count: everything (both None), the institutions whose 医保区划 code starts with
    `region_prefix`, and/or one institution. Devices bound to no institution are only in the unscoped view."""

    region_prefix: str | None = None
    institution_id: int | None = None

    @property
    def unscoped(self) -> bool:
        return self.region_prefix is None and self.institution_id is None

    def institutions(self, institution: Any = Institution) -> list[ColumnElement[bool]]:
        """WHERE conditions on `institution` (the Institution entity or an alias of it)."""
        conditions: list[ColumnElement[bool]] = []
        if self.region_prefix is not None:
            conditions.append(institution.region_code.startswith(self.region_prefix))
        if self.institution_id is not None:
            conditions.append(institution.id == self.institution_id)
        return conditions

    def shows(self, level: int) -> bool:
        """Is a region roll-up of `level` digits shown? Not the unbound row (0), nor a roll-up broader than the
        region prefix (it would hold only the scope's part of that region under the broader code)."""
        return level > 0 and level >= len(self.region_prefix or "")

    def narrowed(self, region: str | None) -> Scope:
        """This scope narrowed to a requested region prefix; `OutOfScopeError` if the two do not overlap."""
        if region is None:
            return self
        own = self.region_prefix
        if own is None or region.startswith(own):
            return Scope(region, self.institution_id)
        if own.startswith(region):
            return self  # asked for more than it may see: it sees its own region
        raise OutOfScopeError(f"region {region!r} is outside the caller's region {own!r}")


@dataclass(frozen=True)
class DayRange:
    """Local days `first`..`last` (both included) in `tz`."""

    first: date
    last: date
    tz: ZoneInfo

    @classmethod
    def of(cls, first: date | None, last: date | None, *, today: date, tz: ZoneInfo) -> DayRange:
        """Defaults: the `DEFAULT_DAYS` days ending `last` (today). `StatisticsError` for an empty or too long range."""
        last = last if last is not None else (first + timedelta(days=DEFAULT_DAYS - 1) if first else today)
        first = first if first is not None else last - timedelta(days=DEFAULT_DAYS - 1)
        if first > last:
            raise StatisticsError("first_day must not be after last_day")
        if (last - first).days + 1 > MAX_DAYS:
            raise StatisticsError(f"at most {MAX_DAYS} days per request")
        return cls(first, last, tz)

    def days(self) -> list[date]:
        return [self.first + timedelta(days=n) for n in range((self.last - self.first).days + 1)]

    def start_of(self, day: date) -> datetime:
        return datetime.combine(day, time.min, tzinfo=self.tz)

    @property
    def start(self) -> datetime:
        return self.start_of(self.first)

    @property
    def end(self) -> datetime:
        return self.start_of(self.last + timedelta(days=1))

    def day_of(self, when: datetime) -> date:
        return when.astimezone(self.tz).date()


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RangeOut(_Out):
    first_day: date
    last_day: date
    timezone: str
    start: datetime = Field(description="Start of first_day in the time zone (included).")
    end: datetime = Field(description="Start of the day after last_day (excluded).")

    @classmethod
    def of(cls, days: DayRange) -> RangeOut:
        return cls(first_day=days.first, last_day=days.last, timezone=str(days.tz), start=days.start, end=days.end)


class ScopeOut(_Out):
    region_prefix: str | None = Field(description="Only institutions whose 医保区划 code starts with this.")
    institution_id: int | None = Field(description="Only this institution.")

    @classmethod
    def of(cls, scope: Scope) -> ScopeOut:
        return cls(region_prefix=scope.region_prefix, institution_id=scope.institution_id)


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _prefixes(code: str | None) -> Iterator[tuple[int, str | None]]:
    """(level, code) of each roll-up a 6-digit region code counts in; devices of no institution count as None."""
    if code is None:
        yield 0, None
        return
    for level in REGION_LEVELS:
        if len(code) >= level:
            yield level, code[:level]


# ------------------------------------------------------------------------------------------------------- devices


class DeviceFigures(_Out):
    """Coverage, registration, binding and presence of one region roll-up (or of the whole scope)."""

    region_code: str | None = Field(description="医保区划 prefix; null: devices bound to no institution.")
    level: int = Field(description="Digits of region_code (2 province, 4 city, 6 county); 0 for the whole scope.")
    institutions: int = Field(description="Institutions in the region.")
    institutions_covered: int = Field(description="Institutions with at least one bound, non-revoked device.")
    institutions_uncovered: int
    coverage_rate: float | None = Field(description="institutions_covered / institutions.")
    devices: int = Field(description="Devices known to the server (every registration state).")
    unprovisioned: int
    registered: int = Field(description="Registered by an admin, not yet enrolled.")
    enrolled: int
    revoked: int
    bound: int = Field(description="Devices bound to an institution now (every registration state).")
    online: int = Field(description="Online now: retained status online and the heartbeat has not timed out.")
    online_rate: float | None = Field(description="online / (devices - revoked).")


class DeviceDayFigures(_Out):
    day: date
    devices_known: int = Field(description="Devices first seen before the day ended and not revoked before it began.")
    devices_reporting: int = Field(description="Devices from which at least one heartbeat was received that day.")
    reporting_rate: float | None = Field(description="devices_reporting / devices_known.")
    heartbeats: int = Field(description="Heartbeats received that day.")
    online_time_rate: float | None = Field(
        description="Share of the day the known devices were online: their time online that day from the presence "
        "history (device_presence: online from a heartbeat or status, offline at a status or at the missed "
        "heartbeat's deadline), over devices_known x the day's seconds (up to now)."
    )
    devices_added: int = Field(description="Devices first seen that day.")
    devices_enrolled: int = Field(description="Devices whose current enrolment happened that day.")
    devices_revoked: int = Field(description="Devices revoked that day (and still revoked).")
    binds: int = Field(description="Bindings approved that day (device_binding_history action 'bind').")
    unbinds: int = Field(description="Devices unbound that day (action 'unbind').")


class DeviceStatistics(_Out):
    as_of: datetime
    range: RangeOut
    scope: ScopeOut
    total: DeviceFigures
    regions: list[DeviceFigures] = Field(description="Roll-ups by 2-, 4- and 6-digit prefix, ordered by code.")
    unbound: DeviceFigures | None = Field(description="Devices bound to no institution (unscoped callers only).")
    daily: list[DeviceDayFigures]


@dataclass
class _DeviceTally:
    institutions: int = 0
    covered: int = 0
    by_state: Counter[str] = field(default_factory=Counter)
    bound: int = 0
    online: int = 0

    def add(self, other: _DeviceTally) -> None:
        self.institutions += other.institutions
        self.covered += other.covered
        self.by_state.update(other.by_state)
        self.bound += other.bound
        self.online += other.online

    def figures(self, code: str | None, level: int) -> DeviceFigures:
        devices = sum(self.by_state.values())
        revoked = self.by_state[RegistrationState.REVOKED.value]
        return DeviceFigures(
            region_code=code,
            level=level,
            institutions=self.institutions,
            institutions_covered=self.covered,
            institutions_uncovered=self.institutions - self.covered,
            coverage_rate=_rate(self.covered, self.institutions),
            devices=devices,
            unprovisioned=self.by_state[RegistrationState.UNPROVISIONED.value],
            registered=self.by_state[RegistrationState.REGISTERED.value],
            enrolled=self.by_state[RegistrationState.ENROLLED.value],
            revoked=revoked,
            bound=self.bound,
            online=self.online,
            online_rate=_rate(self.online, devices - revoked),
        )


def online_now(now: datetime) -> ColumnElement[bool]:
    """SQL form of the presence rule (`sync_server.store.is_online`) at `now`."""
    return and_(Device.link_state == LinkStateColumn.ONLINE, Device.heartbeat_expires_at > now)


def _device_scope(scope: Scope) -> list[ColumnElement[bool]]:
    """Conditions on Device: bound to an institution in scope (no condition when unscoped)."""
    if scope.unscoped:
        return []
    return [Device.institution_id.in_(select(Institution.id).where(*scope.institutions()))]


def device_statistics(session: Session, scope: Scope, days: DayRange, *, now: datetime) -> DeviceStatistics:
    """Every device figure of `scope`: by region now, and per day of `days`."""
    per_region: dict[str | None, _DeviceTally] = defaultdict(_DeviceTally)
    in_scope = scope.institutions()
    for region, count in session.execute(
        select(Institution.region_code, func.count()).where(*in_scope).group_by(Institution.region_code)
    ):
        per_region[region].institutions += int(count)
    covered = (
        select(Institution.region_code, func.count(func.distinct(Institution.id)))
        .join(Device, Device.institution_id == Institution.id)
        .where(*in_scope, Device.registration != RegistrationState.REVOKED)
        .group_by(Institution.region_code)
    )
    for region, count in session.execute(covered):
        per_region[region].covered += int(count)
    online = func.sum(case((online_now(now), 1), else_=0))
    devices = (
        select(Institution.region_code, Device.registration, func.count(), online)
        .select_from(Device)
        .outerjoin(Institution, Device.institution_id == Institution.id)
        .where(*_device_scope(scope))
        .group_by(Institution.region_code, Device.registration)
    )
    for code, state, count, online_count in session.execute(devices):
        tally = per_region[code]
        tally.by_state[RegistrationState(state).value] += int(count)
        tally.bound += int(count) if code is not None else 0
        tally.online += int(online_count or 0)
    rolled: dict[tuple[int, str | None], _DeviceTally] = defaultdict(_DeviceTally)
    total = _DeviceTally()
    for code, tally in per_region.items():
        total.add(tally)
        for key in _prefixes(code):
            rolled[key].add(tally)
    regions = [
        t.figures(code, level) for (level, code), t in sorted(rolled.items(), key=_region_order) if scope.shows(level)
    ]
    unbound = rolled.get((0, None))
    return DeviceStatistics(
        as_of=now,
        range=RangeOut.of(days),
        scope=ScopeOut.of(scope),
        total=total.figures(scope.region_prefix, 0),
        regions=regions,
        unbound=unbound.figures(None, 0) if unbound is not None and scope.unscoped else None,
        daily=_device_days(session, scope, days, now),
    )


def _region_order(item: tuple[tuple[int, str | None], Any]) -> tuple[str, int]:
    (level, code), _ = item
    return (code or "", level)


@dataclass(frozen=True)
class _DeviceLife:
    first_seen_at: datetime
    enrolled_at: datetime | None
    revoked_at: datetime | None
    heartbeat_expires_at: datetime | None
    """The deadline of the device's last heartbeat: an 'online' the sweeper has not yet closed ends there."""


Interval = tuple[datetime, datetime]


def _online_intervals(
    session: Session,
    device_scope: list[ColumnElement[bool]],
    lives: dict[str, _DeviceLife],
    start: datetime,
    end: datetime,
) -> dict[str, list[Interval]]:
    """Each device's time online within [start, end), from `device_presence`: its state at `start` (its last change
    before it), then every change up to `end`. Time before a device's first recorded change counts as offline."""
    presence = DevicePresence
    last_before = (
        select(presence.device_id, func.max(presence.at).label("at"))
        .where(presence.at < start)
        .group_by(presence.device_id)
        .subquery()
    )
    state: dict[str, bool] = {}
    for device_id, online in session.execute(
        select(presence.device_id, presence.online)
        .join(last_before, and_(presence.device_id == last_before.c.device_id, presence.at == last_before.c.at))
        .join(Device, Device.device_id == presence.device_id)
        .where(*device_scope)
        .order_by(presence.id)
    ):
        state[device_id] = bool(online)  # ties on the same instant: the row written last
    since: dict[str, datetime] = {device_id: start for device_id, online in state.items() if online}
    out: dict[str, list[Interval]] = defaultdict(list)
    for device_id, online, at in session.execute(
        select(presence.device_id, presence.online, presence.at)
        .join(Device, Device.device_id == presence.device_id)
        .where(*device_scope, presence.at >= start, presence.at < end)
        .order_by(presence.device_id, presence.at, presence.id)
    ):
        if online and device_id not in since:
            since[device_id] = at
        elif not online and device_id in since:
            out[device_id].append((since.pop(device_id), at))
    for device_id, opened in since.items():  # still online at `end`, or until its heartbeat's deadline passed
        life = lives.get(device_id)
        deadline = None if life is None else life.heartbeat_expires_at
        closed = end if deadline is None else max(opened, min(end, deadline))
        out[device_id].append((opened, closed))
    return out


def _overlap(intervals: list[Interval], start: datetime, end: datetime) -> float:
    return sum(max(0.0, (min(b, end) - max(a, start)).total_seconds()) for a, b in intervals)


def _device_days(session: Session, scope: Scope, days: DayRange, now: datetime) -> list[DeviceDayFigures]:
    """Per local day: the fleet (from one row per device in scope), its heartbeats (one GROUP BY per day) and its
    time online (from the presence history, two queries for the whole range)."""
    device_scope = _device_scope(scope)
    lives = {
        device_id: _DeviceLife(first_seen, enrolled, revoked, expires)
        for device_id, first_seen, enrolled, revoked, expires in session.execute(
            select(
                Device.device_id,
                Device.first_seen_at,
                Device.enrolled_at,
                Device.revoked_at,
                Device.heartbeat_expires_at,
            ).where(*device_scope)
        )
    }
    changes = _binding_changes(session, scope, days)
    observed_until = min(days.end, now)
    online = _online_intervals(session, device_scope, lives, days.start, max(days.start, observed_until))
    out: list[DeviceDayFigures] = []
    for day in days.days():
        start, end = days.start_of(day), days.start_of(day + timedelta(days=1))
        known = [
            device_id
            for device_id, life in lives.items()
            if life.first_seen_at < end and (life.revoked_at is None or life.revoked_at >= start)
        ]
        per_device: dict[str, int] = {
            device_id: int(count)
            for device_id, count in session.execute(
                select(Event.device_id, func.count())
                .join(Device, Device.device_id == Event.device_id)
                .where(
                    *device_scope,
                    Event.payload_type == PayloadType.HEARTBEAT.value,
                    Event.received_at >= start,
                    Event.received_at < end,
                )
                .group_by(Event.device_id)
            )
        }
        observed_s = max(0.0, (min(end, now) - start).total_seconds())
        online_s = sum(_overlap(online.get(device_id, []), start, min(end, now)) for device_id in known)
        out.append(
            DeviceDayFigures(
                day=day,
                devices_known=len(known),
                devices_reporting=len(per_device),
                reporting_rate=_rate(len(per_device), len(known)),
                heartbeats=sum(int(n) for n in per_device.values()),
                online_time_rate=round(online_s / (len(known) * observed_s), 4) if known and observed_s else None,
                devices_added=sum(1 for life in lives.values() if start <= life.first_seen_at < end),
                devices_enrolled=sum(1 for life in lives.values() if _within(life.enrolled_at, start, end)),
                devices_revoked=sum(1 for life in lives.values() if _within(life.revoked_at, start, end)),
                binds=changes[day]["bind"],
                unbinds=changes[day]["unbind"],
            )
        )
    return out


def _within(when: datetime | None, start: datetime, end: datetime) -> bool:
    return when is not None and start <= when < end


def _binding_changes(session: Session, scope: Scope, days: DayRange) -> dict[date, Counter[str]]:
    """Binding changes per local day: a change counts in a scope when its old or its new institution is in it."""
    src, dst = aliased(Institution), aliased(Institution)
    conditions = [DeviceBindingHistory.at >= days.start, DeviceBindingHistory.at < days.end]
    if not scope.unscoped:
        conditions.append(or_(and_(*scope.institutions(src)), and_(*scope.institutions(dst))))
    rows = session.execute(
        select(DeviceBindingHistory.at, DeviceBindingHistory.action)
        .outerjoin(src, src.id == DeviceBindingHistory.from_institution_id)
        .outerjoin(dst, dst.id == DeviceBindingHistory.to_institution_id)
        .where(*conditions)
    )
    changes: dict[date, Counter[str]] = defaultdict(Counter)
    for at, action in rows:
        changes[days.day_of(at)][action] += 1
    return changes


# ------------------------------------------------------------------------------------------------- verifications


@dataclass(frozen=True)
class Method:
    key: str
    zh: str
    en: str


METHODS: Final[tuple[Method, ...]] = (
    Method("face_1to1", "人脸 1:1 核验", "face 1:1"),
    Method("face_1toN", "人脸 1:N 识别", "face 1:N"),
    Method("face_liveness", "活体检测（未比对）", "liveness only"),
    Method("evoucher", "医保电子凭证（医保码）", "e-voucher QR"),
    Method("id_card", "身份证", "ID card"),
    Method("ss_card", "社保卡", "social-security card"),
    Method("pos", "收银台（POS）核验", "POS verification"),
    Method("proxy", "代购药核验", "proxy purchase"),
)
"""Verification methods in display order (docs/statistics.md: which audit events count for which method)."""
METHOD_KEYS: Final = tuple(m.key for m in METHODS)

FACE_ACTIONS: Final = frozenset({"face_1to1", "face_1toN", "face_liveness"})
EVOUCHER_ACTIONS: Final = frozenset({"evoucher.decode.accepted", "evoucher.decode.refused"})
POS_ACTION: Final = "pos.verify"
CARD_METHODS: Final = {"id_card_face": "id_card", "ss_card_face": "ss_card", "ssc_face": "ss_card"}
"""`detail.method` of a POS verification (terminal/pos_api.py BuyerMethod; IdentityMethod spells 'ssc_face')."""
IDENTITY_CATEGORY: Final = "identity"


def methods_of(action: str, detail: dict[str, Any]) -> tuple[str, ...]:
    """The methods one identity audit event counts for (empty: not a verification attempt).

    Face attempts (terminal/verification.py) and e-voucher decodes (terminal/evoucher.py) record their own event,
    also when a POS verification triggered them; the POS event (terminal/pos_api.py) counts as 'pos', plus the card
    it read (card reads record no event of their own) and 'proxy' when an agent bought for the holder. The
    e-voucher inside a POS verification is not counted twice: its decode event already counts."""
    if action in FACE_ACTIONS:
        return (action,)
    if action in EVOUCHER_ACTIONS:
        return ("evoucher",)
    if action == POS_ACTION:
        found = ["pos"]
        card = CARD_METHODS.get(str(detail.get("method")))
        if card is not None:
            found.append(card)
        if detail.get("proxy") is True:
            found.append("proxy")
        return tuple(found)
    return ()


def failure_reason(action: str, detail: dict[str, Any]) -> str:
    """The terminal's reason code of a failed attempt (face: decision; e-voucher and POS: reason)."""
    value = detail.get("decision") if action in FACE_ACTIONS else detail.get("reason")
    return str(value)[:64] if value not in (None, "") else "unspecified"


class OutcomeCount(_Out):
    attempts: int
    success: int
    failure: int
    success_rate: float | None = Field(description="success / attempts.")

    @classmethod
    def of(cls, counter: Counter[str]) -> OutcomeCount:
        success, failure = counter["success"], counter["failure"]
        return cls(
            attempts=success + failure, success=success, failure=failure, success_rate=_rate(success, success + failure)
        )


class MethodFigures(_Out):
    method: str
    label_zh: str
    label_en: str
    outcome: OutcomeCount
    failure_reasons: dict[str, int] = Field(description="Failures by the terminal's reason code, most frequent first.")


class VerificationDay(_Out):
    day: date
    by_method: dict[str, OutcomeCount]


class VerificationRegion(_Out):
    region_code: str | None = Field(description="医保区划 prefix of the device's institution; null: unbound devices.")
    level: int
    by_method: dict[str, OutcomeCount]


class VerificationStatistics(_Out):
    range: RangeOut
    scope: ScopeOut
    events_read: int = Field(description="Audit events of the range read (every category).")
    attempts: int = Field(description="Identity events that counted for at least one method.")
    methods: list[MethodFigures]
    daily: list[VerificationDay]
    regions: list[VerificationRegion]


EVENT_BATCH = 1000


def verification_statistics(session: Session, scope: Scope, days: DayRange) -> VerificationStatistics:
    """Counts per verification method and outcome, per day (the terminal's device_time) and region, from the
    identity audit events stored in `events`. The JSON payload is read in Python (portably), streamed in batches."""
    conditions = [
        Event.payload_type == PayloadType.AUDIT_EVENT.value,
        Event.device_time >= days.start,
        Event.device_time < days.end,
        *_device_scope(scope),
    ]
    query = (
        select(Event.device_time, Event.payload, Institution.region_code)
        .select_from(Event)
        .join(Device, Device.device_id == Event.device_id)
        .outerjoin(Institution, Institution.id == Device.institution_id)
        .where(*conditions)
        .execution_options(yield_per=EVENT_BATCH)
    )
    totals: dict[str, Counter[str]] = defaultdict(Counter)
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    daily: dict[date, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    regional: dict[tuple[int, str | None], dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    read = attempts = 0
    for device_time, payload, region in session.execute(query):
        read += 1
        if not isinstance(payload, dict) or payload.get("category") != IDENTITY_CATEGORY:
            continue
        outcome = payload.get("outcome")
        if outcome not in ("success", "failure"):
            continue
        action = str(payload.get("action", ""))
        raw_detail = payload.get("detail")
        detail: dict[str, Any] = raw_detail if isinstance(raw_detail, dict) else {}
        keys = methods_of(action, detail)
        if not keys:
            continue
        attempts += 1
        day = days.day_of(device_time)
        for key in keys:
            totals[key][outcome] += 1
            daily[day][key][outcome] += 1
            for rollup in _prefixes(region):
                regional[rollup][key][outcome] += 1
            if outcome == "failure":
                reasons[key][failure_reason(action, detail)] += 1
    return VerificationStatistics(
        range=RangeOut.of(days),
        scope=ScopeOut.of(scope),
        events_read=read,
        attempts=attempts,
        methods=[
            MethodFigures(
                method=m.key,
                label_zh=m.zh,
                label_en=m.en,
                outcome=OutcomeCount.of(totals[m.key]),
                failure_reasons=_top_reasons(reasons[m.key]),
            )
            for m in METHODS
        ],
        daily=[VerificationDay(day=day, by_method=_by_method(daily.get(day, {}))) for day in days.days()],
        regions=[
            VerificationRegion(region_code=code, level=level, by_method=_by_method(counts))
            for (level, code), counts in sorted(regional.items(), key=_region_order)
            if scope.shows(level) or (level == 0 and scope.unscoped)
        ],
    )


def _by_method(counts: dict[str, Counter[str]]) -> dict[str, OutcomeCount]:
    return {key: OutcomeCount.of(counts.get(key, Counter())) for key in METHOD_KEYS}


def _top_reasons(counter: Counter[str]) -> dict[str, int]:
    top = counter.most_common(MAX_REASONS)
    rest = sum(counter.values()) - sum(n for _, n in top)
    return dict(top) | ({"other": rest} if rest else {})


# ------------------------------------------------------------------------------------------------- prescriptions

MAX_PRESCRIBERS = 20


class PrescriberFigures(_Out):
    prescribing_institution_code: str
    filed: int


class PrescriptionDay(_Out):
    day: date
    filed: int


class PrescriptionStatistics(_Out):
    range: RangeOut
    scope: ScopeOut
    filed: int = Field(description="Prescriptions registered (filed) at institutions in scope within the range.")
    by_status: dict[str, int] = Field(description="Those prescriptions by their current status.")
    daily: list[PrescriptionDay]
    top_prescribing_institutions: list[PrescriberFigures] = Field(
        description=f"The {MAX_PRESCRIBERS} prescribing institutions with the most filings (R-02)."
    )


def prescription_filings(session: Session, scope: Scope, days: DayRange) -> PrescriptionStatistics:
    """Prescription filings (R-02, D-04) per day, current status and prescribing institution."""
    daily: Counter[date] = Counter()
    statuses: Counter[str] = Counter()
    prescribers: Counter[str] = Counter()
    rx = PrescriptionRow
    rows = session.execute(
        select(rx.registered_at, rx.status, rx.prescribing_institution_code)
        .join(Institution, Institution.id == rx.institution_id)
        .where(*scope.institutions(), rx.registered_at >= days.start, rx.registered_at < days.end)
    )
    for registered_at, status, prescriber in rows:
        daily[days.day_of(registered_at)] += 1
        statuses[str(status.value)] += 1
        prescribers[str(prescriber)] += 1
    return PrescriptionStatistics(
        range=RangeOut.of(days),
        scope=ScopeOut.of(scope),
        filed=sum(daily.values()),
        by_status=dict(sorted(statuses.items())),
        daily=[PrescriptionDay(day=day, filed=daily[day]) for day in days.days()],
        top_prescribing_institutions=[
            PrescriberFigures(prescribing_institution_code=code, filed=n)
            for code, n in prescribers.most_common(MAX_PRESCRIBERS)
        ],
    )
