"""Labeler benchmark: stage times, images/s, speed-work comparisons, FLOP and byte bounds, on
random-weight models, no Ray, no downloads. Usage and sections: python jobs/benchmark.py --help

The code: pipeline/bench/main.py (also `tag2mask benchmark`).
"""

import sys

from pipeline.bench import main

if __name__ == "__main__":
    main.main(sys.argv[1:])
