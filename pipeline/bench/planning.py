"""Planning at scale: the driver's one scan of a synthetic JSONL manifest (schema, unique ids,
tags -> category ids, fingerprint, count and shard ids, as ``jobs/label_coco.py`` does before
loading any model and its ``--dry-run`` prints), optionally the run's stream of shards; then
``read_coco`` on a synthetic COCO instances file of train2017 size. Each size runs in a fresh
process, which reports wall and CPU seconds (CPU time per record, steadier on a loaded
machine) and its peak RSS growth over the RSS before planning.

    python jobs/bench_planning.py --records 200000 1000000 10000000 [--coco] [--stream]

Manifests are written (streamed) to --dir once and reused.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from pipeline import manifest
from pipeline.bench.runner import peak_mib, rss_mib
from pipeline.config import build_config
from pipeline.prompts import COCO_CLASSES

CATEGORIES = [{"id": i + 1, "name": name} for i, name in enumerate(COCO_CLASSES)]


def write_jsonl(path: Path, n: int) -> None:
    """``n`` records with 1-4 tags (names and ids mixed), sizes, file names; seeded."""
    rng = random.Random(0)
    tmp = path.with_suffix(".part")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            tags = rng.sample(CATEGORIES, rng.randint(1, 4))
            record = {"id": f"img{i:09d}", "uri": f"s3://bucket/train/{i:09d}.jpg",
                      "tags": [t["name"] if i % 2 else t["id"] for t in tags],
                      "width": 640, "height": 480, "file_name": f"train/{i:09d}.jpg"}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    tmp.rename(path)


def write_coco(path: Path, images: int = 118_287, annotations: int = 860_001) -> None:
    """A COCO instances file of train2017's size: its image and annotation counts, 80 categories."""
    rng = random.Random(0)
    doc = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(1, images + 1)],
        "annotations": [
            {
                "id": a,
                "image_id": rng.randint(1, images),
                "category_id": rng.randint(1, 80),
                "bbox": [1.0, 2.0, 30.0, 40.0],
                "area": 1200.0,
                "iscrowd": 0,
                "segmentation": [[1.0, 2.0, 31.0, 2.0, 31.0, 42.0, 1.0, 42.0]],
            }
            for a in range(annotations)
        ],  # fmt: skip
        "categories": [{**c, "supercategory": "x"} for c in CATEGORIES],
    }
    path.write_text(json.dumps(doc))


def plan_jsonl(path: str, stream: bool = False) -> dict:
    """What ``--dry-run`` does before it prints the plan: one scan (schema, unique ids, tags ->
    category ids, fingerprint, count and shard ids), timed; RSS growth over the RSS before it.
    ``stream``: also time the run's stream of shards (``read_jsonl`` into ``shards``, images named),
    which the runner pulls while the GPUs work."""
    cats = manifest.categories_from(CATEGORIES, "categories", "coco")
    shard_size = build_config().shard_size
    before = rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    problems: list[str] = []
    scan = manifest.scan_jsonl(path, cats, problems, shard_size)
    t1, c1 = time.perf_counter(), time.process_time()
    streamed = sum(1 for _ in manifest.shards(manifest.read_jsonl(path, cats), shard_size)) if stream else 0
    t2 = time.perf_counter()
    return {"records": scan.count, "problems": len(problems), "shards": len(scan.shard_ids or ()),
            "streamed": streamed, "fingerprint": scan.fingerprint[:12], "scan_s": t1 - t0, "scan_cpu_s": c1 - c0,
            "stream_s": t2 - t1 if stream else None, "rss_growth_mib": peak_mib() - before}  # fmt: skip


def plan_coco(path: str) -> dict:
    before = rss_mib()
    t0 = time.perf_counter()
    cats, records = manifest.read_coco(path, "s3://bucket/train2017", "coco", [])
    return {"records": len(records), "read_s": time.perf_counter() - t0, "rss_growth_mib": peak_mib() - before}


def _child(kind: str, path: Path, *args: object) -> dict:
    call = ", ".join(map(repr, (str(path), *args)))
    code = f"import json, pipeline.bench.planning as b; print(json.dumps(b.plan_{kind}({call})))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[200_000], help="manifest sizes to plan")
    parser.add_argument("--coco", action="store_true", help="also time read_coco at train2017 size")
    parser.add_argument("--stream", action="store_true", help="also time the run's stream of shards (names included)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tag2mask-bench-planning"))
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"{'records':>10s} {'plan s':>8s} {'CPU s':>8s} {'us/rec':>7s} {'shards':>7s} {'RSS growth MiB':>15s} "
          f"{'fingerprint':>12s}{' stream s' if args.stream else ''}")  # fmt: skip
    for n in args.records:
        path = args.dir / f"manifest-{n}.jsonl"
        if not path.exists():
            write_jsonl(path, n)
        r = _child("jsonl", path, args.stream)
        if r["records"] != n or r["problems"]:
            raise SystemExit(f"planning {path} kept {r['records']} of {n} records, {r['problems']} problems")
        stream = f" {r['stream_s']:8.1f}" if args.stream else ""
        cpu, us = r["scan_cpu_s"], r["scan_cpu_s"] / n * 1e6
        print(f"{n:10d} {r['scan_s']:8.1f} {cpu:8.1f} {us:7.2f} {r['shards']:7d} {r['rss_growth_mib']:15.1f} "
              f"{r['fingerprint']:>12s}{stream}")  # fmt: skip
    if args.coco:
        path = args.dir / "instances_train2017_synthetic.json"
        if not path.exists():
            write_coco(path)
        r = _child("coco", path)
        size = path.stat().st_size / 2**20
        print(f"\nread_coco, {r['records']} images, 860001 annotations ({size:.0f} MiB): "
              f"{r['read_s']:.1f} s, RSS growth {r['rss_growth_mib']:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
