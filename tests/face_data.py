"""Where tests find real face photos: `YIBAO_FACES_DIR`, else the committed copy in tests/fixtures/faces.

A missing folder is a test FAILURE with a clear message (never a skip): face tests that silently skip prove nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURE_FACES = Path(__file__).resolve().parent / "fixtures" / "faces"


def faces_dir() -> Path:
    root = Path(os.environ.get("YIBAO_FACES_DIR", str(FIXTURE_FACES)))
    if not (root / "obama").is_dir():
        pytest.fail(f"face photos not found at {root} (set YIBAO_FACES_DIR)", pytrace=False)
    return root


def person_photos(root: Path | None = None) -> dict[str, list[Path]]:
    """Photos by person folder (group/ and video/ excluded), each list sorted."""
    base = root or faces_dir()
    return {
        d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        for d in sorted(base.iterdir())
        if d.is_dir() and d.name not in {"group", "video"}
    }
