"""Driver-side costs of a run, without models: memory while streaming a large manifest, and the
time a resume takes to skip committed shards. With ``--shard-images N``, instead: an actor's peak
memory while it labels one shard of N synthetic images with tiny random-weight models (run in a
fresh process, so the peak is this shard's).

    python jobs/bench_runner.py --images 200000 --shards 1000
    python jobs/bench_runner.py --shard-images 48 --size 360x480
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from pipeline import manifest
from pipeline.storage import commit
from pipeline.storage.store import Store
from pipeline.types import Category, Failure


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _shard_memory(n: int, h: int, w: int) -> None:
    import io

    import fsspec
    import numpy as np
    from PIL import Image

    from pipeline.bench.architectures import save_models
    from pipeline.config import build_config
    from pipeline.labeler import Labeler
    from pipeline.shards import label_shard

    with tempfile.TemporaryDirectory() as tmp:
        paths = save_models(tmp)
        model = {"clip": {"model": str(paths["clip_config"]), "pretrained": None,
                          "checkpoint": str(paths["clip_checkpoint"])},
                 "sd": {"checkpoint": str(paths["sd_dir"])}, "device": "cpu"}  # fmt: skip
        cfg = build_config("voc-vit-b16", {"model": model})
        labeler = Labeler.from_config(cfg, [Category(1, "cat", "cat"), Category(7, "dog", "dog")])
        fs, rng = fsspec.filesystem("memory"), np.random.default_rng(0)
        records = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
            fs.pipe(f"/bench/{i}.jpg", buf.getvalue())
            records.append({"id": f"im{i:04d}", "uri": f"memory:///bench/{i}.jpg", "tags": [1, 7]})
        warm = next(manifest.shards(records[:1], 1))
        label_shard(labeler, Store.open("memory://warm"), warm, "0" * 64)
        base, t0 = rss_mib(), time.perf_counter()
        label_shard(labeler, Store.open("memory://bench-out"), next(manifest.shards(records, n)), "0" * 64)
        seconds, peak = time.perf_counter() - t0, peak_mib()
    print(f"{'measure (one shard, tiny models, CPU)':<58}{'value':>14}")
    print(f"{'  images x size, batch size':<58}{f'{n} x {h}x{w}, {cfg.batch_size}':>14}")
    print(f"{'  RSS after loading models and one warm-up shard (MiB)':<58}{base:>14.0f}")
    print(f"{'  peak RSS while labeling the shard (MiB)':<58}{peak:>14.0f}")
    print(f"{'  growth over the warm process (MiB)':<58}{peak - base:>14.0f}")
    print(f"{'  seconds':<58}{seconds:>14.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--shard-images", type=int, help="measure one shard's labeling memory instead")
    p.add_argument("--size", default="360x480", help="HxW of the synthetic images (with --shard-images)")
    args = p.parse_args(argv)
    if args.shard_images:
        return _shard_memory(args.shard_images, *map(int, args.size.split("x")))
    cats = [Category(i, f"class{i}", f"class{i}") for i in range(1, 81)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.jsonl"
        with path.open("w") as f:
            for i in range(args.images):
                tags = sorted({1 + i % 80, 1 + (i * 7) % 80})
                f.write(json.dumps({"id": f"{i:012d}", "uri": f"s3://bucket/train/{i:012d}.jpg", "tags": tags}) + "\n")
        base = peak_mib()
        t0 = time.perf_counter()
        fp = manifest.fingerprint(manifest.read_jsonl(str(path)), cats)
        n_shards = sum(1 for _ in manifest.shards(manifest.read_jsonl(str(path)), args.shard_size))
        plan_s = time.perf_counter() - t0
        stream_peak = peak_mib()

        store = Store.open(str(Path(tmp) / "out"))
        recs = ({"id": f"s{i}", "uri": f"x/{i}.jpg", "tags": [1]} for i in range(args.shards))
        shard_list = list(manifest.shards(recs, 1))
        for s in shard_list:  # committed shards holding one recorded failure each: markers only
            commit.write_shard(store, s.shard_id, [], [Failure(s.records[0]["id"], "missing", "x")], cats, fp)
        t0 = time.perf_counter()
        skipped = sum(commit.is_committed(store, s.shard_id, fp) for s in shard_list)
        skip_s = time.perf_counter() - t0

    print(f"{'measure':<58}{'value':>14}")
    print(f"{'manifest records (JSONL, streamed twice: fingerprint + plan)':<58}{args.images:>14,}")
    print(f"{'  shards of ' + str(args.shard_size):<58}{n_shards:>14,}")
    print(f"{'  planning time (s)':<58}{plan_s:>14.2f}")
    print(f"{'  driver peak RSS before streaming (MiB)':<58}{base:>14.0f}")
    print(f"{'  driver peak RSS after streaming (MiB)':<58}{stream_peak:>14.0f}")
    print(f"{'resume: committed shards checked and skipped':<58}{skipped:>14,}")
    print(f"{'  time to check them all (s, local disk)':<58}{skip_s:>14.2f}")

