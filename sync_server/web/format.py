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


COMMAND_KIND_WORDS = {
    "ping": ("连通测试", "ping"),
    "log_request": ("状态摘要", "log request"),
    "config_update": ("配置更新", "config update"),
    "unbind": ("解除绑定", "unbind"),
    "rotate_keys": ("更换密钥", "rotate keys"),
    "roster_update": ("人员名单更新", "roster update"),
    "template_update": ("模板更新", "template update"),
    "template_purge": ("删除人脸模板", "template purge"),
}

COMMAND_OUTCOME_WORDS = {
    "applied": ("已执行", "applied"),
    "rejected": ("终端拒绝", "rejected by the terminal"),
    "expired": ("终端收到时已过期", "expired when it arrived"),
    "failed": ("执行失败", "failed"),
}


def command_kind_words(kind: str) -> tuple[str, str]:
    return COMMAND_KIND_WORDS.get(kind, (kind, kind))


def command_state_words(state: str, outcome: str | None, attempts: int) -> tuple[str, str]:
    """One command's state in words, Chinese and English: what happened and what the device answered."""
    if state == "queued":
        return "排队中，尚未发送", "queued, not sent yet"
    if state == "delivered":
        return f"已发送 {attempts} 次，等待终端回复", f"sent {attempts} time(s), waiting for the terminal's answer"
    if state == "expired":
        return "已过期，终端未回复，不再发送", "expired without an answer; no longer sent"
    zh, en = COMMAND_OUTCOME_WORDS.get(outcome or "", (outcome or "?", outcome or "?"))
    return f"终端已回复：{zh}", f"answered: {en}"


def percent(rate: float | None) -> str:
    """'87.5%' for 0.875; '—' when there is nothing to divide by."""
    if rate is None:
        return "—"
    return f"{rate * 100:.1f}%"


def bar_width(value: float | None, maximum: float | None = 1.0) -> float:
    """Width in percent (0-100) of a CSS bar showing `value` against `maximum` (a rate against 1 by default)."""
    if value is None or not maximum or maximum <= 0:
        return 0.0
    return round(max(0.0, min(100.0, value * 100.0 / maximum)), 1)
