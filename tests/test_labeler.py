"""The labeler end to end on tiny models: tags restrict the labels, runs are deterministic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.config import LabelConfig, build_config
from pipeline.labeler import Labeler, LabelRequest
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
    assert result.class_ids == tuple(tags)
    assert result.refined.shape == (len(tags), 64, 64)


def _with_labels(labeler: Labeler, labels: LabelConfig) -> Labeler:
    cfg = dataclasses.replace(labeler.config, labels=labels)
    return Labeler(labeler.clip, labeler.sd, cfg, CATEGORIES)


def test_same_image_id_gives_identical_outputs_in_any_batch(labeler):
    a, b = blob_image(90, 130, seed=4), blob_image(70, 70, seed=5)
    first = labeler.label([LabelRequest("a", a, (1, 7)), LabelRequest("b", b, (15,))])
    again = labeler.label([LabelRequest("b", b, (15,)), LabelRequest("a", a, (1, 7))])
    assert first[0].label_map.tobytes() == again[1].label_map.tobytes()
    assert first[1].label_map.tobytes() == again[0].label_map.tobytes()
    assert np.array_equal(first[0].refined, again[1].refined)
    # The noise comes from the id: another id changes the compensated map.
    renamed = labeler.label([LabelRequest("a2", a, (1, 7))])[0]
    assert not np.allclose(renamed.refined, first[0].refined)


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
    assert windowed.coarse.shape == plain.coarse.shape  # same grid, different (averaged) values
    assert not np.allclose(windowed.coarse, plain.coarse)
    assert set(np.unique(windowed.label_map).tolist()) <= {0, 1, 7}


def test_compensation_off_uses_the_coarse_map(labeler, tiny_paths):
    cfg = build_config("voc-vit-b16", tiny_overrides(tiny_paths, compensation=False))
    result = Labeler(labeler.clip, None, cfg, CATEGORIES).label([LabelRequest("c", blob_image(50, 60), (1,))])[0]
    assert np.array_equal(result.refined, result.coarse)
    assert np.array_equal(result.final_scores, result.coarse_scores)
