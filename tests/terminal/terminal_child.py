"""Runs a whole terminal (simulated peripherals) in its own process, for tests that SIGKILL or SIGTERM it.

python -m tests.terminal.terminal_child <terminal.toml> [<emit_records>]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hardware_sim import simulated_peripherals
from terminal.config import load_terminal_config
from terminal.runtime import run_terminal


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    config = load_terminal_config(Path(argv[0]))
    run_terminal(config, simulated_peripherals(), emit_records=int(argv[1]) if len(argv) > 1 else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
