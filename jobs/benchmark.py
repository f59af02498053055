"""Labeler benchmark (issue 7): per-stage time and images/s on random-weight models of a chosen
size, the measured comparisons behind the speed work, and the FLOP and byte counts that bound
the GPU time. No Ray, no downloads: timing does not depend on the weights' values.

    python jobs/benchmark.py --size tiny --images 8
    python jobs/benchmark.py --size vit-b16 --images 2 --batch-sizes 1,2 --dtypes float32,bfloat16
    python jobs/benchmark.py --size vit-b16 --device cuda --dtypes float32,bfloat16 --batch-sizes 1,4,16,32
    python jobs/benchmark.py --size vit-b16 --images 2 --method clip-es   # CLIP-ES against CLIPer

The code: pipeline/bench/main.py (also `tag2mask benchmark`).
"""

import sys

from pipeline.bench import main

if __name__ == "__main__":
    main.main(sys.argv[1:])
