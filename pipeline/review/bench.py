"""Benchmark of the review app on a large synthetic run: stats of ``images`` images (merged
Parquet, committed shard markers, COCO image lists) and a few 500 x 375 label maps and photos
that every row reuses. Times gallery pages, image pages and (uncached) thumbnails through the
ASGI app, ``requests`` of each, and returns median and p95 milliseconds per kind."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SHARD = 256
PICTURES = 8  # distinct label maps and photos, reused by every row
H, W = 375, 500
CATEGORIES: list[dict[str, Any]] = [{"id": i, "name": f"class{i}"} for i in range(1, 21)]


def _label_map(k: int, rng: np.random.Generator) -> np.ndarray:
    lm = np.zeros((H, W), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, H - 100), rng.integers(0, W - 100)
        lm[y : y + rng.integers(40, 100), x : x + rng.integers(40, 100)] = int(CATEGORIES[(k * 3 + _) % 20]["id"])
    return lm


def write_synthetic_run(root: Path, images: int, seed: int = 0) -> Path:
    """A run of ``images`` images under ``root / "run"`` readable by ``open_review_run``."""
    from pipeline import stats, types
    from pipeline.storage import commit, outputs
    from pipeline.storage.store import Store

    rng = np.random.default_rng(seed)
    store = Store.open(str(root / "run"))
    pictures = root / "images"
    pictures.mkdir(parents=True, exist_ok=True)
    files = {}
    for k in range(PICTURES):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(pictures / f"p{k}.jpg", quality=85)
        files[f"labels/synthetic-{k}.png"] = _png(_label_map(k, rng))
    ids = [f"img{i:07d}" for i in range(images)]
    shard_ids = [types.shard_id_for(s, ids[s * SHARD : (s + 1) * SHARD]) for s in range(-(-images // SHARD))]
    image_rows, class_rows = [], []
    for i, image_id in enumerate(ids):
        shard = shard_ids[i // SHARD]
        ok = i % 97 != 5
        row = dict.fromkeys(stats.to_table("stats_images", []).schema.names)
        row.update(shard_id=shard, image_id=image_id, status="ok" if ok else "decode_error",
                   error=None if ok else "cannot decode image: truncated")  # fmt: skip
        if ok:
            row.update(label_file=f"labels/synthetic-{i % PICTURES}.png", height=H, width=W, n_candidates=3, n_kept=3,
                       background_fraction=float(rng.random()), ignore_fraction=float(rng.random() * 0.1),
                       coarse_refined_agreement=float(rng.random()), superpixel_purity=float(rng.random()),
                       n_superpixels=int(rng.integers(50, 400)))  # fmt: skip
            for c in range(3):
                cid = CATEGORIES[((i % PICTURES) * 3 + c) % 20]["id"]
                class_rows.append({"shard_id": shard, "image_id": image_id, "category_id": cid, "kept": True,
                                   "pixel_area": int(rng.integers(0, 9000)), "pixel_fraction": float(rng.random() * .1),
                                   "coarse_score": float(rng.random()), "class_score": float(rng.random()),
                                   "win_score_mean": None, "win_score_std": None})  # fmt: skip
        image_rows.append(row)
    fingerprint = "0" * 64
    for s, shard in enumerate(shard_ids):
        built = outputs.ShardFiles(
            {}, {}, dict.fromkeys(("images", "ok", "failed", "annotations", "class_rows", "label_maps"), 0)
        )
        docs = {"images": [{"id": i, "source_id": image_id, "file_name": str(pictures / f"p{i % PICTURES}.jpg")}
                           for i, image_id in enumerate(ids[s * SHARD : (s + 1) * SHARD], s * SHARD)],
                "annotations": [], "categories": CATEGORIES}  # fmt: skip
        files[f"shards/{shard}/annotations.json"] = json.dumps(docs).encode()
        files[f"shards/{shard}/_COMMITTED.json"] = json.dumps(commit.marker_doc(shard, built, fingerprint)).encode()
    files["merged/stats_images/part-00000.parquet"] = stats.parquet_bytes(stats.to_table("stats_images", image_rows))
    files["merged/stats_classes/part-00000.parquet"] = stats.parquet_bytes(stats.to_table("stats_classes", class_rows))
    files["merged/_MERGED.json"] = json.dumps({"fingerprint": fingerprint}).encode()
    store.write_many(files)
    return root / "run"


def _png(lm: np.ndarray) -> bytes:
    from pipeline import pngs

    return pngs.encode_png(lm)


def _time(fn: Callable[[int], object], n: int) -> tuple[float, float]:
    times = []
    for k in range(n):
        t0 = time.perf_counter()
        fn(k)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[min(n - 1, int(round(0.95 * (n - 1))))]


def run_bench(root: Path, images: int = 100_000, requests: int = 50) -> list[dict[str, object]]:
    """Rows of (kind, requests, median ms, p95 ms) for gallery pages, image pages and thumbnails."""
    from starlette.testclient import TestClient

    from pipeline.review.app import create_app

    t0 = time.perf_counter()
    prefix = write_synthetic_run(root, images)
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    client = TestClient(create_app(str(prefix), session="bench"), base_url="http://127.0.0.1")
    started = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    sorts = ["image_id", "background_fraction", "coarse_refined_agreement", "ignore_fraction"]
    pages = [int(p) for p in rng.integers(1, images // 24 - 1, requests)]
    ids = [f"img{int(i):07d}" for i in rng.integers(0, images, requests)]
    ids = [i if int(i[3:]) % 97 != 5 else "img0000000" for i in ids]

    def get(url: str) -> None:
        response = client.get(url)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")

    kinds = {
        "gallery (sort, page)": lambda k: get(f"/gallery?sort={sorts[k % 4]}&desc={k % 2}&page={pages[k]}"),
        "gallery (class, range, sort)": lambda k: get(
            f"/gallery?cat={1 + k % 20}&min_class_score=0.3&sort=class_score&desc=1&page={1 + k % 5}"
        ),  # fmt: skip
        "image page": lambda k: get(f"/image?id={ids[k]}&pos={k}&sort=background_fraction"),
        "thumbnail (uncached)": lambda k: get(f"/thumb?id={ids[k]}"),
    }
    rows = [
        {"kind": "write run", "requests": 1, "median_ms": written * 1000, "p95_ms": written * 1000},
        {"kind": "open run (create_app)", "requests": 1, "median_ms": started * 1000, "p95_ms": started * 1000},
    ]
    for kind, fn in kinds.items():
        median, p95 = _time(fn, requests)
        rows.append({"kind": kind, "requests": requests, "median_ms": median, "p95_ms": p95})
    return rows
