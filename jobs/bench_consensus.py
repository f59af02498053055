"""How consensus labels trade coverage for accuracy, on a synthetic split with known truth.

    python jobs/bench_consensus.py --images 200 --out /tmp/bench_consensus

The code: pipeline/bench/consensus.py.
"""

import sys

from pipeline.bench import consensus

if __name__ == "__main__":
    sys.exit(consensus.main())
