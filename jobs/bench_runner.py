"""Driver-side costs of a run, without models: memory while streaming a large manifest, and the
time a resume takes to skip committed shards.

    python jobs/bench_runner.py --images 200000 --shards 1000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import manifest, storage  # noqa: E402
from pipeline.labeler import Category  # noqa: E402
from pipeline.stats import Failure  # noqa: E402


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=256)
    args = p.parse_args()
    cats = [Category(i, f"class{i}", f"class{i}") for i in range(1, 81)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.jsonl"
        with path.open("w") as f:
            for i in range(args.images):
                tags = sorted({1 + i % 80, 1 + (i * 7) % 80})
                f.write(json.dumps({"id": f"{i:012d}", "uri": f"s3://bucket/train/{i:012d}.jpg", "tags": tags}) + "\n")
        base = _peak_mib()
        t0 = time.perf_counter()
        fp = manifest.fingerprint(manifest.read_jsonl(str(path)), cats)
        n_shards = sum(1 for _ in manifest.shards(manifest.read_jsonl(str(path)), args.shard_size))
        plan_s = time.perf_counter() - t0
        stream_peak = _peak_mib()

        store = storage.Store.open(str(Path(tmp) / "out"))
        recs = ({"id": f"s{i}", "uri": f"x/{i}.jpg", "tags": [1]} for i in range(args.shards))
        shard_list = list(manifest.shards(recs, 1))
        for s in shard_list:  # committed shards holding one recorded failure each: markers only
            storage.write_shard(store, s.shard_id, [], [Failure(s.records[0]["id"], "missing", "x")], cats, fp)
        t0 = time.perf_counter()
        skipped = sum(storage.is_committed(store, s.shard_id, fp) for s in shard_list)
        skip_s = time.perf_counter() - t0

    print(f"{'measure':<58}{'value':>14}")
    print(f"{'manifest records (JSONL, streamed twice: fingerprint + plan)':<58}{args.images:>14,}")
    print(f"{'  shards of ' + str(args.shard_size):<58}{n_shards:>14,}")
    print(f"{'  planning time (s)':<58}{plan_s:>14.2f}")
    print(f"{'  driver peak RSS before streaming (MiB)':<58}{base:>14.0f}")
    print(f"{'  driver peak RSS after streaming (MiB)':<58}{stream_peak:>14.0f}")
    print(f"{'resume: committed shards checked and skipped':<58}{skipped:>14,}")
    print(f"{'  time to check them all (s, local disk)':<58}{skip_s:>14.2f}")


if __name__ == "__main__":
    main()
