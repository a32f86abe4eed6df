"""Shared fixtures for the model tests: the shipped store, dlib (the reference) and real aligned face chips.

dlib ships no type information; it is imported as `Any` here rather than stubbed, since only tests touch it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from models.dlib_convert import build_dlib_resnet
from models.manifest import ModelStore
from tests.face_data import person_photos


def dlib_module() -> Any:
    return importlib.import_module("dlib")


def frm_module() -> Any:
    return importlib.import_module("face_recognition_models")


@pytest.fixture(scope="session")
def built_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh models dir with the dlib ResNet built into it by the real build step."""
    models_dir = tmp_path_factory.mktemp("models")
    build_dlib_resnet(ModelStore(models_dir).manifest("dlib_resnet_v1"), models_dir)
    return models_dir


@pytest.fixture(scope="session")
def store(built_models_dir: Path) -> ModelStore:
    return ModelStore(built_models_dir, operator_dir=None)


@pytest.fixture(scope="session")
def face_chips() -> tuple[list[str], NDArray[np.uint8]]:
    """150x150 RGB chips made by dlib (HOG detector, 5-point shape, get_face_chip padding 0.25), one per photo."""
    dlib, frm = dlib_module(), frm_module()
    detector = dlib.get_frontal_face_detector()
    shapes = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
    names: list[str] = []
    chips: list[NDArray[np.uint8]] = []
    for person, photos in person_photos().items():
        for photo in photos:
            if "partial" in photo.name or "res_" in photo.name:
                continue
            bgr = cv2.imread(str(photo))
            assert bgr is not None, photo
            rgb = np.ascontiguousarray(bgr[..., ::-1])
            faces = detector(rgb, 1)
            if len(faces) != 1:
                continue
            chips.append(np.asarray(dlib.get_face_chip(rgb, shapes(rgb, faces[0]), size=150, padding=0.25)))
            names.append(f"{person}/{photo.name}")
    assert len(chips) >= 8, f"only {len(chips)} usable face photos"
    return names, np.stack(chips).astype(np.uint8)
