"""The dlib ResNet face embedder on onnxruntime: aligned 150x150 RGB chips → 128-D templates.

Owns only the call into the loaded `dlib_resnet_v1` model (preprocessing comes from its manifest, via
`LoadedModel.preprocess`) and the L2 normalisation of its output. Alignment (making the chips) belongs to the face
pipeline. Must never log or keep a chip or a template beyond the call.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from models.manifest import LoadedModel, ModelSpecMismatchError, ModelStore

DLIB_RESNET = "dlib_resnet_v1"


class DlibResnetEmbedder:
    """`models.types.FaceEmbedder` over dlib's ResNet; chips as `dlib.get_face_chip(..., size=150, padding=0.25)`."""

    def __init__(self, model: LoadedModel) -> None:
        spec = model.manifest.input
        if model.manifest.role != "face_embedder" or spec.layout != "NCHW" or spec.shape[2] != spec.shape[3]:
            raise ModelSpecMismatchError(f"model {model.manifest.name} is not a square NCHW face embedder")
        if len(model.manifest.outputs) != 1 or len(model.manifest.outputs[0].shape) != 2:
            raise ModelSpecMismatchError(f"model {model.manifest.name} must have one (N, D) output")
        self._model = model
        self._chip_size = spec.shape[2]
        self._dim = model.manifest.outputs[0].shape[1]

    @classmethod
    def from_store(cls, store: ModelStore, name: str = DLIB_RESNET) -> DlibResnetEmbedder:
        return cls(store.load(name))

    @property
    def chip_size(self) -> int:
        return self._chip_size

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def model_sha256(self) -> str:
        """The model's sha256 (what a verification record reports as the model hash)."""
        return self._model.sha256

    def embed_raw(self, chips: NDArray[np.uint8]) -> NDArray[np.float32]:
        """dlib's own descriptors `(N, 128)`, unnormalised (dlib's rule: same person if euclidean < 0.6)."""
        s = self._chip_size
        if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 RGB chips (N, {s}, {s}, 3), got {chips.dtype} {chips.shape}")
        if chips.shape[0] == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        (descriptors,) = self._model.run(self._model.preprocess(chips))
        return descriptors.astype(np.float32, copy=False)

    def embed(self, chips: NDArray[np.uint8]) -> NDArray[np.float32]:
        """L2-normalised templates `(N, 128)` float32: cosine similarity is a dot product."""
        raw = self.embed_raw(chips)
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        out: NDArray[np.float32] = (raw / np.maximum(norms, np.float32(1e-12))).astype(np.float32)
        return out
