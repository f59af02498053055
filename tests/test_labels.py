"""Label-map assembly: only kept classes, background and (optionally) 255 appear."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline import labels, refine
from pipeline.config import LabelConfig


def test_assemble_thresholds_and_takes_the_argmax():
    scores = np.array([[[0.9, 0.2, 0.7]], [[0.8, 0.5, 0.75]]], dtype=np.float32)
    out = labels.assemble_label_map(scores, [3, 9], bkg_thre=0.6, labels=LabelConfig())
    assert out.tolist() == [[3, 0, 9]]


def test_ignore_margin_marks_close_calls_including_background():
    scores = np.array([[[0.9, 0.62, 0.7, 0.1]], [[0.8, 0.1, 0.72, 0.1]]], dtype=np.float32)
    out = labels.assemble_label_map(scores, [3, 9], bkg_thre=0.6, labels=LabelConfig(ignore_margin=0.05))
    # 0.9 vs 0.8: clear; 0.62 vs background 0.6: close; 0.7 vs 0.72: close; 0.1s vs bg 0.6: clear.
    assert out.tolist() == [[3, 255, 255, 0]]


def test_no_kept_class_with_normalisation_and_superpixels_gives_all_background():
    """Open vocabulary: when no class passes score_threshold, nothing is kept (K = 0); the image
    is all background instead of an error that would fail its whole shard."""
    from pipeline.config import RefineConfig

    none_kept = np.zeros((0, 5, 7), np.float32)
    segments = (np.arange(35).reshape(5, 7) // 6).astype(np.int32)
    decision = labels.decision_scores(none_kept, is_normalize=True, segments=segments, refine=RefineConfig())
    assert decision.shape == (0, 5, 7)
    out = labels.assemble_label_map(decision, [], bkg_thre=0.6, labels=LabelConfig(ignore_margin=0.1))
    assert out.shape == (5, 7) and not out.any()


def test_class_ids_outside_uint8_range_are_refused():
    with pytest.raises(ValueError, match="1..254"):
        labels.assemble_label_map(np.zeros((1, 2, 2), np.float32), [300], 0.5, LabelConfig())


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda k: st.tuples(
            arrays(
                np.float32,
                st.tuples(st.just(k), st.integers(1, 12), st.integers(1, 12)),
                elements=st.floats(0, 1, width=32),
            ),
            st.lists(st.integers(1, 254), min_size=k, max_size=k, unique=True),
        )
    ),
    st.floats(0, 1),
    st.one_of(st.none(), st.floats(0, 0.5)),
)
def test_label_map_holds_only_kept_ids_background_and_ignore(scores_ids, bkg, margin):
    scores, ids = scores_ids
    out = labels.assemble_label_map(scores, ids, bkg, LabelConfig(ignore_margin=margin))
    allowed = set(ids) | {0} | ({255} if margin is not None else set())
    assert set(np.unique(out).tolist()) <= allowed
    assert out.dtype == np.uint8 and out.shape == scores.shape[1:]


def test_full_resolution_scores_peak_at_the_final_score():
    import torch

    refined = torch.rand(2, 8, 8)
    out = labels.full_resolution_scores(refined, torch.tensor([0.3, 0.8]), (37, 51))
    assert out.shape == (2, 37, 51)
    np.testing.assert_allclose(out.reshape(2, -1).max(axis=1), [0.3, 0.8], rtol=1e-5)


def test_open_vocabulary_keeps_classes_above_the_score_threshold():
    assert labels.kept_classes(3, np.array([0.2, 0.9, 0.5]), open_vocab=True, score_threshold=0.4).tolist() == [1, 2]
    assert labels.kept_classes(3, np.array([0.2, 0.9, 0.5]), open_vocab=False, score_threshold=0.4).tolist() == [
        0,
        1,
        2,
    ]


def test_non_positive_bkg_thre_scores_background_as_squared_complement_of_the_best_class():
    # The published cam_to_label branch for bkg_thre <= 0, by hand per pixel:
    # (0.9, 0.2): bg (1-0.9)^2 = 0.01 -> class 3; (0.3, 0.4): bg 0.36 < 0.4 -> class 9;
    # (0.1, 0.2): bg 0.64 -> 0; (0.5, 0.5): bg 0.25, tie between classes -> the first, 3;
    # (0.0, 0.0): bg 1 -> 0.
    scores = np.array([[[0.9, 0.3, 0.1, 0.5, 0.0]], [[0.2, 0.4, 0.2, 0.5, 0.0]]], dtype=np.float32)
    for thre in (0.0, -1.0):
        out = labels.assemble_label_map(scores, [3, 9], bkg_thre=thre, labels=LabelConfig())
        assert out.tolist() == [[3, 9, 0, 3, 0]]
    # The margin compares the best class with that background score: 0.4 vs 0.36 is close.
    out = labels.assemble_label_map(scores, [3, 9], bkg_thre=0.0, labels=LabelConfig(ignore_margin=0.05))
    assert out.tolist() == [[3, 255, 0, 255, 0]]


def _old_pool(scores, segments, pooling):
    """The pooling ``refine.pool_scores`` did before the compiled pass, written out here so the
    comparison does not go through the code under test: np.unique ranks, np.bincount float64 sums
    (or np.median per superpixel), spread back to every pixel."""
    _, flat = np.unique(segments.ravel(), return_inverse=True)
    flat = flat.ravel()
    n = int(flat.max()) + 1
    if pooling == "mean":
        counts = np.bincount(flat, minlength=n).astype(np.float64)
        pooled = np.stack([np.bincount(flat, weights=s.ravel(), minlength=n) for s in scores]) / counts
    else:
        order = np.argsort(flat, kind="stable")
        bounds = np.flatnonzero(np.diff(flat[order])) + 1
        pooled = np.stack([[np.median(g) for g in np.split(s.ravel()[order], bounds)] for s in scores])
    return pooled[:, flat].reshape(scores.shape).astype(scores.dtype)


def _old_decide(scores, ids, is_normalize, bkg_thre, segments, refine_cfg, margin):
    """The per-pixel path ``decide`` replaced: pool over every pixel, then the rule on every pixel."""
    if len(scores) and is_normalize:
        scores = labels.minmax_normalize(scores)
    decision = scores.astype(np.float32) if not len(scores) else scores
    if len(scores) and segments is not None:
        decision = _old_pool(scores, segments, refine_cfg.pooling)
    return decision, labels.assemble_label_map(decision, ids, bkg_thre, LabelConfig(ignore_margin=margin))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 3),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["raster", "sparse", "negative"]),
    st.sampled_from(["mean", "median"]),
    st.sampled_from([np.float32, np.float16]),
    st.booleans(),
    st.sampled_from([0.6, 0.3, 0.0, -1.0]),
    st.one_of(st.none(), st.floats(0, 0.5)),
)
def test_decide_per_superpixel_equals_the_per_pixel_formula_byte_for_byte(
    k, h, w, seed, numbering, pooling, dtype, is_normalize, bkg, margin
):
    from pipeline.config import RefineConfig

    rng = np.random.default_rng(seed)
    scores = rng.random((k, h, w)).astype(dtype)
    scores[:, rng.random((h, w)) < 0.2] = 0.5  # ties between classes and with the threshold
    segments = rng.integers(0, max(1, h * w // 3), (h, w)).astype(np.int32)
    if numbering == "raster":  # refine.superpixels' numbering: 0..S-1, none missing
        segments = np.unique(segments, return_inverse=True)[1].reshape(h, w).astype(np.int32)
    elif numbering == "negative":
        segments = segments * 7 - 50
    ids = list(range(3, 3 + k))
    refine_cfg = RefineConfig(pooling=pooling)
    want = _old_decide(scores, ids, is_normalize, bkg, segments, refine_cfg, margin)
    got = labels.decide(scores, ids, is_normalize=is_normalize, bkg_thre=bkg, segments=segments, refine=refine_cfg,
                        labels=LabelConfig(ignore_margin=margin))  # fmt: skip
    for g, x in zip(got, want, strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape and g.tobytes() == x.tobytes()


def test_decide_on_real_superpixels_of_a_photograph_equals_the_per_pixel_formula():
    from skimage import data

    from pipeline import refine as refine_mod
    from pipeline.config import RefineConfig

    image = data.astronaut()[::2, ::2]
    segments = refine_mod.superpixels(image, RefineConfig())
    rng = np.random.default_rng(0)
    scores = rng.random((3, *segments.shape)).astype(np.float32)
    for bkg in (0.6, 0.0):
        want = _old_decide(scores, [1, 2, 3], True, bkg, segments, RefineConfig(), 0.05)
        got = labels.decide(scores, [1, 2, 3], is_normalize=True, bkg_thre=bkg, segments=segments,
                            refine=RefineConfig(), labels=LabelConfig(ignore_margin=0.05))  # fmt: skip
        assert got[0].tobytes() == want[0].tobytes() and got[1].tobytes() == want[1].tobytes()
        assert len(np.unique(got[1])) >= 3  # the rule picked more than one label


@pytest.mark.parametrize(
    "segments",
    [np.array([[0, 1], [2, 1]]), np.array([[5, 9], [5, -2]]), np.array([[0, 2], [2, 0]]), np.array([[7]])],
)
def test_segment_index_is_the_rank_numpy_unique_gives(segments):
    flat, n = refine.segment_index(segments)
    inverse = np.unique(segments, return_inverse=True)[1].ravel()
    assert flat.tolist() == inverse.tolist() and n == len(np.unique(segments))


def test_decide_refuses_superpixels_of_another_size():
    from pipeline.config import RefineConfig

    with pytest.raises(ValueError, match="differ in size"):
        labels.decide(np.zeros((1, 2, 3), np.float32), [1], is_normalize=True, bkg_thre=0.5,
                      segments=np.zeros((3, 2), np.int32), refine=RefineConfig(), labels=LabelConfig())  # fmt: skip
