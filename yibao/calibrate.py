"""`yibao calibrate`: derive the chip template for alignment, and calibrate the face-matching threshold.

Owns the data side of calibration: walking a faces folder (one sub-folder per person; group/ and video/ are not
used for pairs), the labelled augmentations (flip, small rotation, brightness), scoring every genuine and impostor
pair with the real engine, and writing the chosen threshold where the engine reads it (the embedding model's
manifest `[threshold]` block when that manifest exists, else models/calibration.json). The statistics are
`models.calibration`'s.

Also holds the dlib reference pieces (dlib is a development dependency, imported lazily, never by product code):
`DlibReferenceEmbedder` (dlib's own ResNet on chips) and `derive_chip_template` (dlib's HOG detector, 5-point
predictor and get_face_chip framing, measured with our MTCNN: the origin of models.align.CHIP_TEMPLATE_150).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from models.align import align_face
from models.calibration import CalibrationResult, ScoreSet, summarise, write_calibration_file
from models.face import FaceEngine
from models.types import FaceDetector, RgbImage
from yibao.verify_face import IMAGE_SUFFIXES, read_rgb

logger = logging.getLogger(__name__)

EXCLUDED_FOLDERS = {"group", "video"}
# Files named <stem>_res_<N> are one photo at several resolutions: one source, never paired with each other.
_SAME_SOURCE = re.compile(r"^(?P<stem>.+)_res_[^_]+$")


# ---------------------------------------------------------------- dlib reference (development dependency)


def _dlib() -> tuple[Any, Any]:
    """dlib and its model files' package, untyped (they ship no stubs; only this reference code touches them)."""
    return importlib.import_module("dlib"), importlib.import_module("face_recognition_models")


class DlibReferenceEmbedder:
    """FaceEmbedder backed by dlib's own ResNet (the reference the ONNX conversion and the alignment are held to)."""

    def __init__(self) -> None:
        dlib, frm = _dlib()
        location = frm.face_recognition_model_location()
        self._net = dlib.face_recognition_model_v1(location)
        self._sha256 = hashlib.sha256(Path(location).read_bytes()).hexdigest()

    @property
    def chip_size(self) -> int:
        return 150

    @property
    def model_sha256(self) -> str:
        return self._sha256

    def embed(self, chips: NDArray[np.uint8]) -> NDArray[np.float32]:
        out = np.empty((len(chips), 128), dtype=np.float32)
        for i, chip in enumerate(chips):
            v = np.asarray(self._net.compute_face_descriptor(np.ascontiguousarray(chip)), dtype=np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


class DlibChipper:
    """dlib's framing: HOG detector (1 upsample), 5-point shape predictor, get_face_chip (models loaded once)."""

    def __init__(self) -> None:
        self._dlib, frm = _dlib()
        self._hog = self._dlib.get_frontal_face_detector()
        self._predictor = self._dlib.shape_predictor(frm.pose_predictor_five_point_model_location())

    def chips(self, rgb: RgbImage, size: int = 150, padding: float = 0.25) -> list[NDArray[np.uint8]]:
        """Every face found, largest first."""
        rects = sorted(self._hog(rgb, 1), key=lambda r: -int(r.width()))
        return [
            np.asarray(
                self._dlib.get_face_chip(rgb, self._predictor(rgb, rect), size=size, padding=padding), dtype=np.uint8
            )
            for rect in rects
        ]


@dataclass(frozen=True, slots=True)
class ChipTemplate:
    template: NDArray[np.float64]  # (5, 2) mean MTCNN landmarks on dlib's 150x150 chips
    spread: NDArray[np.float64]  # (5, 2) standard deviation
    faces: int


def dlib_chips_under(faces_dir: Path) -> dict[Path, list[NDArray[np.uint8]]]:
    """dlib's chips of every face in every photo under `faces_dir` (sub-folders included), by path."""
    chipper = DlibChipper()
    paths = sorted(p for p in faces_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return {path: chipper.chips(read_rgb(path)) for path in paths}


def derive_chip_template(chips: list[NDArray[np.uint8]], detector: FaceDetector) -> ChipTemplate:
    """Our MTCNN on each of dlib's chips; the landmark positions averaged (the chips: `dlib_chips_under`)."""
    points: list[NDArray[np.float32]] = []
    for chip in chips:
        found = detector.detect(chip)
        if found:
            points.append(found[0].landmarks)
    if not points:
        raise ValueError("MTCNN found no face on any of the chips")
    arr = np.stack(points).astype(np.float64)
    return ChipTemplate(template=arr.mean(0), spread=arr.std(0), faces=len(arr))


# ---------------------------------------------------------------- the face set and its augmentations


@dataclass(frozen=True, slots=True)
class Photo:
    person: str
    source: str  # photos of one source are never paired (same shot at several resolutions)
    path: Path


def person_photos(faces_dir: Path) -> list[Photo]:
    """Photos in person folders (group/ and video/ excluded), sorted."""
    if not faces_dir.is_dir():
        raise FileNotFoundError(f"faces folder {faces_dir} does not exist")
    photos: list[Photo] = []
    for folder in sorted(d for d in faces_dir.iterdir() if d.is_dir() and d.name not in EXCLUDED_FOLDERS):
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            m = _SAME_SOURCE.match(path.stem)
            source = f"{folder.name}/{m['stem'] if m else path.stem}"
            photos.append(Photo(person=folder.name, source=source, path=path))
    return photos


def augmentations(rgb: RgbImage) -> Iterator[tuple[str, RgbImage]]:
    """Labelled variants: horizontal flip, +-8 degree rotation, darker (x0.6) and brighter (x1.4 + 20)."""
    yield "flip", np.ascontiguousarray(rgb[:, ::-1])
    height, width = rgb.shape[:2]
    for angle in (8.0, -8.0):
        m = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
        rotated = cv2.warpAffine(rgb, m, (width, height), borderMode=cv2.BORDER_REFLECT)
        yield f"rot{angle:+.0f}", np.asarray(rotated, dtype=np.uint8)
    yield "dark", np.clip(rgb.astype(np.float32) * 0.6, 0, 255).astype(np.uint8)
    yield "bright", np.clip(rgb.astype(np.float32) * 1.4 + 20, 0, 255).astype(np.uint8)


@dataclass(frozen=True, slots=True)
class Template:
    photo: Photo
    variant: str  # "original" or the augmentation's name
    vector: NDArray[np.float32]


SAME_SHOT_NCC = 0.85


def shot_signature(rgb: RgbImage, landmarks: NDArray[np.float32]) -> NDArray[np.float64]:
    """The aligned face's grey levels at 50x50, zero-mean and unit-variance: two copies of one shot correlate
    at >= 0.88 (crops, rescales), two different photos of one person at <= 0.7 on the development set."""
    grey = cv2.cvtColor(align_face(rgb, landmarks), cv2.COLOR_RGB2GRAY)[30:130, 25:125].astype(np.float64)
    small = cv2.resize(grey, (50, 50), interpolation=cv2.INTER_AREA).ravel()
    return np.asarray((small - small.mean()) / max(float(small.std()), 1e-6), dtype=np.float64)


def merge_same_shots(photos: list[Photo], signatures: dict[Path, NDArray[np.float64]]) -> list[Photo]:
    """Photos of one person whose aligned faces correlate >= SAME_SHOT_NCC are one source (a crop or rescale of one
    shot, e.g. obama_a and obama_res_*): pairing them would count one photo against itself as a genuine pair.
    Decided on pixels, never on the embedder's scores, so it cannot bias the scores it excludes."""
    source = {p.path: p.source for p in photos}
    for i, a in enumerate(photos):
        for b in photos[i + 1 :]:
            if a.person != b.person or a.path not in signatures or b.path not in signatures:
                continue
            ncc = float(signatures[a.path] @ signatures[b.path]) / signatures[a.path].size
            if ncc >= SAME_SHOT_NCC:
                old, new = source[b.path], source[a.path]
                source = {k: (new if v == old else v) for k, v in source.items()}
    return [Photo(p.person, source[p.path], p.path) for p in photos]


def templates(engine: FaceEngine, photos: list[Photo], *, augment: bool = True) -> tuple[list[Template], list[str]]:
    """One template per photo (and per augmentation); photos where no face is found are listed, not scored.
    Copies of one shot are merged into one source first (`merge_same_shots`)."""
    found: list[tuple[Photo, str, NDArray[np.float32]]] = []
    signatures: dict[Path, NDArray[np.float64]] = {}
    missed: list[str] = []
    for photo in photos:
        rgb = read_rgb(photo.path)
        variants = [("original", rgb), *(augmentations(rgb) if augment else [])]
        for name, img in variants:
            analysis = engine.analyse(img)
            if analysis.template is None or analysis.face is None:
                missed.append(f"{photo.path.name}:{name}")
                continue
            if name == "original":
                signatures[photo.path] = shot_signature(img, analysis.face.landmarks)
            found.append((photo, name, analysis.template))
    merged = {p.path: p for p in merge_same_shots(photos, signatures)}
    return [Template(merged[photo.path], name, vector) for photo, name, vector in found], missed


def score_sets(items: list[Template]) -> list[ScoreSet]:
    """Every pair of templates from different sources: genuine (same person) or impostor; "augmented" when either
    side is an augmented variant."""
    vectors = np.stack([t.vector for t in items])
    sims = vectors @ vectors.T
    buckets: dict[tuple[str, str], list[float]] = {}
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            a, b = items[i], items[j]
            if a.photo.source == b.photo.source:
                continue
            kind = "genuine" if a.photo.person == b.photo.person else "impostor"
            source = "original" if a.variant == b.variant == "original" else "augmented"
            buckets.setdefault((kind, source), []).append(float(sims[i, j]))
    return [ScoreSet(kind, source, tuple(scores)) for (kind, source), scores in sorted(buckets.items())]


PACKAGE_FACE_PHOTOS: tuple[tuple[str, str], ...] = (
    ("insightface", "data/images/t1.jpg"),  # six people
    ("insightface", "data/images/Tom_Hanks_54745.png"),
)
"""Face photos that ship inside packages the dev install fetches (located, never imported). Every face in them is
a person absent from the development set, so each adds impostor pairs against everyone else."""

PACKAGE_FACE_MIN_PX = 40.0


def package_photo_paths() -> list[Path]:
    """The package-shipped photos that are installed here (an empty list when the package is not)."""
    import importlib.util

    paths: list[Path] = []
    for package, relative in PACKAGE_FACE_PHOTOS:
        spec = importlib.util.find_spec(package)
        for base in (spec.submodule_search_locations or []) if spec is not None else []:
            candidate = Path(base) / relative
            if candidate.is_file():
                paths.append(candidate)
                break
    return paths


def package_templates(engine: FaceEngine, paths: list[Path]) -> list[Template]:
    """One template per face (at least PACKAGE_FACE_MIN_PX) in each photo, each its own identity and source."""
    items: list[Template] = []
    for path in paths:
        rgb = read_rgb(path)
        faces = [d for d in engine.detector.detect(rgb) if min(d.width, d.height) >= PACKAGE_FACE_MIN_PX]
        if not faces:
            continue
        chips = np.stack([align_face(rgb, d.landmarks, engine.embedder.chip_size) for d in faces])
        for k, vector in enumerate(engine.embedder.embed(chips)):
            person = f"package:{path.name}#{k}"
            items.append(Template(Photo(person=person, source=person, path=path), "original", vector))
    return items


def calibrate_face(
    engine: FaceEngine,
    faces_dir: Path,
    *,
    model: str,
    model_sha256: str,
    augment: bool = True,
    extra_photos: list[Path] | None = None,
) -> tuple[CalibrationResult, list[str]]:
    """Scores every pair; `extra_photos` (package-shipped photos of other people) add impostor identities."""
    items, missed = templates(engine, person_photos(faces_dir), augment=augment)
    items += package_templates(engine, extra_photos or [])
    result = summarise(
        score_sets(items),
        model=model,
        model_sha256=model_sha256,
        calibrated_on=dt.datetime.now(dt.UTC).date().isoformat(),
    )
    return result, missed


# ---------------------------------------------------------------- writing the threshold into a manifest

_THRESHOLD_TABLE = re.compile(r"(?ms)^\[threshold\]\n.*?(?=^\[|\Z)")


def manifest_with_threshold(text: str, result: CalibrationResult) -> str:
    """The manifest's TOML text with its `[threshold]` table replaced (or appended) by this calibration's."""
    how = result.how_chosen.replace("\\", "\\\\").replace('"', '\\"')
    block = (
        "[threshold]\n"
        f'metric = "{result.metric}"\n'
        f"value = {result.threshold:.4f}\n"
        f'how_chosen = "{how}"\n'
        f"calibrated_on = {result.calibrated_on}\n"
    )
    if _THRESHOLD_TABLE.search(text):
        return _THRESHOLD_TABLE.sub(lambda _m: block + "\n", text, count=1).rstrip("\n") + "\n"
    return text.rstrip("\n") + "\n\n" + block


def manifest_file(name: str, directory: Path) -> Path | None:
    """The shipped manifest file declaring model `name`, if any."""
    from models.manifest import read_manifest

    for path in sorted(directory.glob("*.toml")):
        if read_manifest(path).name == name:
            return path
    return None


def store_threshold(result: CalibrationResult, manifests_dir: Path, calibration_file: Path) -> Path:
    """Writes the threshold where the engine reads it: the embedder manifest's [threshold] block, else the file."""
    from models.manifest import parse_manifest

    path = manifest_file(result.model, manifests_dir)
    if path is None:
        write_calibration_file(calibration_file, result)
        return calibration_file
    updated = manifest_with_threshold(path.read_text(encoding="utf-8"), result)
    parse_manifest(updated, str(path))  # never write a manifest the loader would refuse
    path.write_text(updated, encoding="utf-8")
    # The full result (rows, intervals) is kept beside it for the record; the manifest's value is the one used.
    write_calibration_file(calibration_file, result)
    return path


def run_face_calibration(
    faces_dir: Path,
    models_dir: Path | None,
    *,
    augment: bool = True,
    write: bool = True,
    package_photos: bool = True,
) -> tuple[str, str, Path | None]:
    """`yibao calibrate face`: (JSON line, markdown table, where the threshold was written)."""
    from models.calibration import markdown_table
    from models.detector import PARAMS_PHOTOS, MtcnnDetector
    from models.embedder import DLIB_RESNET, DlibResnetEmbedder
    from models.manifest import SHIPPED_MANIFESTS_DIR, ModelStore
    from models.quality import QualityPolicy
    from yibao.verify_face import DEFAULT_CALIBRATION_FILE

    store = ModelStore(models_dir)
    loaded = store.load(DLIB_RESNET)
    # Scoring only: the engine's threshold is not consulted while pairs are scored.
    engine = FaceEngine(
        MtcnnDetector.from_store(store, PARAMS_PHOTOS), DlibResnetEmbedder(loaded), QualityPolicy.for_photos(), 0.0
    )
    extra = package_photo_paths() if package_photos else []
    if package_photos and not extra:
        logger.warning("no package-shipped face photos installed (dev install): calibrating on %s alone", faces_dir)
    result, missed = calibrate_face(
        engine, faces_dir, model=DLIB_RESNET, model_sha256=loaded.sha256, augment=augment, extra_photos=extra
    )
    if missed:
        logger.warning("no face found in %d photo variants: %s", len(missed), ", ".join(missed))
    where = store_threshold(result, SHIPPED_MANIFESTS_DIR, DEFAULT_CALIBRATION_FILE) if write else None
    return result.to_json(), markdown_table(result), where


def run_chip_template(faces_dir: Path) -> str:
    """`yibao calibrate chip-template`: the derivation behind models.align.CHIP_TEMPLATE_150, as one JSON line."""
    import json

    from models.detector import PARAMS_PHOTOS, MtcnnDetector
    from models.manifest import ModelStore

    chips = [chip for found in dlib_chips_under(faces_dir).values() for chip in found]
    derived = derive_chip_template(chips, MtcnnDetector.from_store(ModelStore(), PARAMS_PHOTOS))
    return json.dumps(
        {
            "faces": derived.faces,
            "template": np.round(derived.template, 3).tolist(),
            "spread": np.round(derived.spread, 2).tolist(),
        }
    )
