"""The demo: the whole job on tiny random-weight models over five photographs, on a local Ray:
``run_demo`` and the ``demo`` command (``jobs/demo.py``, ``tag2mask demo``)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from pipeline import demo
from pipeline.usecases import audit, label

DESCRIPTION = """The whole job in about two minutes, on a CPU, with no downloaded weights:

    python jobs/demo.py demo-out/

builds tiny random-weight models, writes a COCO instances file over five photographs that
scikit-image ships, labels them with jobs/label_coco.py on a local Ray (started and stopped here,
on 127.0.0.1), reruns the same command to show that a finished run is skipped, audits the masks
against the rough hand-drawn ground truth, and prints where every output is.

Random weights show the pipeline working, not label quality: the masks and scores mean nothing
until the real weights are used (README: "Weights").
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ``demo`` command's options (jobs/demo.py and ``tag2mask demo``)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("out", help="folder for the demo's inputs, models and outputs (created)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The ``demo`` command: exit status 0, or the first failing step's."""
    return run_demo(Path(build_parser(prog).parse_args(argv).out))


def run_demo(out: Path) -> int:
    """Write the demo's dataset and tiny models under ``out``, label them (twice: the second run
    skips every committed shard), audit the masks and print where each output is; returns the
    exit status of the first step that failed, else 0."""
    # A demo's local Ray stays on the loopback interface (Ray otherwise binds the machine's
    # routable address); set before Ray is imported (the runner imports it lazily).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    out = out.resolve()
    start = time.perf_counter()
    print(f"[demo] writing the dataset and tiny random-weight models under {out}/", flush=True)
    inputs = demo.prepare(out)
    job = ["--annotations", str(inputs.annotations), "--images", str(inputs.images), "--output", str(out / "run"),
           "--preset", "coco-vit-b16", "--clip-model", str(inputs.clip_config),
           "--clip-checkpoint", str(inputs.clip_checkpoint), "--sd-checkpoint", str(inputs.sd_dir),
           "--device", "cpu", "--shard-size", "2"]  # fmt: skip
    print("[demo] labeling: python jobs/label_coco.py " + " ".join(job), flush=True)
    code = label.main(job)
    if code:
        return code
    print("[demo] the same command again: committed shards are skipped, nothing is done twice", flush=True)
    code = label.main(job)
    if code:
        return code
    audit_args = ["--pred", str(out / "run"), "--gt", str(inputs.annotations), "--out", str(out / "audit")]
    print("[demo] auditing: python jobs/audit_masks.py " + " ".join(audit_args), flush=True)
    code = audit.main(audit_args)
    if code:
        return code
    rows = [("label maps (indexed PNG, 0 background, 255 ignore)", out / "run" / "labels"),
            ("COCO annotations (RLE)", out / "run" / "merged" / "annotations.json"),
            ("quality statistics (Parquet)", out / "run" / "merged" / "stats_images"),
            ("audit report", out / "audit" / "report.html")]  # fmt: skip
    print(f"\n[demo] done in {time.perf_counter() - start:.0f} s. Outputs:")
    for what, path in rows:
        print(f"  {what:<52} {path}")
    print("\nThese masks come from RANDOM weights: they show the pipeline working, not label quality.\n"
          "For real pseudo-labels, run jobs/label_coco.py with the default weights (README: Weights).")  # fmt: skip
    return 0

