"""Felzenszwalb superpixels: skimage vs pipeline.felzenszwalb (numba) on one 500x375 photograph,
ms per image on one thread, the throughput ratio of 2 threads to 1 (GIL release), and the numba
first-call cost in a fresh process (cold cache and cached). Prints a table.

    PYTHONPATH=. python jobs/bench_felzenszwalb.py [--repeat 15]
"""

from __future__ import annotations

import argparse
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
from skimage.segmentation import felzenszwalb as skimage_felzenszwalb

from pipeline import felzenszwalb as numba_fz
from pipeline.config import RefineConfig

CFG = RefineConfig()  # every superpixel preset uses these settings (pipeline/config.py)


def _skimage(image: np.ndarray) -> np.ndarray:
    return skimage_felzenszwalb(image, scale=CFG.scale, sigma=CFG.sigma, min_size=CFG.min_size, channel_axis=-1)


def _numba(image: np.ndarray) -> np.ndarray:
    return numba_fz.felzenszwalb(image, CFG.scale, CFG.sigma, CFG.min_size)


def _ms(func: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _throughput(func: Callable[[np.ndarray], object], image: np.ndarray, threads: int, n: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(func, [image] * n))
        return n / (time.perf_counter() - t0)


def _first_call(cache_dir: str) -> float:
    code = ("import time, numpy as np; from pipeline.felzenszwalb import felzenszwalb; t=time.perf_counter(); "
            "felzenszwalb(np.zeros((4, 4, 3), np.uint8)); print(time.perf_counter()-t)")  # fmt: skip
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per figure (median)")
    args = parser.parse_args()
    image = np.ascontiguousarray(skimage.data.astronaut()[:375, :500])
    if not np.array_equal(_skimage(image), _numba(image)):
        raise SystemExit("segment maps differ from skimage's: fix before timing")
    blurred = numba_fz._blur(numba_fz.img_as_float64(image), CFG.sigma)
    costs = numba_fz._costs(blurred)
    order = np.argsort(costs)
    rows = [
        ("skimage felzenszwalb", _ms(lambda: _skimage(image), args.repeat)),
        ("numba felzenszwalb", _ms(lambda: _numba(image), args.repeat)),
        ("  of which blur", _ms(lambda: numba_fz._blur(numba_fz.img_as_float64(image), CFG.sigma), args.repeat)),
        ("  of which edge costs", _ms(lambda: numba_fz._costs(blurred), args.repeat)),
        ("  of which np.argsort", _ms(lambda: np.argsort(costs), args.repeat)),
        ("  of which merge+relabel", _ms(lambda: numba_fz._segment(order, costs, 375, 500, CFG.scale / 255,
                                                                   CFG.min_size), args.repeat)),  # fmt: skip
    ]
    print(f"500x375 astronaut crop, scale={CFG.scale} sigma={CFG.sigma} min_size={CFG.min_size}, "
          f"{os.cpu_count()} CPUs, median of {args.repeat}")  # fmt: skip
    print(f"{'step':28s} {'ms/image':>9s}")
    for name, ms in rows:
        print(f"{name:28s} {ms:9.1f}")
    print(f"speed-up (skimage / numba): {rows[0][1] / rows[1][1]:.2f}x")
    n = 2 * args.repeat
    print(f"\n{'threads':28s} {'img/s 1 thr':>11s} {'img/s 2 thr':>11s} {'ratio':>6s}")
    for name, func in (("skimage", _skimage), ("numba", _numba)):
        one, two = _throughput(func, image, 1, n), _throughput(func, image, 2, n)
        print(f"{name:28s} {one:11.1f} {two:11.1f} {two / one:6.2f}")
    with tempfile.TemporaryDirectory() as cache:
        cold, cached = _first_call(cache), _first_call(cache)
    print(f"\nfirst call in a fresh process: {cold:.2f} s with an empty numba cache, {cached:.2f} s cached")


if __name__ == "__main__":
    main()
