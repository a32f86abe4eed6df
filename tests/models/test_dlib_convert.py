"""The dlib ResNet → ONNX build: reproducible bytes, dlib's own descriptors within tolerance, damage refused.

Tolerance (stated in docs/models.md): per descriptor, max |onnx - dlib| <= 1e-4 and cosine >= 0.99999 against
`dlib.face_recognition_model_v1.compute_face_descriptor(chip)` on real 150x150 chips (measured: ~4e-7).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from typer.testing import CliRunner

from models.dlib_convert import (
    ConversionError,
    build_dlib_resnet,
    build_onnx,
    convert,
    read_dlib_net,
    source_path,
)
from models.embedder import DlibResnetEmbedder
from models.manifest import MeanScaleNormalisation, ModelStore, sha256_file
from tests.models.conftest import dlib_module, frm_module
from yibao.cli import app

MAX_ABS_DIFF = 1e-4
MIN_COSINE = 0.99999


@pytest.fixture(scope="module")
def dat() -> bytes:
    return Path(frm_module().face_recognition_model_location()).read_bytes()


def test_manifest_names_the_installed_file_and_its_means(dat: bytes) -> None:
    manifest = ModelStore().manifest("dlib_resnet_v1")
    assert source_path(manifest) == Path(frm_module().face_recognition_model_location())
    assert hashlib.sha256(dat).hexdigest() == manifest.source.built_from_sha256
    net = read_dlib_net(dat)
    assert isinstance(manifest.normalisation, MeanScaleNormalisation)
    assert manifest.normalisation.mean == list(net.means_rgb)
    assert manifest.normalisation.scale == [1 / 256] * 3  # dlib's input_rgb_image: (pixel - mean) / 256
    assert len(net.layers) == 130


def test_build_is_reproducible(dat: bytes, built_models_dir: Path) -> None:
    first, second = convert(dat), convert(dat)
    assert first.onnx_bytes == second.onnx_bytes
    manifest = ModelStore().manifest("dlib_resnet_v1")
    assert first.sha256 == manifest.sha256
    assert sha256_file(built_models_dir / "dlib_face_recognition_resnet_model_v1.onnx") == manifest.sha256


def test_onnx_matches_dlib(store: ModelStore, face_chips: tuple[list[str], NDArray[np.uint8]]) -> None:
    names, chips = face_chips
    facerec = dlib_module().face_recognition_model_v1(frm_module().face_recognition_model_location())
    reference = np.stack([np.asarray(facerec.compute_face_descriptor(chip), dtype=np.float64) for chip in chips])
    ours = DlibResnetEmbedder.from_store(store).embed_raw(chips).astype(np.float64)
    diff = np.abs(ours - reference).max(axis=1)
    cosine = (ours * reference).sum(axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    for name, d, c in zip(names, diff, cosine, strict=True):
        assert d <= MAX_ABS_DIFF, f"{name}: max abs diff {d:.2e}"
        assert c >= MIN_COSINE, f"{name}: cosine {c:.7f}"
    # and the test can fail: a different person's chip is far outside the tolerance
    assert np.abs(ours[0] - reference[-1]).max() > 100 * MAX_ABS_DIFF


def _corrupt(dat: bytes, offset: int, value: int) -> bytes:
    return dat[:offset] + bytes([value]) + dat[offset + 1 :]


def test_truncated_or_extended_files_are_refused(dat: bytes) -> None:
    for cut in (0, 1, 17, 300, 0x160, len(dat) // 2, len(dat) - 200, len(dat) - 1):
        with pytest.raises(ConversionError):
            convert(dat[:cut])
    with pytest.raises(ConversionError, match="unexpected bytes"):
        read_dlib_net(dat + b"\x00")


def test_flipped_sizes_are_refused(dat: bytes) -> None:
    first_con = dat.index(b"\x05con_4")
    params_samples = first_con + 6 + 2  # name, then tensor version `01 02`, then num_samples `02 80 12` (4736)
    assert dat[params_samples : params_samples + 3] == b"\x02\x80\x12"
    with pytest.raises(ConversionError):
        convert(_corrupt(dat, params_samples + 2, 0x13))  # 4736 + 256 values
    with pytest.raises(ConversionError):
        convert(_corrupt(dat, params_samples + 2, 0x11))  # 4736 - 256 values
    huge = dat[:params_samples] + b"\x03\x80\x12\x7f" + dat[params_samples + 3 :]  # 8.3M values: must not allocate
    with pytest.raises(ConversionError, match="runs past the end"):
        convert(huge)
    after_params = params_samples + 3 + 6 + 4736 * 4
    assert dat[after_params : after_params + 2] == b"\x01\x20"  # num_filters 32
    with pytest.raises(ConversionError):
        convert(_corrupt(dat, after_params + 1, 0x40))
    with pytest.raises(ConversionError):
        convert(dat.replace(b"\x07affine_", b"\x07affinx_", 1))
    with pytest.raises(ConversionError, match="loss"):
        convert(dat.replace(b"loss_metric_2", b"loss_metric_3", 1))


def test_no_header_damage_crashes(dat: bytes) -> None:
    # Every single-byte change in the structural head either is refused with ConversionError or parses (a change
    # inside a float scalar); nothing else may escape. Wrong-but-parsable weights are stopped by the source hash.
    for offset in range(0, 0x160, 3):  # every third byte keeps this under ~5 s
        with contextlib.suppress(ConversionError):
            read_dlib_net(_corrupt(dat, offset, dat[offset] ^ 0x5A))


def test_mutations_near_layer_headers_never_crash(dat: bytes) -> None:
    # Random byte changes and insertions around layer names (where sizes and hyper-parameters live), seeded:
    # the reader and the graph builder either refuse with ConversionError or produce a graph; no other exception
    # and no warning (pytest turns warnings into errors, e.g. a float32 overflow while folding batch-norm).
    rnd = random.Random(4)
    anchors = [m.start() for m in re.finditer(rb"con_4|affine_|max_pool_2|avg_pool_2|add_prev_|fc_2", dat)]
    for _ in range(40):
        at = min(max(rnd.choice(anchors) + rnd.randint(-40, 60), 0), len(dat) - 2)
        mutated = bytearray(dat)
        mutated[at] = rnd.randrange(256)
        if rnd.random() < 0.3:
            mutated[at + 1 : at + 1] = bytes([rnd.randrange(256)])
        with contextlib.suppress(ConversionError):
            build_onnx(read_dlib_net(bytes(mutated)))


def test_build_refuses_a_modified_source(dat: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A parsable file with one weight changed: only the manifest's source sha256 can tell, and it must.
    package = tmp_path / "site" / "fakefrm"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    tampered = bytearray(dat)
    tampered[0x400] ^= 0x01
    read_dlib_net(bytes(tampered))  # still a well-formed network
    (package / "models" / "resnet.dat").write_bytes(bytes(tampered))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    manifest = ModelStore().manifest("dlib_resnet_v1")
    manifest = manifest.model_copy(
        update={"source": manifest.source.model_copy(update={"built_from": "fakefrm/models/resnet.dat"})}
    )
    out = tmp_path / "models"
    with pytest.raises(ConversionError, match="sha256"):
        build_dlib_resnet(manifest, out)
    assert not out.exists() or not any(out.iterdir())


def test_build_refuses_a_manifest_hash_it_cannot_reproduce(tmp_path: Path) -> None:
    manifest = ModelStore().manifest("dlib_resnet_v1")
    manifest = manifest.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(ConversionError, match="the manifest says"):
        build_dlib_resnet(manifest, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_build_then_check(tmp_path: Path) -> None:
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    checked = runner.invoke(app, ["models", "check", "--models-dir", str(empty)])
    assert checked.exit_code == 1
    assert '"error": "ModelMissingError"' in checked.output

    built = runner.invoke(app, ["models", "build", "--out", str(tmp_path / "m")])
    assert built.exit_code == 0, built.output
    assert '"skipped": false' in built.output
    again = runner.invoke(app, ["models", "build", "--out", str(tmp_path / "m")])
    assert '"skipped": true' in again.output

    checked = runner.invoke(app, ["models", "check", "--models-dir", str(tmp_path / "m")])
    assert checked.exit_code == 0, checked.output
    lines = [line for line in checked.output.splitlines() if line.startswith("{")]
    assert len(lines) == 4
    assert all('"ok": true' in line for line in lines)
