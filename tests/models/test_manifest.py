"""The manifest loader: shipped manifests load and warm up; every way a model can disagree is a typed error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models.manifest import (
    ManifestError,
    ModelHashMismatchError,
    ModelLoadError,
    ModelMissingError,
    ModelRuntimeError,
    ModelSpecMismatchError,
    ModelStore,
    load_model,
    parse_manifest,
)


def _tiny_graph(path: Path, *, input_name: str = "pixels", width: int = 4) -> str:
    """A (N, 3, 4, W) → (N, 3) global-average-pool model; returns its sha256."""
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, 4, width])
    y = helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["N", 3])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    node = helper.make_node("ReduceMean", [input_name, "axes"], ["mean"], keepdims=0)
    graph = helper.make_graph([node], "tiny", [x], [y], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="test")
    model.ir_version = 8
    data = model.SerializeToString()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _manifest_toml(sha256: str, *, name: str = "tiny", input_name: str = "pixels", width: int = 4) -> str:
    return f"""
schema_version = 1
name = "{name}"
role = "other"
description = "test model"
file = "operator:tiny.onnx"
sha256 = "{sha256}"
licence = "CC0-1.0"

[source]
notes = "built by the test"

[input]
name = "{input_name}"
shape = [-1, 3, 4, {width}]
dtype = "float32"
layout = "NCHW"
channel_order = "RGB"
warmup_shape = [2, 3, 4, {width}]

[normalisation]
kind = "mean_scale"
mean = [10.0, 20.0, 30.0]
scale = [0.5, 0.5, 0.5]

[[outputs]]
name = "mean"
shape = [-1, 3]
"""


@pytest.fixture
def operator_dir(tmp_path: Path) -> Path:
    d = tmp_path / "operator"
    d.mkdir()
    return d


def test_operator_model_loads_warms_up_and_preprocesses(operator_dir: Path, tmp_path: Path) -> None:
    sha = _tiny_graph(operator_dir / "tiny.onnx")
    (operator_dir / "tiny.toml").write_text(_manifest_toml(sha))
    store = ModelStore(tmp_path / "models", operator_dir)
    assert "tiny" in store.names()
    assert {"mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"} <= set(store.names())
    model = store.load("tiny")
    assert store.load("tiny") is model
    pixels = np.full((1, 4, 4, 3), [12, 24, 36], dtype=np.uint8)
    (out,) = model.run(model.preprocess(pixels))
    np.testing.assert_allclose(out, [[1.0, 2.0, 3.0]])


def test_shipped_mtcnn_manifests_load() -> None:
    store = ModelStore(operator_dir=None)
    pnet = store.load("mtcnn_pnet")
    x = pnet.preprocess(np.zeros((1, 30, 20, 3), dtype=np.uint8))
    assert x.shape == (1, 20, 30, 3)  # NWHC
    assert float(x.max()) == pytest.approx(-0.99609375)
    boxes, scores = pnet.run(x)
    assert boxes.shape[-1] == 4
    assert scores.shape[-1] == 2


def test_missing_file(operator_dir: Path, tmp_path: Path) -> None:
    manifest = parse_manifest(_manifest_toml("0" * 64))
    with pytest.raises(ModelMissingError):
        load_model(manifest, tmp_path, operator_dir=operator_dir)


def test_missing_built_file_names_the_build_command(tmp_path: Path) -> None:
    manifest = parse_manifest(_manifest_toml("0" * 64).replace("operator:tiny.onnx", "built:tiny.onnx"))
    with pytest.raises(ModelMissingError, match="yibao models build"):
        load_model(manifest, tmp_path)


def test_missing_package(tmp_path: Path) -> None:
    manifest = parse_manifest(_manifest_toml("0" * 64).replace("operator:tiny.onnx", "package:no_such_pkg_x/a.onnx"))
    with pytest.raises(ModelMissingError, match="not installed"):
        load_model(manifest, tmp_path)


def test_wrong_hash(operator_dir: Path, tmp_path: Path) -> None:
    sha = _tiny_graph(operator_dir / "tiny.onnx")
    wrong = ("f" if sha[0] != "f" else "e") + sha[1:]
    with pytest.raises(ModelHashMismatchError):
        load_model(parse_manifest(_manifest_toml(wrong)), tmp_path, operator_dir=operator_dir)


@pytest.mark.parametrize(
    ("toml_kwargs", "match"),
    [
        ({"input_name": "image"}, "input is named"),
        ({"width": 5}, "input shape"),
    ],
)
def test_spec_mismatch(operator_dir: Path, tmp_path: Path, toml_kwargs: dict[str, object], match: str) -> None:
    sha = _tiny_graph(operator_dir / "tiny.onnx")
    manifest = parse_manifest(_manifest_toml(sha, **toml_kwargs))  # type: ignore[arg-type]  # test table
    with pytest.raises(ModelSpecMismatchError, match=match):
        load_model(manifest, tmp_path, operator_dir=operator_dir)


def test_spec_mismatch_output_and_dtype(operator_dir: Path, tmp_path: Path) -> None:
    sha = _tiny_graph(operator_dir / "tiny.onnx")
    text = _manifest_toml(sha)
    with pytest.raises(ModelSpecMismatchError, match="outputs"):
        load_model(parse_manifest(text.replace('name = "mean"', 'name = "avg"')), tmp_path, operator_dir=operator_dir)
    with pytest.raises(ModelSpecMismatchError, match="dtype"):
        load_model(
            parse_manifest(text.replace("shape = [-1, 3]\n", 'shape = [-1, 3]\ndtype = "float16"\n')),
            tmp_path,
            operator_dir=operator_dir,
        )
    with pytest.raises(ModelSpecMismatchError, match="shape"):
        load_model(
            parse_manifest(text.replace("shape = [-1, 3]\n", "shape = [2, 3]\n")), tmp_path, operator_dir=operator_dir
        )


def test_not_an_onnx_file_is_a_runtime_error(operator_dir: Path, tmp_path: Path) -> None:
    data = b"this is not a protobuf"
    (operator_dir / "tiny.onnx").write_bytes(data)
    manifest = parse_manifest(_manifest_toml(hashlib.sha256(data).hexdigest()))
    with pytest.raises(ModelRuntimeError):
        load_model(manifest, tmp_path, operator_dir=operator_dir)


def test_all_errors_are_model_load_errors() -> None:
    for cls in (ManifestError, ModelMissingError, ModelHashMismatchError, ModelSpecMismatchError, ModelRuntimeError):
        assert issubclass(cls, ModelLoadError)


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ('licence = "CC0-1.0"', 'licence = "CC0-1.0"\nlicense = "typo"', "Extra inputs"),
        ("schema_version = 1", "schema_version = 99", "unsupported schema_version"),
        ("warmup_shape = [2, 3, 4, 4]\n", "", "warmup_shape is required"),
        ("warmup_shape = [2, 3, 4, 4]", "warmup_shape = [2, 3, 5, 4]", "disagrees"),
        ('kind = "mean_scale"', 'kind = "zscore"', "normalisation"),
        ('file = "operator:tiny.onnx"', 'file = "http://example.com/x.onnx"', "file"),
        ("[source]\n", "[source]\nversion = '1'\n", "where the model comes from"),
        ('sha256 = "', 'sha256 = "XYZ', "sha256"),
    ],
)
def test_invalid_manifests_fail_closed(old: str, new: str, match: str) -> None:
    text = _manifest_toml("a" * 64)
    bad = text.replace(old, new)
    assert bad != text
    bad = bad.replace('notes = "built by the test"\n', "") if "comes from" in match else bad
    with pytest.raises(ManifestError, match=match):
        parse_manifest(bad)


def test_not_toml() -> None:
    with pytest.raises(ManifestError, match="TOML"):
        parse_manifest("name = ")


def test_operator_cannot_shadow_a_shipped_model(operator_dir: Path, tmp_path: Path) -> None:
    sha = _tiny_graph(operator_dir / "tiny.onnx")
    (operator_dir / "x.toml").write_text(_manifest_toml(sha, name="mtcnn_pnet"))
    with pytest.raises(ManifestError, match="clashes"):
        ModelStore(tmp_path, operator_dir)


def test_duplicate_names_and_unknown_names(operator_dir: Path, tmp_path: Path) -> None:
    sha = _tiny_graph(operator_dir / "tiny.onnx")
    (operator_dir / "a.toml").write_text(_manifest_toml(sha))
    store = ModelStore(tmp_path, operator_dir)
    with pytest.raises(ManifestError, match="no manifest"):
        store.load("arcface")
    (operator_dir / "b.toml").write_text(_manifest_toml(sha))
    with pytest.raises(ManifestError, match="twice"):
        ModelStore(tmp_path, operator_dir)


def test_missing_operator_dir(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        ModelStore(tmp_path, tmp_path / "nope")


def test_graph_helper_is_valid_onnx(tmp_path: Path) -> None:
    _tiny_graph(tmp_path / "t.onnx")
    onnx.checker.check_model(str(tmp_path / "t.onnx"))
