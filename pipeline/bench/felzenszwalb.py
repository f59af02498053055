"""Felzenszwalb superpixels: skimage vs pipeline.felzenszwalb (numba: its exact path, np.argsort
in skimage's edge order, and its order-free path, a radix sort checked for equal costs that could
compete) on one 500x375 photograph, ms per image on one thread with the steps of each path; which
path 60 JPEG photographs took (resized crops of skimage's sample images, every segment map checked
against skimage's, and the exact path's against a stable sort); the throughput ratio of 2 threads
to 1 (GIL release); ms and page faults per call in fresh processes with glibc's default malloc
thresholds and with ``pipeline.malloc.keep_freed_memory`` (which this benchmark, like a labeling
actor, runs under); and the numba first-call cost in a fresh process (cold cache and cached).
Prints tables. ``--memory`` instead prints each implementation's peak memory at 3000 x 4000.

    python jobs/bench_felzenszwalb.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import skimage.data
from PIL import Image
from skimage.segmentation import felzenszwalb as skimage_felzenszwalb

from pipeline import felzenszwalb as numba_fz
from pipeline.config import RefineConfig
from pipeline.malloc import keep_freed_memory

CFG = RefineConfig()  # every superpixel preset uses these settings (pipeline/config.py)


def _skimage(image: np.ndarray) -> np.ndarray:
    return skimage_felzenszwalb(image, scale=CFG.scale, sigma=CFG.sigma, min_size=CFG.min_size, channel_axis=-1)


def _numba(image: np.ndarray) -> np.ndarray:
    return numba_fz.felzenszwalb(image, CFG.scale, CFG.sigma, CFG.min_size)


def _ms(funcs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median ms per call of each function, the functions interleaved round by round so that a
    shared machine's load falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(repeat):
        for name, func in funcs.items():
            t0 = time.perf_counter()
            func()
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def _throughput(func: Callable[[np.ndarray], object], image: np.ndarray, threads: int, n: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(func, [image] * n))
        return n / (time.perf_counter() - t0)


def _fresh_process_call(keep: bool, calls: int = 21) -> tuple[float, float]:
    """(median ms, page faults) per call of felzenszwalb in a fresh process, with glibc's default
    malloc thresholds or ``keep_freed_memory``'s (the numba cache warm from this run)."""
    code = ("import resource, statistics, sys, time, numpy as np, skimage.data\n"
            "from pipeline.felzenszwalb import felzenszwalb\nfrom pipeline.malloc import keep_freed_memory\n"
            "assert sys.argv[1] == 'default' or keep_freed_memory()\n"
            "image = np.ascontiguousarray(skimage.data.astronaut()[:375, :500])\n"
            "felzenszwalb(image, 100, 0.8, 50)\n"
            "faults, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []\n"
            f"for _ in range({calls}):\n"
            "    t = time.thread_time(); felzenszwalb(image, 100, 0.8, 50); times.append(time.thread_time() - t)\n"
            "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults\n"
            f"print(1000 * statistics.median(times), faults / {calls})")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, "keep" if keep else "default"], check=True,
                         capture_output=True, text=True)  # fmt: skip
    ms, faults = out.stdout.split()
    return float(ms), float(faults)


MEMORY_RUN = """
import resource, sys, numpy as np
from pipeline import felzenszwalb as fz
from pipeline.malloc import keep_freed_memory
keep_freed_memory()
rng = np.random.default_rng(0)
image = (np.cumsum(rng.integers(0, 256, (3000, 4000, 3)), axis=1) // 50 % 256).astype(np.uint8)
fz.felzenszwalb(image[:10, :10], 100, 0.8, 50)  # compiled (or loaded from the cache) before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "skimage":
    from skimage.segmentation import felzenszwalb
    felzenszwalb(image, 100, 0.8, 50, channel_axis=-1)
elif sys.argv[1] == "exact":
    costs = fz._costs(fz._blur(fz.img_as_float64(image), 0.8))
    fz._segment(np.argsort(costs), costs, 3000, 4000, 100 / 255, 50)
else:
    assert fz.segment_path(image, 100, 0.8, 50)[1] == fz.PATHS[0]
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def memory_rows() -> list[tuple[str, float]]:
    """(implementation, peak RSS growth MiB) of one call on a 3000 x 4000 image, each in a fresh
    process (the peak is a process's high-water mark)."""
    rows = []
    for name in ("order-free", "exact", "skimage"):
        out = subprocess.run([sys.executable, "-c", MEMORY_RUN, name], check=True, capture_output=True, text=True)
        rows.append((name, float(out.stdout.strip())))
    return rows


def _first_call(cache_dir: str) -> float:
    code = ("import time, numpy as np; from pipeline.felzenszwalb import felzenszwalb; t=time.perf_counter(); "
            "felzenszwalb(np.zeros((4, 4, 3), np.uint8)); print(time.perf_counter()-t)")  # fmt: skip
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
               "retina", "colorwheel", "camera", "coins", "brick", "grass", "gravel", "moon", "page", "text", "cat",
               "logo")  # fmt: skip


def photograph_paths(count: int, seed: int = 0) -> tuple[dict[str, int], int, str]:
    """(images per path, exact-path images whose segments change under a stable sort, sha256 of
    all segment maps) over ``count`` photographs: random crops (40-100% of a side) of skimage's
    sample images, resized to 500x375 and saved as JPEG at quality 70-95, segmented at the
    presets' refine settings. Stops if a segment map differs from skimage's. The digest lets runs
    under different ``NPY_DISABLE_CPU_FEATURES`` (numpy's sort kernels) be compared."""
    rng = np.random.default_rng(seed)
    counts: collections.Counter[str] = collections.Counter()
    digest, unstable = hashlib.sha256(), 0
    for i in range(count):
        photo = getattr(skimage.data, PHOTOGRAPHS[i % len(PHOTOGRAPHS)])()
        photo = np.repeat(photo[..., None], 3, axis=-1) if photo.ndim == 2 else photo[..., :3]
        photo = photo if photo.dtype == np.uint8 else (photo * 255).astype(np.uint8)
        height, width = photo.shape[:2]
        h, w = (max(16, int(side * rng.uniform(0.4, 1.0))) for side in (height, width))
        y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        buffer = io.BytesIO()
        crop = Image.fromarray(np.ascontiguousarray(photo[y : y + h, x : x + w])).resize((500, 375))
        crop.save(buffer, "JPEG", quality=int(rng.integers(70, 96)))
        image = np.asarray(Image.open(buffer).convert("RGB"))
        segments, path = numba_fz.segment_path(image, CFG.scale, CFG.sigma, CFG.min_size)
        if not np.array_equal(segments, _skimage(image)):
            raise SystemExit(f"photograph {i} ({path}): segment map differs from skimage's")
        counts[path] += 1
        digest.update(segments.tobytes())
        if path != numba_fz.PATHS[0]:
            blurred = numba_fz._blur(numba_fz.img_as_float64(image), CFG.sigma)
            costs = numba_fz._costs(blurred)
            stable = numba_fz._segment(np.argsort(costs, kind="stable"), costs, 375, 500, CFG.scale / 255,
                                       CFG.min_size)  # fmt: skip
            unstable += not np.array_equal(stable, segments)
    return dict(counts), unstable, digest.hexdigest()


def print_paths(count: int) -> None:
    paths, unstable, digest = photograph_paths(count)
    print(f"\n{f'path taken ({count} JPEG photographs, 500x375)':64s} {'images':>6s}")
    for path in numba_fz.PATHS:
        print(f"{path:64s} {paths.get(path, 0):6d}")
    print(f"exact-path images whose segments change under a stable sort: {unstable}")
    print(f"sha256 of the {count} segment maps: {digest} (NPY_DISABLE_CPU_FEATURES="
          f"{os.environ.get('NPY_DISABLE_CPU_FEATURES', '')!r})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per figure (median)")
    parser.add_argument("--paths-only", action="store_true",
                        help="only the photographs' paths table and digest (to compare numpy sort kernels)")
    parser.add_argument("--memory", action="store_true",
                        help="only peak memory of one call on a 3000x4000 image, per implementation")
    args = parser.parse_args(argv)
    kept = keep_freed_memory()  # as labeling actors run (pipeline.malloc)
    if args.paths_only:
        print_paths(60)
        return
    if args.memory:
        print(f"{'3000 x 4000, one call, fresh process':36s} {'peak RSS growth MiB':>20s} {'bytes/pixel':>12s}")
        for name, mib in memory_rows():
            print(f"{name:36s} {mib:20.0f} {mib * 2**20 / 12e6:12.0f}")
        return
    image = np.ascontiguousarray(skimage.data.astronaut()[:375, :500])
    if not np.array_equal(_skimage(image), _numba(image)):
        raise SystemExit("segment maps differ from skimage's: fix before timing")
    blurred = numba_fz._blur(numba_fz.img_as_float64(image), CFG.sigma)
    costs = numba_fz._costs(blurred)
    order = np.argsort(costs)
    scale = CFG.scale / 255
    edges, ids = numba_fz._edges(blurred)
    positions, ordered = numba_fz._sort_by_cost(edges)
    step = np.array([1, 500, 501, 499], dtype=np.int32)
    ends0 = (ids[positions] >> 2).astype(np.int32)
    ends1 = (ends0 + step[ids[positions] & 3]).astype(np.int32)

    def merge() -> int:
        n = 375 * 500
        threshold = np.full(n, np.float32(scale), dtype=np.float32)
        return numba_fz._merge(ends0, ends1, ordered, np.arange(n), np.ones(n, np.intp), threshold, scale, CFG.min_size)

    if merge() != numba_fz._ORDER_FREE:
        raise SystemExit("this photograph does not take the order-free path: pick another to time it")
    rows = _ms({
        "skimage felzenszwalb": lambda: _skimage(image),
        "numba, exact path": lambda: numba_fz._segment(np.argsort(numba_fz._costs(blurred)), costs, 375, 500,
                                                       scale, CFG.min_size),
        "  of which edge costs": lambda: numba_fz._costs(blurred),
        "  of which np.argsort": lambda: np.argsort(costs),
        "  of which merge+relabel": lambda: numba_fz._segment(order, costs, 375, 500, scale, CFG.min_size),
        "numba, order-free path": lambda: numba_fz._order_free(blurred, scale, CFG.min_size),
        "  of which edges": lambda: numba_fz._edges(blurred),
        "  of which radix sort": lambda: numba_fz._sort_by_cost(edges),
        "  of which merge (checked)": merge,
        "blur (both paths)": lambda: numba_fz._blur(numba_fz.img_as_float64(image), CFG.sigma),
        "felzenszwalb (blur + path)": lambda: _numba(image),
    }, args.repeat)  # fmt: skip
    print(f"500x375 astronaut crop, scale={CFG.scale} sigma={CFG.sigma} min_size={CFG.min_size}, "
          f"{os.cpu_count()} CPUs, median of {args.repeat}, malloc {'keep' if kept else 'default'}")  # fmt: skip
    print(f"{'step':28s} {'ms/image':>9s}")
    for name, ms in rows.items():
        print(f"{name:28s} {ms:9.1f}")
    print(f"speed-up (skimage / numba): {rows['skimage felzenszwalb'] / rows['felzenszwalb (blur + path)']:.2f}x; "
          f"order-free over exact path: {rows['numba, exact path'] / rows['numba, order-free path']:.2f}x")
    print_paths(60)
    n = 2 * args.repeat
    print(f"\n{'threads (interleaved, 3 rounds)':32s} {'img/s 1 thr':>11s} {'img/s 2 thr':>11s} {'ratio':>6s}")
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(3):
        for name, func in (("skimage", _skimage), ("numba", _numba)):
            for threads in (1, 2):
                rates.setdefault((name, threads), []).append(_throughput(func, image, threads, n))
    for name in ("skimage", "numba"):
        one, two = statistics.median(rates[name, 1]), statistics.median(rates[name, 2])
        print(f"{name:32s} {one:11.1f} {two:11.1f} {two / one:6.2f}")
    print(f"\n{'malloc (fresh processes, 3 rounds)':36s} {'ms/call':>8s} {'page faults/call':>17s}")
    calls: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(3):
        for keep in (False, True):
            calls[keep].append(_fresh_process_call(keep))
    for keep, label in ((False, "glibc defaults"), (True, "keep_freed_memory")):
        ms, faults = (statistics.median(v) for v in zip(*calls[keep], strict=True))
        print(f"{label:36s} {ms:8.1f} {faults:17.0f}")
    with tempfile.TemporaryDirectory() as cache:
        cold, cached = _first_call(cache), _first_call(cache)
    print(f"\nfirst call in a fresh process: {cold:.2f} s with an empty numba cache, {cached:.2f} s cached")


if __name__ == "__main__":
    main()
