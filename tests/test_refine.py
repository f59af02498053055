"""Felzenszwalb refinement: pooling inside superpixels makes label edges follow image edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import labels, refine
from pipeline.config import LabelConfig, RefineConfig


def _scene(h: int = 240, w: int = 320, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image with a disc and a triangle (sharp edges, off the 16 px grid) and its truth mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 71) ** 2 + (xx - 77) ** 2 < 23**2
    tri = (xx > 190) & (yy > 37) & (yy - 37 < (xx - 190) * 1.3) & (yy < 131)
    bar = (np.abs((yy - 150) - 0.4 * (xx - 40)) < 12) & (xx > 40) & (xx < 280)
    img = np.empty((h, w, 3), np.float64)
    img[:] = (70, 140, 60)
    img[disc] = (200, 60, 50)
    img[tri | bar] = (200, 60, 50)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), disc | tri | bar


def _patch_blurred(truth: np.ndarray, patch: int = 16) -> np.ndarray:
    """The truth as a patch-grid model would see it: block means on a 16 px grid, upsampled."""
    h, w = truth.shape
    grid = truth[: h // patch * patch, : w // patch * patch].reshape(h // patch, patch, w // patch, patch).mean((1, 3))
    t = torch.from_numpy(grid).float()[None, None]
    return torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("pooling", ["mean", "median"])
def test_superpixel_pooling_raises_iou_against_sharp_truth(pooling):
    image, truth = _scene()
    scores = _patch_blurred(truth)
    cfg = RefineConfig(pooling=pooling)
    plain = labels.assemble_label_map(
        labels.decision_scores(scores, is_normalize=True, segments=None, refine=cfg), [1], 0.5, LabelConfig()
    )
    segments = refine.superpixels(image, cfg)
    refined = labels.assemble_label_map(
        labels.decision_scores(scores, is_normalize=True, segments=segments, refine=cfg), [1], 0.5, LabelConfig()
    )
    iou_plain, iou_refined = _iou(plain == 1, truth), _iou(refined == 1, truth)
    assert iou_refined > iou_plain + 0.03, (iou_plain, iou_refined)
    assert iou_refined > 0.95


def test_pool_scores_gives_each_superpixel_its_mean():
    segments = np.array([[0, 0, 1], [2, 2, 1]])
    scores = np.array([[[1.0, 3.0, 5.0], [0.0, 4.0, 7.0]]], dtype=np.float32)
    out = refine.pool_scores(scores, segments, "mean")
    np.testing.assert_allclose(out[0], [[2.0, 2.0, 6.0], [2.0, 2.0, 6.0]])
    med = refine.pool_scores(
        np.array([[[1.0, 9.0, 5.0], [0.0, 4.0, 7.0]]], np.float32), np.array([[0, 0, 0], [0, 1, 1]]), "median"
    )
    np.testing.assert_allclose(med[0], [[3.0, 3.0, 3.0], [3.0, 5.5, 5.5]])  # median of 1, 9, 5, 0 is 3


def test_superpixel_parameters_scale_with_image_size():
    image, _ = _scene(120, 160)
    big = np.kron(image, np.ones((2, 2, 1), np.uint8))
    n_small = refine.superpixels(image, RefineConfig()).max() + 1
    n_big = refine.superpixels(big, RefineConfig()).max() + 1
    # Four times the pixels, the same scene: a similar number of superpixels, not four times as many.
    assert n_big < 2 * n_small


def test_superpixel_purity():
    segments = np.array([[0, 0, 0, 1], [0, 1, 1, 1]])
    lab = np.array([[3, 3, 5, 5], [3, 5, 5, 0]])
    # segment 0: labels 3,3,5,3 -> 3 of 4; segment 1: 5,5,5,0 -> 3 of 4
    assert refine.superpixel_purity(lab, segments) == pytest.approx(6 / 8)
