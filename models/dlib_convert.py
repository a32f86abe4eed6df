"""Reproducible conversion of dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) to ONNX.

Owns: a pure-Python/numpy reader for the subset of dlib's binary serialization that this network uses, a check
that the file holds exactly the network of dlib's `dnn_face_recognition_ex.cpp` (every hyper-parameter and every
tensor size), and a deterministic ONNX graph builder (fixed opset, fixed names, no timestamps: same bytes on every
run, so the output's sha256 can live in the manifest). `build_dlib_resnet` is the install-time step behind
`yibao models build`.

Must never import dlib (it is a dev dependency, used only by the tests that compare against it), never download
anything, and never emit a model from a file it did not fully understand: any surprise is a `ConversionError`.

dlib's format, as read here (verified byte by byte against the shipped file):

* integer: one control byte (number of magnitude bytes, | 0x80 when negative), then the magnitude little-endian;
* bool: the character '0' or '1'; string: integer length, then the bytes;
* float/double (scalars): `float_details`, i.e. mantissa and exponent as two integers, value = m * 2**e;
* tensor: version 2, then num_samples, k, nr, nc, then the values as raw little-endian float32;
  alias_tensor: version 1, then the four dims (no data);
* `add_loss_layer`: version 1, loss details, the subnet; `add_layer`: version 2, the subnet, the layer details,
  3 bools and 3 (empty) tensors; the innermost `add_layer` over the input layer has version 3 and serializes the
  input layer first and ends with the sample expansion factor (1); `add_tag_layer`/`add_skip_layer`:
  version 1, the subnet (their ids are compile-time only, so they are matched against the known architecture).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from models.manifest import MeanScaleNormalisation, ModelManifest, package_dir, sha256_file

logger = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8
PRODUCER = "yibao.models.dlib_convert"
PRODUCER_VERSION = "1"  # bump when the emitted graph changes (the manifest's sha256 changes with it)
INPUT_NAME = "image"
OUTPUT_NAME = "descriptor"
CHIP_SIZE = 150

F32 = NDArray[np.float32]


class ConversionError(Exception):
    """The .dat file is not the expected dlib network, is damaged, or the build output is not the manifest's."""


# ---------------------------------------------------------------- dlib's serialization


class _Reader:
    """Sequential reader over the whole file; every read checks bounds and raises ConversionError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ConversionError(f"truncated file: {what} needs {n} bytes at offset {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int_(self, what: str = "integer") -> int:
        control = self._take(1, what)[0]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise ConversionError(f"bad integer control byte 0x{control:02x} for {what} at offset {self.pos - 1}")
        value = int.from_bytes(self._take(size, what), "little")
        return -value if control & 0x80 else value

    def bool_(self, what: str) -> bool:
        char = self._take(1, what)
        if char not in (b"0", b"1"):
            raise ConversionError(f"bad bool {char!r} for {what} at offset {self.pos - 1}")
        return char == b"1"

    def float_(self, what: str) -> float:
        mantissa = self.int_(what)
        exponent = self.int_(what)
        specials = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        if exponent in specials:
            return specials[exponent]
        try:
            return math.ldexp(mantissa, exponent)
        except OverflowError as exc:
            raise ConversionError(f"float out of range for {what} at offset {self.pos}") from exc

    def string(self, what: str) -> str:
        length = self.int_(what)
        if not 0 <= length <= 256:
            raise ConversionError(f"implausible string length {length} for {what} at offset {self.pos}")
        try:
            return self._take(length, what).decode("ascii")
        except UnicodeDecodeError as exc:
            raise ConversionError(f"non-ASCII {what} at offset {self.pos}") from exc

    def _dims(self, what: str) -> tuple[int, int, int, int]:
        n, k, nr, nc = (self.int_(what) for _ in range(4))
        if min(n, k, nr, nc) < 0 or max(n, k, nr, nc) > len(self.data):
            raise ConversionError(f"implausible dims {(n, k, nr, nc)} for {what}")
        return n, k, nr, nc

    def tensor(self, what: str) -> F32:
        version = self.int_(what)
        if version != 2:
            raise ConversionError(f"{what}: tensor version {version}, expected 2 (offset {self.pos})")
        dims = self._dims(what)
        count = dims[0] * dims[1] * dims[2] * dims[3]
        if count * 4 > len(self.data) - self.pos:  # checked before allocating: a flipped size must not OOM us
            raise ConversionError(f"{what}: tensor of {dims} runs past the end of the file")
        values = np.frombuffer(self._take(count * 4, what), dtype="<f4").astype(np.float32).reshape(dims)
        if not np.all(np.isfinite(values)):
            raise ConversionError(f"{what}: tensor holds non-finite values")
        return values

    def alias(self, what: str) -> tuple[int, int, int, int]:
        version = self.int_(what)
        if version != 1:
            raise ConversionError(f"{what}: alias_tensor version {version}, expected 1")
        return self._dims(what)


@dataclass(frozen=True, slots=True)
class Con:
    filters: F32  # (num_filters, k, nr, nc): dlib's layout is ONNX's OIHW; dlib convolves as cross-correlation
    biases: F32  # (num_filters,)
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Affine:
    gamma: F32  # (k,)
    beta: F32  # (k,)


@dataclass(frozen=True, slots=True)
class Pool:
    kind: str  # "max" | "avg"
    window: tuple[int, int]  # (0, 0) = the whole plane (avg_pool_everything)
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Relu:
    pass


@dataclass(frozen=True, slots=True)
class AddPrev:
    pass


@dataclass(frozen=True, slots=True)
class Wrapper:
    """An add_tag_layer or add_skip_layer: nothing but a version in the file."""


@dataclass(frozen=True, slots=True)
class Fc:
    weights: F32  # (num_inputs, num_outputs): output = x @ weights


Layer = Con | Affine | Pool | Relu | AddPrev | Wrapper | Fc


@dataclass(frozen=True, slots=True)
class DlibNet:
    """What the file holds: input means, the layers innermost (input side) first, the loss parameters."""

    means_rgb: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: tuple[Layer, ...]
    loss_margin: float
    loss_distance_threshold: float


def _layer_details(r: _Reader, index: int) -> Layer:
    name = r.string(f"layer {index} name")
    where = f"layer {index} ({name})"
    if name == "con_4":
        params = r.tensor(f"{where} params").reshape(-1)
        num_filters, nr, nc = r.int_(where), r.int_(where), r.int_(where)
        stride = (r.int_(where), r.int_(where))
        padding = (r.int_(where), r.int_(where))
        f_dims = r.alias(f"{where} filters")
        b_dims = r.alias(f"{where} biases")
        for _ in range(4):  # learning-rate and weight-decay multipliers: training only
            r.float_(where)
        n_filter_values = f_dims[0] * f_dims[1] * f_dims[2] * f_dims[3]
        if (
            f_dims[0] != num_filters
            or f_dims[2:] != (nr, nc)
            or b_dims != (1, num_filters, 1, 1)
            or params.size != n_filter_values + num_filters
            or min(stride) < 1
            or min(padding) < 0
        ):
            raise ConversionError(f"{where}: inconsistent sizes {params.size} {f_dims} {b_dims} {num_filters}")
        filters = params[:n_filter_values].reshape(f_dims)
        return Con(filters, params[n_filter_values:].copy(), stride, padding)
    if name == "affine_":
        params = r.tensor(f"{where} params").reshape(-1)
        g_dims = r.alias(f"{where} gamma")
        b_dims = r.alias(f"{where} beta")
        mode = r.int_(where)
        k = g_dims[1]
        if mode != 0 or g_dims != (1, k, 1, 1) or b_dims != g_dims or params.size != 2 * k:
            raise ConversionError(f"{where}: not a conv-mode affine of matching size ({mode}, {g_dims}, {b_dims})")
        return Affine(params[:k].copy(), params[k:].copy())
    if name in ("max_pool_2", "avg_pool_2"):
        nr, nc, sy, sx, py, px = (r.int_(where) for _ in range(6))
        if min(sy, sx) < 1 or min(nr, nc, py, px) < 0:
            raise ConversionError(f"{where}: bad pooling parameters")
        return Pool(name[:3], (nr, nc), (sy, sx), (py, px))
    if name == "relu_":
        return Relu()
    if name == "add_prev_":
        return AddPrev()
    if name == "fc_2":
        num_outputs, num_inputs = r.int_(where), r.int_(where)
        params = r.tensor(f"{where} params").reshape(-1)
        w_dims = r.alias(f"{where} weights")
        b_dims = r.alias(f"{where} biases")
        bias_mode = r.int_(where)
        for _ in range(4):
            r.float_(where)
        if (
            bias_mode != 1  # FC_NO_BIAS: the network is fc_no_bias
            or w_dims != (num_inputs, num_outputs, 1, 1)
            or b_dims != (0, 0, 0, 0)
            or params.size != num_inputs * num_outputs
        ):
            raise ConversionError(f"{where}: not an fc_no_bias of matching size")
        return Fc(params.reshape(num_inputs, num_outputs))
    raise ConversionError(f"{where}: unknown layer type")


def _layer_trailer(r: _Reader, where: str) -> None:
    # this_layer_setup_called, gradient_input_is_stale, get_output_and_gradient_input_disabled; then x_grad,
    # cached_output and params_grad (or grad_final): training state, must be empty in a shipped model.
    for flag in range(3):
        r.bool_(f"{where} flag {flag}")
    for tensor in range(3):
        if r.tensor(f"{where} state tensor {tensor}").size:
            raise ConversionError(f"{where}: unexpected saved training state")


def read_dlib_net(data: bytes) -> DlibNet:
    """Parse the whole file; the last byte must end the network."""
    r = _Reader(data)
    if r.int_("loss version") != 1:
        raise ConversionError("not a dlib network: add_loss_layer version is not 1")
    loss = r.string("loss name")
    if loss != "loss_metric_2":
        raise ConversionError(f"loss layer is {loss!r}, expected loss_metric_2")
    margin = r.float_("loss margin")
    threshold = r.float_("loss distance threshold")
    wrappers: list[int] = []
    while True:
        version = r.int_("layer version")
        if version == 3:
            break
        if version not in (1, 2):
            raise ConversionError(f"unexpected layer version {version} at offset {r.pos}")
        if len(wrappers) > 1000:
            raise ConversionError("too many nested layers")
        wrappers.append(version)
    if r.string("input layer") != "input_rgb_image_sized":
        raise ConversionError("input layer is not input_rgb_image_sized")
    means = (r.float_("avg red"), r.float_("avg green"), r.float_("avg blue"))
    input_size = (r.int_("input rows"), r.int_("input cols"))
    layers: list[Layer] = [_layer_details(r, 0)]
    _layer_trailer(r, "layer 0")
    if r.int_("sample expansion factor") != 1:  # version 3 of the input-side add_layer ends with it
        raise ConversionError("sample expansion factor is not 1")
    for version in reversed(wrappers):
        if version == 1:
            layers.append(Wrapper())
            continue
        layers.append(_layer_details(r, len(layers)))
        _layer_trailer(r, f"layer {len(layers) - 1}")
    if r.pos != len(data):
        raise ConversionError(f"{len(data) - r.pos} unexpected bytes after the network")
    if not all(math.isfinite(m) for m in means):
        raise ConversionError("input means are not finite")
    return DlibNet(means, input_size, tuple(layers), margin, threshold)


# ---------------------------------------------------------------- the known architecture

# Tokens of dnn_face_recognition_ex.cpp's `anet_type`, input side first:
#   ("con", filters, window, stride) ("affine",) ("relu",) ("max_pool", window, stride) ("avg_pool", window, stride)
#   ("tag", id) ("skip", id) ("add_prev", id) ("pool_all",) ("fc", outputs)
Token = tuple[str | int, ...]


def _block(n: int, stride: int) -> list[Token]:
    # block<N,BN,stride,SUBNET> = BN<con<N,3,3,1,1, relu<BN<con<N,3,3,stride,stride, SUBNET>>>>>
    return [("con", n, 3, stride), ("affine",), ("relu",), ("con", n, 3, 1), ("affine",)]


def _ares(n: int) -> list[Token]:
    # relu<add_prev1<block<N,affine,1,tag1<SUBNET>>>>
    return [("tag", 1), *_block(n, 1), ("add_prev", 1), ("relu",)]


def _ares_down(n: int) -> list[Token]:
    # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,affine,2,tag1<SUBNET>>>>>>>>
    return [("tag", 1), *_block(n, 2), ("tag", 2), ("skip", 1), ("avg_pool", 2, 2), ("add_prev", 2), ("relu",)]


def architecture() -> list[Token]:
    tokens: list[Token] = [("con", 32, 7, 2), ("affine",), ("relu",), ("max_pool", 3, 2)]
    tokens += _ares(32) * 3  # alevel4
    tokens += _ares_down(64) + _ares(64) * 3  # alevel3
    tokens += _ares_down(128) + _ares(128) * 2  # alevel2
    tokens += _ares_down(256) + _ares(256) * 2  # alevel1
    tokens += _ares_down(256)  # alevel0
    tokens += [("pool_all",), ("fc", 128)]
    return tokens


def _default_padding(window: int, stride: int) -> int:
    # dlib's default for con_ and the pools: no padding when striding, else "same" padding
    return 0 if stride != 1 else window // 2


def _matches(token: Token, layer: Layer) -> bool:
    kind = token[0]
    if kind in ("tag", "skip"):
        return isinstance(layer, Wrapper)
    if kind == "con":
        _, n, window, stride = token
        pad = _default_padding(int(window), int(stride))
        return (
            isinstance(layer, Con)
            and layer.filters.shape[0] == n
            and layer.filters.shape[2:] == (window, window)
            and layer.stride == (stride, stride)
            and layer.padding == (pad, pad)
        )
    if kind in ("max_pool", "avg_pool"):
        _, window, stride = token
        pad = _default_padding(int(window), int(stride))
        return (
            isinstance(layer, Pool)
            and layer.kind == str(kind)[:3]
            and layer.window == (window, window)
            and layer.stride == (stride, stride)
            and layer.padding == (pad, pad)
        )
    if kind == "pool_all":
        return (
            isinstance(layer, Pool)
            and layer.kind == "avg"
            and layer.window == (0, 0)
            and layer.stride == (1, 1)
            and layer.padding == (0, 0)
        )
    if kind == "fc":
        return isinstance(layer, Fc) and layer.weights.shape[1] == token[1]
    return {"affine": Affine, "relu": Relu, "add_prev": AddPrev}[str(kind)] is type(layer)


# ---------------------------------------------------------------- ONNX graph


def _out_size(size: int, window: int, stride: int, pad: int) -> int:
    # dlib's (and ONNX's floor-mode) output size for convolutions and pools
    return 1 + (size + 2 * pad - window) // stride


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, prefix: str, array: NDArray[np.float32] | NDArray[np.int64]) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str, **attrs: Any) -> str:
        out = self.name(prefix)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def build_onnx(net: DlibNet) -> onnx.ModelProto:
    """The dlib network as an ONNX graph: NCHW float32 normalised RGB (N, 3, 150, 150) → (N, 128) descriptors.

    Every conv is followed by an affine (frozen batch-norm) in this network; they are folded into one Conv.
    """
    expected = architecture()
    if len(expected) != len(net.layers):
        raise ConversionError(f"the file has {len(net.layers)} layers, the dlib face ResNet has {len(expected)}")
    for i, (token, layer) in enumerate(zip(expected, net.layers, strict=True)):
        if not _matches(token, layer):
            raise ConversionError(f"layer {i}: expected {token}, found {type(layer).__name__}")
    if net.input_size != (CHIP_SIZE, CHIP_SIZE):
        raise ConversionError(f"input size {net.input_size}, expected {CHIP_SIZE}x{CHIP_SIZE}")

    g = _GraphBuilder()
    cur, shape = INPUT_NAME, (3, CHIP_SIZE, CHIP_SIZE)  # (channels, rows, cols)
    tags: dict[int, tuple[str, tuple[int, int, int]]] = {}
    pending: Con | None = None
    for token, layer in zip(expected, net.layers, strict=True):
        kind = token[0]
        if isinstance(layer, Con):
            if layer.filters.shape[1] != shape[0]:
                raise ConversionError(f"conv expects {layer.filters.shape[1]} input channels, gets {shape[0]}")
            pending = layer
            continue
        if isinstance(layer, Affine):
            if pending is None or layer.gamma.size != pending.filters.shape[0]:
                raise ConversionError("affine layer does not follow a convolution of the same width")
            gamma = layer.gamma.astype(np.float64)
            w = _to_f32(pending.filters.astype(np.float64) * gamma[:, None, None, None])
            b = _to_f32(pending.biases.astype(np.float64) * gamma + layer.beta.astype(np.float64))
            window = pending.filters.shape[2]
            (sy, sx), (py, px) = pending.stride, pending.padding
            cur = g.node(
                "Conv",
                [cur, g.const("w", w), g.const("b", b)],
                "conv",
                kernel_shape=[window, window],
                strides=[sy, sx],
                pads=[py, px, py, px],
            )
            shape = (w.shape[0], _out_size(shape[1], window, sy, py), _out_size(shape[2], window, sx, px))
            pending = None
            continue
        if pending is not None:
            raise ConversionError("a convolution without its affine layer")
        if kind == "tag":
            tags[int(token[1])] = (cur, shape)
        elif kind == "skip":
            cur, shape = tags[int(token[1])]
        elif kind == "add_prev":
            other, other_shape = tags[int(token[1])]
            target = tuple(max(a, b) for a, b in zip(shape, other_shape, strict=True))
            cur = g.node("Add", [_pad_to(g, cur, shape, target), _pad_to(g, other, other_shape, target)], "add")
            shape = (target[0], target[1], target[2])
        elif isinstance(layer, Relu):
            cur = g.node("Relu", [cur], "relu")
        elif isinstance(layer, Pool) and kind == "pool_all":
            cur = g.node("GlobalAveragePool", [cur], "pool_all")
            cur = g.node("Flatten", [cur], "flatten", axis=1)
            shape = (shape[0], 1, 1)
        elif isinstance(layer, Pool):
            (wy, wx), (sy, sx), (py, px) = layer.window, layer.stride, layer.padding
            op = "MaxPool" if layer.kind == "max" else "AveragePool"
            cur = g.node(
                op, [cur], f"{layer.kind}_pool", kernel_shape=[wy, wx], strides=[sy, sx], pads=[py, px, py, px]
            )
            shape = (shape[0], _out_size(shape[1], wy, sy, py), _out_size(shape[2], wx, sx, px))
        elif isinstance(layer, Fc):
            if layer.weights.shape[0] != shape[0] * shape[1] * shape[2]:
                raise ConversionError(f"fc expects {layer.weights.shape[0]} inputs, gets {shape}")
            g.nodes.append(helper.make_node("MatMul", [cur, g.const("fc", layer.weights)], [OUTPUT_NAME], name="fc"))
        else:
            raise ConversionError(f"no ONNX mapping for {token}")

    graph = helper.make_graph(
        g.nodes,
        "dlib_face_recognition_resnet_model_v1",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, CHIP_SIZE, CHIP_SIZE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 128])],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version=PRODUCER_VERSION,
    )
    model.ir_version = IR_VERSION
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"the emitted graph is not valid ONNX: {exc}") from exc
    return model


def _to_f32(values: NDArray[np.float64]) -> F32:
    if not np.all(np.abs(values) <= np.finfo(np.float32).max):
        raise ConversionError("folding an affine layer into its convolution overflows float32")
    return values.astype(np.float32)


def _pad_to(g: _GraphBuilder, x: str, shape: tuple[int, int, int], target: tuple[int, ...]) -> str:
    # dlib's add_prev adds tensors of different sizes as if the smaller were zero-extended at the far end
    if shape == tuple(target):
        return x
    pads = np.array([0, 0, 0, 0, 0, *(t - s for s, t in zip(shape, target, strict=True))], dtype=np.int64)
    return g.node("Pad", [x, g.const("pads", pads)], "pad", mode="constant")


# ---------------------------------------------------------------- the build step


@dataclass(frozen=True, slots=True)
class ConvertedModel:
    onnx_bytes: bytes
    sha256: str
    means_rgb: tuple[float, float, float]


def convert(dat: bytes) -> ConvertedModel:
    """dlib .dat bytes → deterministic ONNX bytes (raises ConversionError on anything unexpected)."""
    net = read_dlib_net(dat)
    data = build_onnx(net).SerializeToString(deterministic=True)
    return ConvertedModel(data, hashlib.sha256(data).hexdigest(), net.means_rgb)


def source_path(manifest: ModelManifest) -> Path:
    """The installed .dat the manifest's `source.built_from` names (`<module>/<path>`), located without import."""
    built_from = manifest.source.built_from
    if built_from is None:
        raise ConversionError(f"model {manifest.name}: the manifest names no source file to build from")
    module, _, relative = built_from.partition("/")
    return package_dir(module) / relative


@dataclass(frozen=True, slots=True)
class BuildResult:
    path: Path
    sha256: str
    skipped: bool  # the output already existed with the manifest's sha256


def build_dlib_resnet(manifest: ModelManifest, models_dir: Path) -> BuildResult:
    """Write the manifest's `built:` file into `models_dir` unless it is already there with the right sha256.

    Checks the source file's sha256 and the input means against the manifest, and the output's sha256 against
    the manifest before the file appears (written atomically); any mismatch is a ConversionError and no file.
    """
    if not manifest.file.startswith("built:"):
        raise ConversionError(f"model {manifest.name} is not a built model")
    out = models_dir / manifest.file.removeprefix("built:")
    if out.is_file() and sha256_file(out) == manifest.sha256:
        return BuildResult(out, manifest.sha256, skipped=True)
    src = source_path(manifest)
    try:
        dat = src.read_bytes()
    except OSError as exc:
        raise ConversionError(f"cannot read {src}: {exc}") from exc
    if hashlib.sha256(dat).hexdigest() != manifest.source.built_from_sha256:
        raise ConversionError(f"{src} is not the file the manifest was built from (sha256 differs)")
    converted = convert(dat)
    norm = manifest.normalisation
    if not isinstance(norm, MeanScaleNormalisation) or [np.float32(m) for m in norm.mean] != [
        np.float32(m) for m in converted.means_rgb
    ]:
        raise ConversionError(f"manifest normalisation disagrees with the file's input means {converted.means_rgb}")
    if converted.sha256 != manifest.sha256:
        raise ConversionError(
            f"built {manifest.name} has sha256 {converted.sha256}, the manifest says {manifest.sha256}: "
            "the converter or its dependencies changed; review and update the manifest"
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=models_dir, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(converted.onnx_bytes)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("built %s (%d bytes)", out, len(converted.onnx_bytes))
    return BuildResult(out, converted.sha256, skipped=False)
