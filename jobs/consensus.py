"""Consensus labels of several runs: the class where every run agrees, 255 where they disagree or
any run ignores the pixel. Written under --out like a run (label PNGs, COCO annotations, stats,
commit markers, merged/), shard by shard as run A's; rerun the same command to finish or resume.

    python jobs/consensus.py s3://bucket/pseudo/cliper s3://bucket/pseudo/clip-es --out s3://bucket/pseudo/agreed

Conventions: pipeline/consensus.py. The first run (A) sets the shards, file names and config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import consensus  # noqa: E402
from pipeline.storage.store import Store  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", metavar="RUN", nargs="+", help="output prefixes of the input runs (two or more; A first)")
    p.add_argument("--out", required=True, help="output prefix of the consensus: local path or fsspec URL")
    p.add_argument("--overwrite", action="store_true", help="redo every shard when the inputs changed")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        inputs = consensus.open_inputs(args.runs)
        done = consensus.write_consensus(inputs, Store.open(args.out), args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = done["merged"]["counts"]
    print(f"consensus of {len(args.runs)} runs: {len(done['written'])} shard(s) written, "
          f"{len(done['skipped'])} already committed; "
          f"{counts['ok']} images labelled, {counts['failed']} failed")  # fmt: skip
    if done["not_in_a"]:
        print(f"  {done['not_in_a']} image(s) of the other runs are not in run A's committed shards: left out")
    print(f"  outputs: {args.out} (merged/annotations.json, merged/stats_images/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
