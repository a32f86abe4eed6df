"""Formatting helpers for the web templates: local times, ages, durations, state words.

Pure functions; they must never touch the database or the request.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

PERIPHERAL_STATE_WORDS = {
    "ok": ("正常", "ok"),
    "degraded": ("降级", "degraded"),
    "fault": ("故障", "fault"),
    "absent": ("未接入", "absent"),
}


def local_time(value: datetime | None, tz: ZoneInfo) -> str:
    if value is None:
        return "—"
    return value.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    """'45 秒', '3 分 20 秒', '2 时 5 分', '3 天 4 时' ('—' for None)."""
    if seconds is None:
        return "—"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} 秒"
    if s < 3600:
        return f"{s // 60} 分 {s % 60} 秒"
    if s < 86400:
        return f"{s // 3600} 时 {s % 3600 // 60} 分"
    return f"{s // 86400} 天 {s % 86400 // 3600} 时"


def ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return ""
    return f"{duration((now - value).total_seconds())}前"


def peripheral_state_words(state: str) -> tuple[str, str]:
    return PERIPHERAL_STATE_WORDS.get(state, (state, state))
