"""Felzenszwalb superpixels: skimage vs pipeline.felzenszwalb (numba) on one 500x375 photograph,

    python jobs/bench_felzenszwalb.py --help

The code: pipeline/bench/felzenszwalb.py.
"""

import sys

from pipeline.bench import felzenszwalb

if __name__ == "__main__":
    felzenszwalb.main(sys.argv[1:])
