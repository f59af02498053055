"""CLIP-ES (pipeline/clip_es.py) against numbers derived by hand and against open_clip's own forward.

Every expected value here is written out or computed by the test itself (Fractions, closed forms,
autograd through open_clip's unmodified modules), never by the functions under test.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import clip_es
from pipeline.clip_es_prompts import COCO_BACKGROUND, VOC_BACKGROUND, background_prompts, class_prompts
from pipeline.config import ClipConfig
from tests.conftest import blob_image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# --- input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wh", "expected"),
    [
        ((500, 375), (512, 384)),
        ((16, 16), (16, 16)),
        ((17, 1), (32, 16)),
        ((224, 224), (224, 224)),
        ((1, 33), (16, 48)),
    ],
)
def test_input_size_rounds_each_side_up_to_16(wh: tuple[int, int], expected: tuple[int, int]) -> None:
    assert clip_es.input_size(*wh) == expected


def test_input_is_resized_up_and_normalised_with_clip_mean_std() -> None:
    img = np.zeros((20, 30, 3), dtype=np.uint8)
    img[...] = (255, 0, 51)  # flat colour: bicubic keeps it exactly
    x = clip_es.clip_es_input(img, 16, OPENAI_MEAN, OPENAI_STD)
    assert x.shape == (3, 32, 32)
    for ch, v in enumerate((1.0, 0.0, 0.2)):
        expected = (v - OPENAI_MEAN[ch]) / OPENAI_STD[ch]
        assert torch.allclose(x[ch], torch.full((32, 32), expected), atol=1e-6)


def test_input_refuses_non_rgb() -> None:
    with pytest.raises(ValueError, match="HWC uint8 RGB"):
        clip_es.clip_es_input(np.zeros((8, 8), dtype=np.uint8), 16, OPENAI_MEAN, OPENAI_STD)


# --- scoremap2bbox -------------------------------------------------------------------------------


def test_boxes_use_truncated_uint8_strict_threshold_8_connectivity_and_clipped_ends() -> None:
    m = np.zeros((6, 8), dtype=np.float32)
    m[1, 1], m[2, 2] = 1.0, 0.5  # diagonal neighbours: one 8-connected region
    m[1, 5] = 0.402  # 102.51 -> uint8 102, not above int(0.4 * 255) = 102
    m[4, 7] = m[5, 7] = m[5, 6] = 0.6  # region touching the right and bottom edges
    assert sorted(clip_es.score_boxes(m, 0.4)) == [(1, 1, 3, 3), (6, 4, 7, 5)]
    expected = np.zeros((6, 8), dtype=bool)
    expected[1:3, 1:3] = True
    expected[4, 6] = True  # the clipped box [4:5, 6:7] keeps one pixel, and not one of the region's
    np.testing.assert_array_equal(clip_es.box_mask(m, 0.4), expected)


def test_box_threshold_is_relative_to_the_uint8_maximum() -> None:
    m = np.zeros((1, 7), dtype=np.float32)
    m[0, 0] = 0.5  # uint8 127: threshold int(0.4 * 127) = 50
    m[0, 2] = 0.2  # 51.00 -> 51 > 50: kept
    m[0, 4] = 0.199  # 50.7 -> 50: dropped
    assert sorted(clip_es.score_boxes(m, 0.4)) == [(0, 0, 1, 0), (2, 0, 3, 0)]  # y1 clipped to height-1 = 0
    assert not clip_es.box_mask(m, 0.4).any()  # one row: every box is empty after clipping


def test_box_of_a_ring_covers_its_hole_and_an_empty_map_gives_the_zero_box() -> None:
    m = np.zeros((6, 6), dtype=np.float32)
    m[1:4, 1:4] = 1.0
    m[2, 2] = 0.0
    expected = np.zeros((6, 6), dtype=bool)
    expected[1:4, 1:4] = True
    np.testing.assert_array_equal(clip_es.box_mask(m, 0.4), expected)
    assert clip_es.score_boxes(np.zeros((3, 3), dtype=np.float32), 0.4) == [(0, 0, 0, 0)]
    assert not clip_es.box_mask(np.zeros((3, 3), dtype=np.float32), 0.4).any()


# --- CAA -----------------------------------------------------------------------------------------


def _fraction_transition(a: list[list[int]], rounds: int) -> list[list[Fraction]]:
    """The published steps written out with exact fractions: Sinkhorn (columns, then rows),
    symmetrise, square."""
    n = len(a)
    t = [[Fraction(v) for v in row] for row in a]
    for _ in range(rounds):
        cols = [sum(t[i][j] for i in range(n)) for j in range(n)]
        t = [[t[i][j] / cols[j] for j in range(n)] for i in range(n)]
        rows = [sum(r) for r in t]
        t = [[t[i][j] / rows[i] for j in range(n)] for i in range(n)]
    s = [[(t[i][j] + t[j][i]) / 2 for j in range(n)] for i in range(n)]
    return [[sum(s[i][k] * s[k][j] for k in range(n)) for j in range(n)] for i in range(n)]


def test_caa_transition_equals_three_sinkhorn_rounds_symmetrised_and_squared() -> None:
    a = [[2, 1, 1], [1, 3, 1], [4, 1, 5]]
    expected = torch.tensor([[float(v) for v in row] for row in _fraction_transition(a, 3)])
    got = clip_es.caa_transition(torch.tensor(a, dtype=torch.float32))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    two_rounds = torch.tensor([[float(v) for v in row] for row in _fraction_transition(a, 2)])
    assert not torch.allclose(got, two_rounds, rtol=1e-6, atol=1e-7)  # the round count is visible here


def test_caa_of_a_rank_one_attention_is_uniform_and_averages_the_masked_cam() -> None:
    u, v = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5.0, 1.0, 2.0, 7.0])
    t = clip_es.caa_transition(torch.outer(u, v))
    torch.testing.assert_close(t, torch.full((4, 4), 0.25))  # one column+row round already gives 1/n
    cam = np.array([[0.2, 0.4], [0.6, 0.8]], dtype=np.float32)
    mask = np.array([[True, False], [False, True]])
    np.testing.assert_allclose(clip_es.caa_refine(t, cam, mask), np.full((2, 2), (0.2 + 0.8) / 4), rtol=1e-6)


def test_upscale_min_max_scales_then_resizes_with_half_pixel_centres() -> None:
    got = clip_es.upscale(np.array([[3.0, 5.0]], dtype=np.float32), (1, 4))
    peak = 1 / (1 + 1e-7)  # (5 - 3) / (1e-7 + 2) after the shift by the minimum
    np.testing.assert_allclose(got, [[0.0, 0.25 * peak, 0.75 * peak, peak]], rtol=1e-6)


# --- Grad-CAM ------------------------------------------------------------------------------------


def test_grad_cam_of_a_toy_softmax_classifier_with_an_analytic_gradient() -> None:
    # Toy network: p = softmax(W @ mean_tokens(A)). dp0/dA_i = p0 * p1 * (W0 - W1) / n for every token.
    act = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, 1.0], [0.0, 0.0], [1.0, 2.0]], requires_grad=True)
    w = torch.tensor([[0.5, -0.5], [-0.25, 0.25]])
    p = torch.softmax(w @ act.mean(dim=0), dim=0)
    (grad,) = torch.autograd.grad(p[0], act)
    analytic = (p[0] * p[1] * (w[0] - w[1]) / 6).detach().expand(6, 2)
    torch.testing.assert_close(grad, analytic)
    # weights proportional to (1, -1): raw [2, -1, 1, 2, 0, -1] -> ReLU -> / 2, on a 2 x 3 grid, row-major
    cam = clip_es.grad_cam(act.detach(), grad, (2, 3))
    np.testing.assert_allclose(cam, [[1.0, 0.0, 0.5], [1.0, 0.0, 0.0]], atol=1e-6)


def test_grad_cam_scales_twice_with_the_published_epsilon() -> None:
    # Real CLIP gradients of a softmax probability are small, and the 1e-7 of scale_cam_image then
    # matters: raw ReLU'd map [2e-7, 0, 1e-7, 2e-7, 0, 0] -> / (1e-7 + 2e-7) = [2/3, 0, 1/3, ...]
    # -> / (1e-7 + 2/3): close to [1, 0, 1/2, ...]. Scaling once would leave 2/3.
    act = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, 1.0], [0.0, 0.0], [1.0, 2.0]])
    grad = torch.tensor([[1e-7, -1e-7]]).expand(6, 2)
    first = np.array([2, 0, 1, 2, 0, 0]) / 3
    np.testing.assert_allclose(clip_es.grad_cam(act, grad, (2, 3)).ravel(), first / (1e-7 + 2 / 3), rtol=1e-5)


# --- the whole method on a tiny CLIP, against open_clip's own forward ---------------------------


@pytest.fixture(scope="module")
def tiny_clip(tiny_paths: dict):
    """The tiny CLIP saved with the real save code and loaded back through production's loader."""
    from pipeline import models

    cfg = ClipConfig(
        model=str(tiny_paths["clip_config"]), pretrained=None, checkpoint=str(tiny_paths["clip_checkpoint"])
    )
    return models.build_clip(models._resolve_clip(cfg, {}, fetch=True), torch.device("cpu"), torch.float32)


def _reference(model: torch.nn.Module, pixels: torch.Tensor, text: torch.Tensor, n_fg: int) -> dict:
    """open_clip's unmodified VisionTransformer.forward with hooks on every block's ln_1 and on
    ln_post; the positional embedding is resized (bilinear, half-pixel) for a non-square grid."""
    ref = copy.deepcopy(model).requires_grad_(True)
    visual = ref.visual
    grid = (pixels.shape[-2] // 16, pixels.shape[-1] // 16)
    pos = visual.positional_embedding.detach()
    g = int((pos.shape[0] - 1) ** 0.5)
    sq = pos[1:].T.reshape(1, -1, g, g)
    up = F.interpolate(sq, size=grid, mode="bilinear", align_corners=False).reshape(pos.shape[1], -1).T
    visual.positional_embedding = torch.nn.Parameter(torch.cat([pos[:1], up]))
    seen: dict[str, list[torch.Tensor]] = {"ln_1": [], "ln_post": []}
    for block in visual.transformer.resblocks:
        block.ln_1.register_forward_hook(lambda m, i, o: seen["ln_1"].append(o))
    visual.ln_post.register_forward_hook(lambda m, i, o: seen["ln_post"].append(o))
    visual(pixels)
    feat = seen["ln_post"][0][:, 1:].mean(dim=1) @ visual.proj
    feat = feat / feat.norm(dim=-1, keepdim=True)
    probs = (ref.logit_scale.exp() * feat @ (text / text.norm(dim=-1, keepdim=True)).T).softmax(dim=-1)
    last = seen["ln_1"][-1]
    grads = torch.stack([torch.autograd.grad(probs[0, c], last, retain_graph=True)[0][0, 1:] for c in range(n_fg)])
    attn = [
        b.attn(y, y, y, need_weights=True)[1][0, 1:, 1:]
        for b, y in zip(visual.transformer.resblocks, seen["ln_1"], strict=True)
    ]
    return {
        "activations": last[0, 1:].detach(),
        "gradients": grads,
        "attention": torch.stack(attn[-8:]).mean(dim=0).detach(),
        "scores": probs[0, :n_fg].detach(),
    }


def _scaled(x: np.ndarray) -> np.ndarray:
    x = x - x.min()
    return x / (1e-7 + x.max())


def test_forward_equals_open_clip_with_hooks_on_the_real_last_ln_1(tiny_clip) -> None:
    img = blob_image(40, 75)
    prompts = [*class_prompts(["cat", "person"], "voc"), *background_prompts("voc")]
    text = clip_es.text_features(tiny_clip.model, tiny_clip.tokenizer, prompts)
    pixels = clip_es.clip_es_input(img, 16, tiny_clip.mean, tiny_clip.std)[None]
    assert pixels.shape[-2:] == (48, 80)
    got = clip_es.clip_es_forward(tiny_clip.model, pixels, text, n_fg=2)
    ref = _reference(tiny_clip.model, pixels, text, n_fg=2)
    assert got.grid == (3, 5)
    for key in ("activations", "gradients", "attention", "scores"):
        atol = 1e-5 * float(ref[key].abs().max())  # gradients are ~1e-4: an absolute 1e-6 would hide errors
        torch.testing.assert_close(getattr(got, key), ref[key], rtol=1e-4, atol=atol, msg=key)
    # the maps: Grad-CAM from the reference gradients, by the published formula written out here
    out = clip_es.clip_es_from_text(tiny_clip.model, pixels, text, 2, (40, 75))
    for c in range(2):
        weights = ref["gradients"][c].mean(dim=0)
        raw = np.maximum((ref["activations"] @ weights).reshape(3, 5).numpy(), 0)
        np.testing.assert_allclose(out.cam[c].numpy(), _scaled(_scaled(raw)), atol=1e-5)
        # CAA from the reference attention, each tag with its own box mask (box_mask is tested above)
        mask = out.box_mask[c].numpy()
        np.testing.assert_array_equal(mask, clip_es.box_mask(out.cam[c].numpy(), 0.4))
        t = ref["attention"].double()
        for _ in range(3):
            t = t / t.sum(dim=0, keepdim=True)
            t = t / t.sum(dim=1, keepdim=True)
        t = (t + t.T) / 2
        t = (t @ t) * torch.from_numpy(mask.reshape(1, -1))
        small = (t @ out.cam[c].double().reshape(-1, 1)).reshape(1, 1, 3, 5).numpy()
        up = F.interpolate(torch.from_numpy(_scaled(small)), size=(40, 75), mode="bilinear", align_corners=False)
        np.testing.assert_allclose(out.refined[c].numpy(), up[0, 0].numpy(), atol=1e-4)  # float32 vs float64
    assert out.refined.shape == (2, 40, 75) and out.box_mask.shape == (2, 3, 5)
    assert float(out.refined.min()) >= 0 and float(out.refined.max()) <= 1


def test_maps_run_under_no_grad_and_for_an_image_without_tags(tiny_clip) -> None:
    img = blob_image(33, 20)
    with torch.no_grad():
        out = clip_es.clip_es_maps(tiny_clip, img, ["cat"], VOC_BACKGROUND)
        empty = clip_es.clip_es_maps(tiny_clip, img, [], VOC_BACKGROUND)
    assert out.cam.shape == (1, 3, 2) and out.refined.shape == (1, 33, 20)
    assert 0 < float(out.scores[0]) < 1
    assert empty.refined.shape == (0, 33, 20) and empty.scores.shape == (0,)


# --- label map -----------------------------------------------------------------------------------


def test_label_map_background_power_in_float16_first_wins_ties() -> None:
    refined = np.array([[[0.40, 0.38, 0.10, 0.6]], [[0.10, 0.10, 0.45, 0.6001]]], dtype=np.float32)
    # exponent 2: background (1 - max)^2 = 0.36, 0.3844, 0.3025, 0.16; 0.6 and 0.6001 are one float16
    np.testing.assert_array_equal(clip_es.label_map(refined, [8, 15]), [[8, 0, 15, 8]])
    # exponent 1: background 1 - max = 0.6, 0.62, 0.55, 0.4
    np.testing.assert_array_equal(clip_es.label_map(refined, [8, 15], bg_exponent=1), [[0, 0, 0, 8]])
    assert clip_es.label_map(refined, [8, 15]).dtype == np.uint8
    np.testing.assert_array_equal(clip_es.label_map(np.zeros((0, 2, 3), np.float32), []), np.zeros((2, 3)))


@pytest.mark.parametrize("ids", [[0, 15], [8, 255], [8]])
def test_label_map_refuses_bad_class_ids(ids: list[int]) -> None:
    with pytest.raises(ValueError):
        clip_es.label_map(np.zeros((2, 2, 2), np.float32), ids)


# --- prompts -------------------------------------------------------------------------------------


def test_published_synonyms_and_background_lists() -> None:
    assert class_prompts(["person", "tvmonitor", "bird"], "voc") == [
        "person with clothes,people,human", "tvmonitor screen", "bird avian",
    ]  # fmt: skip
    assert class_prompts(["couch", "tie", "snowboard", "tv"], "coco") == [
        "sofa", "necktie", "sknowboard", "tvmonitor screen",
    ]  # fmt: skip
    assert len(VOC_BACKGROUND) == 25 and len(COCO_BACKGROUND) == 23
    assert set(VOC_BACKGROUND) - set(COCO_BACKGROUND) == {"keyboard", "sign"}
    with pytest.raises(ValueError, match="not among CLIP-ES's voc classes"):
        class_prompts(["couch"], "voc")
    with pytest.raises(ValueError, match="prompts exist for"):
        background_prompts("ade20k")


# --- dense CRF (pydensecrf2) ---------------------------------------------------------------------


def test_crf_image_is_bgr_minus_caffe_mean_wrapped_to_uint8() -> None:
    img = np.array([[[255, 0, 130], [200, 120, 110]]], dtype=np.uint8)
    # BGR (130, 0, 255) - (104.008, 116.669, 122.675) = (25.99, -116.67, 132.33) -> (25, 140, 132)
    # BGR (110, 120, 200) - mean = (5.99, 3.33, 77.33) -> (5, 3, 77)
    np.testing.assert_array_equal(clip_es.crf_image(img), [[[25, 140, 132], [5, 3, 77]]])


def test_crf_label_map_keeps_confident_regions_and_ignores_a_tie() -> None:
    img = np.zeros((12, 16, 3), dtype=np.uint8)
    img[:, 8:] = 255
    halves = np.zeros((2, 12, 16), dtype=np.float32)
    halves[0, :, :8] = 0.9  # background 1 - 0.9 = 0.1 there
    halves[1, :, 8:] = 0.9
    expected = np.full((12, 16), 3, dtype=np.uint8)
    expected[:, 8:] = 9
    np.testing.assert_array_equal(clip_es.crf_label_map(img, halves, [3, 9]), expected)
    # background 1 - 0.5 = 0.5 against the tag's 0.5 everywhere: the CRF cannot break the tie -> 255
    tie = clip_es.crf_label_map(img, np.full((1, 12, 16), 0.5, np.float32), [7])
    np.testing.assert_array_equal(tie, np.full((12, 16), 255))


def test_crf_background_is_one_minus_max_to_the_power_one() -> None:
    img = np.zeros((12, 16, 3), dtype=np.uint8)
    # a flat 0.45: background 0.55 wins (with the power 2 of eval_cam.py it would be 0.3025 and lose)
    got = clip_es.crf_label_map(img, np.full((1, 12, 16), 0.45, np.float32), [7])
    np.testing.assert_array_equal(got, np.zeros((12, 16)))
    got = clip_es.crf_label_map(img, np.full((1, 12, 16), 0.55, np.float32), [7])
    np.testing.assert_array_equal(got, np.full((12, 16), 7))
