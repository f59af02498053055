"""Pins of the published method (cliper-method.md, linsun449/cliper.code), each against values
derived apart from our code: by hand on tiny tensors, or through the library's own code path."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from pipeline import cliper, compensation
from pipeline.config import build_config
from pipeline.labeler import Labeler
from pipeline.prompts import CAR_TEMPLATES, class_prompt
from pipeline.types import LabelRequest
from tests.conftest import CATEGORIES, blob_image, tiny_overrides

# The first line of the published data/voc/cls_voc21.txt, verbatim.
VOC_BACKGROUND_LINE = (
    "ground, land, grass, tree, building, wall, sky, lake, water, river, sea, railway, railroad, "
    "keyboard, helmet, cloud, house, mountain, ocean, road, rock, street, valley, bridge, sign"
)


# ---------------------------------------------------------------- direction of propagation


def test_the_selected_layer_propagates_as_maps_times_attention():
    # One class, two patches, one layer: seg = [1, 0]; A (not symmetric) = [[.5, .5], [.1, .9]].
    # Published: seg_last.flatten(-2, -1) @ attn -> [1*.5 + 0*.1, 1*.5 + 0*.9] = [.5, .5], plus the
    # layer mean [1, 0]: [1.5, .5]. The other direction, A @ seg, would give [1.5, .1].
    seg = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    attn = torch.tensor([[[0.5, 0.5], [0.1, 0.9]]])
    out = cliper.fuse_layers(seg, attn, select_layer=-1, attention_thr=0.1, grid=(1, 2))
    assert out.flatten().tolist() == pytest.approx([1.5, 0.5])


def test_the_coarse_map_uses_the_patch_block_of_the_head_mean_attention():
    # Two heads over [cls, p0, p1]; the patch block of their mean is [[.5, .5], [.1, .9]] (the class
    # token's row and column must be dropped, not renormalised).
    h0 = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.6, 0.2], [0.0, 0.2, 0.8]])
    h1 = torch.tensor([[0.0, 0.5, 0.5], [0.4, 0.4, 0.8], [0.0, 0.0, 1.0]])
    expected = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    assert torch.allclose(cliper.patch_attention(torch.stack([h0, h1])[None])[0], expected)


def test_window_logits_average_overlaps_and_propagate_with_the_window_averaged_attention():
    # Grid 1 x 3, patch 1, two windows of 2 patches: [p0, p1] and [p1, p2]; one layer, one text row.
    # Logits: window 1 [2, 4], window 2 [6, 8] -> averaged [2, 5, 8].
    # Attention: window 1 [[.5, .5], [.2, .8]], window 2 [[.6, .4], [.3, .7]]. On the grid, with the
    # published (count + 1e-5) divisor (e = 1e-5):
    #   row p0: [.5, .5, 0] / (1 + e)               -> row-normalised [.5, .5, 0]
    #   row p1: [.2 / (1+e), (.8 + .6) / (2+e), .4 / (1+e)]
    #   row p2: [0, .3, .7] / (1 + e)               -> [0, .3, .7]
    # Propagated (logits @ attention), column j = sum_i logit_i * A[i, j].
    e = 1e-5
    r1 = np.array([0.2 / (1 + e), 1.4 / (2 + e), 0.4 / (1 + e)])
    r1 /= r1.sum()
    a = np.array([[0.5, 0.5, 0.0], r1, [0.0, 0.3, 0.7]])
    expected = np.array([2.0, 5.0, 8.0]) @ a
    logits = [torch.tensor([2.0, 4.0]).reshape(1, 2, 1), torch.tensor([6.0, 8.0]).reshape(1, 2, 1)]  # [N, hw, T]
    attns = [torch.tensor([[0.5, 0.5], [0.2, 0.8]]), torch.tensor([[0.6, 0.4], [0.3, 0.7]])]
    out = cliper.slide_logits(logits, attns, [(0, 1, 0, 2), (0, 1, 1, 3)], grid=(1, 3), patch=1)
    np.testing.assert_allclose(out.flatten().numpy(), expected, rtol=1e-6)


# ---------------------------------------------------------------- window formula


def _published_boxes(h_img: int, w_img: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The window loop of the published forward_slide, transcribed."""
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    boxes = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


@pytest.mark.parametrize("crop", [224, 336])
def test_window_boxes_follow_the_published_loop(crop):
    for h in range(112, 800, 16):
        for w in (112, 224, 336, 448, 496, 672, 1120):
            assert cliper.window_boxes(h, w, crop, 112) == _published_boxes(h, w, crop, 112), (h, w)


# ---------------------------------------------------------------- candidate list


def _independent_text(labeler: Labeler, prompt: str) -> torch.Tensor:
    model, tok = labeler.clip.model, labeler.clip.tokenizer
    with torch.no_grad():
        e = model.encode_text(tok([t.format(prompt) for t in CAR_TEMPLATES])).float()
    e = e / e.norm(dim=-1, keepdim=True)
    return e.mean(0) / e.mean(0).norm()


def test_candidates_are_every_dataset_class_then_background_then_their_mean(labeler):
    assert labeler.config.cliper.candidates == "dataset"
    fg = [_independent_text(labeler, c.prompt) for c in CATEGORIES]  # cat, dog, person
    bg = [_independent_text(labeler, w) for w in VOC_BACKGROUND_LINE.split(", ")]
    expected = torch.stack([*fg, *bg, torch.stack(fg).mean(0)])
    work = labeler._work(LabelRequest("x", blob_image(20, 20), (15, 1)))
    assert work.text.shape == expected.shape == (3 + 25 + 1, expected.shape[1])
    assert torch.allclose(work.text, expected, atol=1e-6)
    assert work.n_fg == 3 and work.class_ids == (15, 1) and work.channels == (2, 0)


@pytest.mark.slow
def test_tags_only_candidates_remain_a_named_option(labeler, tiny_paths):
    cfg = build_config("voc-vit-b16", tiny_overrides(tiny_paths, candidates="tags"))
    tags_only = Labeler(labeler.clip, labeler.sd, cfg, CATEGORIES)
    person, cat = (_independent_text(labeler, p) for p in ("person", "cat"))
    work = tags_only._work(LabelRequest("x", blob_image(20, 20), (15, 1)))
    assert torch.allclose(work.text[[0, 1, -1]], torch.stack([person, cat, (person + cat) / 2]), atol=1e-6)
    assert work.n_fg == 2 and work.channels == (0, 1)
    with pytest.raises(ValueError, match="cliper.candidates must be 'dataset' or 'tags'"):
        build_config("voc-vit-b16", {"cliper": {"candidates": "all"}})


def test_class_prompts_match_the_published_class_files():
    # data/voc/cls_voc21.txt and data/coco14/cls_coco81.txt (lines that differ from the name).
    voc = {
        "bird": "bird avian",
        "chair": "chair seat",
        "person": "person with clothes, people, human",
        "tvmonitor": "tvmonitor screen",
        "aeroplane": "aeroplane",
        "sofa": "sofa",
    }
    coco = {"person": "person with cloth people human", "chair": "chair seat", "couch": "sofa",
            "potted plant": "pottedplant", "dining table": "diningtable", "tv": "tvmonitor",
            "airplane": "aeroplane", "motorcycle": "motorbike", "traffic light": "traffic light"}  # fmt: skip
    assert {n: class_prompt(n, "voc") for n in voc} == voc
    assert {n: class_prompt(n, "coco") for n in coco} == coco


@pytest.mark.slow
def test_a_tag_scores_the_same_whatever_else_is_tagged(labeler):
    """With the dataset's classes as candidates, the softmax does not depend on the tags: a class's
    maps are the same whether it is tagged alone or with others (tags only select channels)."""
    img = blob_image(60, 80, seed=2)
    alone = labeler.label([LabelRequest("s", img, (7,))])[0]
    both = labeler.label([LabelRequest("s", img, (1, 7))])[0]
    # Relative only: the tiny models' class maps are ~1e-4, and tags-only candidates move them ~1e-3.
    np.testing.assert_allclose(both.coarse[1], alone.coarse[0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(both.final_scores[1], alone.final_scores[0], rtol=1e-6, atol=0)


# ---------------------------------------------------------------- Stable Diffusion


@pytest.fixture(scope="module")
def sd(labeler):
    return labeler.sd


@pytest.mark.slow
def test_the_timestep_is_index_45_of_the_checkpoints_scheduler_at_50_steps(sd, tiny_paths):
    # SD 2.1 base ships a PNDM scheduler with skip_prk_steps and steps_offset 1: for 50 steps its
    # PLMS timesteps are 981, 961, 961 (the repeated step), 941, ... so index 45 is
    # 961 - (45 - 2) * 20 = 101 (a DDIM schedule would give 81).
    own = diffusers.PNDMScheduler.from_pretrained(tiny_paths["sd_dir"], subfolder="scheduler")
    own.set_timesteps(50)
    assert int(own.timesteps[45]) == 101
    seen = {}

    def hook(module, args, kwargs):
        seen["sample"], seen["t"] = args[0].clone(), args[1]

    pixels = compensation.sd_pixels(blob_image(40, 50))[None]
    handle = sd.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        compensation.capture_attention(sd, pixels, ["img"], build_config().cliper.sd_layers)
    finally:
        handle.remove()
    assert int(seen["t"]) == 101
    # The UNet input: the VAE's latent-distribution mean x its scaling factor (0.18215 in the
    # config), noised by hand with the checkpoint's alphas_cumprod at t and the id's noise.
    with torch.no_grad():
        latents = sd.vae.encode(pixels).latent_dist.mean * 0.18215
    noise = compensation.image_noise("img", latents.shape[1:])[None]
    abar = own.alphas_cumprod[101].double()
    expected = abar.sqrt() * latents.double() + (1 - abar).sqrt() * noise.double()
    assert torch.allclose(seen["sample"].double(), expected, atol=1e-5)


@pytest.mark.slow
def test_captured_attention_equals_diffusers_own_attention_probabilities(sd):
    layers = build_config().cliper.sd_layers
    modules = dict(sd.unet.named_modules())
    inputs = {}

    def keep(name):
        def hook(module, args, kwargs):
            inputs[name] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return hook

    handles = [modules[n].register_forward_pre_hook(keep(n), with_kwargs=True) for n in layers]
    try:
        pixels = torch.stack([compensation.sd_pixels(blob_image(40, 50, seed=s)) for s in (1, 2)])
        maps = compensation.capture_attention(sd, pixels, ["a", "b"], layers)
    finally:
        for h in handles:
            h.remove()
    for name in layers:
        attn = modules[name]
        x = inputs[name]
        with torch.no_grad():  # diffusers' own path: head_to_batch_dim + get_attention_scores
            q, k = attn.head_to_batch_dim(attn.to_q(x)), attn.head_to_batch_dim(attn.to_k(x))
            theirs = attn.get_attention_scores(q, k, None).reshape(2, attn.heads, x.shape[1], x.shape[1])
        assert maps[name].shape == theirs.shape and x.shape[1] == 64 * 64  # the 64 x 64 layers
        torch.testing.assert_close(maps[name], theirs, rtol=1e-5, atol=1e-7)
