"""Felzenszwalb-Huttenlocher graph segmentation compiled with numba, giving the same segment maps
as ``skimage.segmentation.felzenszwalb`` (``np.array_equal``) in a fraction of its time.

Same steps as scikit-image's: float64 conversion (``img_as_float64``), the same gaussian blur call,
an 8-connected graph whose edge costs are the float64 Euclidean colour distances summed channel by
channel in numpy's order, a union-find merge over the edges in ascending cost whose thresholds are
rounded to float32 as skimage's Cython does, the ``min_size`` pass over the same edge order, and
segments numbered by their first pixel in raster order.

Two paths give that result:

- **order-free** (the usual one): the edges are sorted by a compiled radix sort, in no particular
  order among equal costs. skimage sorts with ``np.argsort``, an unstable sort whose order of
  equal costs depends on numpy's build and the CPU's vector unit, so this path only answers where
  that order cannot change the segments, and checks it while merging (``_merge``):

  * merge pass: within a run of equal cost ``w``, an edge merges iff both its segments pass
    ``w < threshold``; a segment that has not merged at ``w`` keeps its threshold, and one that
    has holds ``float32(w + scale / size) > w``, so the merges of the run are the connected
    pieces of its edges between passing segments, whatever their order. Only a threshold that
    rounds to ``<= w`` inside a run of two or more equal costs breaks this: checked.
  * ``min_size`` pass: within a run of equal costs, only the edges that join two segments, one
    of them small, at the start of the run can merge. Groups of them that share no segment are
    independent; a group merges the same in any order when it joins one pair only, or when it
    holds at most one large segment and its small ones add up to less than ``min_size``
    (``_competing``). Any other group is refused: checked.

  Roots are the smallest pixel index of their segment in either order, so the numbering agrees too.
- **exact** (the fallback, where the check refuses, or for 8+ channels whose costs numpy sums
  pairwise): ``np.argsort`` on skimage's cost array in skimage's edge order, so the order of equal
  costs is numpy's, as it is for skimage on the same machine.

Both run in compiled functions that release the GIL (``nogil=True``), so threads scale on a node's
cores. ``segment_path`` says which path an image took.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from scipy import ndimage
from skimage.util import img_as_float64

_NUMPY_SUM_LEFT_TO_RIGHT = 8  # numpy sums fewer than 8 values left to right (pairwise beyond)


def compiled(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(nogil=True, cache=True)``. The cache goes to ``__pycache__`` beside this file,
    else to numba's user-wide cache (or ``NUMBA_CACHE_DIR``); where neither is writable numba
    refuses to cache, and the function is compiled once per process instead."""

    def wrap(func: Callable[..., Any]) -> Any:
        try:
            return numba.njit(nogil=True, cache=True, **options)(func)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, **options)(func)

    return wrap


_MAX_CANDIDATES = 64  # per run of equal costs; _competing is quadratic in them

#: how ``segment_path`` says an image was segmented (the reasons the order-free path gave way)
PATHS = ("order-free", "exact: a cost is NaN", "exact: a threshold rounds to an equal cost",
         "exact: equal costs compete in the min_size pass", "exact: 8 or more channels",
         "exact: too many pixels for int32 edge ids",
         f"exact: over {_MAX_CANDIDATES} min_size candidates in one run of equal costs")  # fmt: skip
_ORDER_FREE, _NAN, _ROUNDING, _COMPETING, _WIDE, _HUGE, _CROWDED = range(7)
MAX_ORDER_FREE_PIXELS = (2**31 - 1) // 4  # edge ids 4 * pixel + direction are int32


def felzenszwalb(image: np.ndarray, scale: float = 1.0, sigma: float = 0.8, min_size: int = 20) -> np.ndarray:
    """[H, W] or [H, W, C] image (any dtype ``img_as_float64`` takes; channels last) -> [H, W]
    intp segment ids 0..S-1, numbered by first pixel in raster order; equal to
    ``skimage.segmentation.felzenszwalb(image, scale, sigma, min_size, channel_axis=-1)``."""
    return segment_path(image, scale, sigma, min_size)[0]


def segment_path(image: np.ndarray, scale: float = 1.0, sigma: float = 0.8,
                 min_size: int = 20) -> tuple[np.ndarray, str]:  # fmt: skip
    """``felzenszwalb``'s segments and the path that computed them (one of ``PATHS``)."""
    if image.ndim not in (2, 3) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"felzenszwalb needs an [H, W] or [H, W, C] image with H, W >= 1, got shape {image.shape}")
    blurred = _blur(img_as_float64(np.atleast_3d(image)), sigma)
    height, width = blurred.shape[:2]
    scale, min_size = float(scale) / 255.0, int(min_size)
    if blurred.shape[2] >= _NUMPY_SUM_LEFT_TO_RIGHT:
        status = _WIDE
    elif height * width > MAX_ORDER_FREE_PIXELS:
        status = _HUGE
    else:
        labels, status = _order_free(np.ascontiguousarray(blurred), scale, min_size)
        if status == _ORDER_FREE:
            return labels.reshape(height, width), PATHS[status]
    costs = _costs(blurred)
    order = np.argsort(costs)  # skimage's call: its (unstable) order of equal costs is part of the result
    return _segment(order, costs, height, width, scale, min_size), PATHS[status]


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """skimage's ``gaussian(image, sigma=[sigma, sigma, 0], mode='reflect', channel_axis=-1)`` on a
    float64 [H, W, C] image: scipy's filter with the defaults skimage passes (cval 0, truncate 4)."""
    out = np.empty_like(image)
    ndimage.gaussian_filter(image, sigma=[sigma, sigma, 0], output=out, mode="reflect", cval=0, truncate=4.0)
    return out


def _costs(image: np.ndarray) -> np.ndarray:
    """[E] float64 edge costs in skimage's edge order: right, down, down-right, up-right neighbours,
    each block in raster order of its first pixel."""
    if image.shape[2] >= _NUMPY_SUM_LEFT_TO_RIGHT:  # numpy's pairwise sum: let numpy compute it
        return _costs_numpy(image)
    return _costs_numba(np.ascontiguousarray(image))


def _costs_numpy(image: np.ndarray) -> np.ndarray:
    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(np.sum((a - b) * (a - b), axis=-1)).ravel()

    parts = [dist(image[:, 1:], image[:, :-1]), dist(image[1:, :], image[:-1, :]),
             dist(image[1:, 1:], image[:-1, :-1]), dist(image[1:, :-1], image[:-1, 1:])]  # fmt: skip
    return np.concatenate(parts)


@compiled()
def _dist(image: np.ndarray, y0: int, x0: int, y1: int, x1: int) -> float:  # pragma: no cover (compiled)
    total = 0.0
    for c in range(image.shape[2]):
        d = image[y0, x0, c] - image[y1, x1, c]
        total += d * d
    return np.sqrt(total)


@compiled()
def _costs_numba(image: np.ndarray) -> np.ndarray:  # pragma: no cover (compiled)
    h, w = image.shape[0], image.shape[1]
    n_right, n_down, n_diag = h * (w - 1), (h - 1) * w, (h - 1) * (w - 1)
    costs = np.empty(n_right + n_down + 2 * n_diag)
    k = 0
    for y in range(h):
        for x in range(w - 1):
            costs[k] = _dist(image, y, x + 1, y, x)
            k += 1
    for y in range(h - 1):
        for x in range(w):
            costs[k] = _dist(image, y + 1, x, y, x)
            k += 1
    for y in range(h - 1):
        for x in range(w - 1):
            costs[k] = _dist(image, y + 1, x + 1, y, x)
            k += 1
    for y in range(h - 1):
        for x in range(w - 1):
            costs[k] = _dist(image, y + 1, x, y, x + 1)
            k += 1
    return costs


@compiled(inline="always")
def _ends(e: int, h: int, w: int) -> tuple[int, int]:  # pragma: no cover (compiled)
    """Pixel indices (first, second) of edge ``e``, as skimage pairs them."""
    n_right, n_down, n_diag = h * (w - 1), (h - 1) * w, (h - 1) * (w - 1)
    if e < n_right:
        y, x = divmod(e, w - 1)
        return y * w + x + 1, y * w + x
    e -= n_right
    if e < n_down:
        return e + w, e
    e -= n_down
    if e < n_diag:
        y, x = divmod(e, w - 1)
        return (y + 1) * w + x + 1, y * w + x
    y, x = divmod(e - n_diag, w - 1)
    return y * w + x + 1, (y + 1) * w + x


@compiled(inline="always")
def _set_root(forest: np.ndarray, n: int, root: int) -> None:  # pragma: no cover (compiled)
    while forest[n] < n:
        j = forest[n]
        forest[n] = root
        n = j
    forest[n] = root


@compiled(inline="always")
def _find_root(forest: np.ndarray, n: int) -> int:  # pragma: no cover (compiled)
    root = n
    while forest[root] < root:
        root = forest[root]
    _set_root(forest, n, root)
    return root


@compiled(inline="always")
def _join(forest: np.ndarray, n: int, m: int) -> int:  # pragma: no cover (compiled)
    """Union with the smaller root as the new root (skimage's ``join_trees``); returns that root."""
    root, root_m = _find_root(forest, n), _find_root(forest, m)
    if root_m < root:
        root = root_m
    _set_root(forest, n, root)
    _set_root(forest, m, root)
    return root


@compiled()
def _segment(order: np.ndarray, costs: np.ndarray, h: int, w: int, scale: float,
             min_size: int) -> np.ndarray:  # fmt: skip  # pragma: no cover (compiled)
    n = h * w
    forest = np.arange(n)
    size = np.ones(n, dtype=np.intp)
    inner = np.zeros(n)
    for k in range(order.size):
        a, b = _ends(order[k], h, w)
        seg0, seg1 = _find_root(forest, a), _find_root(forest, b)
        if seg0 == seg1:
            continue
        cost = costs[order[k]]
        # skimage's Cython keeps the thresholds in C floats: round to float32 before comparing
        t0 = np.float32(inner[seg0] + scale / size[seg0])
        t1 = np.float32(inner[seg1] + scale / size[seg1])
        if cost < min(t0, t1):
            root = _join(forest, seg0, seg1)
            size[root] = size[seg0] + size[seg1]
            inner[root] = cost
    for k in range(order.size):
        a, b = _ends(order[k], h, w)
        seg0, seg1 = _find_root(forest, a), _find_root(forest, b)
        if seg0 == seg1:
            continue
        if size[seg0] < min_size or size[seg1] < min_size:
            root = _join(forest, seg0, seg1)
            size[root] = size[seg0] + size[seg1]
    return _relabel(forest).reshape(h, w)


@compiled()
def _relabel(forest: np.ndarray) -> np.ndarray:  # pragma: no cover (compiled)
    """Segment ids by first pixel in raster order: a root is its segment's smallest pixel index,
    so this equals ``np.unique(roots, return_inverse=True)[1]``."""
    labels = np.empty(forest.size, dtype=np.intp)
    count = 0
    for p in range(forest.size):
        root = _find_root(forest, p)
        if root == p:
            labels[p] = count
            count += 1
        else:
            labels[p] = labels[root]
    return labels


# ---- the order-free path ----


@compiled()
def _edges(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover (compiled)
    """Every 8-connected edge once: [E] float64 costs equal to skimage's for the same pixel pair
    (the same ``_dist``; the sign of a difference does not survive squaring), and [E] int32 ids
    ``4 * p + d``: pixel ``p`` and its neighbour to the right (d 0), below (1), below-right (2)
    or below-left (3)."""
    h, w = image.shape[0], image.shape[1]
    n_edges = h * (w - 1) + (h - 1) * w + 2 * (h - 1) * (w - 1)
    costs = np.empty(n_edges)
    ids = np.empty(n_edges, dtype=np.int32)
    k = 0
    for y in range(h):
        for x in range(w - 1):
            costs[k], ids[k] = _dist(image, y, x + 1, y, x), 4 * (y * w + x)
            k += 1
    for y in range(h - 1):
        for x in range(w):
            costs[k], ids[k] = _dist(image, y + 1, x, y, x), 4 * (y * w + x) + 1
            k += 1
    for y in range(h - 1):
        for x in range(w - 1):
            costs[k], ids[k] = _dist(image, y + 1, x + 1, y, x), 4 * (y * w + x) + 2
            k += 1
    for y in range(h - 1):
        for x in range(1, w):
            costs[k], ids[k] = _dist(image, y + 1, x - 1, y, x), 4 * (y * w + x) + 3
            k += 1
    return costs, ids


_RADIX_BITS = 8  # 4 passes over 256 buckets (3 over 2048 timed the same here)
_RADIX_DIGITS = (32 + _RADIX_BITS - 1) // _RADIX_BITS
_SHORT_RUN = 24  # runs of equal float32 keys up to this long are insertion-sorted


@compiled()
def _radix_pass(src_k: np.ndarray, src_p: np.ndarray, dst_k: np.ndarray, dst_p: np.ndarray, counts: np.ndarray,
                shift: int) -> None:  # fmt: skip  # pragma: no cover (compiled)
    """One stable pass: keys and positions into ``dst_*``, by the digit at ``shift``."""
    start = np.empty(counts.size, dtype=np.int64)
    total = 0
    for b in range(counts.size):
        start[b] = total
        total += counts[b]
    mask = counts.size - 1
    for i in range(src_k.size):
        key = src_k[i]
        b = (key >> shift) & mask
        at = start[b]
        dst_k[at] = key
        dst_p[at] = src_p[i]
        start[b] = at + 1


@compiled()
def _sort_by_cost(costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover (compiled)
    """(positions, sorted costs): ``costs[positions]`` ascending, equal costs in any order.

    A least-significant-digit radix sort on the bits of ``float32(cost)`` (rounding is monotone
    and costs are >= 0, so the bits order as the values do; a digit that every key shares is
    skipped), then each run of equal float32 keys ordered by its float64 costs."""
    n = costs.size
    keys = costs.astype(np.float32).view(np.uint32)
    buckets = 1 << _RADIX_BITS
    mask = buckets - 1
    hist = np.zeros((_RADIX_DIGITS, buckets), dtype=np.int64)
    for i in range(n):
        key = keys[i]
        for digit in range(_RADIX_DIGITS):
            hist[digit, (key >> (_RADIX_BITS * digit)) & mask] += 1
    src_k, src_p = keys, np.arange(n).astype(np.int32)
    dst_k, dst_p = np.empty_like(src_k), np.empty_like(src_p)
    for digit in range(_RADIX_DIGITS):
        if hist[digit].max() < n:  # else every key shares this digit: nothing to do
            _radix_pass(src_k, src_p, dst_k, dst_p, hist[digit], _RADIX_BITS * digit)
            src_k, dst_k, src_p, dst_p = dst_k, src_k, dst_p, src_p
    positions, ordered = src_p, np.empty(n)
    for i in range(n):
        ordered[i] = costs[positions[i]]
    i = 0
    while i < n:
        j = i + 1
        while j < n and src_k[j] == src_k[i]:
            j += 1
        if j - i > 1 and ordered[i:j].min() != ordered[i:j].max():
            if j - i <= _SHORT_RUN:
                for t in range(i + 1, j):
                    cost, pos, u = ordered[t], positions[t], t - 1
                    while u >= i and ordered[u] > cost:
                        ordered[u + 1], positions[u + 1] = ordered[u], positions[u]
                        u -= 1
                    ordered[u + 1], positions[u + 1] = cost, pos
            else:
                within = np.argsort(ordered[i:j], kind="mergesort")
                positions[i:j] = positions[i:j][within]
                ordered[i:j] = ordered[i:j][within]
        i = j
    return positions, ordered


@compiled()
def _order_free(image: np.ndarray, scale: float,
                min_size: int) -> tuple[np.ndarray, int]:  # fmt: skip  # pragma: no cover (compiled)
    """(labels [H*W], ``_ORDER_FREE``) for a contiguous float64 [H, W, C<8] blurred image, or
    (empty, the reason) where the order of equal costs could change the segments."""
    h, w = image.shape[0], image.shape[1]
    n = h * w
    costs, ids = _edges(image)
    if np.isnan(costs).any():
        return np.empty(0, dtype=np.intp), _NAN
    positions, ordered = _sort_by_cost(costs)
    step = np.array([1, w, w + 1, w - 1], dtype=np.int32)
    ends0 = np.empty(costs.size, dtype=np.int32)
    ends1 = np.empty(costs.size, dtype=np.int32)
    for k in range(costs.size):
        e = ids[positions[k]]
        ends0[k] = e >> 2
        ends1[k] = (e >> 2) + step[e & 3]
    forest = np.arange(n)
    size = np.ones(n, dtype=np.intp)
    threshold = np.full(n, np.float32(scale), dtype=np.float32)
    status = _merge(ends0, ends1, ordered, forest, size, threshold, scale, min_size)
    if status != _ORDER_FREE:
        return np.empty(0, dtype=np.intp), status
    return _relabel(forest), _ORDER_FREE


@compiled()
def _merge(ends0: np.ndarray, ends1: np.ndarray, costs: np.ndarray, forest: np.ndarray, size: np.ndarray,
           threshold: np.ndarray, scale: float, min_size: int) -> int:  # fmt: skip  # pragma: no cover (compiled)
    """Both passes of skimage's merge over edges sorted by cost (``ends0``, ``ends1``, ``costs``),
    on the segments ``forest``/``size``/``threshold`` (float32 ``inner + scale / size``, kept per
    root instead of recomputed); returns ``_ORDER_FREE``, or the reason the order of equal costs
    could matter (the module docstring has the argument), leaving the segments half merged."""
    n_edges = costs.size
    for k in range(n_edges):
        seg0, seg1 = _find_root(forest, ends0[k]), _find_root(forest, ends1[k])
        if seg0 == seg1:
            continue
        cost = costs[k]
        if cost < min(threshold[seg0], threshold[seg1]):
            root = _join(forest, seg0, seg1)
            size[root] = size[seg0] + size[seg1]
            threshold[root] = np.float32(cost + scale / size[root])
            if threshold[root] <= cost and (
                (k > 0 and costs[k - 1] == cost) or (k + 1 < n_edges and costs[k + 1] == cost)
            ):
                return _ROUNDING
    # min_size pass: an edge between two segments that are already large cannot merge, ever
    large = np.empty(forest.size, dtype=np.bool_)
    for p in range(forest.size):
        large[p] = size[_find_root(forest, p)] >= min_size
    pair0 = np.empty(_MAX_CANDIDATES, dtype=np.int64)
    pair1 = np.empty(_MAX_CANDIDATES, dtype=np.int64)
    k = 0
    while k < n_edges:
        end = k + 1
        while end < n_edges and costs[end] == costs[k]:
            end += 1
        if end - k > 1:  # a run of equal costs: which of its edges could merge, from its start?
            count = 0
            for t in range(k, end):
                a, b = ends0[t], ends1[t]
                if large[a] and large[b]:
                    continue
                seg0, seg1 = _find_root(forest, a), _find_root(forest, b)
                if seg0 == seg1 or (size[seg0] >= min_size and size[seg1] >= min_size):
                    continue
                if count == pair0.size:
                    return _CROWDED
                pair0[count], pair1[count] = min(seg0, seg1), max(seg0, seg1)
                count += 1
            if count > 1 and _competing(pair0[:count], pair1[:count], size, min_size):
                return _COMPETING
        for t in range(k, end):
            a, b = ends0[t], ends1[t]
            if large[a] and large[b]:
                continue
            seg0, seg1 = _find_root(forest, a), _find_root(forest, b)
            if seg0 != seg1 and (size[seg0] < min_size or size[seg1] < min_size):
                root = _join(forest, seg0, seg1)
                size[root] = size[seg0] + size[seg1]
        k = end
    return _ORDER_FREE


@compiled()
def _competing(pair0: np.ndarray, pair1: np.ndarray, size: np.ndarray,
               min_size: int) -> bool:  # fmt: skip  # pragma: no cover (compiled)
    """Whether the ``min_size`` merges of a run of equal costs can depend on their order. The
    candidates (segment pairs ``pair0[i] < pair1[i]``, one of them small) fall into groups that
    share segments; groups touch disjoint segments, so each is merged alone. A group whose
    candidates all join one pair merges it in any order. Otherwise: with at most one large segment
    and the small ones together still under ``min_size``, every union formed without the large
    segment stays small, so each candidate still joins a small segment when its turn comes and the
    whole group merges in any order. Anything else (a small segment between two large ones, say)
    counts as competing."""
    count = pair0.size
    group = np.arange(count)
    changed = True
    while changed:  # groups: candidates linked by a shared segment (count <= _MAX_CANDIDATES)
        changed = False
        for u in range(count):
            for v in range(u + 1, count):
                if group[u] != group[v] and (pair0[u] == pair0[v] or pair0[u] == pair1[v]
                                             or pair1[u] == pair0[v] or pair1[u] == pair1[v]):  # fmt: skip
                    group[u] = group[v] = min(group[u], group[v])
                    changed = True
    for g in range(count):
        one_pair, large, small = True, 0, 0
        segments = np.empty(2 * count, dtype=np.int64)
        n_segments = 0
        first = -1
        for u in range(count):
            if group[u] != g:
                continue
            if first < 0:
                first = u
            elif pair0[u] != pair0[first] or pair1[u] != pair1[first]:
                one_pair = False
            for seg in (pair0[u], pair1[u]):
                if seg not in segments[:n_segments]:
                    segments[n_segments] = seg
                    n_segments += 1
                    if size[seg] >= min_size:
                        large += 1
                    else:
                        small += size[seg]
        if first >= 0 and not one_pair and (large > 1 or small >= min_size):
            return True
    return False
