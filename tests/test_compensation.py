"""Fine-grained compensation: the right-to-left chain, attention normalisation, seeded noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import compensation


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 10_000))
def test_right_to_left_chain_equals_the_explicit_product(n_maps, n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    side = 8
    raw = torch.softmax(torch.randn(n_maps, 1, side * side, side * side, generator=g, dtype=torch.float64) * 4, -1)
    chain = compensation.attention_chain(raw, thr=0.2)
    coarse = torch.rand(n_classes, 3, 5, generator=g, dtype=torch.float64)
    fast = compensation.compensate(chain, coarse)
    explicit = chain[0]
    for m in chain[1:]:
        explicit = explicit @ m
    s = torch.nn.functional.interpolate(coarse[None], size=(side, side), mode="bilinear", align_corners=False)
    slow = (explicit @ s[0].flatten(1).T).T.reshape(n_classes, side, side)
    assert torch.allclose(fast.double(), slow, rtol=1e-9, atol=1e-12)


def test_normalize_attention_follows_the_three_steps():
    m = torch.tensor([[0.6, 0.1, 0.3], [0.2, 0.5, 0.3], [0.2, 0.4, 0.4]], dtype=torch.float64)
    out = compensation.normalize_attention(m, thr=0.5)
    # By hand: column maxima 0.6, 0.5, 0.4 -> [[1, .2, .75], [.333, 1, .75], [.333, .8, 1]]
    # (each / (max + 1e-5)); entries below 0.5 -> 0; rows / (sum + 1e-5).
    cm = np.array([0.6, 0.5, 0.4]) + 1e-5
    kept = np.array([[0.6 / cm[0], 0, 0.3 / cm[2]], [0, 0.5 / cm[1], 0.3 / cm[2]], [0, 0.4 / cm[1], 0.4 / cm[2]]])
    expected = kept / (kept.sum(axis=1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)


def test_noise_is_a_function_of_the_image_id_only():
    a = compensation.image_noise("000000139", (4, 8, 8))
    assert torch.equal(a, compensation.image_noise("000000139", (4, 8, 8)))
    assert not torch.equal(a, compensation.image_noise("000000140", (4, 8, 8)))
    assert a.dtype == torch.float32
    assert 0 <= compensation.noise_seed("x") < 2**63
    # Integer and string forms of the same id are the same id.
    assert compensation.noise_seed(139) == compensation.noise_seed("139")  # type: ignore[arg-type]


def test_sd_pixels_is_a_nearest_resize_to_512_in_minus_one_to_one():
    img = np.zeros((2, 4, 3), np.uint8)
    img[0, :, 0] = 255  # top row red
    x = compensation.sd_pixels(img)
    assert x.shape == (3, 512, 512)
    assert x.min() == -1.0 and x.max() == 1.0
    assert (x[0, :256] == 1).all() and (x[0, 256:] == -1).all()  # nearest: no blended rows


def test_capture_is_deterministic_and_independent_of_the_batch(labeler):
    from tests.conftest import blob_image

    sd = labeler.sd
    layers = labeler.config.cliper.sd_layers
    imgs = [blob_image(60, 90, seed=1), blob_image(80, 50, seed=2)]
    px = torch.stack([compensation.sd_pixels(i) for i in imgs])
    both = compensation.capture_attention(sd, px, ["a", "b"], layers)
    again = compensation.capture_attention(sd, px, ["a", "b"], layers)
    alone = compensation.capture_attention(sd, px[1:], ["b"], layers)
    other_id = compensation.capture_attention(sd, px[1:], ["c"], layers)
    for name in layers:
        assert both[name].shape[-1] == 64 * 64
        assert torch.equal(both[name], again[name])
        assert torch.allclose(both[name][1], alone[name][0], atol=1e-5)
        assert not torch.allclose(alone[name][0], other_id[name][0], atol=1e-5)


def _steps(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` and its ``n`` neighbours either side, one ulp apart."""
    out, lo, hi = [x], x, x
    for _ in range(n):
        lo, hi = torch.nextafter(lo, lo - 1), torch.nextafter(hi, hi + 1)
        out += [lo, hi]
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("thr", [0.1, 0.2, 0.7, 1 / 3])
def test_the_one_pass_threshold_zeroes_exactly_what_masked_fill_did(dtype, thr):
    near = _steps(torch.tensor(thr, dtype=dtype), 20)
    m = torch.rand(8, len(near), generator=torch.Generator().manual_seed(0), dtype=dtype) * 0.5
    m[0] = 1.0  # every column maximum is 1, so row 1 lands on the ulps around thr after step 1
    m[1] = near * (1.0 + 1e-5)
    scaled = m / (m.amax(dim=-2, keepdim=True) + 1e-5)
    assert (scaled[1] == torch.tensor(thr, dtype=dtype)).any()  # the boundary itself is exercised
    old = scaled.masked_fill(scaled < thr, 0.0)
    old.div_(old.sum(dim=-1, keepdim=True) + 1e-5)
    assert torch.equal(compensation.normalize_attention(m, thr), old)


@pytest.mark.parametrize("head_dim", [4, 16, 64, 8 * 3])
def test_scaled_scores_are_bitwise_the_scaled_product(head_dim):
    g = torch.Generator().manual_seed(head_dim)
    q, k = torch.randn(3, 50, head_dim, generator=g), torch.randn(3, 50, head_dim, generator=g)
    scale = head_dim**-0.5
    assert torch.equal(compensation.scaled_scores(q, k, scale), torch.bmm(q, k.transpose(1, 2)) * scale)


def test_the_chain_takes_one_map_tensor_per_layer_as_a_stack():
    maps = torch.softmax(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)), -1)
    stacked = compensation.attention_chain(maps, 0.1)
    per_layer = compensation.attention_chain([maps[0], maps[1]], 0.1)
    assert len(stacked) == 6 and all(torch.equal(a, b) for a, b in zip(stacked, per_layer, strict=True))
