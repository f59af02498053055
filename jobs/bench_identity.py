"""Byte identity of every preset's outputs, to compare two checkouts: python jobs/bench_identity.py --help

The code: pipeline/bench/identity.py.
"""

import sys

from pipeline.bench import identity

if __name__ == "__main__":
    identity.main(sys.argv[1:])
