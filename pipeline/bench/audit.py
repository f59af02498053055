"""Benchmark the audit: images per second on 500 x 375 label maps, per stage and end to end.

    python jobs/bench_audit.py --images 200 --repeats 3

Synthetic pairs: 20 classes of 80 plus background as discs, a 255 band in the ground truth, the
prediction a shifted copy with 5 % of its pixels set to random tagged ids, background or 255.
Stages: scoring maps already in memory (``Audit.add``), reading a label PNG (``PngFolder.read``),
decoding our COCO RLE (``CocoLabels.read``), and the whole ``audit_images`` over PNG folders
(both sides read and scored) on one core.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import audit, coco, pngs

HEIGHT, WIDTH = 375, 500
CLASS_IDS = tuple(range(1, 81))


def synthetic_pair(index: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    gt = np.zeros((HEIGHT, WIDTH), np.uint8)
    tagged = rng.choice(CLASS_IDS, 20, replace=False)
    for cid in tagged:
        cy, cx, r = rng.integers(0, HEIGHT), rng.integers(0, WIDTH), rng.integers(20, 120)
        gt[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = cid
    pred = np.roll(gt, 7, axis=1)
    noise = rng.random(gt.shape) < 0.05
    pred[noise] = rng.choice([0, *tagged, 255], int(noise.sum()))  # pseudo labels hold tagged classes only
    band = rng.integers(0, HEIGHT - 6)
    gt[band : band + 6] = 255
    return gt, pred


def rate(fn: Callable[[], object], n: int, repeats: int) -> float:
    """Median images per second over ``repeats`` calls of ``fn`` (which handles ``n`` images)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    pairs = {f"im{i:05d}": synthetic_pair(i) for i in range(args.images)}
    ids = audit.check_class_ids(CLASS_IDS)
    cats = [{"id": c, "name": f"class{c}"} for c in CLASS_IDS]
    with tempfile.TemporaryDirectory() as tmp:
        for side, k in (("gt", 0), ("pred", 1)):
            (Path(tmp) / side).mkdir()
            for key, pair in pairs.items():
                (Path(tmp) / side / f"{key}.png").write_bytes(pngs.encode_png(pair[k]))
        gt, pred = audit.PngFolder(f"{tmp}/gt"), audit.PngFolder(f"{tmp}/pred")
        doc = coco.build_coco([(k, p[1], {}, f"{k}.png") for k, p in pairs.items()], cats)
        ours = audit.CocoLabels(doc, "bench", key="source_id")

        def score() -> None:
            a = audit.Audit(ids)
            for key, (g, pr) in pairs.items():
                a.add(key, g, pr)

        n = (len(pairs), args.repeats)
        rows = [
            ("score maps in memory (Audit.add)", rate(score, *n)),
            ("read a label PNG (PngFolder.read)", rate(lambda: [gt.read(k) for k in pairs], *n)),
            ("decode our COCO RLE (CocoLabels.read)", rate(lambda: [ours.read(k) for k in pairs], *n)),
            ("end to end, PNG folders, 1 core", rate(lambda: audit.audit_images(pred, gt, list(pairs), ids), *n)),
        ]
    print(f"audit throughput, {args.images} maps of {WIDTH} x {HEIGHT}, {len(CLASS_IDS)} classes, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"| {'stage':<40} | {'images/s':>9} |\n|{'-' * 42}|{'-' * 11}|")
    for name, value in rows:
        print(f"| {name:<40} | {value:>9.1f} |")
    return 0

