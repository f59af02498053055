"""Per-stage time, batch sizes, dtypes, and one method against CLIPer: serial passes over
synthetic images with the labeler's own stage timers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch

from pipeline import methods
from pipeline.bench.common import (
    CPU_STAGES,
    FINGERPRINT,
    GOAL_IMAGES_PER_S,
    STAGES,
    Models,
    categories,
    make_labeler,
    synced_clock,
    with_batch_size,
)
from pipeline.config import build_config
from pipeline.decode import decode_image
from pipeline.labeler import Labeler
from pipeline.storage import commit
from pipeline.storage.store import Store
from pipeline.types import LabelRequest, LabelResult

# ---------------------------------------------------------------- stages, batch sizes, dtypes


@dataclass
class StageRun:
    """One (dtype, batch size) configuration: per-image seconds of every stage and the
    throughput of every pass over the images, peak GPU memory and the label maps."""

    dtype: str
    batch_size: int
    labeler: Labeler = field(repr=False)
    seconds: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    passes_images_per_s: list[float] = field(default_factory=list)
    peak_mib_per_image: float | None = None
    label_maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def ms(self) -> dict[str, float]:
        """Median milliseconds per image of each stage."""
        return {s: statistics.median(v) * 1e3 for s, v in self.seconds.items()}

    @property
    def images_per_s(self) -> float:
        """Median over passes of images / wall seconds of the pass."""
        return statistics.median(self.passes_images_per_s)

    def summary(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "batch_size": self.batch_size, "ms_per_image": self.ms,
                "images_per_s": self.images_per_s, "passes_images_per_s": self.passes_images_per_s,
                "peak_mib_per_image": self.peak_mib_per_image}  # fmt: skip


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _label_batch(labeler: Labeler, blobs: Sequence[bytes], ids: Sequence[str], store: Store,
                 shard_id: str) -> tuple[list[LabelResult], dict[str, float]]:  # fmt: skip
    """Decode, label, encode and write one batch serially; returns results and per-image seconds
    of the stages the labeler does not time itself."""
    t0 = time.perf_counter()
    images = [decode_image(b) for b in blobs]
    t1 = time.perf_counter()
    tags = tuple(labeler.categories)
    results = labeler.label([LabelRequest(i, im, tags) for i, im in zip(ids, images, strict=True)])
    t2 = time.perf_counter()
    commit.write_shard(store, shard_id, results, [], list(labeler.categories.values()), FINGERPRINT)
    n = len(blobs)
    return results, {"decode": (t1 - t0) / n, "encode_write": (time.perf_counter() - t2) / n}


def start_run(labeler: Labeler, batch_size: int, blobs: Sequence[bytes]) -> StageRun:
    """A configuration's labeler, warmed up (first call: allocations, text embeddings)."""
    labeler = with_batch_size(labeler, batch_size)
    device = labeler.clip.model.logit_scale.device
    warm = blobs[: batch_size if device.type == "cuda" else 1]
    store = Store.open("memory://bench-warm")
    _label_batch(labeler, warm, [f"warm{i}" for i in range(len(warm))], store, "warm")
    fsspec.filesystem("memory").rm("memory://bench-warm", recursive=True)
    return StageRun(labeler.config.model.dtype, batch_size, labeler)


def stage_pass(run: StageRun, blobs: Sequence[bytes]) -> None:
    """One serial pass over ``blobs`` in batches (decode, label, write to memory://), added to ``run``."""
    device = run.labeler.clip.model.logit_scale.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    root = f"memory://bench-stages-{run.dtype}-{run.batch_size}"
    store = Store.open(root)
    t0 = time.perf_counter()
    for b, chunk in enumerate(batches(list(blobs), run.batch_size)):
        ids = [f"img{b * run.batch_size + i:04d}" for i in range(len(chunk))]
        results, extra = _label_batch(run.labeler, chunk, ids, store, f"b{b:04d}")
        for res in results:
            run.label_maps[res.image_id] = res.label_map
            for s in STAGES:
                run.seconds[s].append(extra.get(s, res.timings.get(s, 0.0)))
    run.passes_images_per_s.append(len(blobs) / (time.perf_counter() - t0))
    fsspec.filesystem("memory").rm(root, recursive=True)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / run.batch_size / 2**20
        run.peak_mib_per_image = max(peak, run.peak_mib_per_image or 0.0)


def run_stages(labelers: Sequence[Labeler], batch_sizes: Sequence[int], blobs: Sequence[bytes], repeats: int,
               log: Callable[[str], None] = lambda _: None) -> list[StageRun]:  # fmt: skip
    """Every (labeler's dtype, batch size) configuration, ``repeats`` passes each, interleaved
    pass by pass so that a change in the machine's load falls on all configurations alike."""
    runs = [start_run(lab, bs, blobs) for lab in labelers for bs in batch_sizes]
    for r in range(max(1, repeats)):
        for run in runs:
            stage_pass(run, blobs)
            log(f"  pass {r + 1}: {run.dtype} batch {run.batch_size}: {run.passes_images_per_s[-1]:.3g} images/s")
    return runs


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Fraction of pixels, over every image both hold, where two label-map sets are equal."""
    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("the two runs share no image")
    equal = sum(int((a[i] == b[i]).sum()) for i in ids)
    return equal / sum(a[i].size for i in ids)


def stage_table(runs: Sequence[StageRun]) -> list[str]:
    """Markdown: one row per stage, one column per run."""
    head = "| stage | " + " | ".join(f"{r.dtype} b{r.batch_size}" for r in runs) + " |"
    lines = [head, "|---|" + "---:|" * len(runs)]
    for s in STAGES:
        lines.append(f"| {s} | " + " | ".join(f"{r.ms[s]:.1f}" for r in runs) + " |")
    lines.append("| sum of stages (ms/image) | " + " | ".join(f"{sum(r.ms.values()):.1f}" for r in runs) + " |")
    cpu = [sum(r.ms[s] for s in CPU_STAGES) for r in runs]
    lines.append("| CPU stages (decode, superpixels, assembly, write) | " + " | ".join(f"{c:.1f}" for c in cpu) + " |")
    lines.append(f"| cores to feed {GOAL_IMAGES_PER_S:g} images/s | " + " | ".join(
        f"{c * GOAL_IMAGES_PER_S / 1e3:.1f}" for c in cpu) + " |")  # fmt: skip
    lines.append("| **images/s end to end (serial)** | " + " | ".join(f"{r.images_per_s:.3g}" for r in runs) + " |")
    lines.append("| peak GPU MiB/image | " + " | ".join(
        "n/a" if r.peak_mib_per_image is None else f"{r.peak_mib_per_image:.0f}" for r in runs) + " |")  # fmt: skip
    return lines


def batch_rows(runs: Sequence[StageRun]) -> list[dict[str, Any]]:
    """Per dtype: images/s of each batch size over the smallest, and pixel agreement with it."""
    rows = []
    for dtype in dict.fromkeys(r.dtype for r in runs):
        mine = sorted((r for r in runs if r.dtype == dtype), key=lambda r: r.batch_size)
        for r in mine:
            rows.append({"dtype": dtype, "batch_size": r.batch_size, "images_per_s": r.images_per_s,
                         "speedup": r.images_per_s / mine[0].images_per_s,
                         "agreement": agreement(r.label_maps, mine[0].label_maps)})  # fmt: skip
    return rows


def dtype_rows(runs: Sequence[StageRun]) -> list[dict[str, Any]]:
    """Per batch size: images/s of each dtype over float32's, and pixel agreement with float32."""
    ref = {r.batch_size: r for r in runs if r.dtype == "float32"}
    return [{"dtype": r.dtype, "batch_size": r.batch_size, "speedup": r.images_per_s / ref[r.batch_size].images_per_s,
             "agreement": agreement(r.label_maps, ref[r.batch_size].label_maps)}
            for r in runs if r.dtype != "float32" and r.batch_size in ref]  # fmt: skip


# ---------------------------------------------------------------- methods


METHOD_PRESETS = {"clip-es": "clip-es-voc"}


def method_rows(base: Models, method: str, blobs: Sequence[bytes], n_tags: int, repeats: int) -> list[dict[str, Any]]:
    """ms/image of CLIPer (the size's preset) and of ``method`` (its VOC preset) labelling the same
    decoded images at batch 1 on the same CLIP: the whole ``label`` (with superpixels and assembly
    where the preset has them) and its model stages alone (the labeler's synchronised per-stage
    timings, superpixels and assembly left out). One warm-up image each, then ``repeats`` rounds
    with the methods interleaved (so load on a shared machine hits both alike); medians. A method
    without SD gets no SD model."""
    device = str(base.clip.model.logit_scale.device)
    over = {"batch_size": 1, "model": {"device": device, "dtype": base.dtype}}
    cats = categories(n_tags)
    chosen = {"cliper": make_labeler(base, 1, n_tags)}
    other_cfg = build_config(METHOD_PRESETS.get(method), {**over, "method": method})
    other_sd = base.sd if methods.needs_sd(other_cfg) else None
    chosen[method] = Labeler(base.clip, other_sd, other_cfg, cats, sync_timings=True)
    tags = tuple(c.id for c in cats)
    requests = [LabelRequest(f"m{i}", decode_image(b), tags) for i, b in enumerate(blobs)]
    whole: dict[str, list[float]] = {name: [] for name in chosen}
    model: dict[str, list[float]] = {name: [] for name in chosen}
    for labeler in chosen.values():
        labeler.label(requests[:1])  # warm-up
    for _ in range(max(1, repeats)):
        for name, labeler in chosen.items():
            t0 = synced_clock(device)
            results = labeler.label(requests)
            whole[name].append((synced_clock(device) - t0) / len(requests))
            cpu = ("superpixels", "label_assembly")
            stages = [sum(v for k, v in r.timings.items() if k not in cpu) for r in results]
            model[name].append(sum(stages) / len(stages))
    rows = [{"method": name, "preset": lab.config.preset, "model_ms_per_image": statistics.median(model[name]) * 1e3,
             "label_ms_per_image": statistics.median(whole[name]) * 1e3} for name, lab in chosen.items()]  # fmt: skip
    for r in rows:
        r["model_ratio_to_cliper"] = r["model_ms_per_image"] / rows[0]["model_ms_per_image"]
        r["label_ratio_to_cliper"] = r["label_ms_per_image"] / rows[0]["label_ms_per_image"]
    return rows


