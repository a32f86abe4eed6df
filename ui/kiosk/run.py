"""Running the kiosk on a terminal: the view-models over a `TerminalRuntime`, the App in the main thread.

Owns `kiosk_models(runtime)` (ports from `ui.services`, espeak-ng voice when installed) and `run_kiosk_terminal`,
the kiosk counterpart of `terminal.runtime.run_terminal`: build the runtime, attach the POS API when enabled,
start, record `terminal.started`, run the App until it closes or SIGINT/SIGTERM, then stop the runtime cleanly.
Call `ui.kiosk.env.prepare()` before importing this module.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from drivers.peripherals import Peripheral
from protocol import AuditOutcome
from terminal.config import TerminalConfig
from terminal.devices import KioskDevices
from terminal.evoucher import EVoucherPlatform
from terminal.runtime import TerminalRuntime, build_runtime
from terminal.session import TerminalSecurity
from ui.kiosk.app import KioskApp
from ui.services import NationalClient, RuntimeIdentity, RuntimeMaintenance, RuntimeNational, RuntimeQueries

# staff screens (pharmacist, review, binding)
from ui.staff_services import staff_models
from ui.viewmodels.models import KioskModels, build_models
from ui.voice import EspeakSpeaker, SilentSpeaker, Speaker

logger = logging.getLogger(__name__)


def default_speaker() -> Speaker:
    try:
        return EspeakSpeaker()
    except FileNotFoundError:
        logger.warning("espeak-ng not installed: the care mode will have no voice prompts")
        return SilentSpeaker()


def kiosk_models(
    runtime: TerminalRuntime,
    *,
    speaker: Speaker | None = None,
    admin_hash: str | None = None,
    national: NationalClient | None = None,
) -> KioskModels:
    """The view-models over `runtime`. `admin_hash` (argon2) opens maintenance; by default `[kiosk]
    admin_password_hash` of the terminal's config, else `YIBAO_KIOSK_ADMIN_HASH`.
    `national` replaces the relay client over the runtime's server API (the screen tour's in-process relay)."""
    maintenance = RuntimeMaintenance(runtime)
    configured = admin_hash if admin_hash is not None else runtime.config.kiosk.admin_password_hash
    if configured is not None:
        maintenance.admin_hash = configured
    models = build_models(
        runtime.clock,
        identity=RuntimeIdentity(runtime),
        queries=RuntimeQueries(runtime, national),
        maintenance=maintenance,
        speaker=speaker if speaker is not None else default_speaker(),
        # national queries (K-11…K-16)
        national=RuntimeNational(runtime, national),
    )
    # staff screens (pharmacist, review, binding)
    # 人证比对 needs the reader vendor's WLT photo decoder (`[devices.id_card_reader] photo_decoder`)
    decoder = None if runtime.devices is None else runtime.devices.id_photo_decoder
    models.staff = staff_models(runtime, models.kiosk, decode_photo=decoder)
    return models


def run_kiosk_terminal(
    config: TerminalConfig,
    peripherals: Sequence[Peripheral] | KioskDevices,
    *,
    security: TerminalSecurity | None = None,
    evoucher_platform: EVoucherPlatform | None = None,
) -> None:
    """Run the terminal with its kiosk window until the window closes or SIGINT/SIGTERM."""
    runtime = build_runtime(config, peripherals, security=security, evoucher_platform=evoucher_platform)
    try:
        models = kiosk_models(runtime)
        attach_kiosk_pos_api(runtime, models)
        runtime.start()
        runtime.record_audit(
            "system",
            "terminal.started",
            AuditOutcome.INFO,
            software_version=config.software_version,
            config_version=config.config_version,
            ui="kiosk",
        )
        app = KioskApp(models)
        restore = _stop_app_on_signals(app)
        try:
            app.run()
        finally:
            restore()
    finally:
        runtime.stop()


def attach_kiosk_pos_api(runtime: TerminalRuntime, models: KioskModels) -> None:
    """`terminal.pos_api.attach_pos_api` with the kiosk in the loop: a register's verification request opens the POS
    screen, which shows the verifier's instructions and the masked outcome. Nothing when `[pos_api]` is off."""
    config = runtime.config.pos_api
    if not config.enabled:
        return
    # FastAPI/uvicorn load only when the POS API is on
    from terminal.pos_api import RuntimeBuyerVerifier, build_pos_server, runtime_evidence
    from terminal.proxy import SqliteProxyRegistry
    from ui.pos_link import KioskBuyerVerifier

    verifier = RuntimeBuyerVerifier(runtime.devices, runtime.evoucher, runtime.face, show=models.pos.instruct)
    runtime.pos_api = build_pos_server(
        config,
        device_id=runtime.config.device_id,
        verifier=KioskBuyerVerifier(verifier, models.pos, face=runtime.face),
        registry=runtime.proxy_registry or SqliteProxyRegistry(),
        record=lambda event: runtime.record_audits([event]),
        clock=runtime.clock,
        evidence=runtime_evidence(runtime),
        rules=runtime.catalogue,
    )


def _stop_app_on_signals(app: KioskApp) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum: int, frame: FrameType | None) -> None:
        # Only post: the App is stopped from its own loop (widgets belong to the main loop).
        main = app.main
        if main is not None:
            main.post(app.stop)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
