"""Commands end to end through real processes: `yibao server run` (ingest + command dispatcher), `yibao terminal run
--simulated` and Mosquitto, driven only through the public REST API. A command reaches the online terminal and is
acknowledged; one issued while the terminal is stopped is delivered when it starts again and applied once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from yibao.demo import DemoOptions, DemoStack, start_stack
from yibao.procs import stop

pytestmark = pytest.mark.e2e


def wait_for_state(http: httpx.Client, command_id: str, state: str, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = http.get(f"/api/v1/commands/{command_id}").json()
        if body["state"] == state:
            return body
        time.sleep(0.1)
    raise AssertionError(f"command {command_id} did not reach {state!r}; last seen {body}")


def started_stack(workdir: Path) -> DemoStack:
    return start_stack(DemoOptions(workdir=workdir, heartbeat_interval_s=1.0))


def wait_offline(stack: DemoStack, timeout_s: float = 30.0) -> None:
    """`DemoStack.wait_online(False)` would treat the terminal we stopped on purpose as a crashed child."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        device = stack.device()
        if device is not None and not device["online"]:
            return
        time.sleep(0.1)
    raise AssertionError("the server still shows the stopped terminal online")


def issue(http: httpx.Client, stack: DemoStack, kind: str) -> str:
    resp = http.post(f"/api/v1/devices/{stack.options.device_id}/commands", json={"kind": kind, "ttl_s": 600})
    assert resp.status_code == 201, resp.text
    command_id: str = resp.json()["command_id"]
    return command_id


def test_commands_reach_the_terminal_process_online_and_after_a_restart(tmp_path: Path) -> None:
    stack = started_stack(tmp_path / "demo")
    try:
        stack.wait_online(True)
        with httpx.Client(base_url=stack.base_url, timeout=10.0, headers=stack.admin_headers) as http:
            ping = issue(http, stack, "ping")
            answered = wait_for_state(http, ping, "acknowledged")
            assert (answered["result_outcome"], answered["result_detail"]) == ("applied", "pong")

            assert stack.terminal is not None
            stop(stack.terminal, name="terminal")  # graceful: it publishes 'offline' on its way out
            wait_offline(stack)
            summary = issue(http, stack, "log_request")
            wait_for_state(http, summary, "delivered")
            stack.start_terminal()
            answered = wait_for_state(http, summary, "acknowledged")
            assert answered["result_outcome"] == "applied"

            device = stack.options.device_id
            results = http.get(f"/api/v1/devices/{device}/events", params={"payload_type": "command_result"}).json()
            audits = http.get(f"/api/v1/devices/{device}/events", params={"payload_type": "audit_event"}).json()
            page = http.get(f"/devices/{device}").text
    finally:
        assert stack.close() == []
    assert sorted(e["payload"]["command_id"] for e in results["items"]) == sorted([ping, summary]), "one answer each"
    summaries = [e for e in audits["items"] if e["payload"]["action"] == "terminal.state_summary"]
    assert len(summaries) == 1, "log_request applied once"
    assert summaries[0]["payload"]["detail"]["command_id"] == summary
    assert "终端已回复：已执行" in page
