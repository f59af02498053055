"""Discovery (pipeline.discovery): the mechanism where truth is known. Token maps are planted with
one direction per region plus noise, so the regions to recover are known exactly; the labeler
test plants such a token map in place of the tiny random model's tokens (its tokens carry no
objects) and checks what the label map does with the region."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import clip_es_prompts, discovery
from pipeline.config import DiscoveryConfig, build_config, merge_overrides
from pipeline.labeler import Labeler
from pipeline.types import LabelRequest
from tests.conftest import CATEGORIES, blob_image, tiny_overrides

H, W, D = 28, 28, 64
ON = DiscoveryConfig(enabled=True)


def planted(layout: np.ndarray, noise: float = 0.2, seed: int = 0, d: int = D) -> tuple[np.ndarray, np.ndarray]:
    """[h, w, d] unit tokens: region k of ``layout`` ([h, w] int) around its own random direction.
    Returns (tokens, directions [K, d])."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(layout.max() + 1, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    tok = dirs[layout] + noise * rng.normal(size=(*layout.shape, d)) / math.sqrt(d)
    return (tok / np.linalg.norm(tok, axis=-1, keepdims=True)).astype(np.float32), dirs


def scene() -> np.ndarray:
    """Background 0, a tagged object 1 (left), two untagged objects 2 and 3."""
    layout = np.zeros((H, W), int)
    layout[3:13, 2:12] = 1
    layout[4:12, 16:25] = 2
    layout[17:25, 6:20] = 3
    return layout


def best_iou(masks: np.ndarray, truth: np.ndarray) -> float:
    return max((discovery.iou(m, truth) for m in masks), default=0.0)


def test_planted_untagged_objects_are_recovered_and_the_tagged_one_is_not():
    layout = scene()
    tokens, _ = planted(layout)
    regions = discovery.discover(tokens, layout == 1, ON)
    assert len(regions.masks) == 2  # background (over max_area) and the tagged object are not regions
    assert best_iou(regions.masks, layout == 2) >= 0.9 and best_iou(regions.masks, layout == 3) >= 0.9
    assert not (regions.masks & (layout == 1)).any()
    assert regions.areas.tolist() == pytest.approx([(layout == 3).mean(), (layout == 2).mean()])  # largest first
    assert regions.ids.tolist() == [1, 2] and regions.masks.shape == (2, H, W)


def test_a_region_found_at_two_scales_is_reported_once():
    layout = scene()
    tokens, _ = planted(layout)
    candidates = discovery._candidates(tokens, layout != 1, ON)
    found = [m for m in candidates if discovery.iou(m, layout == 2) >= 0.9]
    assert len(found) >= 2  # every scale finds it
    regions = discovery.discover(tokens, layout == 1, ON)
    assert sum(discovery.iou(m, layout == 2) >= 0.9 for m in regions.masks) == 1


def test_fusion_reports_a_coarse_and_a_fine_find_of_one_object_once(monkeypatch):
    """A coarse scale's cluster that swallowed a ring of background, and a fine scale's exact one:
    one region (the fine, more coherent one), not the object plus the leftover ring."""
    layout = scene()
    tokens, _ = planted(layout)
    exact = layout == 2
    coarse = np.zeros_like(exact)
    coarse[3:13, 15:26] = True  # object 2 and a one-cell ring around it: IoU 72 / 110
    monkeypatch.setattr(discovery, "_candidates", lambda tokens, free, cfg: [coarse, exact])
    regions = discovery.discover(tokens, layout == 1, dataclasses.replace(ON, min_area=0.0, min_coherence=-1.0))
    assert len(regions.masks) == 1 and np.array_equal(regions.masks[0], exact)


def test_fusion_keeps_the_more_coherent_of_overlapping_masks():
    layout = scene()
    tokens, _ = planted(layout, noise=0.2)
    exact = layout == 2
    sloppy = exact.copy()
    sloppy[12, 16:25] = True  # one row of background: overlaps ``exact`` with IoU 8/9, less coherent
    kept = discovery.fuse(tokens, [sloppy, layout == 3, exact], fusion_iou=0.5)
    assert len(kept) == 2 and any(np.array_equal(k, exact) for k in kept)
    assert len(discovery.fuse(tokens, [sloppy, exact], fusion_iou=0.95)) == 2  # below the threshold both stay


def test_a_cluster_split_by_kmeans_is_merged_back():
    layout = scene()
    tokens, _ = planted(layout)
    x = tokens.reshape(-1, D)
    split = np.where(layout.ravel() == 2, np.arange(x.shape[0]) % 2 + 4, layout.ravel())  # object 2 as clusters 4, 5
    centres = np.stack([discovery._normalise(x[split == k].mean(0)) for k in range(6) if k != 2] + [np.zeros(D)])
    merged = discovery.merge_similar(np.where(split > 2, split - 1, split), centres[:5], similarity=0.9)
    assert len(np.unique(merged[layout.ravel() == 2])) == 1
    assert len(np.unique(merged)) == 4


def test_min_area_drops_small_regions():
    layout = scene()
    layout[21:27, 21:27] = 4  # 36 cells, 4.6% of the grid: found by the 4-per-side windows (7 x 7 cells)
    tokens, _ = planted(layout)
    small = layout == 4
    assert best_iou(discovery.discover(tokens, layout == 1, dataclasses.replace(ON, min_area=0.04)).masks, small) == 1
    assert best_iou(discovery.discover(tokens, layout == 1, dataclasses.replace(ON, min_area=0.05)).masks, small) == 0


def test_min_coherence_drops_incoherent_regions():
    layout = scene()
    tokens, _ = planted(layout, noise=0.2)
    noisy, _ = planted(layout, noise=2.0, seed=1)
    tokens[layout == 3] = noisy[layout == 3]  # object 3: its tokens spread widely around its direction
    regions = discovery.discover(tokens, layout == 1, dataclasses.replace(ON, min_coherence=-1.0))
    coh = {k: regions.coherence[np.argmax([discovery.iou(m, layout == k) for m in regions.masks])] for k in (2, 3)}
    assert coh[3] < 0.5 < coh[2]
    kept = discovery.discover(tokens, layout == 1, dataclasses.replace(ON, min_coherence=0.5))
    assert best_iou(kept.masks, layout == 2) >= 0.9 and best_iou(kept.masks, layout == 3) < 0.5


def test_coherence_is_the_mean_cosine_to_the_centre():
    tokens = np.zeros((1, 2, 2), np.float32)
    tokens[0, 0] = (1, 0)
    tokens[0, 1] = (0, 1)
    value, centre = discovery.coherence(tokens, np.ones((1, 2), bool))
    assert value == pytest.approx(math.sqrt(0.5)) and centre == pytest.approx([math.sqrt(0.5)] * 2)


def test_same_input_gives_the_same_bytes():
    layout = scene()
    tokens, _ = planted(layout, noise=0.8)
    a = discovery.discover(tokens, layout == 1, ON)
    b = discovery.discover(tokens.copy(), (layout == 1).copy(), ON)
    for name in ("masks", "centres", "coherence", "areas"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    assert a.region_map((97, 131)).tobytes() == b.region_map((97, 131)).tobytes()


def test_window_centres_tile_the_grid_without_overlap():
    tokens = np.eye(4, dtype=np.float32)[np.arange(4 * 5).reshape(4, 5) % 4]
    free = np.ones((4, 5), bool)
    free[:2, :3] = False  # the first window of 2 per side has no free cell: no centre
    assert len(discovery.window_centres(tokens, free, 2)) == 3
    assert len(discovery.window_centres(tokens, np.ones((4, 5), bool), 3)) == 2 * 3  # sides ceil(4/3)=2, ceil(5/3)=2


def test_region_map_is_the_label_maps_bilinear_resize_then_threshold():
    masks = np.zeros((1, 3, 4), bool)
    masks[0, 1, 1:3] = True
    regions = discovery.Regions(masks, np.zeros((1, 2), np.float32), np.ones(1, np.float32), np.ones(1, np.float32))
    ours = regions.region_map((37, 50))
    theirs = F.interpolate(torch.from_numpy(masks.astype(np.float64))[None], size=(37, 50), mode="bilinear",
                           align_corners=False)[0, 0].numpy()  # fmt: skip
    clear = np.abs(theirs - 0.5) > 1e-9  # exact ties (0.5) may round either way in either implementation
    assert ours.dtype == np.uint16 and clear.mean() > 0.95
    assert np.array_equal((ours == 1)[clear], (theirs > 0.5)[clear])


def test_grid_cells_take_the_majority_of_each_cells_pixels():
    label = np.zeros((10, 12), np.uint8)
    label[:5, :6] = 3  # exactly the top-left cell of a 2 x 2 grid
    label[5:, 6:] = 255  # ignored pixels are not labelled
    label[0, 6:9] = 2  # 3 of 30 pixels: not enough
    assert discovery.labelled_cells(label, (2, 2)).tolist() == [[True, False], [False, False]]


def test_grid_cells_of_an_image_smaller_than_the_grid():
    label = np.zeros((3, 4), np.uint8)
    label[:, 2:] = 1
    cells = discovery.labelled_cells(label, (6, 8))  # a 3 x 4 px image on a 6 x 8 token grid
    assert cells.shape == (6, 8) and cells[:, 4:].all() and not cells[:, :4].any()


def _one_region(grid: tuple[int, int]) -> discovery.Regions:
    """One region, the right half of an [h, w] grid (w even)."""
    masks = np.zeros((1, *grid), bool)
    masks[0, :, grid[1] // 2 :] = True
    return discovery.Regions(masks, np.zeros((1, 2), np.float32), np.ones(1, np.float32), np.ones(1, np.float32))


def test_apply_unknown_modes():
    label = np.zeros((4, 6), np.uint8)
    label[:2, 3:] = 7  # a tagged class inside the region
    regions = _one_region((2, 2))  # a coarser grid than the label map, as the ViT grid is
    same, none = discovery.apply_unknown(label, regions, "background")
    assert same is label and none is None
    ignored, none = discovery.apply_unknown(label, regions, "ignore")
    expected = label.copy()
    expected[2:, 3:] = 255
    assert np.array_equal(ignored, expected) and none is None and label[2:, 3:].max() == 0  # input untouched
    kept, region_map = discovery.apply_unknown(label, regions, "regions")
    assert (
        kept is label
        and region_map.dtype == np.uint16
        and np.array_equal(region_map, np.repeat([[0, 0, 0, 1, 1, 1]], 4, 0))
    )
    with pytest.raises(ValueError, match="unknown mode"):
        discovery.apply_unknown(label, regions, "drop")


def test_score_regions_softmax_over_the_vocabulary():
    text = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    region = np.array([[0.0, 2.0]])  # cosines 0, 1, 0.8
    [(name, score)] = discovery.score_regions(region, text, ["a", "b", "c"], logit_scale=10.0)
    assert name == "b" and score == pytest.approx(math.exp(10) / (1 + math.exp(10) + math.exp(8)))
    with pytest.raises(ValueError, match="2 names for 3"):
        discovery.score_regions(region, text, ["a", "b"])


@pytest.mark.parametrize(("v", "d", "r"), [(3, 64, 2), (80, 512, 6), (1203, 768, 16)])
def test_text_normalised_once_scores_regions_to_the_same_bits_as_per_image(v, d, r):
    """``Labeler.vocabulary`` stores ``text_matrix`` once; suggestions must keep the bits of the
    per-image formula it replaced (rows normalised in float32, cast to float64 in the product)."""
    rng = np.random.default_rng(v)
    raw = (3 * rng.normal(size=(v, d))).astype(np.float32)  # not unit: the method's rows may be off by rounding
    regions = rng.normal(size=(r, d)).astype(np.float32)
    names = [f"c{k}" for k in range(v)]
    text = discovery.text_matrix(raw)
    assert text.dtype == np.float64 and np.allclose(np.linalg.norm(text, axis=1), 1.0)
    unit32 = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    reg64 = (regions / np.linalg.norm(regions, axis=1, keepdims=True)).astype(np.float32).astype(np.float64)
    logits = 100.0 * (reg64 @ unit32.T)  # the per-image formula, float32 rows cast in the product
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    want = [(names[b], float(probs[k, b])) for k, b in enumerate(probs.argmax(axis=1))]
    got = discovery.score_regions(regions, text, names)
    assert [n for n, _ in got] == [n for n, _ in want]
    assert np.array([s for _, s in got]).tobytes() == np.array([s for _, s in want]).tobytes()


def test_run_suggestions_counts_classes_never_tagged():
    shards = [{"suggested_class": ["dog", "cat", "dog"], "score": [0.9, 0.8, 0.5]},
              {"suggested_class": ["kite", "dog"], "score": [0.4, 0.7]}]  # fmt: skip
    rows = discovery.run_suggestions(shards, tagged={"cat"})
    assert rows == [("dog", 3, pytest.approx(0.7)), ("kite", 1, pytest.approx(0.4))]
    assert discovery.run_suggestions(shards, tagged=set(), top=1)[0][0] == "dog"


def test_vocabularies(tmp_path):
    assert discovery.load_vocabulary("dataset", ["cat", "dog", "cat"]) == ("cat", "dog")
    coco = discovery.load_vocabulary("coco", [])
    assert len(coco) == 80 and coco[0] == "person" and coco[-1] == "toothbrush"
    lvis = tmp_path / "lvis.txt"
    lvis.write_text("# LVIS-like\naerosol can\n\nair conditioner\n")
    assert discovery.load_vocabulary(str(lvis), []) == ("aerosol can", "air conditioner")
    with pytest.raises(ValueError, match="neither 'dataset', 'coco' nor an existing file"):
        discovery.load_vocabulary(str(tmp_path / "missing.txt"), [])


def test_config_is_off_by_default_and_in_the_fingerprint_only_when_on():
    base = build_config()
    assert base.discovery.enabled is False and base.discovery.unknown == "background"
    tweaked_off = build_config(None, {"discovery": {"min_area": 0.3, "scales": [5]}})
    assert tweaked_off.fingerprint() == base.fingerprint()
    on = build_config(None, {"discovery": {"enabled": True}})
    assert on.fingerprint() != base.fingerprint()
    assert build_config(None, {"discovery": {"enabled": True, "fusion_iou": 0.7}}).fingerprint() != on.fingerprint()
    assert on.discovery.scales == (2, 3, 4)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"unknown": "hide"}, "discovery.unknown must be one of"),
    ({"scales": ["2"]}, "expected a list of ints"),
    ({"scales": []}, "discovery.scales must be a non-empty list"),
    ({"min_area": 0.6, "max_area": 0.5}, "exceeds discovery.max_area"),
    ({"min_coherence": 2.0}, "is a cosine"),
])  # fmt: skip
def test_bad_discovery_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(None, {"discovery": overrides})


def _labeler(tiny_paths: dict, **discovery_settings: object) -> Labeler:
    overrides = merge_overrides(tiny_overrides(tiny_paths), {"discovery": discovery_settings})
    return Labeler.from_config(build_config("voc-vit-b16", overrides), CATEGORIES)


@pytest.mark.slow
def test_labeler_turns_a_planted_untagged_object_into_ignore(labeler, tiny_paths):
    """The tiny random model's tokens hold no objects, so after ``infer`` they are replaced by a
    planted token map: the untagged blue rectangle's quadrant as one direction, everything else
    another. ``finish`` then runs as in production: discovery sees only the cells the model's
    label map leaves background, and those of the object must become 255."""
    request = LabelRequest("scene", blob_image(96, 128), (1,))  # the red rectangle is tagged, the blue one not
    off = labeler.label([request])[0]
    [probe] = _labeler(tiny_paths, enabled=True).infer([request])
    grid = tuple(probe.output.tokens.shape[:2])
    assert probe.output.tokens.shape[-1] == labeler.clip.model.text_projection.shape[1]
    assert torch.allclose(probe.output.tokens.norm(dim=-1), torch.ones(grid))
    layout = np.zeros(grid, int)
    layout[grid[0] // 2 :, grid[1] // 2 :] = 1
    free = ~discovery.labelled_cells(off.label_map, grid)
    obj, rest = (free & (layout == 1)).mean(), (free & (layout == 0)).mean()
    assert 0.02 < obj < rest  # the seeded tiny model leaves enough of both untagged
    ours = _labeler(tiny_paths, enabled=True, unknown="ignore", max_area=float(obj + rest) / 2)
    [item] = ours.infer([request])
    tokens, _ = planted(layout, d=item.output.tokens.shape[-1])
    item.output.tokens = torch.from_numpy(tokens)
    result = ours.finish(item)
    [region] = result.regions.masks
    assert discovery.iou(region, (layout == 1) & free) >= 0.9
    changed = result.label_map != off.label_map
    assert changed.any() and (result.label_map[changed] == 255).all() and (off.label_map[changed] == 0).all()
    assert not changed[: 96 // 2 - 4].any() and not changed[:, : 128 // 2 - 4].any()  # outside the quadrant: as before
    assert result.region_map is None and "discovery" in result.timings


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["voc-vit-b16", "clip-es-voc"])
def test_discovery_off_or_background_leaves_label_maps_byte_identical(tiny_paths, preset):
    image = blob_image(80, 96, seed=3)
    request = LabelRequest("same", image, (1, 7))
    maps = {}
    for name, settings in {"off": {}, "background": {"enabled": True, "unknown": "background"}}.items():
        overrides = merge_overrides(tiny_overrides(tiny_paths), {"discovery": settings})
        lab = Labeler.from_config(build_config(preset, overrides), CATEGORIES)
        [item] = lab.infer([request])
        assert (item.output.tokens is None) == (name == "off")  # no tokens kept when off
        result = lab.finish(item)
        assert (result.regions is None) == (name == "off")
        maps[name] = result.label_map.tobytes()
    assert maps["off"] == maps["background"]


def _vocabulary_labeler(labeler, tiny_paths, preset: str) -> Labeler:
    overrides = merge_overrides(tiny_overrides(tiny_paths), {"cliper": {"compensation": False},
                                                             "discovery": {"enabled": True}})  # fmt: skip
    return Labeler(labeler.clip, None, build_config(preset, overrides), CATEGORIES)


@pytest.mark.parametrize("preset", ["voc-vit-b16", "clip-es-voc"])
def test_the_dataset_vocabulary_embeds_the_text_the_method_labels_with(labeler, tiny_paths, preset):
    """CLIP-ES labels with its published synonyms ("person with clothes,people,human"), CLIPer with
    the category's prompt: the ``dataset`` vocabulary must embed the same strings, so a region
    whose centre is a class's labeling text embedding is suggested as that class."""
    lab = _vocabulary_labeler(labeler, tiny_paths, preset)
    embedded: list[tuple[str, ...]] = []
    real = lab.method.embed_prompts
    lab.method.embed_prompts = lambda prompts: (embedded.append(tuple(prompts)), real(prompts))[1]
    names, text = lab.vocabulary()
    synonyms = clip_es_prompts.SYNONYMS["voc"] if preset == "clip-es-voc" else {}
    assert names == ("cat", "dog", "person")
    assert embedded == [tuple(synonyms.get(c.name, c.prompt) for c in CATEGORIES)]
    for k, c in enumerate(CATEGORIES):
        labeling = lab.method._text((c.id,))[0].float().numpy()  # row 0: the class as labeling embeds it
        labeling = labeling / np.linalg.norm(labeling)
        np.testing.assert_allclose(text[k], labeling, atol=1e-6)
        [(name, _)] = discovery.score_regions(labeling[None], text, names)
        assert name == c.name


def test_the_vocabulary_is_embedded_once_per_labeler(labeler, tiny_paths):
    """CLIP-ES (the faster of the two on the tiny model) over two infer batches."""
    lab = _vocabulary_labeler(labeler, tiny_paths, "clip-es-voc")
    vocabulary = tuple(clip_es_prompts.SYNONYMS["voc"].get(c.name, c.prompt) for c in CATEGORIES)
    calls = []
    real = lab.method.embed_prompts
    lab.method.embed_prompts = lambda prompts: (calls.append(tuple(prompts)), real(prompts))[1]
    for seed in range(2):  # two infer batches
        lab.infer([LabelRequest(f"i{seed}", blob_image(32, 40, seed), (1,))])
    assert calls.count(vocabulary) == 1  # CLIP-ES also embeds each image's tags and background this way
    names, text = lab.vocabulary()
    assert calls.count(vocabulary) == 1 and text.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-6)  # stored as unit rows
