"""DlibResnetEmbedder: batching, normalisation, input checks, and that it tells people apart."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from models.embedder import DlibResnetEmbedder
from models.manifest import ModelSpecMismatchError, ModelStore
from models.types import FaceEmbedder


def test_embed_is_batched_normalised_and_consistent(
    store: ModelStore, face_chips: tuple[list[str], NDArray[np.uint8]]
) -> None:
    _, chips = face_chips
    embedder: FaceEmbedder = DlibResnetEmbedder.from_store(store)
    assert embedder.chip_size == 150
    batch = embedder.embed(chips)
    assert batch.dtype == np.float32
    assert batch.shape == (len(chips), 128)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    single = np.concatenate([embedder.embed(chips[i : i + 1]) for i in range(len(chips))])
    np.testing.assert_allclose(single, batch, atol=1e-5)


def test_same_person_is_closer_than_different_people(
    store: ModelStore, face_chips: tuple[list[str], NDArray[np.uint8]]
) -> None:
    names, chips = face_chips
    emb = DlibResnetEmbedder.from_store(store)
    raw = emb.embed_raw(chips)
    people = [n.split("/")[0] for n in names]
    distance = np.linalg.norm(raw[:, None, :] - raw[None, :, :], axis=2)
    same = [distance[i, j] for i in range(len(names)) for j in range(i) if people[i] == people[j]]
    other = [distance[i, j] for i in range(len(names)) for j in range(i) if people[i] != people[j]]
    assert same
    assert other
    assert max(same) < 0.6 < min(other)  # dlib's documented rule holds on this set


def test_input_checks(store: ModelStore) -> None:
    emb = DlibResnetEmbedder.from_store(store)
    assert emb.embed(np.zeros((0, 150, 150, 3), dtype=np.uint8)).shape == (0, 128)
    with pytest.raises(ValueError, match="uint8 RGB chips"):
        emb.embed(np.zeros((1, 112, 112, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB chips"):
        emb.embed(np.zeros((1, 150, 150, 3), dtype=np.float32))


def test_refuses_a_non_embedder_model(store: ModelStore) -> None:
    with pytest.raises(ModelSpecMismatchError):
        DlibResnetEmbedder(store.load("mtcnn_onet"))
