"""CLIPer coarse map: input sizing, positional embedding, fusion, against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import cliper
from pipeline.bench.architectures import build_clip


@pytest.mark.parametrize(
    ("w", "h", "patch", "expected"),
    [
        # r = 336/375: 500 -> 448 = 28 * 16, 375 -> 336 = 21 * 16
        (500, 375, 16, (448, 336)),
        # r = 336/480: 640 * 0.7 = 448 -> 448/14 = 32 -> 448; 480 -> 336 = 24 * 14
        (640, 480, 14, (448, 336)),
        # r = 336/100: 333 * 3.36 = 1118.88 -> /16 = 69.93 -> 70 * 16 = 1120
        (333, 100, 16, (1120, 336)),
    ],
)
def test_clip_input_size_follows_the_published_rounding(w, h, patch, expected):
    assert cliper.clip_input_size(w, h, patch) == expected


def test_clip_input_normalises_with_the_given_mean_and_std():
    img = np.full((50, 80, 3), 255, np.uint8)
    x = cliper.clip_input(img, 16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    assert x.shape == (3, 336, 544)  # 80 * 6.72 = 537.6 -> 33.6 -> 34 * 16 = 544
    assert torch.allclose(x[:, 100, 100], torch.tensor([1.0, 3.0, 1.0]))


def test_pos_embed_interpolation_keeps_class_row_and_identity_on_same_grid():
    pos = torch.randn(1 + 14 * 14, 8)
    assert torch.equal(cliper.interpolate_pos_embed(pos, (14, 14)), pos)
    out = cliper.interpolate_pos_embed(pos, (21, 28))
    assert out.shape == (1 + 21 * 28, 8)
    assert torch.equal(out[0], pos[0])
    # Bilinear interpolation of a constant grid is the constant.
    const = torch.cat([pos[:1], torch.full((196, 8), 3.0)])
    assert torch.allclose(cliper.interpolate_pos_embed(const, (9, 30))[1:], torch.tensor(3.0))


@pytest.fixture(scope="module")
def tiny_visual():
    return build_clip("tiny", seed=3).visual


def test_block_forward_matches_open_clip(tiny_visual):
    x = torch.randn(2, 1 + 6 * 5, 64)
    for block in tiny_visual.transformer.resblocks:
        ours, normed, probs = cliper._block_forward(block, x)
        theirs = block(x if tiny_visual.transformer.batch_first else x.transpose(0, 1))
        theirs = theirs if tiny_visual.transformer.batch_first else theirs.transpose(0, 1)
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert torch.allclose(normed, block.ln_1(x))
        assert torch.allclose(probs.sum(-1), torch.ones(2, block.attn.num_heads, x.shape[1]), atol=1e-5)
        x = theirs


def _reference_fusion(visual, pixels: torch.Tensor, one_round: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """Section 2 steps 1-3 written from the text, for one image, with nn.MultiheadAttention's own
    attention weights and float64 numpy for the fusion."""
    x = cliper._tokens(visual, pixels)[0]  # [L, D]
    blocks = list(visual.transformer.resblocks)
    feats, attn_sum = [], 0
    for block in blocks[:-1]:
        y = block.ln_1(x[None])
        _, w = block.attn(y, y, y, need_weights=True, average_attn_weights=False)
        attn_sum = attn_sum + w[0].double().numpy()  # [heads, L, L]
        feats.append(y[0])
        x = block(x[None])[0]
    feats.append(x)
    last = blocks[-1]
    d = x.shape[-1]
    heads = last.attn.num_heads
    s = attn_sum.copy()
    outs = []
    for k, f in enumerate(feats):
        if k == 0 or not one_round:
            s = s / s.sum(axis=1, keepdims=True)
            s = s / s.sum(axis=2, keepdims=True)
        a = (s + np.swapaxes(s, 1, 2)) / 2
        a = np.maximum(a - a.mean(axis=1, keepdims=True), 0)
        a = a / a.sum(axis=2, keepdims=True)
        v = (last.ln_1(f) @ last.attn.in_proj_weight[2 * d :].T + last.attn.in_proj_bias[2 * d :]).double().numpy()
        n_tok = len(v)
        v = v.reshape(n_tok, heads, d // heads).transpose(1, 0, 2)
        o = (a @ v).transpose(1, 0, 2).reshape(n_tok, d)
        o = last.attn.out_proj(torch.from_numpy(o).float())
        outs.append((visual.ln_post(o) @ visual.proj).detach().double().numpy())
    return outs, a


@torch.no_grad()
def test_early_layer_fusion_matches_a_reference_written_from_the_method(tiny_visual):
    pixels = torch.randn(1, 3, 5 * 16, 7 * 16)
    fusion = cliper.early_layer_fusion(tiny_visual, pixels)
    ref_embeddings, ref_attn_last = _reference_fusion(tiny_visual, pixels)
    n_blocks = len(tiny_visual.transformer.resblocks)
    assert fusion.embeddings.shape[:3] == (n_blocks, 1, 1 + 35)
    assert fusion.grid == (5, 7)
    for k in range(n_blocks):
        np.testing.assert_allclose(fusion.embeddings[k, 0].double().numpy(), ref_embeddings[k], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fusion.attn_last[0].double().numpy(), ref_attn_last, atol=1e-5)


@torch.no_grad()
def test_candidate_k_sees_k_sinkhorn_rounds(tiny_visual):
    """The published in-place rounds are not a rounding detail: candidate k >= 2 differs from what
    one shared round gives, and matches k rounds (candidate 1 sees one round either way)."""
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 64, 64)
    fusion = cliper.early_layer_fusion(tiny_visual, pixels)
    k_rounds, attn_k = _reference_fusion(tiny_visual, pixels)
    one_round, attn_one = _reference_fusion(tiny_visual, pixels, one_round=True)
    np.testing.assert_allclose(fusion.embeddings[0, 0].double().numpy(), one_round[0], rtol=1e-4, atol=1e-4)
    for k in range(1, len(k_rounds)):
        np.testing.assert_allclose(fusion.embeddings[k, 0].double().numpy(), k_rounds[k], rtol=1e-4, atol=1e-4)
        assert np.abs(fusion.embeddings[k, 0].double().numpy() - one_round[k]).max() > 1e-3
    np.testing.assert_allclose(fusion.attn_last[0].double().numpy(), attn_k, atol=1e-5)
    assert np.abs(fusion.attn_last[0].double().numpy() - attn_one).max() > 1e-3


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(2, 12), st.integers(0, 10_000), st.integers(1, 4))
def test_fused_attention_rows_are_non_negative_and_sum_to_one(heads, n, seed, rounds):
    g = torch.Generator().manual_seed(seed)
    s = torch.softmax(torch.randn(heads, n, n, generator=g, dtype=torch.float64) * 3, dim=-1) * rounds
    for _ in range(rounds):
        s = cliper.sinkhorn_round(s)
    a = cliper.fuse_attention(s)
    assert (a >= 0).all()
    nonzero = a.sum(-1) > 0
    # A row can only be all zero if every entry sat at or below its column mean.
    assert torch.allclose(a.sum(-1)[nonzero], torch.ones_like(a.sum(-1)[nonzero]))
    assert nonzero.float().mean() > 0.5


def test_coarse_map_keeps_only_foreground_channels_and_thresholds_the_selected_layer():
    torch.manual_seed(0)
    n, hw, e, c = 3, 6, 8, 2
    emb = torch.randn(n, 1, 1 + hw, e)
    # Two heads of row-stochastic, non-symmetric attention: sel @ A and A @ sel differ.
    attn = torch.softmax(torch.randn(1, 2, 1 + hw, 1 + hw) * 3, dim=-1)
    fusion = cliper.FusionOutput(emb, attn, (2, 3))
    text = torch.randn(c + 3 + 1, e)
    out = cliper.coarse_map(fusion, text, c, logit_scale=10.0, select_layer=-1, attention_thr=0.5)
    assert out.shape == (1, c, 2, 3)
    # Independent computation in float64 numpy: softmax over all text rows, keep fg, threshold the
    # last layer, propagate as the published seg_last.flatten(-2, -1) @ attn.mean(0)[1:, 1:].
    x = emb[:, 0, 1:].double().numpy()
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    t = text.double().numpy() / np.linalg.norm(text.double().numpy(), axis=-1, keepdims=True)
    logits = 10.0 * x @ t.T
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    seg = (prob / prob.sum(-1, keepdims=True))[..., :c].transpose(0, 2, 1)  # [n, C, hw]
    sel = seg[-1].copy()
    sel[sel < 0.5 * sel.max(-1, keepdims=True)] = 0
    a = attn[0].double().numpy().mean(0)[1:, 1:]
    expected = sel @ a + (seg[0] + seg[1] + sel) / 3
    np.testing.assert_allclose(out[0].reshape(c, hw).double().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.abs((a @ sel.T).T - sel @ a).max() > 1e-3  # the test can tell the two directions apart


@pytest.mark.parametrize(
    ("size", "crop", "stride", "expected"),
    [(336, 224, 112, [0, 112]), (448, 224, 112, [0, 112, 224]), (400, 224, 112, [0, 112, 176]), (100, 224, 112, [0])],
)
def test_window_origins_cover_the_axis(size, crop, stride, expected):
    assert cliper.window_origins(size, crop, stride) == expected
