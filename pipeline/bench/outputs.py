"""Benchmark the output stage: CPU time per image of COCO RLE, indexed PNG and quality stats for
500 x 375 label maps, and the bytes written per image through ``pipeline.storage``.

    python jobs/bench_outputs.py --images 50 --repeats 5

Synthetic inputs: 3 tagged classes as overlapping discs on background, a horizontal band of
255, random decision scores, a 64 x 64 refined map and ~400 square superpixels.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import coco, pngs, stats
from pipeline.storage import commit
from pipeline.storage.store import Store
from pipeline.types import LabelResult

HEIGHT, WIDTH = 375, 500
CLASS_IDS = (3, 8, 15)
CATEGORIES = [{"id": c, "name": f"class{c}"} for c in CLASS_IDS]


def synthetic_result(index: int) -> LabelResult:
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    label_map = np.zeros((HEIGHT, WIDTH), np.uint8)
    for cid in CLASS_IDS:
        cy, cx, r = rng.integers(0, HEIGHT), rng.integers(0, WIDTH), rng.integers(40, 140)
        label_map[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = cid
    band = rng.integers(0, HEIGHT - 8)
    label_map[band : band + 8] = 255
    segments = ((yy // 19) * (WIDTH // 25 + 1) + xx // 25).astype(np.int32)
    k = len(CLASS_IDS)
    return LabelResult(
        image_id=f"bench_{index:06d}", label_map=label_map, class_ids=CLASS_IDS,
        coarse=rng.random((k, 21, 28), dtype=np.float32), compensated=rng.random((k, 64, 64), dtype=np.float32),
        coarse_scores=rng.random(k, dtype=np.float32), final_scores=rng.random(k, dtype=np.float32),
        kept_ids=CLASS_IDS, decision=rng.random((k, HEIGHT, WIDTH), dtype=np.float32), segments=segments,
        timings={"clip_coarse": 0.1},
    )  # fmt: skip


def _rle(r: LabelResult) -> object:
    return coco.image_annotations(r.label_map, 1, dict(zip(r.class_ids, r.final_scores, strict=True)), set(CLASS_IDS))


def _stats(r: LabelResult) -> object:
    return stats.image_row(r, "s", None), stats.class_rows(r, "s")


def time_stage(fn: Callable[[LabelResult], object], results: list[LabelResult], repeats: int) -> tuple[float, float]:
    """Median over repeats of (wall ms, CPU ms) per image."""
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for r in results:
            fn(r)
        wall.append((time.perf_counter() - w0) / len(results) * 1e3)
        cpu.append((time.process_time() - c0) / len(results) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def bytes_written(results: list[LabelResult]) -> dict[str, int]:
    """Total bytes per file kind for one shard of ``results`` written to a local temp dir."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(tmp)
        commit.write_shard(store, "00000-bench", results, [], CATEGORIES, "0" * 64)
        totals: dict[str, int] = defaultdict(int)
        for path in Path(tmp).rglob("*"):
            if path.is_file():
                totals["label PNGs" if path.suffix == ".png" else path.name] += path.stat().st_size
    return dict(totals)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    results = [synthetic_result(i) for i in range(args.images)]
    stages = {
        "COCO RLE (annotations)": _rle,
        "indexed PNG": lambda r: pngs.encode_png(r.label_map),
        "quality stats (rows)": _stats,
    }
    print(f"{args.images} label maps of {WIDTH} x {HEIGHT}, {len(CLASS_IDS)} classes + 255 band; "
          f"median of {args.repeats} repeats\n")  # fmt: skip
    print(f"| {'stage':<30} | {'wall ms/image':>13} | {'CPU ms/image':>12} |\n|{'-' * 32}|{'-' * 14}:|{'-' * 13}:|")
    total_wall = total_cpu = 0.0
    for name, fn in stages.items():
        wall, cpu = time_stage(fn, results, args.repeats)
        total_wall, total_cpu = total_wall + wall, total_cpu + cpu
        print(f"| {name:<30} | {wall:>13.2f} | {cpu:>12.2f} |")
    print(f"| {'sum':<30} | {total_wall:>13.2f} | {total_cpu:>12.2f} |")
    w0, c0 = time.perf_counter(), time.process_time()
    sizes = bytes_written(results)
    print(f"| {'write_shard (all + local I/O)':<30} | {(time.perf_counter() - w0) / len(results) * 1e3:>13.2f} | "
          f"{(time.process_time() - c0) / len(results) * 1e3:>12.2f} |\n")  # fmt: skip
    print(f"| {'file':<30} | {'bytes/image':>13} |\n|{'-' * 32}|{'-' * 14}:|")
    for name, size in sorted(sizes.items()):
        print(f"| {name:<30} | {size / len(results):>13.0f} |")
    print(f"| {'total':<30} | {sum(sizes.values()) / len(results):>13.0f} |")

