"""Comparing two runs image by image: how far their label maps agree (no ground truth needed) and,
with ground truth, each run's audit side by side. Pure functions and small readers, no Ray.

Pairing: images pair by manifest id (the ``source_id`` our COCO files record). Each run is read
through ``audit.open_run``: only shards committed under its ``run.json`` fingerprint count. An
image one run labelled and the other did not (failed, or absent) is a row with status
``missing_a`` / ``missing_b`` whose ``error`` says why; maps of different sizes or holding ids
that are none of their run's categories are ``error`` rows. All are counted, none is dropped.

Agreement conventions (run A against run B; also in README "Compare runs and methods"):

- Categories are matched by id and name. The shared classes (same id, same name, plus
  background 0) are compared; ids only one run has and ids the runs name differently are listed
  in the summary and in ``categories.parquet``, and pixels where either run holds such a class
  are left out of every figure and counted as ``unshared_pixels``.
- 255 is "no answer", not a class: a pixel either run marks 255 is left out of agreement and
  IoU and counted in ``ignore_a`` / ``ignore_b`` (a pixel both ignore counts in both).
- ``compared_pixels``: pixels both runs label with shared classes (background included).
  ``agreement`` = pixels with the same class / compared pixels.
- IoU of class c, A against B = |A = c and B = c| / |A = c or B = c| over the compared pixels; it
  is symmetric. A class neither run shows has no IoU (NaN, null in the tables) and is left out of
  the means; ``miou`` averages every class with an IoU, background included.

The agreement matrix is ``[n, n]`` int64 pixel counts over the shared class ids (rows A, columns
B), accumulated by exact integer addition, so the tables do not depend on image order.

With ground truth, each run is audited with ``pipeline.audit`` (its conventions, its readers) on
the images both runs labelled; per-class IoU of A and B sit side by side and every image gets
``miou_delta`` = B's mIoU minus A's. Both runs' categories must then match the ground truth's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import audit
from pipeline.audit import BACKGROUND, CocoLabels, RunOutput
from pipeline.types import IGNORE
from pipeline.types import OK as IMAGE_OK  # a stats_images row's status; OK below is this module's

log = logging.getLogger(__name__)

OK, MISSING_A, MISSING_B, ERROR = "ok", "missing_a", "missing_b", "error"

IMAGE_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # ok, missing_a, missing_b, error
    pa.field("error", pa.string()),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("pixels", pa.int64()),
    pa.field("ignore_a", pa.int64()),  # pixels A marks 255
    pa.field("ignore_b", pa.int64()),
    pa.field("unshared_pixels", pa.int64()),  # labelled by both, but with a class only one run has
    pa.field("compared_pixels", pa.int64()),
    pa.field("agree_pixels", pa.int64()),
    pa.field("agreement", pa.float64()),  # agree / compared
    pa.field("miou", pa.float64()),  # mean IoU of A against B over the classes either shows
    pa.field("n_classes_a", pa.int32()),  # foreground classes in A's compared pixels
    pa.field("n_classes_b", pa.int32()),
])  # fmt: skip

CLASS_SCHEMA = pa.schema([
    pa.field("category_id", pa.int32(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("pixels_a", pa.int64(), nullable=False),  # compared pixels A gives the class
    pa.field("pixels_b", pa.int64(), nullable=False),
    pa.field("both", pa.int64(), nullable=False),
    pa.field("iou", pa.float64()),
])  # fmt: skip

PAIRS_SCHEMA = pa.schema([
    pa.field("a_category_id", pa.int32(), nullable=False),
    pa.field("b_category_id", pa.int32(), nullable=False),
    pa.field("pixels", pa.int64(), nullable=False),
])  # fmt: skip

CATEGORY_SCHEMA = pa.schema([
    pa.field("category_id", pa.int32(), nullable=False),
    pa.field("name_a", pa.string()),  # null: A has no such category
    pa.field("name_b", pa.string()),
    pa.field("compared", pa.bool_(), nullable=False),  # same id and name on both sides
])  # fmt: skip

GT_CLASS_SCHEMA = pa.schema([
    pa.field("category_id", pa.int32(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("gt_pixels", pa.int64(), nullable=False),
    pa.field("iou_a", pa.float64()),
    pa.field("iou_b", pa.float64()),
    pa.field("iou_delta", pa.float64()),  # b - a
])  # fmt: skip

GT_IMAGE_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("status_a", pa.string(), nullable=False),  # audit statuses: ok, missing_gt, error
    pa.field("status_b", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("miou_a", pa.float64()),
    pa.field("miou_b", pa.float64()),
    pa.field("miou_delta", pa.float64()),  # b - a, where both are defined
    pa.field("pixel_accuracy_a", pa.float64()),
    pa.field("pixel_accuracy_b", pa.float64()),
    pa.field("ignored_fraction_a", pa.float64()),
    pa.field("ignored_fraction_b", pa.float64()),
    pa.field("labelled_accuracy_a", pa.float64()),
    pa.field("labelled_accuracy_b", pa.float64()),
])  # fmt: skip


# --- reading a run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunImages:
    """A run opened for comparison: which committed shard holds each labelled image (by manifest
    id) and, for each image the run failed, ``"<status>: <error>"`` from its stats."""

    url: str
    run: RunOutput
    where: dict[str, str]  # image id -> shard id
    failed: dict[str, str]

    @property
    def categories(self) -> list[dict[str, Any]]:
        return self.run.categories

    def labels(self, image_id: str) -> CocoLabels:
        return self.run.shards[self.where[image_id]]

    def read(self, image_id: str) -> np.ndarray:
        """[H, W] uint8 label map of a labelled image (255 ignore)."""
        return self.labels(image_id).read(image_id)

    def image_ids(self) -> list[str]:
        """Every image the run recorded, labelled or failed, sorted."""
        return sorted(set(self.where) | set(self.failed))


def open_images(url: str, **storage_options: Any) -> RunImages:
    """Open a run's committed shards (``audit.open_run``) and index its images."""
    run = audit.open_run(url, **storage_options)
    where = {key: shard_id for shard_id, labels in run.shards.items() for key in labels.image_ids()}
    failed = {}
    if run.stats is not None:
        for row in run.stats.select(["image_id", "status", "error"]).to_pylist():
            if row["status"] != IMAGE_OK:
                failed[row["image_id"]] = f"{row['status']}: {row['error']}"
    return RunImages(url, run, where, failed)


def why_missing(run: RunImages, image_id: str, side: str) -> str:
    """Why ``run`` has no label map of the image, for a row's ``error``."""
    if image_id in run.failed:
        return f"run {side} failed this image: {run.failed[image_id]}"
    return f"not in run {side}'s committed shards"


# --- categories -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SharedCategories:
    """The classes two runs can be compared on: ``shared`` (same id and name, sorted by id),
    ``only_a`` / ``only_b`` (ids one run lacks) and ``renamed`` (same id, other name)."""

    shared: list[dict[str, Any]]
    only_a: list[int]
    only_b: list[int]
    renamed: list[int]
    names_a: dict[int, str]
    names_b: dict[int, str]

    @property
    def class_ids(self) -> tuple[int, ...]:
        """0 background and the shared ids, sorted."""
        return audit.check_class_ids(c["id"] for c in self.shared)


def share_categories(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> SharedCategories:
    """Match two runs' categories (``{"id", "name"}``) by id and name."""
    na = {int(c["id"]): str(c["name"]) for c in a}
    nb = {int(c["id"]): str(c["name"]) for c in b}
    both = sorted(set(na) & set(nb))
    shared = [{"id": i, "name": na[i]} for i in both if na[i] == nb[i]]
    renamed = [i for i in both if na[i] != nb[i]]
    return SharedCategories(shared, sorted(set(na) - set(nb)), sorted(set(nb) - set(na)), renamed, na, nb)


def category_table(cats: SharedCategories) -> pa.Table:
    """One row per category id of either run (``CATEGORY_SCHEMA``), sorted by id."""
    ids = sorted(set(cats.names_a) | set(cats.names_b))
    compared = {c["id"] for c in cats.shared}
    rows = [{"category_id": i, "name_a": cats.names_a.get(i), "name_b": cats.names_b.get(i),
             "compared": i in compared} for i in ids]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=CATEGORY_SCHEMA)


# --- agreement of two label maps --------------------------------------------------------------


def _valid_ids(categories: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """[256] bool: the ids a run's label map may hold (0, its categories, 255)."""
    ok = np.zeros(256, dtype=bool)
    ok[[BACKGROUND, IGNORE, *(int(c["id"]) for c in categories)]] = True
    return ok


def _ratio(num: Any, den: Any) -> Any:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def class_iou(matrix: np.ndarray) -> np.ndarray:
    """[n, n] agreement matrix (rows A, columns B) -> [n] float64 IoU per class (NaN: neither shows it)."""
    both = np.diag(matrix).astype(np.int64)
    return _ratio(both, matrix.sum(axis=1) + matrix.sum(axis=0) - both)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def _opt(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass
class Agreement:
    """Running totals of A against B: the agreement matrix over the shared class ids and one row
    per image (``IMAGE_SCHEMA``)."""

    class_ids: tuple[int, ...]
    valid_a: np.ndarray
    valid_b: np.ndarray
    matrix: np.ndarray = field(default=None)  # type: ignore[arg-type,assignment]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.matrix is None:
            n = len(self.class_ids)
            self.matrix = np.zeros((n, n), dtype=np.int64)

    @classmethod
    def of(cls, cats: SharedCategories) -> Agreement:
        return cls(cats.class_ids, _valid_ids(_cats(cats.names_a)), _valid_ids(_cats(cats.names_b)))

    def add(self, image_id: str, a: np.ndarray, b: np.ndarray) -> None:
        """Compare one image: [H, W] uint8 label maps of A and B. A size mismatch or an id that is
        no category of its run makes an ``error`` row and leaves the matrix unchanged."""
        try:
            hist = audit.pair_histogram(a, b)  # rows A, columns B
            self._check_ids(hist)
        except ValueError as err:
            self.add_unscored(image_id, ERROR, str(err).replace("ground truth", "run A").replace("prediction", "run B"))
            return
        matrix = hist[np.ix_(self.class_ids, self.class_ids)]
        self.matrix += matrix
        self.rows.append(image_row(image_id, a.shape, hist, matrix, self.class_ids))

    def _check_ids(self, hist: np.ndarray) -> None:
        for side, present, valid in (("A", hist.sum(axis=1), self.valid_a), ("B", hist.sum(axis=0), self.valid_b)):
            bad = np.flatnonzero((present > 0) & ~valid)
            if bad.size:
                raise ValueError(f"run {side}'s label map holds ids {bad.tolist()} that are none of its categories")

    def add_unscored(self, image_id: str, status: str, error: str | None = None) -> None:
        row = dict.fromkeys(IMAGE_SCHEMA.names)
        row.update(image_id=image_id, status=status, error=error)
        self.rows.append(row)

    def sorted_rows(self) -> list[dict[str, Any]]:
        return sorted(self.rows, key=lambda r: (r["image_id"], r["status"]))


def _cats(names: Mapping[int, str]) -> list[dict[str, Any]]:
    return [{"id": i, "name": n} for i, n in names.items()]


def image_row(image_id: str, shape: tuple[int, ...], hist: np.ndarray, matrix: np.ndarray,
              class_ids: Sequence[int]) -> dict[str, Any]:  # fmt: skip
    """The per-image row of a compared image: ``hist`` its [256, 256] (A, B) pair histogram,
    ``matrix`` the [n, n] part over ``class_ids``."""
    total = int(hist.sum())
    ignore_a, ignore_b = int(hist[IGNORE].sum()), int(hist[:, IGNORE].sum())
    compared, agree = int(matrix.sum()), int(np.trace(matrix))
    unshared = total - ignore_a - ignore_b + int(hist[IGNORE, IGNORE]) - compared
    ids = np.asarray(class_ids)
    fg = ids != BACKGROUND
    return {
        "image_id": image_id, "status": OK, "error": None, "height": int(shape[0]), "width": int(shape[1]),
        "pixels": total, "ignore_a": ignore_a, "ignore_b": ignore_b, "unshared_pixels": unshared,
        "compared_pixels": compared, "agree_pixels": agree, "agreement": _opt(float(_ratio(agree, compared))),
        "miou": _opt(_nanmean(class_iou(matrix))),
        "n_classes_a": int(((matrix.sum(axis=1) > 0) & fg).sum()),
        "n_classes_b": int(((matrix.sum(axis=0) > 0) & fg).sum()),
    }  # fmt: skip


def compare_runs(a: RunImages, b: RunImages, cats: SharedCategories | None = None) -> Agreement:
    """Compare every image either run recorded (labelled or failed), in id order."""
    cats = cats or share_categories(a.categories, b.categories)
    result = Agreement.of(cats)
    for key in sorted(set(a.image_ids()) | set(b.image_ids())):
        if key not in a.where:
            result.add_unscored(key, MISSING_A, why_missing(a, key, "A"))
        elif key not in b.where:
            result.add_unscored(key, MISSING_B, why_missing(b, key, "B"))
        else:
            try:
                la, lb = a.read(key), b.read(key)
            except (ValueError, OSError) as err:
                result.add_unscored(key, ERROR, f"label map unreadable: {err}")
                continue
            result.add(key, la, lb)
    return result


def class_table(matrix: np.ndarray, cats: SharedCategories) -> pa.Table:
    """Per-class rows (``CLASS_SCHEMA``) over the shared classes, background first."""
    names = {BACKGROUND: "background", **{c["id"]: c["name"] for c in cats.shared}}
    iou = class_iou(matrix)
    rows = [{"category_id": cid, "name": names[cid], "pixels_a": int(matrix[i].sum()),
             "pixels_b": int(matrix[:, i].sum()), "both": int(matrix[i, i]), "iou": _opt(float(iou[i]))}
            for i, cid in enumerate(cats.class_ids)]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=CLASS_SCHEMA)


def pairs_table(matrix: np.ndarray, class_ids: Sequence[int]) -> pa.Table:
    """The agreement matrix in long form (``PAIRS_SCHEMA``), every cell, row-major."""
    rows = [{"a_category_id": ca, "b_category_id": cb, "pixels": int(matrix[i, j])}
            for i, ca in enumerate(class_ids) for j, cb in enumerate(class_ids)]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)


def image_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=IMAGE_SCHEMA)


def summary(result: Agreement, cats: SharedCategories) -> dict[str, Any]:
    """Headline figures and counts (JSON-friendly; NaN becomes None)."""
    scored = [r for r in result.rows if r["status"] == OK]
    total = lambda name: sum(r[name] for r in scored)  # noqa: E731
    pixels, compared = total("pixels"), int(result.matrix.sum())
    statuses = [r["status"] for r in result.rows]
    return {
        "images_compared": len(scored), "images_missing_a": statuses.count(MISSING_A),
        "images_missing_b": statuses.count(MISSING_B), "images_error": statuses.count(ERROR),
        "pixels": pixels, "compared_pixels": compared,
        "agreement": _opt(float(_ratio(np.trace(result.matrix), compared))),
        "miou": _opt(_nanmean(class_iou(result.matrix))),
        "ignore_fraction_a": _opt(float(_ratio(total("ignore_a"), pixels))),
        "ignore_fraction_b": _opt(float(_ratio(total("ignore_b"), pixels))),
        "unshared_fraction": _opt(float(_ratio(total("unshared_pixels"), pixels))),
        "classes_compared": len(cats.shared), "category_ids_only_a": cats.only_a,
        "category_ids_only_b": cats.only_b, "category_ids_renamed": cats.renamed,
    }  # fmt: skip


# --- with ground truth: the two audits side by side -------------------------------------------


def audit_run(run: RunImages, gt: audit.LabelSource, keys: Sequence[str], gt_name: str) -> audit.Audit:
    """Audit ``run`` on the images ``keys`` (labelled by the run) against ``gt``, paired as
    ``audit.pair`` pairs them; keys the ground truth lacks are ``missing_gt`` rows."""
    categories = audit.match_categories(run.categories, gt.categories if gt.categories is not None else run.categories)
    paired, _ = audit.pair(list(keys), gt, run.run.file_stems, "auto", gt_name)
    class_ids = audit.check_class_ids(c["id"] for c in categories)
    have = set(paired.image_ids())
    result = audit.Audit(class_ids)
    by_shard: dict[str, list[str]] = {}
    for key in keys:
        if key in have:
            by_shard.setdefault(run.where[key], []).append(key)
        else:
            result.add_unscored(key, audit.MISSING_GT, "not in the ground truth")
    for shard_id, shard_keys in sorted(by_shard.items()):
        result = result.merge(audit.audit_images(run.run.shards[shard_id], paired, shard_keys, class_ids))
    return result


def gt_class_table(a: audit.Audit, b: audit.Audit, categories: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Per-class IoU of each run against the ground truth (``GT_CLASS_SCHEMA``), background first."""
    ta, tb = audit.class_table(a.matrix, categories).to_pylist(), audit.class_table(b.matrix, categories).to_pylist()
    rows = []
    for ra, rb in zip(ta, tb, strict=True):
        delta = None if ra["iou"] is None or rb["iou"] is None else rb["iou"] - ra["iou"]
        rows.append({"category_id": ra["category_id"], "name": ra["name"], "gt_pixels": ra["gt_pixels"],
                     "iou_a": ra["iou"], "iou_b": rb["iou"], "iou_delta": delta})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=GT_CLASS_SCHEMA)


def gt_image_rows(a: audit.Audit, b: audit.Audit) -> list[dict[str, Any]]:
    """Per-image rows (``GT_IMAGE_SCHEMA``) of two audits over the same images, sorted by id."""
    ra = {r["image_id"]: r for r in a.rows}
    rb = {r["image_id"]: r for r in b.rows}
    rows = []
    for key in sorted(set(ra) | set(rb)):
        x, y = ra.get(key, {}), rb.get(key, {})
        errors = [f"run {s}: {r['error']}" for s, r in (("A", x), ("B", y)) if r.get("error")]
        row = {"image_id": key, "status_a": x.get("status", MISSING_A), "status_b": y.get("status", MISSING_B),
               "error": "; ".join(errors) or None}  # fmt: skip
        for name in ("miou", "pixel_accuracy", "ignored_fraction", "labelled_accuracy"):
            row[f"{name}_a"], row[f"{name}_b"] = x.get(name), y.get(name)
        both = row["miou_a"] is not None and row["miou_b"] is not None
        row["miou_delta"] = row["miou_b"] - row["miou_a"] if both else None
        rows.append(row)
    return rows


def gt_image_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=GT_IMAGE_SCHEMA)


def gt_categories(a: RunImages, b: RunImages) -> list[dict[str, Any]]:
    """The categories of two runs compared against ground truth: they must be the same."""
    cats = share_categories(a.categories, b.categories)
    if cats.only_a or cats.only_b or cats.renamed:
        raise ValueError(f"with --gt both runs must have the same categories (ids only in A: {cats.only_a}, "
                         f"only in B: {cats.only_b}, named differently: {cats.renamed}); compare them without "
                         "--gt, or audit each run on its own with jobs/audit_masks.py")  # fmt: skip
    return cats.shared


def gt_summary(a: audit.Audit, b: audit.Audit) -> dict[str, Any]:
    """Both audits' headline figures, and B minus A for each."""
    sa, sb = audit.summary(a), audit.summary(b)
    out: dict[str, Any] = {"a": sa, "b": sb}
    out["delta"] = {k: sb[k] - sa[k] for k in sa if isinstance(sa[k], float) and isinstance(sb[k], float)}
    return out
