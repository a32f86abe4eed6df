"""The kiosk's settings in the terminal's config: the maintenance password is configured as an argon2 hash."""

from __future__ import annotations

from pathlib import Path

import pytest
from argon2 import PasswordHasher

from hardware_sim import simulated_peripherals
from terminal.config import parse_terminal_config
from terminal.runtime import build_runtime
from tests.terminal.conftest import FakeClock, terminal_raw_config
from tests.terminal.fakes import ScriptedLink
from ui.kiosk.run import kiosk_models
from ui.services import ADMIN_HASH_ENV
from ui.viewmodels.kiosk import ScreenName
from ui.voice import RecordingSpeaker


def test_the_maintenance_password_hash_comes_from_the_terminal_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ADMIN_HASH_ENV, PasswordHasher().hash("from-the-environment"))
    raw = terminal_raw_config(tmp_path)
    raw["kiosk"] = {"admin_password_hash": PasswordHasher().hash("from-the-config")}
    config = parse_terminal_config(raw, source="test")
    clock = FakeClock()
    runtime = build_runtime(config, simulated_peripherals(), clock, link=ScriptedLink(clock))
    try:
        models = kiosk_models(runtime, speaker=RecordingSpeaker())
        models.maintenance.open()
        models.maintenance.sign_in("from-the-environment")  # the config's hash wins over the environment's
        assert models.kiosk.state.screen is ScreenName.MAINTENANCE_LOGIN
        models.maintenance.sign_in("from-the-config")
        assert (models.kiosk.state.screen, models.maintenance.state.signed_in) == (ScreenName.MAINTENANCE, True)
    finally:
        runtime.stop()
