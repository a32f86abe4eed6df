"""`yibao bench crypto` keeps running and keeps its JSON shape (the figures themselves live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_crypto_prints_one_json_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "yibao", "bench", "crypto", "--seconds", "0.05"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    figures = json.loads(line)
    for name in (
        "sm2_keygen_per_s",
        "sm2_sign_per_s",
        "sm2_verify_per_s",
        "key_agreement_per_s",
        "sm3_mb_s_64k",
        "hmac_sm3_mb_s_64k",
        "sm4_gcm_seal_mb_s_1k",
        "sm4_gcm_open_mb_s_64k",
        "audit_append_fsync_per_s",
        "pure_gmssl_sm2_sign_per_s",
        "pure_gmssl_sm2_verify_per_s",
    ):
        assert figures[name] > 0, name
