"""Felzenszwalb superpixel refinement: class scores pooled inside superpixels of the original image,
so label boundaries follow image edges. Pure numpy; the segmentation is ``pipeline.felzenszwalb``
(scikit-image's algorithm compiled with numba, equal segment maps)."""

from __future__ import annotations

import numpy as np

from pipeline.config import RefineConfig
from pipeline.felzenszwalb import compiled, felzenszwalb


def superpixels(image: np.ndarray, cfg: RefineConfig) -> np.ndarray:
    """HWC uint8 RGB -> [H, W] int32 superpixel ids 0..S-1.

    ``scale`` and ``min_size`` grow with the pixel count relative to ``cfg.reference_pixels``.
    """
    h, w = image.shape[:2]
    growth = (h * w) / cfg.reference_pixels
    return felzenszwalb(
        image,
        scale=cfg.scale * growth,
        sigma=cfg.sigma,
        min_size=max(1, int(round(cfg.min_size * growth))),
    ).astype(np.int32)


def pool_scores(scores: np.ndarray, segments: np.ndarray, pooling: str = "mean") -> np.ndarray:
    """[K, H, W] float scores -> the same shape with each superpixel holding its pooled score
    (``mean`` or ``median`` over its pixels, per class)."""
    if scores.shape[1:] != segments.shape:
        raise ValueError(f"scores {scores.shape[1:]} and superpixels {segments.shape} differ in size")
    flat, n = segment_index(segments)
    return np.take(segment_pooled(scores, flat, n, pooling), flat, axis=1).reshape(scores.shape)


def segment_index(segments: np.ndarray) -> tuple[np.ndarray, int]:
    """[H, W] int superpixel ids -> (flat [H * W] intp index 0..S-1, S): each pixel's rank among the
    distinct ids, as ``np.unique(segments, return_inverse=True)`` gives it. Ids that are already
    0..S-1 with none missing (``refine.superpixels`` numbers them so) are their own rank, which
    skips the sort of every pixel."""
    flat = segments.ravel()
    if flat.size and flat.min() >= 0 and flat.max() < flat.size and np.bincount(flat).all():
        return flat.astype(np.intp, copy=False), int(flat.max()) + 1
    _, inverse = np.unique(flat, return_inverse=True)
    return inverse.ravel(), int(inverse.max()) + 1 if inverse.size else 0


def segment_pooled(scores: np.ndarray, flat: np.ndarray, n: int, pooling: str) -> np.ndarray:
    """[K, H, W] scores, ``segment_index``'s (flat, S) -> [K, S] pooled score of each superpixel in
    ``scores.dtype``: the values ``pool_scores`` spreads over the superpixel's pixels (the
    same float64 sums, the same medians)."""
    if pooling == "mean":
        values = scores.reshape(len(scores), -1)
        sums, counts = _segment_sums(values if values.dtype != np.float16 else values.astype(np.float32), flat, n)
        pooled = sums / counts.astype(np.float64)
    elif pooling == "median":
        order = np.argsort(flat, kind="stable")
        bounds = np.flatnonzero(np.diff(flat[order])) + 1
        pooled = np.stack([[np.median(g) for g in np.split(s.ravel()[order], bounds)] for s in scores])
    else:
        raise ValueError(f"unknown pooling {pooling!r}; use 'mean' or 'median'")
    return pooled.astype(scores.dtype)


@compiled()
def _segment_sums(values: np.ndarray, flat: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """[K, N] scores, [N] segment index -> ([K, S] float64 sums, [S] pixel counts): the sums
    ``np.bincount(flat, weights=values[k])`` gives (float64, added in pixel order), all classes in
    one pass over the pixels, without the GIL."""
    sums = np.zeros((values.shape[0], n))
    counts = np.zeros(n, dtype=np.int64)
    for i in range(flat.size):
        j = flat[i]
        counts[j] += 1
        for c in range(values.shape[0]):
            sums[c, j] += np.float64(values[c, i])
    return sums, counts


def superpixel_purity(labels: np.ndarray, segments: np.ndarray) -> float:
    """Pixel-weighted fraction of each superpixel taken by its majority label, in [0, 1].

    labels: [H, W] uint8 label map; segments: [H, W] non-negative int superpixel ids.
    """
    pairs = segments.astype(np.int64).ravel() * 256 + labels.astype(np.int64).ravel()
    counts = np.bincount(pairs, minlength=(int(segments.max()) + 1) * 256).reshape(-1, 256)
    return float(counts.max(axis=1).sum() / labels.size)
