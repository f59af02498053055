"""Discovery's added cost per image (Labeler._discover on model and planted tokens) against the labeler:

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python jobs/bench_discovery.py --images 3 --repeats 20

The code: pipeline/bench/discovery.py.
"""

import sys

from pipeline.bench import discovery

if __name__ == "__main__":
    discovery.main(sys.argv[1:])
