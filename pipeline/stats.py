"""Quality statistics of label maps, as rows of the Parquet tables in ``pipeline/schemas.py``.

Pure functions of a ``LabelResult``. Three tables, one file each per shard:

    stats_images   one row per image: size, background/ignore fractions, coarse-vs-compensated
                   agreement, superpixel purity; failed images have ``status`` and ``error``
    stats_classes  one row per (image, candidate class): pixel area and fraction, coarse and
                   final class scores, mean and spread of the decision score inside its mask
    timings        one row per (image, stage): wall-clock seconds. Not deterministic, so kept
                   apart from the two tables above, which are byte-identical across runs.

With discovery on (docs/DISCOVERY.md), ``stats_images`` gains ``unknown_fraction`` and
``n_unknown_regions`` (schema ``stats_images_discovery``) and each image has rows of
``suggestions``; without it, nothing here changes.

Agreement: the coarse map [C, h, w] is bilinearly resized to the SD-compensated grid [C, s, s]; the
value is the fraction of grid cells where both argmaxes over the candidate classes agree.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import discovery
from pipeline.refine import superpixel_purity
from pipeline.schemas import ARROW_SCHEMAS
from pipeline.types import IGNORE, OK, Failure, LabelResult

ROW_GROUP_ROWS = 128 * 1024  # rows per Parquet row group: large enough for fast scans of big datasets
STAT_DIGITS = 9  # statistics are rounded: shorter files, and no digits below float32 precision


def _round(x: float) -> float:
    return round(float(x), STAT_DIGITS)


def coarse_refined_agreement(coarse: np.ndarray, compensated: np.ndarray) -> float | None:
    """[C, h, w] coarse and [C, s, s] compensated maps -> fraction of compensated-grid cells where
    the argmax class agrees (None when there are no candidate classes). The column keeps its
    historical name ``coarse_refined_agreement``."""
    if coarse.ndim != 3 or compensated.ndim != 3 or len(coarse) != len(compensated):
        raise ValueError(f"coarse {coarse.shape} and compensated {compensated.shape} must be [C, h, w] with the same C")
    if len(coarse) == 0:
        return None
    # torch here, not at the top: readers of stats (audit, merge) must not load it; only a
    # process holding LabelResults, which has torch already, computes this.
    import torch
    import torch.nn.functional as F

    grid = torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32))[None]
    up = F.interpolate(grid, size=compensated.shape[1:], mode="bilinear", align_corners=False)[0].numpy()
    return _round(float(np.mean(up.argmax(axis=0) == compensated.argmax(axis=0))))


def _check(result: LabelResult) -> None:
    lm = result.label_map
    if not isinstance(lm, np.ndarray) or lm.ndim != 2 or lm.dtype != np.uint8:
        raise ValueError(f"image {result.image_id}: label_map must be [H, W] uint8")
    if result.decision.shape != (len(result.kept_ids), *lm.shape):
        raise ValueError(
            f"image {result.image_id}: decision {result.decision.shape} must be [K, H, W] = "
            f"[{len(result.kept_ids)}, {lm.shape[0]}, {lm.shape[1]}] (one map per kept id)"
        )
    if len(result.final_scores) != len(result.class_ids) or len(result.coarse_scores) != len(result.class_ids):
        raise ValueError(f"image {result.image_id}: coarse_scores and final_scores need one value per class id")
    seg = result.segments
    if seg is not None and (seg.shape != lm.shape or not np.issubdtype(seg.dtype, np.integer) or seg.min() < 0):
        raise ValueError(f"image {result.image_id}: segments must be [H, W] non-negative integers like the label map")


def image_row(result: LabelResult, shard_id: str, label_file: str | None) -> dict[str, Any]:
    """One ``stats_images`` row for a labelled image."""
    _check(result)
    lm, seg = result.label_map, result.segments
    row = {
        "shard_id": shard_id, "image_id": result.image_id, "status": OK, "error": None, "label_file": label_file,
        "height": int(lm.shape[0]), "width": int(lm.shape[1]),
        "n_candidates": len(result.class_ids), "n_kept": len(result.kept_ids),
        "background_fraction": _round(np.mean(lm == 0)), "ignore_fraction": _round(np.mean(lm == IGNORE)),
        "coarse_refined_agreement": coarse_refined_agreement(result.coarse, result.compensated),
        "superpixel_purity": None if seg is None else _round(superpixel_purity(lm, seg)),
        "n_superpixels": None if seg is None else int(np.count_nonzero(np.bincount(seg.ravel()))),
    }  # fmt: skip
    if result.regions is not None:  # discovery ran (columns of STATS_IMAGES_DISCOVERY)
        row.update(unknown_fraction=discovery.unknown_fraction(result.regions),
                   n_unknown_regions=len(result.regions.masks))  # fmt: skip
    return row


def failed_row(failure: Failure, shard_id: str) -> dict[str, Any]:
    """One ``stats_images`` row for an image that failed: status and error, the rest null."""
    row = dict.fromkeys(ARROW_SCHEMAS["stats_images"].names)
    row.update(shard_id=shard_id, image_id=failure.image_id, status=failure.status, error=failure.error)
    return row


def class_rows(result: LabelResult, shard_id: str) -> list[dict[str, Any]]:
    """``stats_classes`` rows, one per candidate class in ``result.class_ids`` order."""
    _check(result)
    lm, kept = result.label_map, {cid: k for k, cid in enumerate(result.kept_ids)}
    rows = []
    for c, cid in enumerate(result.class_ids):
        mask = lm == cid
        area = int(mask.sum())
        mean = std = None
        if cid in kept and area:
            inside = result.decision[kept[cid]][mask].astype(np.float64)
            mean, std = _round(inside.mean()), _round(inside.std())
        rows.append({
            "shard_id": shard_id, "image_id": result.image_id, "category_id": int(cid), "kept": cid in kept,
            "pixel_area": area, "pixel_fraction": _round(area / lm.size),
            "coarse_score": _round(result.coarse_scores[c]), "class_score": _round(result.final_scores[c]),
            "win_score_mean": mean, "win_score_std": std,
        })  # fmt: skip
    return rows


@dataclass(frozen=True)
class ImageEntry:
    """What a shard's files need of one labelled image, without its float maps: the label map
    ([H, W] uint8), the class scores (category id -> final score) and its rows of the three tables.
    ``entry`` makes one as soon as an image is finished, so a shard holds these, not whole results.
    With discovery: region_map ([H, W] uint16, ``unknown: regions`` only) and suggestion_rows
    (``suggestions`` rows; None when discovery did not run on the image)."""

    image_id: str
    label_map: np.ndarray
    class_scores: dict[int, float]
    image_row: dict[str, Any]
    class_rows: list[dict[str, Any]]
    timing_rows: list[dict[str, Any]]
    region_map: np.ndarray | None = None
    suggestion_rows: list[dict[str, Any]] | None = field(default=None)


def entry(result: LabelResult, shard_id: str, label_file: str | None) -> ImageEntry:
    """The ``ImageEntry`` of a labelled image (the same rows ``image_row``, ``class_rows`` and
    ``timing_rows`` give)."""
    scores = dict(zip(result.class_ids, map(float, result.final_scores), strict=True))
    suggestions = None
    if result.regions is not None:
        suggestions = discovery.suggestion_rows(result.regions, result.suggestions, shard_id, result.image_id)
    return ImageEntry(result.image_id, result.label_map, scores, image_row(result, shard_id, label_file),
                      class_rows(result, shard_id), timing_rows(result, shard_id), result.region_map,
                      suggestions)  # fmt: skip


def timing_rows(result: LabelResult, shard_id: str) -> list[dict[str, Any]]:
    """``timings`` rows: one per stage in ``result.timings``, stages sorted by name."""
    return [
        {"shard_id": shard_id, "image_id": result.image_id, "stage": stage, "seconds": float(sec)}
        for stage, sec in sorted(result.timings.items())
    ]


def to_table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> an Arrow table with the schema ``name`` of ``pipeline.schemas.ARROW_SCHEMAS``."""
    return pa.Table.from_pylist(rows, schema=ARROW_SCHEMAS[name])


def parquet_bytes(table: pa.Table, row_group_rows: int = ROW_GROUP_ROWS) -> bytes:
    """Serialise a table to Parquet bytes, deterministically (same table -> same bytes: no
    timestamps; pinned compression and page settings)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_rows, compression="zstd", compression_level=3,
                   write_statistics=True, use_dictionary=True, store_schema=True)  # fmt: skip
    return buf.getvalue()
