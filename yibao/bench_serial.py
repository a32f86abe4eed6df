"""`yibao bench serial`: the real serial drivers against the pty simulators, read after read.

Owns the benchmark only: the kiosk rig (`hardware_sim.kiosk_rig`) serves an ID-card reader, a social-security-card
reader and a QR scanner on pseudo-terminals; the real drivers (`drivers.idcard`, `drivers.sscard`,
`drivers.qr_scanner`) read from them, and each read is timed end to end (find/select/read and checksums for the ID
card; activation and the APDUs for the SS card; line to `ScannedCode` for the QR scanner). A pty moves bytes at
memory speed: these figures are the drivers' own cost, not a real line's (at 115,200 baud one ID-card response of
1,295 bytes alone takes about 112 ms on the wire). Prints one JSON line.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from drivers.idcard import IdCardReader
from drivers.qr_scanner import QrScanner
from drivers.sscard import SocialSecurityCardReader
from hardware_sim.kiosk_rig import start_kiosk_simulators
from yibao.bench_vision import peak_rss_mb, time_calls

WIRE_BYTES_ID_CARD_READ = 5 + 2 + 3 + 4 + 256 + 1024 + 1
"""Bytes of one read-text-and-photo response: preamble, length, status, the two lengths, text, photo, checksum."""


def run_serial_bench(reads: int = 200) -> dict[str, Any]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="yibao-bench-serial-") as tmp:
        rig = start_kiosk_simulators(Path(tmp))
        try:
            id_reader = IdCardReader.on_port(rig.id_card_pty.path)
            ss_reader = SocialSecurityCardReader.on_port(rig.ss_card_pty.path)
            scanner = QrScanner.on_port(rig.qr_scanner_pty.path)
            scanner.open()
            try:
                id_numbers: set[str] = set()
                ss_numbers: set[str] = set()
                codes: list[str] = []

                def read_id(_i: int) -> None:
                    id_numbers.add(id_reader.read_card(timeout_s=3.0).id_number)

                def read_ss(_i: int) -> None:
                    ss_numbers.add(ss_reader.read_card(timeout_s=3.0).card_number)

                def read_qr(i: int) -> None:
                    rig.qr_scanner.scan(f"SIMEC1-BENCH-{i:06d}")
                    codes.append(scanner.read_code(timeout_s=3.0).text)

                figures = {
                    "id_card_read": time_calls(read_id, reads).as_dict(),
                    "ss_card_read": time_calls(read_ss, reads).as_dict(),
                    "qr_scan_to_code": time_calls(read_qr, reads).as_dict(),
                }
            finally:
                for device in (id_reader, ss_reader, scanner):
                    device.close()
        finally:
            rig.stop()
    return {
        "bench": "serial",
        "reads": reads,
        **figures,
        "consistent": len(id_numbers) == 1 and len(ss_numbers) == 1 and len(codes) == reads + 3,
        "id_card_wire_ms_at_115200": round(WIRE_BYTES_ID_CARD_READ * 10 / 115_200 * 1000, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }
