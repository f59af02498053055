"""Everything of one image that is not a model call, before and after the CPU speed work (issue 15),
in one run: decode, superpixels, label assembly, PNG + COCO RLE + stats, each stage's GIL share,
and how the whole path scales from 1 to 2 threads.

"before" swaps the replaced code back in for the time of a pass, and only here: scikit-image's
Felzenszwalb (``pipeline.felzenszwalb`` gives the same segments), the per-pixel pooling and label
rule (``labels.decide`` gives the same bytes) and the ``np.unique`` + Fortran-copy COCO masks
(``coco.image_annotations`` gives the same JSON). Outputs are compared, not assumed, every pass.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import skimage.segmentation
from pycocotools import mask as mask_utils

from pipeline import coco, labels, pngs, refine
from pipeline.bench.busy import gil_share
from pipeline.bench.common import FINGERPRINT
from pipeline.config import LabelConfig, RefineConfig
from pipeline.decode import decode_image
from pipeline.labeler import Labeler
from pipeline.storage import commit
from pipeline.storage.store import Store
from pipeline.types import IGNORE, LabelRequest, LabelResult

VARIANTS = ("before", "after")
CPU_PATH_STAGES = ("decode", "superpixels", "label_assembly", "png", "coco_rle", "write_shard")


def _per_pixel_decide(scores: np.ndarray, class_ids: Sequence[int], *, is_normalize: bool, bkg_thre: float,
                      segments: np.ndarray | None, refine: RefineConfig,
                      labels: LabelConfig) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The label rule as it ran before ``labels.decide``: pooled scores (np.unique ranks, np.bincount
    sums, as ``refine.pool_scores`` computed them before the compiled pass) spread over every pixel,
    then the rule on every pixel."""
    if len(scores) and is_normalize:
        scores = _labels.minmax_normalize(scores)
    decision = scores if len(scores) else scores.astype(np.float32)
    if len(scores) and segments is not None:
        decision = _bincount_pool(scores, segments, refine.pooling)
    return decision, _labels.assemble_label_map(decision, class_ids, bkg_thre, labels)


def _bincount_pool(scores: np.ndarray, segments: np.ndarray, pooling: str) -> np.ndarray:
    if pooling != "mean":
        return _labels.pool_scores(scores, segments, pooling)
    _, flat = np.unique(segments.ravel(), return_inverse=True)
    flat = flat.ravel()
    n = int(flat.max()) + 1
    counts = np.bincount(flat, minlength=n).astype(np.float64)
    pooled = np.stack([np.bincount(flat, weights=s.ravel(), minlength=n) for s in scores]) / counts
    return pooled[:, flat].reshape(scores.shape).astype(scores.dtype)


_labels = labels  # the module, under a name the keyword argument ``labels`` above does not hide


def _unique_image_annotations(label_map: np.ndarray, image_id: int, scores: Mapping[int, float], known: set[int],
                              first_id: int = 1) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:  # fmt: skip
    """COCO annotations as built before: ``np.unique`` of the map and an [H, W, N] mask copied to
    Fortran order by ``coco.encode_masks``."""
    present = np.unique(label_map)
    ids = [int(v) for v in present if v not in (0, IGNORE)]
    if set(ids) - known:
        raise ValueError(f"image {image_id}: label map holds ids that are not in the categories")
    rles = coco.encode_masks(label_map[:, :, None] == np.array(ids + [IGNORE], dtype=np.uint8))
    raw = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    areas, boxes = mask_utils.area(raw), mask_utils.toBbox(raw)
    anns = [{"id": first_id + i, "image_id": image_id, "category_id": cid, "segmentation": rles[i],
             "area": int(areas[i]), "bbox": [float(v) for v in boxes[i]], "iscrowd": 0,
             "score": round(float(scores.get(cid, 0.0)), coco.SCORE_DIGITS)} for i, cid in enumerate(ids)]  # fmt: skip
    return (rles[-1] if IGNORE in present else None), anns


@contextmanager
def variant(name: str) -> Iterator[None]:
    """Within the block, the CPU path runs as it did ``before`` the speed work or as it does
    ``after`` (the code as it is). Swaps module attributes: benchmarks only, one thread at a time."""
    if name not in VARIANTS:
        raise ValueError(f"unknown CPU-path variant {name!r}; choose one of {VARIANTS}")
    if name == "after":
        yield
        return
    saved = refine.felzenszwalb, labels.decide, coco.image_annotations
    refine.felzenszwalb = skimage.segmentation.felzenszwalb  # type: ignore[assignment]
    labels.decide = _per_pixel_decide  # type: ignore[assignment]
    coco.image_annotations = _unique_image_annotations  # type: ignore[assignment]
    try:
        yield
    finally:
        refine.felzenszwalb, labels.decide, coco.image_annotations = saved  # type: ignore[assignment]


def model_outputs(labeler: Labeler, blobs: Sequence[bytes]) -> list[Any]:
    """The labeler's model stages for each image, once: the inferred work items ``finish`` takes."""
    tags = tuple(labeler.categories)
    return labeler.infer([LabelRequest(f"c{i:04d}", decode_image(b), tags) for i, b in enumerate(blobs)])


def image_path(labeler: Labeler, blob: bytes, work: Any) -> tuple[dict[str, float], LabelResult, bytes, Any]:
    """One image through every CPU stage (the model output given): per-stage CPU seconds of the
    calling thread (``time.thread_time``: what the stage costs one core, whatever else the shared
    machine runs; torch must run on this thread, ``torch.set_num_threads(1)``), the result, its
    PNG bytes and its COCO annotations."""
    clock = time.thread_time
    t0 = clock()
    image = decode_image(blob)
    t1 = clock()
    segments = refine.superpixels(image, labeler.config.refine)
    t2 = clock()
    req = LabelRequest(work.request.image_id, image, work.request.tags, segments)
    result = labeler.finish(_with_request(work, req))
    t3 = clock()
    png = pngs.encode_png(result.label_map)
    t4 = clock()
    scores = dict(zip(result.class_ids, (float(s) for s in result.final_scores), strict=True))
    anns = coco.image_annotations(result.label_map, 1, scores, set(labeler.categories))
    t5 = clock()
    seconds = {"decode": t1 - t0, "superpixels": t2 - t1, "label_assembly": t3 - t2, "png": t4 - t3,
               "coco_rle": t5 - t4}  # fmt: skip
    return seconds, result, png, anns


def _with_request(work: Any, req: LabelRequest) -> Any:
    import dataclasses

    return dataclasses.replace(work, request=req, timings={})


def _write_seconds(labeler: Labeler, results: Sequence[LabelResult]) -> float:
    """Seconds per image of ``commit.write_shard`` (stats entries, PNGs, COCO, Parquet, marker)
    to memory://."""
    import fsspec

    store = Store.open("memory://bench-cpupath")
    t0 = time.thread_time()
    commit.write_shard(store, "00000", results, [], list(labeler.categories.values()), FINGERPRINT)
    seconds = (time.thread_time() - t0) / len(results)
    fsspec.filesystem("memory").rm("memory://bench-cpupath", recursive=True)
    return seconds


def cpu_path_rows(labeler: Labeler, blobs: Sequence[bytes], works: Sequence[Any],
                  repeats: int) -> tuple[list[dict[str, Any]], bool]:  # fmt: skip
    """Median CPU ms per image (one core) of every CPU stage, before and after, passes interleaved
    after a warm-up pass of each; and whether both variants gave byte-identical label maps,
    decision scores, PNGs and COCO annotations on every pass. ``png`` and ``coco_rle`` are timed
    alone; ``write_shard`` is the whole shard write (it encodes them again beside the stats
    rows), so the total counts it and not them. ``works``: ``model_outputs(labeler, blobs)``."""
    for name in VARIANTS:  # warm-up: imports, numba's cache, first-call allocations
        with variant(name):
            _write_seconds(labeler, [image_path(labeler, blobs[0], works[0])[1]])
    seconds: dict[str, dict[str, list[float]]] = {v: {s: [] for s in CPU_PATH_STAGES} for v in VARIANTS}
    outputs: dict[str, list[Any]] = {}
    identical = True
    for _ in range(max(1, repeats)):
        for name in VARIANTS:
            with variant(name):
                runs = [image_path(labeler, b, w) for b, w in zip(blobs, works, strict=True)]
                for stage in CPU_PATH_STAGES[:-1]:
                    seconds[name][stage].append(statistics.median(r[0][stage] for r in runs))
                seconds[name]["write_shard"].append(_write_seconds(labeler, [r[1] for r in runs]))
            got = [(r[1].label_map.tobytes(), r[1].decision.tobytes(), r[2], repr(r[3])) for r in runs]
            identical &= outputs.setdefault("first", got) == got
    rows = []
    for stage in (*CPU_PATH_STAGES, "total"):
        row: dict[str, Any] = {"stage": stage}
        for name in VARIANTS:
            ms = {s: statistics.median(v) * 1e3 for s, v in seconds[name].items()}
            row[f"{name}_ms"] = ms[stage] if stage != "total" else sum(
                ms[s] for s in ("decode", "superpixels", "label_assembly", "write_shard"))  # fmt: skip
        row["speedup"] = row["before_ms"] / max(row["after_ms"], 1e-9)
        rows.append(row)
    return rows, identical


def gil_rows(labeler: Labeler, blob: bytes, work: Any, seconds: float = 1.0) -> list[dict[str, Any]]:
    """Per CPU stage (as it is now): the speed of a pure-Python loop beside it on another thread,
    over its speed alone (``busy.gil_share``): near 1 = the stage releases the GIL, near 0.5 or
    below = it holds it and threads cannot run it in parallel. On a machine busy with other work
    both threads also wait for a core: the last row, a sleep, is the control that sees only that.
    ``work``: ``blob``'s model output (``model_outputs``)."""
    _, result, _, _ = image_path(labeler, blob, work)
    image, segments = decode_image(blob), result.segments
    req = LabelRequest(work.request.image_id, image, work.request.tags, segments)
    scores = dict(zip(result.class_ids, (float(s) for s in result.final_scores), strict=True))
    stages: dict[str, Callable[[], object]] = {
        "decode": lambda: decode_image(blob),
        "superpixels": lambda: refine.superpixels(image, labeler.config.refine),
        "label_assembly": lambda: labeler.finish(_with_request(work, req)),
        "png": lambda: pngs.encode_png(result.label_map),
        "coco_rle": lambda: coco.image_annotations(result.label_map, 1, scores, set(labeler.categories)),
        "write_shard": lambda: _write_seconds(labeler, [result]),
    }
    stages["control: time.sleep (releases the GIL)"] = lambda: time.sleep(0.005)
    return [{"stage": s, "python_speed_beside": gil_share(fn, seconds)} for s, fn in stages.items()]


def thread_scaling(labeler: Labeler, blobs: Sequence[bytes], works: Sequence[Any], repeats: int,
                   threads: Sequence[int] = (1, 2)) -> list[dict[str, Any]]:  # fmt: skip
    """images/s of the whole CPU path (decode, superpixels, assembly, PNG, COCO RLE) over ``blobs``
    on each thread count, as ``label_shard``'s reader and post threads run it; ratio to 1 thread.
    Rounds interleaved, medians. ``works``: ``model_outputs(labeler, blobs)``."""
    rates: dict[int, list[float]] = {n: [] for n in threads}
    cores: dict[int, list[float]] = {n: [] for n in threads}
    for _ in range(max(1, repeats)):
        for n in threads:
            with ThreadPoolExecutor(n) as pool:
                t0, c0 = time.perf_counter(), time.process_time()
                list(pool.map(lambda bw: image_path(labeler, *bw), zip(blobs, works, strict=True)))
                wall = time.perf_counter() - t0
                rates[n].append(len(blobs) / wall)
                cores[n].append((time.process_time() - c0) / wall)
    base = statistics.median(rates[threads[0]])
    # cores_used: the process's CPU seconds over wall seconds. Below n on n threads: the GIL, or a
    # machine whose cores other work holds (then 1 thread gets less than 1 core as well).
    return [{"threads": n, "images_per_s": statistics.median(r), "ratio_to_1": statistics.median(r) / base,
             "cores_used": statistics.median(cores[n])} for n, r in rates.items()]  # fmt: skip


def simulated_before_after(labeler: Labeler, blobs: Sequence[bytes], io_threads: Sequence[int], gpu_ms: float,
                           repeats: int) -> list[dict[str, Any]]:  # fmt: skip
    """``label_shard`` beside a simulated GPU of ``gpu_ms`` per image (``busy.SimulatedGPU``), with
    the CPU path before and after, rounds interleaved: images/s and the GPU's busy fraction."""
    from pipeline.bench.busy import simulated_rows

    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(max(1, repeats)):
        for name in VARIANTS:
            with variant(name):
                for row in simulated_rows(labeler, blobs, io_threads, (gpu_ms,)):
                    runs.setdefault((name, int(row["io_threads"])), []).append(row)
    return [{"cpu_path": name, "io_threads": n, "gpu_ms_per_image": gpu_ms,
             "images_per_s": statistics.median(r["images_per_s"] for r in rows),
             "gpu_busy_fraction": statistics.median(r["gpu_busy_fraction"] for r in rows)}
            for (name, n), rows in runs.items()]  # fmt: skip
