"""Helpers the serial-device tests share: byte transcripts in tests/fixtures/serial/ and a scripted ByteLink.

A transcript file is text: '#' comments, then runs of hex bytes; a line starting with '>' begins bytes the host
sent, '<' bytes the device sent, and indented lines continue the current run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "serial"


def load_transcript(name: str) -> list[tuple[str, bytes]]:
    runs: list[tuple[str, bytearray]] = []
    for raw in (FIXTURES / name).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0]
        if not line.strip():
            continue
        if line[0] in "<>":
            runs.append((line[0], bytearray.fromhex(line[1:])))
        elif line[0].isspace() and runs:
            runs[-1][1].extend(bytes.fromhex(line))
        else:
            raise ValueError(f"bad transcript line in {name}: {raw!r}")
    return [(direction, bytes(data)) for direction, data in runs]


def format_transcript(runs: list[tuple[str, bytes]], header: str, width: int = 32) -> str:
    """The text form of `runs` (used once to record a fixture; the tests then compare against the file)."""
    lines = [f"# {h}" if h else "#" for h in header.splitlines()]
    for direction, data in runs:
        chunks = [data[i : i + width] for i in range(0, len(data), width)] or [b""]
        lines.append(f"{direction} {chunks[0].hex(' ').upper()}")
        lines.extend(f"  {chunk.hex(' ').upper()}" for chunk in chunks[1:])
    return "\n".join(lines) + "\n"


class ScriptedLink:
    """A ByteLink whose replies come from a function of the bytes written: a fake through the Protocol seam."""

    def __init__(self, reply: Callable[[bytes], bytes], port: str = "scripted") -> None:
        self._reply = reply
        self._port = port
        self._incoming: deque[int] = deque()
        self.written: list[bytes] = []

    @property
    def port(self) -> str:
        return self._port

    def open(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self._incoming.extend(self._reply(data))

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        if not self._incoming:
            time.sleep(min(timeout_s, 0.01))  # nothing scripted: behave like a quiet line, without spinning
        out = bytearray()
        while self._incoming and len(out) < max_bytes:
            out.append(self._incoming.popleft())
        return bytes(out)

    def discard_input(self) -> None:
        self._incoming.clear()

    def close(self) -> None:
        pass
