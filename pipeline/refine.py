"""Felzenszwalb superpixel refinement: class scores pooled inside superpixels of the original image,
so label boundaries follow image edges. Pure numpy; the segmentation is ``pipeline.felzenszwalb``
(scikit-image's algorithm compiled with numba, equal segment maps)."""

from __future__ import annotations

import numpy as np
from pipeline.config import RefineConfig
from pipeline.felzenszwalb import felzenszwalb


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
    _, flat = np.unique(segments.ravel(), return_inverse=True)  # ids made contiguous
    n = int(flat.max()) + 1
    if pooling == "mean":
        counts = np.bincount(flat, minlength=n).astype(np.float64)
        pooled = np.stack([np.bincount(flat, weights=s.ravel(), minlength=n) for s in scores]) / counts
    elif pooling == "median":
        order = np.argsort(flat, kind="stable")
        bounds = np.flatnonzero(np.diff(flat[order])) + 1
        pooled = np.stack([[np.median(g) for g in np.split(s.ravel()[order], bounds)] for s in scores])
    else:
        raise ValueError(f"unknown pooling {pooling!r}; use 'mean' or 'median'")
    return pooled[:, flat].reshape(scores.shape).astype(scores.dtype)


def superpixel_purity(labels: np.ndarray, segments: np.ndarray) -> float:
    """Pixel-weighted fraction of each superpixel taken by its majority label, in [0, 1].

    labels: [H, W] uint8 label map; segments: [H, W] non-negative int superpixel ids.
    """
    pairs = segments.astype(np.int64).ravel() * 256 + labels.astype(np.int64).ravel()
    counts = np.bincount(pairs, minlength=(int(segments.max()) + 1) * 256).reshape(-1, 256)
    return float(counts.max(axis=1).sum() / labels.size)
