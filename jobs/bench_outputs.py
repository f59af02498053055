"""Benchmark the output stage: CPU time per image of COCO RLE, indexed PNG and quality stats for
500 x 375 label maps, and the bytes written per image through ``pipeline.storage``.

    python jobs/bench_outputs.py --images 50 --repeats 5

The code: pipeline/bench/outputs.py.
"""

import sys

from pipeline.bench import outputs

if __name__ == "__main__":
    sys.exit(outputs.main())
