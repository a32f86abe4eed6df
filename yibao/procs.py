"""Child processes that cannot outlive their parent.

The demo and the benchmarks start Mosquitto, the server and terminals as children. Each child is put in its own
session (so a Ctrl-C reaches only the orchestrator, which then stops children in a deliberate order) and is told by
the kernel to die if the orchestrator dies (PR_SET_PDEATHSIG), so nothing is ever left running.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child between fork and exec: ask the kernel to SIGTERM us when the parent dies (Linux).

    The kernel watches the *thread* that forked us: start long-lived children from a thread that lives as long
    as they should (the main thread, in every caller today)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session, bound to our lifetime; output goes to `log_path` (or is discarded)."""
    out = log_path.open("ab") if log_path is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,  # prctl must run in the child
        )
    finally:
        if log_path is not None and not isinstance(out, int):
            out.close()


def yibao_argv(*args: str) -> list[str]:
    """The command line that runs a `yibao` sub-command with this interpreter."""
    return [sys.executable, "-m", "yibao", *args]


def stop(proc: subprocess.Popen[bytes], *, name: str, timeout_s: float = 15.0) -> int | None:
    """SIGTERM, wait, then SIGKILL; returns the exit code (None if it had to be killed)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop within %.0f s; killing it", name, timeout_s)
        proc.kill()
        proc.wait()
        return None


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); look at its state.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
