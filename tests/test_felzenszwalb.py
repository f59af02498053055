"""pipeline.felzenszwalb against scikit-image's felzenszwalb, the reference: segment maps must be
equal (np.array_equal), so label maps stay byte-identical."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.segmentation import felzenszwalb as skimage_felzenszwalb

from pipeline import refine
from pipeline.config import PRESETS, build_config
from pipeline.felzenszwalb import felzenszwalb


def reference(image: np.ndarray, scale: float, sigma: float, min_size: int) -> np.ndarray:
    return skimage_felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size,
                                channel_axis=None if image.ndim == 2 else -1)  # fmt: skip


@st.composite
def images(draw: st.DrawFn) -> np.ndarray:
    """Small images of any shape from 1x1 (rows and columns of one pixel included), gray [H, W],
    [H, W, 1] or RGB, uint8 or float; few distinct values make many equal edge costs, whose order
    (np.argsort's) decides merges."""
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    channels = draw(st.sampled_from([(), (1,), (3,)]))
    dtype = draw(st.sampled_from([np.uint8, np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    palette = draw(st.sampled_from([2, 3, 8, 256]))
    values = rng.integers(0, palette, (h, w, *channels)) * (255 // (palette - 1))
    return values.astype(np.uint8) if dtype is np.uint8 else (values / 255).astype(dtype)


@settings(max_examples=150, deadline=None)
@given(images(), st.floats(0.1, 1000), st.sampled_from([0.0, 0.5, 0.8, 2.0]), st.integers(1, 40))
def test_random_images_segment_as_skimage(image: np.ndarray, scale: float, sigma: float, min_size: int) -> None:
    expected = reference(image, scale, sigma, min_size)
    got = felzenszwalb(image, scale, sigma, min_size)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert np.array_equal(got, expected)


def _preset_refines() -> list:
    cfgs = {build_config(name).refine for name in PRESETS}
    return sorted(cfgs, key=repr)


@pytest.mark.slow
@pytest.mark.parametrize("photo", ["astronaut", "coffee", "chelsea", "camera", "rocket"])
def test_sample_photographs_at_preset_parameters(photo: str) -> None:
    """Every preset's refine settings (scale and min_size grown with the pixel count, as
    refine.superpixels does), on the full photograph and on a 375x500 crop."""
    full = getattr(skimage.data, photo)()
    if full.ndim == 2:
        full = np.repeat(full[..., None], 3, axis=-1)  # refine takes HWC RGB
    for image in (full, np.ascontiguousarray(full[:375, :500])):
        for cfg in _preset_refines():
            growth = image.shape[0] * image.shape[1] / cfg.reference_pixels
            min_size = max(1, int(round(cfg.min_size * growth)))
            expected = reference(image, cfg.scale * growth, cfg.sigma, min_size)
            assert np.array_equal(refine.superpixels(image, cfg), expected.astype(np.int32))


def test_photograph_with_many_equal_costs() -> None:
    """A posterised photograph (4 levels per channel): most edge costs repeat, so the tie order of
    the edge sort must be skimage's."""
    image = (skimage.data.chelsea()[:120, :160] // 64 * 85).astype(np.uint8)
    for scale, sigma, min_size in [(100, 0.0, 50), (5, 0.0, 1), (300, 0.8, 20)]:
        assert np.array_equal(felzenszwalb(image, scale, sigma, min_size), reference(image, scale, sigma, min_size))


@pytest.mark.parametrize("shape", [(5,), (0, 4, 3), (4, 0), (2, 2, 2, 3)])
def test_bad_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="felzenszwalb needs an"):
        felzenszwalb(np.zeros(shape, np.uint8))


def test_compiled_parts_release_the_gil() -> None:
    """The merge loop and the edge costs run without the GIL, so threads scale (skimage's merge
    loop runs nogil too); the ratio is measured by jobs/bench_felzenszwalb.py."""
    from pipeline import felzenszwalb as module

    for func in (module._segment, module._costs_numba, module._relabel):
        assert func.targetoptions.get("nogil") is True, func


@pytest.mark.parametrize(("scale", "merged"), [(100.0, True), (0.3, False)])
def test_merge_threshold_is_rounded_to_float32(scale: float, merged: bool) -> None:
    """Two pixels whose difference lies between the threshold scale/255 and that threshold in
    float32: skimage keeps thresholds in C floats, so 100/255 (rounded up in float32) merges a
    difference of exactly 100/255, and 0.3/255 (rounded down) keeps a difference equal to its
    float32 value apart."""
    t = scale / 255
    t32 = float(np.float32(t))
    assert (t32 > t) == merged  # the case each parameter is chosen for
    image = np.array([[0.0, t if merged else t32]])
    expected = np.array([[0, 0]] if merged else [[0, 1]])
    assert np.array_equal(reference(image, scale, 0.0, 1), expected)
    assert np.array_equal(felzenszwalb(image, scale, 0.0, 1), expected)


@pytest.mark.parametrize("channels", [1, 3, 9])
def test_edge_costs_are_skimages_to_the_bit(channels: int) -> None:
    """Edge costs as skimage computes them (numpy's sum over channels, then sqrt), in its edge
    order (right, down, down-right, up-right): one ulp off can reorder the edge sort."""
    from pipeline.felzenszwalb import _costs

    image = np.random.default_rng(channels).random((7, 9, channels))

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(np.sum((a - b) * (a - b), axis=-1)).ravel()

    expected = np.hstack([dist(image[:, 1:], image[:, :-1]), dist(image[1:], image[:-1]),
                          dist(image[1:, 1:], image[:-1, :-1]), dist(image[1:, :-1], image[:-1, 1:])])  # fmt: skip
    assert np.array_equal(_costs(image), expected)
