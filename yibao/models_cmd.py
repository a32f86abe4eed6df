"""`yibao models build` and `yibao models check`: the install-time build of converted models and a load check.

Owns the loop over manifests and the JSON lines the commands print; the work itself is models.dlib_convert
(building) and models.manifest (loading). Must never download anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from models.dlib_convert import BuildResult, ConversionError, build_dlib_resnet
from models.manifest import ModelLoadError, ModelManifest, ModelStore

logger = logging.getLogger(__name__)

# Builders by the manifest's `source.built_by`; a built manifest with no builder here is an error.
BUILDERS: dict[str, Callable[[ModelManifest, Path], BuildResult]] = {"models.dlib_convert": build_dlib_resnet}


class ModelsCommandError(Exception):
    """A model could not be built (the message names it and why)."""


def build_models(store: ModelStore) -> Iterator[dict[str, Any]]:
    """Build every `built:` model of the store into its models dir; one record per model.

    Raises ModelsCommandError on the first failure (the file is not written: see build_dlib_resnet).
    """
    for name in store.names():
        manifest = store.manifest(name)
        if not manifest.file.startswith("built:"):
            continue
        builder = BUILDERS.get(manifest.source.built_by or "")
        if builder is None:
            raise ModelsCommandError(f"model {name}: no builder for built_by={manifest.source.built_by!r}")
        try:
            result = builder(manifest, store.models_dir)
        except (ConversionError, ModelLoadError) as exc:
            raise ModelsCommandError(f"model {name}: build failed: {exc}") from exc
        yield {"name": name, "path": str(result.path), "sha256": result.sha256[:16], "skipped": result.skipped}


def check_models(store: ModelStore) -> Iterator[dict[str, Any]]:
    """Load (with warm-up) every model the store knows; one record per model, `ok` false with the error on failure."""
    for name in store.names():
        manifest = store.manifest(name)
        record: dict[str, Any] = {"name": name, "sha256": manifest.sha256[:16], "licence": manifest.licence}
        try:
            model = store.load(name)
        except ModelLoadError as exc:
            record.update(ok=False, error=type(exc).__name__, message=str(exc))
        else:
            record.update(ok=True, load_ms=round(model.load_ms, 1))
        yield record
