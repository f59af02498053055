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

    for func in (module._segment, module._costs_numba, module._relabel, module._edges, module._sort_by_cost,
                 module._merge, module._competing, module._order_free):
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


# ---- the order-free path: sorted by a radix sort, checked where equal costs could compete ----


def _tie_shuffles(costs: np.ndarray, order: np.ndarray, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """``n`` orders that differ from ``order`` (ascending costs) only among equal costs."""
    sorted_costs = costs[order]
    starts = np.flatnonzero(np.r_[True, sorted_costs[1:] != sorted_costs[:-1]])
    ends = np.r_[starts[1:], order.size]
    shuffles = []
    for _ in range(n):
        shuffled = order.copy()
        for s, e in zip(starts, ends, strict=True):
            if e - s > 1:
                shuffled[s:e] = rng.permutation(shuffled[s:e])
        shuffles.append(shuffled)
    return shuffles


def test_order_free_segments_are_those_of_every_order_of_equal_costs() -> None:
    """The argument in pipeline/felzenszwalb.py, tried: posterised images (many equal costs), each
    merged by skimage's loop (the exact path's) under 12 random orders of its equal costs. Where
    the order-free path answers, every order gives its segments; where it gives way, the images
    include some whose segments really do change with that order (so the check is needed)."""
    from pipeline import felzenszwalb as module

    rng = np.random.default_rng(7)
    seen: dict[str, int] = {}
    order_mattered = 0
    for case in range(60):
        h, w = int(rng.integers(4, 20)), int(rng.integers(4, 20))
        levels = int(rng.choice([2, 3, 4, 6]))
        image = (rng.integers(0, levels, (h, w, 3)) * (255 // (levels - 1))).astype(np.uint8)
        scale, sigma = float(rng.choice([1.0, 30.0, 300.0])), float(rng.choice([0.0, 0.8]))
        min_size = int(rng.integers(2, 12))
        got, path = module.segment_path(image, scale, sigma, min_size)
        seen[path] = seen.get(path, 0) + 1
        blurred = module._blur(module.img_as_float64(image), sigma)
        costs = module._costs(blurred)
        results = {module._segment(order, costs, h, w, scale / 255, min_size).tobytes()
                   for order in _tie_shuffles(costs, np.argsort(costs), rng, 12)}  # fmt: skip
        if path == "order-free":
            assert results == {got.tobytes()}, f"case {case}: an order of equal costs changed the segments"
        else:
            order_mattered += len(results) > 1
        assert np.array_equal(got, reference(image, scale, sigma, min_size)), f"case {case}"
    assert seen.get("order-free", 0) >= 20, seen
    assert seen.get("exact: equal costs compete in the min_size pass", 0) >= 3, seen
    assert order_mattered >= 1


def test_a_small_segment_between_two_equal_costs_takes_the_exact_path() -> None:
    """One mid-grey pixel between black and white, 0.5 from each: min_size 2 must join it to one
    side, and which one is the order of two equal costs: skimage's np.argsort decides."""
    from pipeline.felzenszwalb import segment_path

    image = np.array([[0.0, 0.0, 0.5, 1.0, 1.0]])
    got, path = segment_path(image, 1.0, 0.0, 2)
    assert path == "exact: equal costs compete in the min_size pass"
    assert np.array_equal(got, reference(image, 1.0, 0.0, 2))
    assert got.max() == 1  # the grey pixel went to one side: two segments


def test_a_threshold_rounding_to_an_equal_cost_is_refused() -> None:
    """The merge pass relies on a segment merged at cost w passing ``w < float32(w + scale/size)``
    for the rest of a run of equal costs w. A segment big enough for ``scale/size`` to vanish in
    float32 breaks it: merging A-B first shuts B-C out, merging B-C first lets A in. No real image
    gets there (2^26 pixels), so the state is given to ``_merge`` directly; both orders refuse."""
    from pipeline.felzenszwalb import _ROUNDING, _merge

    w, scale = 1.0 + 2.0**-40, 0.5  # float32(w + tiny) rounds down to 1.0 <= w
    for ends0, ends1 in (([0, 1], [1, 2]), ([1, 0], [2, 1])):
        forest = np.arange(3)
        size = np.array([2**26, 1, 1])
        threshold = np.full(3, 2.0, dtype=np.float32)  # all three pass at w
        status = _merge(np.array(ends0, np.int32), np.array(ends1, np.int32), np.array([w, w]), forest, size,
                        threshold, scale, 1)  # fmt: skip
        assert status == _ROUNDING, (ends0, status)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 400), st.sampled_from(["ties", "near", "wide", "zeros"]))
def test_sort_by_cost_orders_every_cost(seed: int, n: int, kind: str) -> None:
    """Radix sort on float32 bits, then float64 order inside equal float32 keys (runs shorter and
    longer than the insertion-sort limit), as ``np.sort`` orders them; positions a permutation."""
    from pipeline.felzenszwalb import _sort_by_cost

    rng = np.random.default_rng(seed)
    if kind == "ties":
        costs = rng.integers(0, 5, n) / 3.0
    elif kind == "near":  # equal in float32, different in float64: the runs the second step orders
        costs = 1.0 + rng.integers(0, 60, n) * 2.0**-45
    elif kind == "wide":
        costs = rng.random(n) * 10.0 ** rng.integers(-30, 3, n)
    else:
        costs = np.where(rng.random(n) < 0.7, 0.0, rng.random(n))
    positions, ordered = _sort_by_cost(costs)
    assert np.array_equal(np.sort(positions), np.arange(n))
    assert np.array_equal(costs[positions], ordered)
    assert np.array_equal(ordered, np.sort(costs))


def test_order_free_edges_are_skimages_edges_with_the_same_costs() -> None:
    """The order-free path lays edges out pixel by pixel; as a set of (pixel pair, cost) they must
    be skimage's, to the bit."""
    from pipeline.felzenszwalb import _costs, _edges

    h, w = 6, 7
    image = np.random.default_rng(3).random((h, w, 3))
    costs, ids = _edges(image)
    step = np.array([1, w, w + 1, w - 1])
    ours = {(min(p, q), max(p, q)): c for p, q, c in zip(ids >> 2, (ids >> 2) + step[ids & 3], costs, strict=True)}
    ys, xs = np.mgrid[:h, :w]
    pix = ys * w + xs
    pairs = [(pix[:, 1:], pix[:, :-1]), (pix[1:], pix[:-1]), (pix[1:, 1:], pix[:-1, :-1]), (pix[1:, :-1], pix[:-1, 1:])]
    firsts = np.concatenate([a.ravel() for a, _ in pairs])
    seconds = np.concatenate([b.ravel() for _, b in pairs])
    theirs = {(min(p, q), max(p, q)): c for p, q, c in zip(firsts, seconds, _costs(image), strict=True)}
    assert len(ours) == costs.size == len(theirs)
    assert ours == theirs


def _min_size_pass(pairs: list[tuple[int, int]], sizes: list[int], min_size: int, order: tuple[int, ...]) -> set:
    """skimage's min_size rule in plain Python, on segments ``0..len(sizes)-1``: the partition."""
    parent, size = list(range(len(sizes))), list(sizes)

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i in order:
        a, b = find(pairs[i][0]), find(pairs[i][1])
        if a != b and (size[a] < min_size or size[b] < min_size):
            parent[max(a, b)] = min(a, b)
            size[min(a, b)] += size[max(a, b)]
    return {frozenset(s for s in range(len(sizes)) if find(s) == r) for r in range(len(sizes))}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=2, max_size=6), st.integers(1, 14), st.data())
def test_a_run_judged_not_competing_merges_the_same_in_every_order(sizes: list[int], min_size: int, data) -> None:
    """``_competing`` against brute force: every order of a run's candidate edges (pairs of
    segments, one of them small). Where it says the order cannot matter, all orders agree."""
    import itertools

    from pipeline.felzenszwalb import _competing

    candidates = [(a, b) for a in range(len(sizes)) for b in range(a + 1, len(sizes))
                  if sizes[a] < min_size or sizes[b] < min_size]  # fmt: skip
    if len(candidates) < 2:
        return
    pairs = data.draw(st.lists(st.sampled_from(candidates), min_size=2, max_size=5))
    competing = _competing(np.array([a for a, _ in pairs]), np.array([b for _, b in pairs]), np.array(sizes), min_size)
    outcomes = {frozenset(_min_size_pass(pairs, sizes, min_size, order))
                for order in itertools.permutations(range(len(pairs)))}  # fmt: skip
    if not competing:
        assert len(outcomes) == 1, (pairs, sizes, min_size)


def test_competing_runs_are_recognised() -> None:
    from pipeline.felzenszwalb import _competing

    def competing(pairs: list[tuple[int, int]], sizes: list[int], min_size: int) -> bool:
        return _competing(np.array([a for a, _ in pairs]), np.array([b for _, b in pairs]), np.array(sizes), min_size)

    assert competing([(0, 1), (1, 2)], [5, 1, 5], 3)  # a small segment between two large ones
    assert competing([(0, 1), (2, 3), (1, 2)], [2, 2, 2, 2], 3)  # two pairs that grow large, then their link
    assert not competing([(0, 1), (0, 1)], [5, 1], 3)  # one pair twice
    assert not competing([(0, 1), (1, 2)], [5, 1, 1], 3)  # one large, the small ones add up to 2 < 3
    assert not competing([(0, 1), (2, 3)], [5, 1, 1, 5], 3)  # two groups that share no segment


@pytest.mark.filterwarnings("ignore:Got image with third dimension:RuntimeWarning")  # skimage, on 8 channels
@pytest.mark.parametrize(("shape", "limit", "path"), [((6, 7, 8), None, "exact: 8 or more channels"),
                                                      ((6, 7, 3), 41, "exact: too many pixels for int32 edge ids"),
                                                      ((6, 7, 3), 42, "order-free")])  # fmt: skip
def test_images_the_order_free_path_cannot_take_go_the_exact_way(monkeypatch, shape, limit, path) -> None:
    """8+ channels (numpy sums their costs pairwise) and images whose edge ids would overflow int32
    (the limit lowered here: 6 x 7 = 42 pixels) take the exact path, with skimage's segments."""
    from pipeline import felzenszwalb as module

    if limit is not None:
        monkeypatch.setattr(module, "MAX_ORDER_FREE_PIXELS", limit)
    image = np.random.default_rng(1).random(shape)
    got, taken = module.segment_path(image, 50.0, 0.5, 3)
    assert taken == path
    assert np.array_equal(got, reference(image, 50.0, 0.5, 3))


@pytest.mark.parametrize(("dots", "path"), [(9, "exact: over 64 min_size candidates in one run of equal costs"),
                                            (2, "exact: equal costs compete in the min_size pass"),
                                            (1, "order-free")])  # fmt: skip
def test_a_run_with_more_candidates_than_the_check_holds_takes_the_exact_path(dots: int, path: str) -> None:
    """Isolated white pixels on black, sigma 0: every dot is a one-pixel segment whose 8 edges to the
    background all cost 1, one run of equal costs; min_size 2 makes each edge a candidate. 9 dots
    give 72 candidates, over the 64 the check holds (its own reason); 2 dots are checked and refused
    (two small segments sharing the background, adding up to 2 >= min_size); 1 dot's 8 candidates
    join one pair, which any order merges alike."""
    from pipeline.felzenszwalb import segment_path

    image = np.zeros((3 * 9, 3 * ((dots + 8) // 9)))
    for i in range(dots):
        image[3 * (i % 9) + 1, 3 * (i // 9) + 1] = 1.0
    got, taken = segment_path(image, 1.0, 0.0, 2)
    assert taken == path
    assert np.array_equal(got, reference(image, 1.0, 0.0, 2))
