"""From per-class score maps to a label map (cliper-method.md section 4). Pure functions.

Conventions: label maps are [H, W] uint8 with 0 background, dataset class ids 1..254, and
``IGNORE`` (255) for uncertain pixels when that option is on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import LabelConfig, RefineConfig
from pipeline.refine import pool_scores, segment_index, segment_pooled
from pipeline.types import IGNORE, check_class_ids


def full_resolution_scores(compensated: torch.Tensor, final_scores: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[C, s, s] compensated map -> [C, H, W] float32: bilinear upsampling to ``size`` (H, W), each
    class divided by its maximum and multiplied by its final class score."""
    up = F.interpolate(compensated[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    peak = up.flatten(1).amax(dim=1).clamp_min(1e-12)
    up = up / peak[:, None, None] * final_scores.float()[:, None, None]
    return up.cpu().numpy().astype(np.float32)


def kept_classes(n_fg: int, scores: np.ndarray, open_vocab: bool, score_threshold: float) -> np.ndarray:
    """Indices of the candidate classes that may appear: every tag, or in open-vocabulary mode
    the classes whose final score exceeds ``score_threshold``."""
    if not open_vocab:
        return np.arange(n_fg)
    return np.flatnonzero(np.asarray(scores) > score_threshold)


def minmax_normalize(scores: np.ndarray) -> np.ndarray:
    """Per-class min-max normalisation of [K, H, W] scores to [0, 1]."""
    lo = scores.reshape(len(scores), -1).min(axis=1)[:, None, None]
    hi = scores.reshape(len(scores), -1).max(axis=1)[:, None, None]
    return ((scores - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32)


def decision_scores(
    scores: np.ndarray,
    *,
    is_normalize: bool,
    segments: np.ndarray | None,
    refine: RefineConfig,
) -> np.ndarray:
    """[K, H, W] kept-class scores -> the scores the threshold and argmax see: min-max normalised
    if ``is_normalize``, then pooled inside superpixels when ``segments`` is given. K may be 0
    (open vocabulary: no class passed ``score_threshold``)."""
    if not len(scores):
        return scores.astype(np.float32)
    if is_normalize:
        scores = minmax_normalize(scores)
    if segments is not None:
        scores = pool_scores(scores, segments, refine.pooling)
    return scores


def decide(
    scores: np.ndarray,
    class_ids: Sequence[int],
    *,
    is_normalize: bool,
    bkg_thre: float,
    segments: np.ndarray | None,
    refine: RefineConfig,
    labels: LabelConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """[K, H, W] kept-class scores -> ([K, H, W] decision scores, [H, W] uint8 label map), equal
    byte for byte to ``decision_scores`` followed by ``assemble_label_map``. With superpixels every
    pixel of one holds the same decision scores, and the label rule looks at one pixel's scores
    only, so the rule runs once per superpixel ([K, S]) and its labels are spread to the pixels:
    S is hundreds where H * W is ~10^5."""
    if segments is None or not len(scores):
        decision = decision_scores(scores, is_normalize=is_normalize, segments=segments, refine=refine)
        return decision, assemble_label_map(decision, class_ids, bkg_thre, labels)
    if scores.shape[1:] != segments.shape:
        raise ValueError(f"scores {scores.shape[1:]} and superpixels {segments.shape} differ in size")
    if is_normalize:
        scores = minmax_normalize(scores)
    flat, n = segment_index(segments)
    pooled = segment_pooled(scores, flat, n, refine.pooling)
    per_segment = assemble_label_map(pooled[:, None, :], class_ids, bkg_thre, labels)[0]
    # np.take: the same gather as pooled[:, flat], several times faster than fancy indexing
    return np.take(pooled, flat, axis=1).reshape(scores.shape), np.take(per_segment, flat).reshape(scores.shape[1:])


def assemble_label_map(
    scores: np.ndarray, class_ids: Sequence[int], bkg_thre: float, labels: LabelConfig
) -> np.ndarray:
    """[K, H, W] decision scores of the kept classes -> [H, W] uint8 label map.

    ``bkg_thre > 0``: scores below ``bkg_thre`` become 0; each pixel takes the id of its best
    class, or background (0) where every kept class is 0. ``bkg_thre <= 0`` (the published
    ``cam_to_label``'s other branch): background scores (1 - best class score)**2 and competes
    in the argmax, winning ties. With ``labels.ignore_margin`` set, pixels whose two best
    candidates (background counting as ``bkg_thre``, or as its score in the second branch) are
    closer than the margin become 255. Ties between classes go to the earlier one.
    """
    ids = np.asarray(class_ids, dtype=np.int64)
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} class ids for {len(scores)} score maps")
    check_class_ids(ids.tolist())
    h, w = scores.shape[1:]
    if not len(ids):
        return np.zeros((h, w), dtype=np.uint8)
    if bkg_thre > 0:
        kept = np.where(scores < bkg_thre, 0.0, scores)
        best = kept.argmax(axis=0)
        label = np.where(kept.max(axis=0) > 0, ids[best], 0).astype(np.uint8)
        background = np.full((1, h, w), bkg_thre, dtype=scores.dtype)
    else:
        background = np.square(1 - scores.max(axis=0, keepdims=True)).astype(scores.dtype)
        label = np.concatenate([[0], ids])[np.concatenate([background, scores]).argmax(axis=0)].astype(np.uint8)
    if labels.ignore_margin is not None:
        top2 = np.sort(np.concatenate([background, scores]), axis=0)[-2:]
        label[(top2[1] - top2[0]) < labels.ignore_margin] = IGNORE
    return label


def resized_scores(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[C, h, w] maps -> [C, H, W] float32 as they are (a method whose maps are its scores):
    bilinearly resized to ``size`` (H, W) only when they are not at that size already."""
    if tuple(maps.shape[1:]) != tuple(size):
        maps = F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return maps.float().cpu().numpy().astype(np.float32)
