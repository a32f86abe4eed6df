"""The kiosk's simulated surroundings in one place: the serial device simulators on ptys and the e-voucher platform
simulator over HTTP, started together for `yibao sim devices`, the demo and end-to-end tests.

Owns `KioskSimulatorRig` and `start_kiosk_simulators(directory)`: the ID-card reader, social-security-card reader and
QR scanner simulators each on a `PtyDevice` behind a stable symlink in `directory` (like udev rules give real
readers), a synthetic card in each reader, and the e-voucher simulator served by uvicorn on a free loopback port in a
thread. `terminal_toml()` renders the `[devices]` and `[evoucher]` tables that point a terminal's REAL drivers at
them (backend "serial", simulated_peer = true). Everything it holds is synthetic; production code never imports it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import uvicorn

from hardware_sim.evoucher import EVoucherSimulator
from hardware_sim.evoucher_http import create_app
from hardware_sim.idcard_sim import IdCardSimulator, synthetic_card
from hardware_sim.pty_device import PtyDevice
from hardware_sim.qr_scanner_sim import QrScannerSimulator
from hardware_sim.sscard_sim import SsCardSimulator, synthetic_ss_card
from protocol import SystemClock

logger = logging.getLogger(__name__)

ID_CARD_LINK: Final = "idcard"
SS_CARD_LINK: Final = "sscard"
QR_SCANNER_LINK: Final = "qr"
DEMO_ORG_CODE: Final = "H00000000001"
"""Institution code the rig's terminals send; the simulated platform accepts any institution."""
SERVER_START_TIMEOUT_S: Final = 15.0


class RigStartError(RuntimeError):
    """A simulator could not be started (no pty, the HTTP server did not come up)."""


@dataclass
class KioskSimulatorRig:
    """The running simulators. `stop()` unplugs the ptys (removing the symlinks) and stops the HTTP server."""

    directory: Path
    id_card: IdCardSimulator
    ss_card: SsCardSimulator
    qr_scanner: QrScannerSimulator
    evoucher: EVoucherSimulator
    id_card_pty: PtyDevice
    ss_card_pty: PtyDevice
    qr_scanner_pty: PtyDevice
    evoucher_url: str = ""
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _socket: socket.socket | None = None
    _ptys: list[PtyDevice] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """What `yibao sim devices` prints: the port paths and the platform URL."""
        return {
            "id_card_reader": self.id_card_pty.path,
            "ss_card_reader": self.ss_card_pty.path,
            "qr_scanner": self.qr_scanner_pty.path,
            "evoucher_url": self.evoucher_url,
            "org_code": DEMO_ORG_CODE,
        }

    def terminal_toml(self) -> str:
        """The `[devices]` and `[evoucher]` tables of a terminal config that runs the real drivers against us."""
        return (
            "\n[devices.id_card_reader]\n"
            'backend = "serial"\n'
            f'port = "{self.id_card_pty.path}"\n'
            "simulated_peer = true\n"
            "\n[devices.ss_card_reader]\n"
            'backend = "serial"\n'
            f'port = "{self.ss_card_pty.path}"\n'
            "simulated_peer = true\n"
            "\n[devices.qr_scanner]\n"
            'backend = "serial"\n'
            f'port = "{self.qr_scanner_pty.path}"\n'
            "simulated_peer = true\n"
            "\n[evoucher]\n"
            'platform = "http"\n'
            f'base_url = "{self.evoucher_url}"\n'
            f'org_code = "{DEMO_ORG_CODE}"\n'
        )

    def _serve_evoucher(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(self.evoucher), log_config=None, log_level="warning", access_log=False, lifespan="off"
            )
        )
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="evoucher-sim-http", daemon=True)
        self._socket, self._server, self._thread = sock, server, thread
        thread.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            raise RigStartError("the e-voucher platform simulator did not start serving")
        self.evoucher_url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for pty in self._ptys:
            pty.stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> KioskSimulatorRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_kiosk_simulators(directory: Path, *, seed: int = 0) -> KioskSimulatorRig:
    """Start the three serial simulators (symlinks `idcard`, `sscard`, `qr` in `directory`, each reader holding a
    synthetic card of seed `seed`) and the e-voucher platform on a free port; `stop()` (or `with`) ends them."""
    directory.mkdir(parents=True, exist_ok=True)
    id_card = IdCardSimulator(synthetic_card(seed), seed=seed)
    ss_card = SsCardSimulator(synthetic_ss_card(seed))
    qr_scanner = QrScannerSimulator()
    rig = KioskSimulatorRig(
        directory=directory,
        id_card=id_card,
        ss_card=ss_card,
        qr_scanner=qr_scanner,
        evoucher=EVoucherSimulator(SystemClock()),
        id_card_pty=PtyDevice(id_card, link_path=directory / ID_CARD_LINK, name="idcard-sim"),
        ss_card_pty=PtyDevice(ss_card, link_path=directory / SS_CARD_LINK, name="sscard-sim"),
        qr_scanner_pty=PtyDevice(qr_scanner, link_path=directory / QR_SCANNER_LINK, name="qr-sim"),
    )
    try:
        for pty in (rig.id_card_pty, rig.ss_card_pty, rig.qr_scanner_pty):
            pty.start()
            rig._ptys.append(pty)
        rig._serve_evoucher()
    except OSError as exc:
        rig.stop()
        raise RigStartError(f"cannot start the device simulators in {directory}: {exc}") from exc
    except BaseException:
        rig.stop()
        raise
    logger.info("kiosk simulators up in %s, e-voucher platform at %s", directory, rig.evoucher_url)
    return rig
