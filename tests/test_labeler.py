"""The labeler end to end on tiny models: tags restrict the labels, runs are deterministic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline import cliper
from pipeline.config import LabelConfig, build_config
from pipeline.labeler import Labeler
from pipeline.types import LabelRequest
from tests.conftest import CATEGORIES, blob_image, tiny_overrides


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.integers(8, 120), st.integers(8, 120),
    st.lists(st.sampled_from([1, 7, 15]), min_size=1, max_size=3, unique=True),
    st.one_of(st.none(), st.just(0.05)),
)  # fmt: skip
def test_label_maps_hold_only_tagged_classes(labeler, h, w, tags, margin):
    assume(max(h, w) / min(h, w) <= labeler.config.cliper.max_aspect_ratio)  # more elongated: refused
    lab = labeler if margin is None else _with_labels(labeler, LabelConfig(ignore_margin=margin))
    result = lab.label([LabelRequest(f"img-{h}-{w}", blob_image(h, w), tuple(tags))])[0]
    allowed = set(tags) | {0} | ({255} if margin is not None else set())
    assert result.label_map.shape == (h, w)
    assert set(np.unique(result.label_map).tolist()) <= allowed
    assert result.class_ids == tuple(tags)  # maps for the tags; the softmax saw every category
    assert result.compensated.shape == (len(tags), 64, 64)


def _with_labels(labeler: Labeler, labels: LabelConfig) -> Labeler:
    cfg = dataclasses.replace(labeler.config, labels=labels)
    return Labeler(labeler.clip, labeler.sd, cfg, CATEGORIES)


def test_same_image_id_gives_identical_outputs_in_any_batch(labeler):
    a, b = blob_image(90, 130, seed=4), blob_image(70, 70, seed=5)
    first = labeler.label([LabelRequest("a", a, (1, 7)), LabelRequest("b", b, (15,))])
    again = labeler.label([LabelRequest("b", b, (15,)), LabelRequest("a", a, (1, 7))])
    assert first[0].label_map.tobytes() == again[1].label_map.tobytes()
    assert first[1].label_map.tobytes() == again[0].label_map.tobytes()
    assert np.array_equal(first[0].compensated, again[1].compensated)
    # The noise comes from the id: another id changes the compensated map.
    renamed = labeler.label([LabelRequest("a2", a, (1, 7))])[0]
    assert not np.allclose(renamed.compensated, first[0].compensated)


def test_an_image_without_tags_is_all_background(labeler):
    result = labeler.label([LabelRequest("empty", blob_image(20, 30), ())])[0]
    assert result.label_map.shape == (20, 30) and not result.label_map.any()


def test_unknown_tags_and_bad_arrays_are_refused(labeler):
    with pytest.raises(ValueError, match="not in the category list"):
        labeler.label([LabelRequest("x", blob_image(20, 20), (99,))])
    with pytest.raises(ValueError, match="aspect ratio 200.0, over cliper.max_aspect_ratio"):
        labeler.label([LabelRequest("x", np.zeros((1, 200, 3), np.uint8), (1,))])
    with pytest.raises(ValueError, match="HWC uint8 RGB"):
        labeler.label([LabelRequest("x", np.zeros((20, 20), np.uint8), (1,))])


def test_refinement_switch_and_window_mode_change_the_path_not_the_contract(labeler, tiny_paths):
    img = blob_image(100, 150, seed=9)
    over = tiny_overrides(tiny_paths, window=224)
    over["refine"] = {"enabled": False}
    cfg = build_config("voc-vit-b16", over)
    windowed = Labeler(labeler.clip, labeler.sd, cfg, CATEGORIES).label([LabelRequest("w", img, (1, 7))])[0]
    plain = labeler.label([LabelRequest("w", img, (1, 7))])[0]
    assert windowed.segments is None and plain.segments is not None
    assert set(np.unique(windowed.label_map).tolist()) <= {0, 1, 7}


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@torch.no_grad()
def _published_sliding_coarse(labeler: Labeler, image: np.ndarray, crop: int, stride: int) -> np.ndarray:
    """The published ``forward`` with ``forward_slide``, transcribed step by step in float64 numpy
    on top of ``early_layer_fusion`` (pinned in test_cliper): [C_fg, h, w] for every foreground
    class of the labeler, in category order."""
    c, p = labeler.config.cliper, labeler.clip.patch_size
    visual = labeler.clip.model.visual
    pixels = cliper.clip_input(image, p, labeler.clip.mean, labeler.clip.std)[None]
    text = labeler._work(LabelRequest("r", image, (1,))).text.double().numpy()
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    n_fg = len(labeler.categories)

    def encode(x):  # -> per-layer logits [N, T, hw], head-mean patch attention [hw, hw]
        f = cliper.early_layer_fusion(visual, x)
        emb = f.embeddings[:, 0, 1:].double().numpy()
        emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
        return (c.logit_scale * emb @ text.T).transpose(0, 2, 1), f.attn_last[0].double().numpy().mean(0)[1:, 1:]

    logits, attn = encode(pixels)
    h_img, w_img = pixels.shape[-2:]
    h, w = h_img // p, w_img // p
    n_layers, n_text = logits.shape[:2]
    preds, count = np.zeros((n_layers, n_text, h, w)), np.zeros((1, h, w))
    attns, count_attns = np.zeros((h, w, h, w)), np.zeros((h, w, h, w))
    for h_idx in range(max(h_img - crop + stride - 1, 0) // stride + 1):
        for w_idx in range(max(w_img - crop + stride - 1, 0) // stride + 1):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            lg, a = encode(pixels[:, :, y1:y2, x1:x2])
            ch, cw = (y2 - y1) // p, (x2 - x1) // p
            ys, xs = slice(y1 // p, y2 // p), slice(x1 // p, x2 // p)
            attns[ys, xs, ys, xs] += a.reshape(ch, cw, ch, cw)
            count_attns[ys, xs, ys, xs] += 1
            preds[..., ys, xs] += lg.reshape(n_layers, n_text, ch, cw)
            count[..., ys, xs] += 1
    preds /= count
    attns = (attns / (count_attns + 1e-5)).reshape(h * w, h * w)
    attns /= attns.sum(-1, keepdims=True)
    slide = preds.reshape(n_layers, n_text, h * w) @ attns
    seg = 0.5 * _softmax(slide, 1)[:, :n_fg] + 0.5 * _softmax(logits, 1)[:, :n_fg]
    sel = seg[c.select_layer]
    sel[sel < sel.max(-1, keepdims=True) * c.attention_thr] = 0
    return (sel @ attn + seg.mean(0)).reshape(n_fg, h, w)


@pytest.mark.slow
def test_sliding_window_follows_the_published_order(labeler, tiny_paths):
    """Window logits averaged and propagated by the window-averaged attention, softmax, mixed
    0.5 / 0.5 with the whole image, and only then layer selection and propagation."""
    img = blob_image(100, 150, seed=9)  # 336 x 496 input: 2 x 4 windows of 224, overlapping
    cfg = build_config("voc-vit-b16", tiny_overrides(tiny_paths, window=224, compensation=False))
    windowed = Labeler(labeler.clip, None, cfg, CATEGORIES).label([LabelRequest("w", img, (15, 1))])[0]
    expected = _published_sliding_coarse(labeler, img, 224, 112)
    order = [c.id for c in CATEGORIES]
    np.testing.assert_allclose(windowed.coarse, expected[[order.index(15), order.index(1)]], rtol=1e-4, atol=1e-5)


def test_compensation_off_uses_the_coarse_map(labeler, tiny_paths):
    cfg = build_config("voc-vit-b16", tiny_overrides(tiny_paths, compensation=False))
    result = Labeler(labeler.clip, None, cfg, CATEGORIES).label([LabelRequest("c", blob_image(50, 60), (1,))])[0]
    assert np.array_equal(result.compensated, result.coarse)
    assert np.array_equal(result.final_scores, result.coarse_scores)
