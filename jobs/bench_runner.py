"""Driver-side costs of a run, without models: memory while streaming a large manifest, and the
time a resume takes to skip committed shards. With ``--shard-images N``, instead: an actor's peak
memory while it labels one shard of N synthetic images with tiny random-weight models (run in a
fresh process, so the peak is this shard's).

    python jobs/bench_runner.py --images 200000 --shards 1000
    python jobs/bench_runner.py --shard-images 48 --size 360x480

The code: pipeline/bench/runner.py.
"""

import sys

from pipeline.bench import runner

if __name__ == "__main__":
    sys.exit(runner.main())
