"""Planning at scale: the preflight scan and sharding of a synthetic JSONL manifest, and read_coco at train2017 size.

    python jobs/bench_planning.py --help

The code: pipeline/bench/planning.py.
"""

import sys

from pipeline.bench import planning

if __name__ == "__main__":
    planning.main(sys.argv[1:])
