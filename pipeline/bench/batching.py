"""Does the batch size change the labels? Every preset labels the same images at batch 1, 2 and 8
through tiny random-weight models (built from configs, saved and loaded through the production
loaders); the table counts label pixels that differ from batch 1 and the largest difference of the
compensated score maps. ``Method.batch_invariant`` (the batch size leaves the run's identity) must
show 0 for its presets; docs/METHODS.md cites this table for the others.

    python jobs/bench_batching.py
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Sequence

import numpy as np

from pipeline import methods
from pipeline.bench.architectures import save_models
from pipeline.bench.common import synthetic_jpeg
from pipeline.bench.identity import CATEGORIES, tiny_overrides
from pipeline.config import PRESETS, build_config
from pipeline.decode import decode_image
from pipeline.labeler import Labeler
from pipeline.types import LabelRequest

SHAPES = [(48, 64), (64, 48), (48, 64), (40, 80), (48, 64), (64, 64), (48, 64), (56, 72), (48, 64)]
TAGS = [(1,), (1, 7), (7, 15), (15,), (1, 15), (7,), (1, 7, 15), (1,), (15, 7)]


def requests() -> list[LabelRequest]:
    out = []
    for i, ((h, w), tags) in enumerate(zip(SHAPES, TAGS, strict=True)):
        image = decode_image(synthetic_jpeg(i, w, h))
        out.append(LabelRequest(f"im{i}", image, tags))
    return out


def compare(preset: str, paths: dict, reqs: Sequence[LabelRequest], sizes: Sequence[int]) -> list[dict]:
    base = build_config(preset, tiny_overrides(paths))
    labeler = Labeler.from_config(base, CATEGORIES)
    results = {}
    for size in sizes:
        labeler.config = dataclasses.replace(base, batch_size=size)
        results[size] = [r for s in range(0, len(reqs), size) for r in labeler.label(list(reqs[s : s + size]))]
    first, rows = results[sizes[0]], []
    total = sum(r.label_map.size for r in first)
    for size in sizes[1:]:
        pixels = sum(int((a.label_map != b.label_map).sum()) for a, b in zip(first, results[size], strict=True))
        score = max(float(np.abs(a.compensated - b.compensated).max(initial=0.0))
                    for a, b in zip(first, results[size], strict=True))  # fmt: skip
        rows.append({"preset": preset, "batch": f"{sizes[0]} vs {size}", "pixels": pixels, "total": total,
                     "score": score, "claims": methods.get(base.method).batch_invariant})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(sorted(PRESETS)), help="comma-separated preset names")
    p.add_argument("--batch-sizes", default="1,2,8")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    reqs = requests()
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_models(tmp)
        rows = [row for preset in args.presets.split(",") for row in compare(preset, paths, reqs, sizes)]
    print(f"{len(reqs)} images ({min(h * w for h, w in SHAPES)}-{max(h * w for h, w in SHAPES)} px), tiny models, CPU")
    print("| preset | batch | label pixels differing | largest score difference | batch_invariant |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['preset']} | {r['batch']} | {r['pixels']} / {r['total']} | {r['score']:.2g} | {r['claims']} |")
