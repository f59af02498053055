"""Planning at scale: the driver's preflight scan (schema, unique ids, tags -> category ids,
fingerprint and count, as ``jobs/label_coco.py`` does before loading any model) and the sharding
pass (shard ids over a second stream, as its ``--dry-run``) of a synthetic JSONL manifest; then
``read_coco`` on a synthetic COCO instances file of train2017 size. Each size runs in a fresh
process, which reports seconds and its peak RSS growth over the RSS before planning.

    PYTHONPATH=. python jobs/bench_planning.py --records 200000 1000000 10000000 [--coco]

Manifests are written (streamed) to --dir once and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from pipeline import manifest
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
        "annotations": [{"id": a, "image_id": rng.randint(1, images), "category_id": rng.randint(1, 80),
                         "bbox": [1.0, 2.0, 30.0, 40.0], "area": 1200.0, "iscrowd": 0,
                         "segmentation": [[1.0, 2.0, 31.0, 2.0, 31.0, 42.0, 1.0, 42.0]]}
                        for a in range(annotations)],  # fmt: skip
        "categories": [{**c, "supercategory": "x"} for c in CATEGORIES],
    }
    path.write_text(json.dumps(doc))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan_jsonl(path: str) -> dict:
    """The preflight scan and the sharding pass, timed; RSS growth over the RSS before them."""
    cats = manifest.categories_from(CATEGORIES, "categories", "coco")
    shard_size = build_config().shard_size
    before = _rss_mib()
    t0 = time.perf_counter()
    problems: list[str] = []
    count = [0]

    def counted():  # as label_coco._inputs: count while fingerprinting
        for record in manifest.read_jsonl(path, cats, problems):
            count[0] += 1
            yield record

    fingerprint = manifest.fingerprint(counted(), cats)
    t1 = time.perf_counter()
    n_shards = sum(1 for _ in manifest.shards(manifest.read_jsonl(path, cats), shard_size))
    t2 = time.perf_counter()
    return {"records": count[0], "problems": len(problems), "shards": n_shards, "fingerprint": fingerprint[:12],
            "scan_s": t1 - t0, "shard_s": t2 - t1, "rss_growth_mib": _peak_mib() - before}  # fmt: skip


def plan_coco(path: str) -> dict:
    before = _rss_mib()
    t0 = time.perf_counter()
    cats, records = manifest.read_coco(path, "s3://bucket/train2017", "coco", [])
    return {"records": len(records), "read_s": time.perf_counter() - t0, "rss_growth_mib": _peak_mib() - before}


def _child(kind: str, path: Path) -> dict:
    code = f"import json, jobs.bench_planning as b; print(json.dumps(b.plan_{kind}({str(path)!r})))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[200_000], help="manifest sizes to plan")
    parser.add_argument("--coco", action="store_true", help="also time read_coco at train2017 size")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tag2mask-bench-planning"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"{'records':>10s} {'scan s':>8s} {'shards s':>8s} {'total s':>8s} {'shards':>7s} {'RSS growth MiB':>15s}")
    for n in args.records:
        path = args.dir / f"manifest-{n}.jsonl"
        if not path.exists():
            write_jsonl(path, n)
        r = _child("jsonl", path)
        if r["records"] != n or r["problems"]:
            raise SystemExit(f"planning {path} kept {r['records']} of {n} records, {r['problems']} problems")
        total = r["scan_s"] + r["shard_s"]
        print(f"{n:10d} {r['scan_s']:8.1f} {r['shard_s']:8.1f} {total:8.1f} {r['shards']:7d} {r['rss_growth_mib']:15.1f}")
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
