"""Face alignment: a similarity transform from MTCNN's five landmarks onto the dlib 150x150 chip framing.

Owns the chip template and the warp. The dlib ResNet embedder was trained on chips cut by dlib's
`get_face_chip(img, shape5, size=150, padding=0.25)` from its own 5-point landmarks (eye corners and nose base),
which MTCNN does not produce. The template below holds where MTCNN's landmarks (eye centres, nose tip, mouth
corners) fall on dlib's chips: `yibao calibrate chip-template` derives it (dlib HOG detector + 5-point predictor +
`get_face_chip` on the development photos, MTCNN run on each chip, positions averaged); the constants are its output,
and tests check that our chips match dlib's.

Must never import dlib (a development dependency), keep a chip beyond the call, or log anything about a face.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from models.types import Detection, RgbImage

CHIP_SIZE = 150

# Mean MTCNN landmarks (x, y) on dlib's 150x150 chips (padding 0.25), LANDMARK_NAMES order. Derived by
# `yibao calibrate chip-template --faces-dir tests/fixtures/faces` on 25 faces (HOG-detected, 2026-12-01);
# per-point spread (sd, px): eyes ~1.1-1.6, nose ~3.5-5, mouth ~3-5 (pose and expression).
CHIP_TEMPLATE_150 = np.array(
    [
        [46.500, 45.005],
        [101.486, 45.049],
        [74.152, 77.323],
        [48.062, 102.588],
        [100.375, 102.416],
    ],
    dtype=np.float64,
)

# The eyes are the stable points (the nose and mouth move with pose and expression), so they weigh more in the fit.
LANDMARK_WEIGHTS = np.array([2.0, 2.0, 1.0, 1.0, 1.0], dtype=np.float64)


def similarity_transform(
    src: NDArray[np.floating], dst: NDArray[np.floating], weights: NDArray[np.floating] | None = None
) -> NDArray[np.float64]:
    """Weighted least-squares similarity (rotation, uniform scale, translation) mapping `src` onto `dst`.

    Umeyama (1991) closed form; returns the 2x3 matrix for cv2.warpAffine. No RANSAC: five points, all needed.
    """
    s = np.asarray(src, dtype=np.float64)
    d = np.asarray(dst, dtype=np.float64)
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mu_s = (w[:, None] * s).sum(0)
    mu_d = (w[:, None] * d).sum(0)
    sc = s - mu_s
    dc = d - mu_d
    var_s = float((w * (sc**2).sum(1)).sum())
    if var_s <= 1e-12:
        raise ValueError("degenerate landmarks (all at one point)")
    cov = (w[:, None, None] * (dc[:, :, None] * sc[:, None, :])).sum(0)
    u, sig, vt = np.linalg.svd(cov)
    fix = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        fix[1, 1] = -1.0
    rot = u @ fix @ vt
    scale = float(np.trace(np.diag(sig) @ fix)) / var_s
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def chip_transform(landmarks: NDArray[np.floating], size: int = CHIP_SIZE) -> NDArray[np.float64]:
    """The 2x3 image -> chip matrix for a `size` x `size` chip (template scaled from 150)."""
    return similarity_transform(landmarks, CHIP_TEMPLATE_150 * (size / CHIP_SIZE), LANDMARK_WEIGHTS)


def align_face(rgb: RgbImage, landmarks: NDArray[np.floating], size: int = CHIP_SIZE) -> NDArray[np.uint8]:
    """The aligned `size` x `size` RGB chip of the face with these landmarks (outside the image: black, as dlib).

    When the face is much larger than the chip, the region is first shrunk by area averaging so the bilinear warp
    never shrinks by more than 2 (dlib's chip extractor uses an image pyramid for the same reason: aliasing).
    """
    m = chip_transform(landmarks, size)
    scale = float(np.hypot(m[0, 0], m[0, 1]))
    if scale < 0.5:
        # Corners of the chip in the image, to crop only what the warp reads (a 1080p frame is mostly background).
        inv = cv2.invertAffineTransform(m)
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64) @ inv.T
        height, width = rgb.shape[:2]
        x0 = int(max(np.floor(corners[:, 0].min()) - 2, 0))
        y0 = int(max(np.floor(corners[:, 1].min()) - 2, 0))
        x1 = int(min(np.ceil(corners[:, 0].max()) + 2, width))
        y1 = int(min(np.ceil(corners[:, 1].max()) + 2, height))
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            shrink = 1.0 / (2.0 * scale)  # after it, the warp scales by 0.5 .. 1
            region = rgb[y0:y1, x0:x1]
            rw = max(round((x1 - x0) / shrink), 1)
            rh = max(round((y1 - y0) / shrink), 1)
            small = np.asarray(cv2.resize(region, (rw, rh), interpolation=cv2.INTER_AREA), dtype=np.uint8)
            fx, fy = rw / (x1 - x0), rh / (y1 - y0)
            # image -> small: ((x - x0) * fx, (y - y0) * fy), pixel centres kept (+0.5/-0.5)
            to_small = np.array([[fx, 0, -fx * x0 + 0.5 * fx - 0.5], [0, fy, -fy * y0 + 0.5 * fy - 0.5]])
            m = m @ np.vstack([cv2.invertAffineTransform(to_small), [0, 0, 1]])
            rgb = small
    chip = cv2.warpAffine(
        rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0)
    )
    return np.ascontiguousarray(chip, dtype=np.uint8)


def align_detections(rgb: RgbImage, detections: list[Detection], size: int = CHIP_SIZE) -> NDArray[np.uint8]:
    """Chips for several faces at once: `(N, size, size, 3)` uint8, ready for a FaceEmbedder."""
    if not detections:
        return np.empty((0, size, size, 3), dtype=np.uint8)
    return np.stack([align_face(rgb, d.landmarks, size) for d in detections])
