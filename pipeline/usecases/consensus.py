"""Consensus labels of several runs: ``consensus_of`` and the ``consensus`` command in front of it
(``jobs/consensus.py``, ``tag2mask consensus``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pipeline import consensus
from pipeline.storage.store import Store

DESCRIPTION = """Consensus labels of several runs: the class where every run agrees, 255 where they disagree or
any run ignores the pixel. Written under --out like a run (label PNGs, COCO annotations, stats,
commit markers, merged/), shard by shard as run A's; rerun the same command to finish or resume.

    python jobs/consensus.py s3://bucket/pseudo/cliper s3://bucket/pseudo/clip-es --out s3://bucket/pseudo/agreed

Conventions: pipeline/consensus.py. The first run (A) sets the shards, file names and config.
"""


def consensus_of(runs: Sequence[str], out: str, overwrite: bool = False) -> dict[str, Any]:
    """Write the consensus of the output prefixes ``runs`` (two or more, A first) under ``out``,
    shard by shard as run A's, resuming committed shards; returns ``consensus.write_consensus``'s
    record (written, skipped, not_in_a, merged). Raises ``ValueError``/``FileNotFoundError``."""
    return consensus.write_consensus(consensus.open_inputs(list(runs)), Store.open(out), overwrite)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ``consensus`` command's options (jobs/consensus.py and ``tag2mask consensus``)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("runs", metavar="RUN", nargs="+", help="output prefixes of the input runs (two or more; A first)")
    p.add_argument("--out", required=True, help="output prefix of the consensus: local path or fsspec URL")
    p.add_argument("--overwrite", action="store_true", help="redo every shard when the inputs changed")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The ``consensus`` command; exit status 0, or 2 when the runs cannot be combined."""
    args = build_parser(prog).parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        done = consensus_of(args.runs, args.out, args.overwrite)
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
