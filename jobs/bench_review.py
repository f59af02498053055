"""Review app speed on a synthetic run: gallery and image pages, median and p95 over N requests.

    python jobs/bench_review.py [--images 100000] [--requests 50]

Target: gallery and image pages under 300 ms on a 100k-image run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pipeline.review.bench import run_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--requests", type=int, default=50)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_bench(Path(tmp), args.images, args.requests)
    print(f"review app, {args.images} images, in-process ASGI client")
    print(f"| {'request':<30} | {'n':>3} | {'median ms':>9} | {'p95 ms':>9} |")
    print(f"| {'-' * 30} | {'-' * 3} | {'-' * 9} | {'-' * 9} |")
    for r in rows:
        print(f"| {r['kind']:<30} | {r['requests']:>3} | {r['median_ms']:>9.1f} | {r['p95_ms']:>9.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
