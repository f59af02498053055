"""Audit: pseudo labels against ground truth. Pure functions and small readers, no Ray.

One confusion matrix is accumulated over any number of images. Its rows are the ground-truth
classes and its columns the predicted classes, both indexed by position in ``class_ids`` (0
background first, then the category ids, sorted), plus one last column for the pixels our labels
mark ``IGNORE`` (255): ``[n, n + 1]`` int64 pixel counts.

Conventions (the audit's choices, also in README "Audit"):

- Ground-truth 255 pixels are excluded from every figure.
- Our 255 pixels where the ground truth is valid are "ignored by us": their share of the valid
  pixels is ``ignored_fraction``, ``labelled_accuracy`` is the accuracy on the other pixels, and
  for IoU, recall and ``pixel_accuracy`` they count as a miss of the ground-truth class (they are
  no class, so they are never a true positive and add to no class's predicted pixels).
- IoU of a class = TP / (GT pixels + predicted pixels - TP); a class with no pixels on either
  side has no IoU (NaN) and is left out of the means. mIoU averages every class with an IoU;
  ``miou_fg`` leaves background (id 0) out. Per-image figures use the same formulas on the
  image's own matrix.
- Class ids are matched by category id. Both sides' category lists must hold the same ids with
  the same names (``match_categories``); a pixel id that is no category fails its image.
- Tags (``tags`` of ``add``) come from our manifest and are only reported (how many ground-truth
  classes the image's tags missed); the audit never takes tags or classes from the ground truth
  to change what is scored.
- Images on one side only are rows with status ``missing_pred`` / ``missing_gt``; images whose
  maps have different sizes or unknown ids are rows with status ``error``. All are counted.
- Pairing (``pair``): our images are keyed by manifest id or by image file stem (the COCO
  ``file_name`` our run recorded), whichever pairs more ground-truth keys; rows keep our ids, so
  they join the run's stats. A stem several of our images share pairs none of them. Nothing
  paired is an error (``NoPairsError``), never an empty audit.
- A run is read through ``open_run``: only shards whose marker carries ``run.json``'s
  fingerprint count; stale ones (from before ``--overwrite``) are left out and counted.

Accumulation is exact integer addition, so the matrix and the rows (sorted by image id) do not
depend on how the images were split into chunks or in which order the chunks were merged.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import coco
from pipeline.storage import commit, layout
from pipeline.storage.store import Store
from pipeline.types import IGNORE, file_stem

log = logging.getLogger(__name__)

BACKGROUND = 0
OK, MISSING_PRED, MISSING_GT, ERROR = "ok", "missing_pred", "missing_gt", "error"

IMAGE_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # ok, missing_pred, missing_gt, error
    pa.field("error", pa.string()),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("valid_pixels", pa.int64()),  # ground truth not 255
    pa.field("gt_ignore_pixels", pa.int64()),
    pa.field("pred_ignore_pixels", pa.int64()),  # ours 255 where the ground truth is valid
    pa.field("ignored_fraction", pa.float64()),
    pa.field("pixel_accuracy", pa.float64()),
    pa.field("labelled_accuracy", pa.float64()),
    pa.field("miou", pa.float64()),
    pa.field("miou_fg", pa.float64()),
    pa.field("n_gt_classes", pa.int32()),  # foreground classes in the ground truth
    pa.field("n_pred_classes", pa.int32()),  # foreground classes in our labels
    pa.field("n_tags", pa.int32()),  # from our manifest, null without one
    pa.field("gt_classes_untagged", pa.int32()),  # ground-truth classes our tags missed
])  # fmt: skip

CLASS_SCHEMA = pa.schema([
    pa.field("category_id", pa.int32(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("gt_pixels", pa.int64(), nullable=False),
    pa.field("pred_pixels", pa.int64(), nullable=False),
    pa.field("true_positive", pa.int64(), nullable=False),
    pa.field("ignored_by_us", pa.int64(), nullable=False),  # GT pixels of the class we marked 255
    pa.field("iou", pa.float64()),
    pa.field("precision", pa.float64()),
    pa.field("recall", pa.float64()),
])  # fmt: skip

CONFUSION_SCHEMA = pa.schema([
    pa.field("gt_category_id", pa.int32(), nullable=False),
    pa.field("pred_category_id", pa.int32(), nullable=False),  # 255: ignored by us
    pa.field("pixels", pa.int64(), nullable=False),
])  # fmt: skip

CORRELATION_SCHEMA = pa.schema([
    pa.field("stat", pa.string(), nullable=False),
    pa.field("n", pa.int64(), nullable=False),
    pa.field("pearson", pa.float64()),
    pa.field("spearman", pa.float64()),
])  # fmt: skip


# --- confusion matrices ---------------------------------------------------------------------


def pair_histogram(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """[H, W] uint8 ground truth and prediction -> [256, 256] int64 counts of (gt id, pred id)."""
    for name, m in (("ground truth", gt), ("prediction", pred)):
        if not isinstance(m, np.ndarray) or m.ndim != 2 or m.dtype != np.uint8:
            got = f"{m.dtype} {m.shape}" if isinstance(m, np.ndarray) else type(m).__name__
            raise ValueError(f"{name}: expected an [H, W] uint8 label map, got {got}")
    if gt.shape != pred.shape:
        (gh, gw), (ph, pw) = gt.shape, pred.shape
        raise ValueError(f"ground truth is {gh}x{gw} but the prediction {ph}x{pw}")
    codes = gt.astype(np.uint16).ravel() << 8 | pred.ravel()
    return np.bincount(codes, minlength=1 << 16).reshape(256, 256)


def fold(hist: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """[256, 256] pair histogram -> [n, n + 1] confusion matrix over ``class_ids`` (last column:
    pred 255). Ground-truth 255 is dropped; any other id outside ``class_ids`` raises ValueError."""
    ids = np.asarray(class_ids, dtype=np.int64)
    known = np.zeros(256, dtype=bool)
    known[ids] = True
    gt_any, pred_any = hist.sum(axis=1), hist.sum(axis=0)
    bad_gt = np.flatnonzero((gt_any > 0) & ~known & (np.arange(256) != IGNORE))
    bad_pred = np.flatnonzero((pred_any > 0) & ~known & (np.arange(256) != IGNORE))
    if bad_gt.size or bad_pred.size:
        side = "ground truth" if bad_gt.size else "prediction"
        raise ValueError(f"{side} holds ids {(bad_gt if bad_gt.size else bad_pred).tolist()} that are no category "
                         f"(categories: {ids[ids != BACKGROUND].tolist()}, 0 background, 255 ignore)")  # fmt: skip
    return hist[np.ix_(ids, np.append(ids, IGNORE))]


@dataclass(frozen=True)
class Metrics:
    """Figures of one [n, n + 1] confusion matrix; per-class arrays are [n] float64 (NaN: undefined)."""

    iou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    miou: float
    miou_fg: float
    pixel_accuracy: float
    labelled_accuracy: float
    ignored_fraction: float
    valid_pixels: int


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> Any:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def metrics(matrix: np.ndarray, class_ids: Sequence[int]) -> Metrics:
    """Metrics of a confusion matrix (see the module docstring for the conventions)."""
    n = len(class_ids)
    if matrix.shape != (n, n + 1):
        raise ValueError(f"confusion matrix is {matrix.shape}, expected {(n, n + 1)} for {n} classes")
    tp = np.diag(matrix[:, :n]).astype(np.int64)
    gt, pred = matrix.sum(axis=1), matrix[:, :n].sum(axis=0)
    iou = _ratio(tp, gt + pred - tp)
    fg = np.asarray(class_ids) != BACKGROUND
    total, ignored = int(matrix.sum()), int(matrix[:, n].sum())
    return Metrics(
        iou=iou, precision=_ratio(tp, pred), recall=_ratio(tp, gt), miou=_nanmean(iou), miou_fg=_nanmean(iou[fg]),
        pixel_accuracy=float(_ratio(tp.sum(), total)), labelled_accuracy=float(_ratio(tp.sum(), total - ignored)),
        ignored_fraction=float(_ratio(ignored, total)), valid_pixels=total,
    )  # fmt: skip


def _opt(x: float) -> float | None:
    return None if math.isnan(x) else x


# --- streaming accumulation -----------------------------------------------------------------


@dataclass
class Audit:
    """Running totals: the confusion matrix over every scored image and one row per image."""

    class_ids: tuple[int, ...]
    matrix: np.ndarray = field(default=None)  # type: ignore[assignment]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.class_ids = check_class_ids(self.class_ids)
        if self.matrix is None:
            n = len(self.class_ids)
            self.matrix = np.zeros((n, n + 1), dtype=np.int64)

    def add(self, image_id: str, gt: np.ndarray, pred: np.ndarray, tags: Sequence[int] | None = None) -> None:
        """Score one image: [H, W] uint8 ground truth and prediction. A size mismatch or an
        unknown id makes an ``error`` row and leaves the matrix unchanged."""
        try:
            hist = pair_histogram(gt, pred)
            matrix = fold(hist, self.class_ids)
        except ValueError as err:
            self.add_unscored(image_id, ERROR, str(err))
            return
        self.matrix += matrix
        self.rows.append(image_row(image_id, gt.shape, hist, matrix, self.class_ids, tags))

    def add_unscored(self, image_id: str, status: str, error: str | None = None) -> None:
        """A row for an image that was not scored (missing on one side, or unreadable)."""
        row = dict.fromkeys(IMAGE_SCHEMA.names)
        row.update(image_id=image_id, status=status, error=error)
        self.rows.append(row)

    def merge(self, other: Audit) -> Audit:
        """A new Audit holding both (same class ids required)."""
        if other.class_ids != self.class_ids:
            raise ValueError("cannot merge audits over different class ids")
        return Audit(self.class_ids, self.matrix + other.matrix, self.rows + other.rows)

    def sorted_rows(self) -> list[dict[str, Any]]:
        return sorted(self.rows, key=lambda r: (r["image_id"], r["status"]))


def check_class_ids(class_ids: Iterable[int]) -> tuple[int, ...]:
    """Sorted unique ids in 0..254 with background 0 included."""
    ids = sorted({int(c) for c in class_ids} | {BACKGROUND})
    if ids[-1] >= IGNORE:
        raise ValueError(f"class ids must lie in 0..{IGNORE - 1}, got {ids[-1]}")
    return tuple(ids)


def image_row(image_id: str, shape: tuple[int, ...], hist: np.ndarray, matrix: np.ndarray,
              class_ids: Sequence[int], tags: Sequence[int] | None) -> dict[str, Any]:  # fmt: skip
    """The per-image row (``IMAGE_SCHEMA``) of a scored image."""
    m = metrics(matrix, class_ids)
    ids = np.asarray(class_ids)
    gt_classes = set(ids[(matrix.sum(axis=1) > 0)].tolist()) - {BACKGROUND}
    pred_classes = set(ids[(matrix[:, :-1].sum(axis=0) > 0)].tolist()) - {BACKGROUND}
    return {
        "image_id": image_id, "status": OK, "error": None, "height": int(shape[0]), "width": int(shape[1]),
        "valid_pixels": m.valid_pixels, "gt_ignore_pixels": int(hist[IGNORE].sum()),
        "pred_ignore_pixels": int(matrix[:, -1].sum()), "ignored_fraction": _opt(m.ignored_fraction),
        "pixel_accuracy": _opt(m.pixel_accuracy), "labelled_accuracy": _opt(m.labelled_accuracy),
        "miou": _opt(m.miou), "miou_fg": _opt(m.miou_fg),
        "n_gt_classes": len(gt_classes), "n_pred_classes": len(pred_classes),
        "n_tags": None if tags is None else len(set(tags)),
        "gt_classes_untagged": None if tags is None else len(gt_classes - set(tags)),
    }  # fmt: skip


def audit_images(pred: LabelSource, gt: LabelSource, keys: Iterable[str], class_ids: Sequence[int],
                 tags: Mapping[str, Sequence[int]] | None = None) -> Audit:  # fmt: skip
    """Score the images ``keys`` (present on both sides). An image that cannot be read becomes an
    ``error`` row naming the side."""
    audit = Audit(tuple(class_ids))
    for key in keys:
        try:
            gt_map = gt.read(key)
        except (ValueError, OSError) as err:
            audit.add_unscored(key, ERROR, f"ground truth unreadable: {err}")
            continue
        try:
            pred_map = pred.read(key)
        except (ValueError, OSError) as err:
            audit.add_unscored(key, ERROR, f"prediction unreadable: {err}")
            continue
        audit.add(key, gt_map, pred_map, None if tags is None else tags.get(key, ()))
    return audit


def missing(pred_keys: Iterable[str], gt_keys: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """(both, only in the ground truth, only in the prediction), each sorted."""
    p, g = set(pred_keys), set(gt_keys)
    return sorted(p & g), sorted(g - p), sorted(p - g)


# --- categories -----------------------------------------------------------------------------


def match_categories(pred: Sequence[Mapping[str, Any]], gt: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The shared categories (``{"id", "name"}`` sorted by id) of both sides, matched by id.
    Raises ValueError listing every id only one side has and every id whose names differ."""
    p = {int(c["id"]): str(c["name"]) for c in pred}
    g = {int(c["id"]): str(c["name"]) for c in gt}
    problems = []
    if set(p) - set(g):
        problems.append(f"ids only in the prediction: {sorted(set(p) - set(g))}")
    if set(g) - set(p):
        problems.append(f"ids only in the ground truth: {sorted(set(g) - set(p))}")
    renamed = [f"{i} ({p[i]!r} vs {g[i]!r})" for i in sorted(set(p) & set(g)) if p[i] != g[i]]
    if renamed:
        problems.append(f"ids named differently (prediction vs ground truth): {', '.join(renamed[:10])}")
    if problems:
        raise ValueError("the prediction's and the ground truth's categories disagree; " + "; ".join(problems)
                         + ". Audit against ground truth with the categories the run was labeled with")  # fmt: skip
    return [{"id": i, "name": p[i]} for i in sorted(p)]


# --- readers --------------------------------------------------------------------------------


class LabelSource(Protocol):
    """Label maps by image key; ``categories`` is None when the source does not name them."""

    categories: list[dict[str, Any]] | None

    def image_ids(self) -> list[str]: ...

    def read(self, key: str) -> np.ndarray: ...


def _segmentation_mask(seg: Any, h: int, w: int) -> np.ndarray:
    """Polygons, uncompressed RLE or compressed RLE -> [h, w] bool."""
    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if seg else None
        return np.zeros((h, w), bool) if rle is None else mask_utils.decode(rle).astype(bool)
    if isinstance(seg.get("counts"), list):  # uncompressed RLE
        return mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).astype(bool)
    return coco.decode_rle(seg).view(bool)  # 0/1 uint8 from pycocotools


def coco_label_map(image: Mapping[str, Any], annotations: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """A COCO image and its instance or stuff annotations -> [H, W] uint8 semantic map.

    Larger annotations are painted first so overlapping smaller objects stay visible (ties by
    annotation id); crowd regions are painted as their category. ``ignore_segmentation`` (our
    own output) becomes 255. On our non-overlapping output this equals ``coco.decode_label_map``.
    """
    h, w = int(image["height"]), int(image["width"])
    out = np.zeros((h, w), dtype=np.uint8)
    for ann in sorted(annotations, key=lambda a: (-float(a.get("area", 0)), a.get("id", 0))):
        if ann.get("segmentation") is None:  # a box-only annotation paints nothing we could score against
            raise ValueError(f"annotation {ann.get('id')!r} of image {image.get('id')!r} has no segmentation")
        np.copyto(out, int(ann["category_id"]), where=_segmentation_mask(ann["segmentation"], h, w))
    if "ignore_segmentation" in image:
        np.copyto(out, IGNORE, where=coco.decode_rle(image["ignore_segmentation"]).view(bool))
    return out


KEY_FIELDS = {  # how a COCO image is named for matching with the other side
    "id": lambda im: str(im["id"]),
    "source_id": lambda im: str(im.get("source_id", im["id"])),
    "file_stem": lambda im: file_stem(str(im["file_name"])),
}


class CocoLabels:
    """Semantic maps from one COCO document (ground truth, or a shard of our output)."""

    def __init__(self, doc: Mapping[str, Any], where: str, key: str = "id") -> None:
        for part in ("images", "annotations", "categories"):
            if part not in doc:
                raise ValueError(f"{where}: not a COCO file (no {part!r} list)")
        if key not in KEY_FIELDS:
            raise ValueError(f"unknown COCO image key {key!r}; choose one of {sorted(KEY_FIELDS)}")
        self.where = where
        self.categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in doc["categories"]]
        self._images = {KEY_FIELDS[key](im): im for im in doc["images"]}
        if len(self._images) != len(doc["images"]):
            raise ValueError(f"{where}: image {key}s are not unique")
        by_id: dict[Any, list[Mapping[str, Any]]] = {}
        for ann in doc["annotations"]:
            by_id.setdefault(ann["image_id"], []).append(ann)
        self._anns = {k: by_id.get(im["id"], []) for k, im in self._images.items()}

    @classmethod
    def open(cls, url: str, key: str = "id", **storage_options: Any) -> CocoLabels:
        with fsspec.open(url, "rb", **storage_options) as f:
            return cls(json.load(f), url, key)

    def image_ids(self) -> list[str]:
        return sorted(self._images)

    def keys_to(self, other: str) -> dict[str, str]:
        """Each image's key -> its ``other`` key field (``KEY_FIELDS``)."""
        return {k: KEY_FIELDS[other](im) for k, im in self._images.items()}

    def image(self, key: str) -> Mapping[str, Any]:
        """The COCO ``images`` entry of ``key`` (``file_name``, ``height``, ``width``, ...)."""
        return self._images[key]

    def read(self, key: str) -> np.ndarray:
        return coco_label_map(self._images[key], self._anns[key])


def read_label_png(data: bytes) -> np.ndarray:
    """PNG bytes of a label map -> [H, W] uint8: palette indices (mode P, as VOC and our output
    write them) or grey values (mode L). Other modes raise ValueError (colours are not ids)."""
    image = Image.open(io.BytesIO(data))
    if image.mode not in ("P", "L"):
        raise ValueError(f"expected an indexed (P) or greyscale (L) label PNG, got mode {image.mode}")
    return np.array(image, dtype=np.uint8)


class PngFolder:
    """``<folder>/<key>.png`` label maps (VOC ``SegmentationClass`` style, 255 ignore), local or fsspec URL."""

    categories: list[dict[str, Any]] | None = None

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        paths = self.fs.glob(f"{self.root}/*.png")
        if not paths:
            raise ValueError(f"{url}: no .png label maps found")
        self._paths = {p.rsplit("/", 1)[-1][: -len(".png")]: p for p in paths}

    def image_ids(self) -> list[str]:
        return sorted(self._paths)

    def read(self, key: str) -> np.ndarray:
        return read_label_png(self.fs.cat_file(self._paths[key]))


COCOSTUFF_UNLABELED = 255


class CocoStuffFolder(PngFolder):
    """COCO-Stuff ``stuffthingmaps`` (``<folder>/<image file stem>.png``): each pixel holds the
    category id minus one (0 person .. 181 wood) and 255 marks unlabeled pixels (COCO-Stuff's
    README, "stuff-thing maps"). ``read`` returns category ids, 255 kept as ignore. COCO-Stuff
    gives every pixel a thing or stuff class; ids outside ``keep`` (stuff, for a run over COCO's
    80 thing categories) are what our label maps call background, so they read as 0."""

    def __init__(self, url: str, keep: Iterable[int] | None = None, **storage_options: Any) -> None:
        super().__init__(url, **storage_options)
        self.keep: np.ndarray | None = None
        if keep is not None:
            self.keep_only(keep)

    def keep_only(self, ids: Iterable[int]) -> None:
        """Read ids other than ``ids`` (and 255) as background 0 from now on."""
        self.keep = np.isin(np.arange(256), [int(i) for i in ids])

    def read(self, key: str) -> np.ndarray:
        stored = super().read(key)
        if (stored == COCOSTUFF_UNLABELED - 1).any():
            raise ValueError(f"{self._paths[key]}: 254 is no COCO-Stuff value (0..181 are ids - 1, 255 unlabeled)")
        ids = np.where(stored == COCOSTUFF_UNLABELED, IGNORE, stored + np.uint8(1)).astype(np.uint8)
        if self.keep is not None:
            ids[~self.keep[ids] & (ids != IGNORE)] = BACKGROUND
        return ids


GT_FORMATS = ("png", "cocostuff")  # how a folder of ground-truth PNG maps stores class ids


def open_ground_truth(url: str, key: str = "id", fmt: str = "png", keep: Iterable[int] | None = None,
                      **storage_options: Any) -> LabelSource:  # fmt: skip
    """A COCO JSON (``key``: which image field names an image) or a folder of PNG maps in format
    ``fmt`` ("png": pixel values are category ids; "cocostuff": see ``CocoStuffFolder``)."""
    if fmt not in GT_FORMATS:
        raise ValueError(f"unknown ground-truth format {fmt!r}; choose one of {list(GT_FORMATS)}")
    if url.endswith(".json"):
        if fmt != "png":
            raise ValueError(f"--gt-format {fmt} describes a folder of PNG maps, but {url} is a COCO JSON file")
        return CocoLabels.open(url, key, **storage_options)
    if fmt == "cocostuff":
        return CocoStuffFolder(url, keep, **storage_options)
    return PngFolder(url, **storage_options)


# --- pairing prediction and ground truth ----------------------------------------------------

PRED_KEYS = ("auto", "id", "file_stem")  # how our images are named for pairing with the ground truth


class NoPairsError(ValueError):
    """No image of the prediction pairs with one of the ground truth."""


class Renamed:
    """A label source read under other keys: ``names`` maps a new key to the source's key; the
    source's keys not renamed stay as they are (unless a new key took their name)."""

    def __init__(self, source: LabelSource, names: Mapping[str, str]) -> None:
        self.source, self.categories = source, source.categories
        taken = set(names.values())
        self._keys = {k: k for k in source.image_ids() if k not in taken and k not in names} | dict(names)

    def image_ids(self) -> list[str]:
        return sorted(self._keys)

    def read(self, key: str) -> np.ndarray:
        return self.source.read(self._keys[key])


def _stem_pairs(pred_ids: Iterable[str], gt_ids: set[str], stems: Mapping[str, str]) -> dict[str, str]:
    """Prediction id -> ground-truth key where the image's file stem is a ground-truth key; a
    stem that several of our images share pairs none of them (it cannot tell them apart)."""
    count: dict[str, int] = {}
    for stem in stems.values():
        count[stem] = count.get(stem, 0) + 1
    return {p: stems[p] for p in pred_ids if p in stems and stems[p] in gt_ids and count[stems[p]] == 1}


def pair(pred_ids: Sequence[str], gt: LabelSource, stems: Mapping[str, str] | None = None, how: str = "auto",
         gt_name: str = "ground truth") -> tuple[LabelSource, str]:  # fmt: skip
    """The ground truth keyed by our image ids, and how they paired ("id" or "file_stem").

    ``stems``: our image id -> its image file's stem (``RunOutput.file_stems``), None when our
    side records none (a PNG folder). "auto" pairs by file stem when that pairs more images than
    pairing by id. Raises NoPairsError, showing a few keys of each side, when nothing pairs."""
    if how not in PRED_KEYS:
        raise ValueError(f"unknown pairing {how!r}; choose one of {list(PRED_KEYS)}")
    gt_ids = set(gt.image_ids())
    by_id = len(gt_ids.intersection(pred_ids))
    by_stem = _stem_pairs(pred_ids, gt_ids, stems or {}) if how != "id" else {}
    if how == "file_stem" and stems is None:
        raise ValueError("--pred-key file_stem needs our run's output prefix (its COCO files record the file names)")
    if how == "file_stem" or (how == "auto" and len(by_stem) > by_id):
        chosen, count = "file_stem", len(by_stem)
    else:
        chosen, count = "id", by_id
    if count == 0:
        raise NoPairsError(_no_pairs_message(pred_ids, gt_ids, stems, gt_name))
    return (Renamed(gt, by_stem) if chosen == "file_stem" else gt), chosen


def _no_pairs_message(pred_ids: Sequence[str], gt_ids: set[str], stems: Mapping[str, str] | None,
                      gt_name: str) -> str:  # fmt: skip
    few = lambda keys: ", ".join(repr(k) for k in sorted(keys)[:3]) or "none"  # noqa: E731
    ours = f"ids {few(pred_ids)}" + (f" and file stems {few(set((stems or {}).values()))}" if stems else "")
    return (f"no image pairs: our images are named by {ours}; the {gt_name} by {few(gt_ids)} "
            f"({len(pred_ids)} and {len(gt_ids)} images). Ground-truth maps must be named by our image ids or by "
            "the image files' stems (--pred-key id|file_stem); for COCO ground truth, choose the image field "
            "with --gt-key id|source_id|file_stem")  # fmt: skip


@dataclass(frozen=True)
class RunOutput:
    """Our labeling run under an output prefix: one COCO source per committed shard (keys are the
    manifest ids, ``source_id``), the run's categories, its ``stats_images`` rows, each image's
    file stem (from its COCO ``file_name``) and how many stale or broken shards were left out."""

    shards: dict[str, CocoLabels]
    categories: list[dict[str, Any]]
    stats: pa.Table | None
    file_stems: dict[str, str] = field(default_factory=dict)
    ignored_shards: int = 0


def is_run_output(url: str, **storage_options: Any) -> bool:
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    return bool(fs.glob(f"{root.rstrip('/')}/{layout.marker_glob()}"))


def open_run(url: str, **storage_options: Any) -> RunOutput:
    """Read the shards of a run committed under its ``run.json`` fingerprint. A shard with a
    broken marker, or one written by another run (left over from before ``--overwrite``), is
    left out, counted in ``ignored_shards`` and logged; its images count as missing."""
    store = Store.open(url, **storage_options)
    record = commit.read_run(store)
    if record is None:
        log.warning("%s has no %s: every committed shard is audited, whatever run wrote it", url, layout.RUN_FILE)
    markers = store.fs.glob(f"{store.root}/{layout.marker_glob()}")
    shards: dict[str, CocoLabels] = {}
    tables, ignored = [], 0
    for shard_id in sorted(map(layout.shard_id_of_marker, markers)):
        marker = commit.read_marker(store, shard_id)
        if marker is None or (record is not None and marker["fingerprint"] != record["fingerprint"]):
            ignored += 1
            continue
        shards[shard_id], stats_table = _read_shard(store, shard_id)
        if stats_table is not None:
            tables.append(stats_table)
    if ignored:
        log.info("%s: %d shard(s) ignored: their commit marker is broken or from another run "
                 "(fingerprint other than run.json's); their images count as missing", url, ignored)  # fmt: skip
    if not shards:
        raise ValueError(f"{url}: no shards committed by the run in {layout.RUN_FILE} "
                         f"(shards/<id>/{layout.MARKER}; {ignored} stale or broken)")  # fmt: skip
    cats = next(iter(shards.values())).categories
    stems = {k: v for s in shards.values() for k, v in s.keys_to("file_stem").items()}
    stats_table = pa.concat_tables(tables) if tables else None
    return RunOutput(shards, cats, stats_table, stems, ignored)


def _read_shard(store: Store, shard_id: str) -> tuple[CocoLabels, pa.Table | None]:
    annotations = layout.shard_file(shard_id, layout.ANNOTATIONS)
    data = store.read(annotations)
    if data is None:
        raise ValueError(f"{store.path(layout.shard_dir(shard_id))}: committed but annotations.json is missing")
    labels = CocoLabels(json.loads(data), store.path(annotations), key="source_id")
    stats_data = store.read(layout.table_file(shard_id, "stats_images"))
    return labels, None if stats_data is None else pq.read_table(io.BytesIO(stats_data))


# --- correlation of our statistics with the true IoU ----------------------------------------


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    out = np.empty(len(x), dtype=np.float64)
    out[order] = np.repeat(avg, ends - starts)
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r of two 1-D float arrays; NaN with fewer than 2 points or a constant side."""
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / den if den > 0 else math.nan


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the (tie-averaged) ranks."""
    return pearson(ranks(x), ranks(y))


def correlations(stats: pa.Table, image_rows: Sequence[Mapping[str, Any]], target: str = "miou") -> list[dict]:
    """One row per numeric ``stats`` column: Pearson and Spearman against the per-image ``target``
    of the scored images, over the images where both are known (``n``)."""
    truth = {r["image_id"]: r[target] for r in image_rows if r["status"] == OK and r[target] is not None}
    ids = stats.column("image_id").to_pylist()
    out = []
    for name in stats.column_names:
        column = stats.column(name)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            continue
        pairs = [(v, truth[i]) for i, v in zip(ids, column.to_pylist(), strict=True)
                 if v is not None and i in truth and not math.isnan(v)]  # fmt: skip
        x = np.array([p[0] for p in pairs], dtype=np.float64)
        y = np.array([p[1] for p in pairs], dtype=np.float64)
        out.append({"stat": name, "n": len(pairs), "pearson": _opt(pearson(x, y)), "spearman": _opt(spearman(x, y))})
    return out


# --- tables ---------------------------------------------------------------------------------


def class_table(matrix: np.ndarray, categories: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Per-class rows (``CLASS_SCHEMA``), background first; ``categories`` exclude background."""
    names = {BACKGROUND: "background", **{int(c["id"]): str(c["name"]) for c in categories}}
    ids = check_class_ids(names)
    m = metrics(matrix, ids)
    n = len(ids)
    rows = [{"category_id": cid, "name": names[cid], "gt_pixels": int(matrix[i].sum()),
             "pred_pixels": int(matrix[:, i].sum()), "true_positive": int(matrix[i, i]),
             "ignored_by_us": int(matrix[i, n]), "iou": _opt(float(m.iou[i])),
             "precision": _opt(float(m.precision[i])), "recall": _opt(float(m.recall[i]))}
            for i, cid in enumerate(ids)]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=CLASS_SCHEMA)


def confusion_table(matrix: np.ndarray, class_ids: Sequence[int]) -> pa.Table:
    """The matrix in long form (``CONFUSION_SCHEMA``), every cell, row-major."""
    cols = [*class_ids, IGNORE]
    rows = [{"gt_category_id": g, "pred_category_id": p, "pixels": int(matrix[i, j])}
            for i, g in enumerate(class_ids) for j, p in enumerate(cols)]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=CONFUSION_SCHEMA)


def image_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=IMAGE_SCHEMA)


def correlation_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=CORRELATION_SCHEMA)


def summary(audit: Audit) -> dict[str, Any]:
    """Headline figures and counts of an audit (JSON-friendly; NaN becomes None)."""
    m = metrics(audit.matrix, audit.class_ids)
    statuses = [r["status"] for r in audit.rows]
    return {
        "images_scored": statuses.count(OK), "images_missing_pred": statuses.count(MISSING_PRED),
        "images_missing_gt": statuses.count(MISSING_GT), "images_error": statuses.count(ERROR),
        "classes": len(audit.class_ids) - 1, "valid_pixels": m.valid_pixels,
        "miou": _opt(m.miou), "miou_fg": _opt(m.miou_fg), "pixel_accuracy": _opt(m.pixel_accuracy),
        "ignored_fraction": _opt(m.ignored_fraction), "labelled_accuracy": _opt(m.labelled_accuracy),
    }  # fmt: skip
