"""Felzenszwalb superpixels: skimage against pipeline.felzenszwalb (numba), steps, threads, first call.

    python jobs/bench_felzenszwalb.py --help

The code: pipeline/bench/felzenszwalb.py.
"""

import sys

from pipeline.bench import felzenszwalb

if __name__ == "__main__":
    felzenszwalb.main(sys.argv[1:])
