"""Benchmark the audit: images per second on 500 x 375 label maps, per stage and end to end.

    python jobs/bench_audit.py --images 200 --repeats 3

The code: pipeline/bench/audit.py.
"""

import sys

from pipeline.bench import audit

if __name__ == "__main__":
    sys.exit(audit.main())
