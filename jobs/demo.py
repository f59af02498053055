"""The whole job in about two minutes, on a CPU, with no downloaded weights: tiny random-weight
models label five photographs on a local Ray, a rerun skips them, and an audit scores them.

    python jobs/demo.py demo-out/

The code: pipeline/usecases/demo.py (run_demo); also `tag2mask demo`.
"""

import sys

from pipeline.usecases import demo

if __name__ == "__main__":
    sys.exit(demo.main())
