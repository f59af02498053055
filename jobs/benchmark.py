"""Labeler benchmark (issue 7): per-stage time and images/s on random-weight models of a chosen
size, the measured comparisons behind the speed work, and the FLOP and byte counts that bound
the GPU time. No Ray, no downloads: timing does not depend on the weights' values.

    python jobs/benchmark.py --size tiny --images 8
    python jobs/benchmark.py --size vit-b16 --images 2 --batch-sizes 1,2 --dtypes float32,bfloat16
    python jobs/benchmark.py --size vit-b16 --device cuda --dtypes float32,bfloat16 --batch-sizes 1,4,16,32
    python jobs/benchmark.py --size vit-b16 --images 2 --method clip-es   # CLIP-ES against CLIPer

Sections (``--compare``, comma-separated, default all):
  stages     ms/image of every stage, images/s and peak GPU memory, per batch size x dtype
  batch      images/s of each batch size against the smallest, and label-map agreement
  dtype      images/s of each dtype against float32 at the same batch size, and the fraction
             of label-map pixels equal to float32's
  chain      compensation right to left against forming the n x n chain product first
  busy       a whole shard through ``shards.label_shard``: fraction of wall time in the model
             stages (the GPU's share) while decode, superpixels and writing run on threads,
             the same shard with nothing overlapped, and label_shard beside a simulated GPU
             (0 and 20 ms/image) to show how fast the CPU side alone can go
  speedwork  one-run A/B of each speed change: early UNet stop, SDPA on uncaptured layers,
             the exact scale folding, the one-pass threshold, no stacked copy, text cache
  flops      FLOPs (torch FlopCounterMode on the real modules, batch 1) and bytes per image,
             and the H100 ceilings they imply
  methods    (``--method NAME``; alone unless --compare is given) ms/image of that method and of
             CLIPer on the same models and images, each under its own preset, and their ratio
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from pipeline import cliper, compensation, methods, refine  # noqa: E402
from pipeline.architectures import clip_models, sd_models  # noqa: E402
from pipeline.config import Config, build_config  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402
from pipeline.labeler import Labeler  # noqa: E402
from pipeline.manifest import Shard  # noqa: E402
from pipeline.models import DTYPES, ClipModels  # noqa: E402
from pipeline.prompts import background_classes, templates  # noqa: E402
from pipeline.shards import label_shard  # noqa: E402
from pipeline.storage import commit  # noqa: E402
from pipeline.storage.store import Store  # noqa: E402
from pipeline.types import Category, LabelRequest, LabelResult  # noqa: E402

# size -> (open_clip architecture, SD shape, preset)
SIZES = {
    "tiny": ("tiny", "tiny", "voc-vit-b16"),
    "vit-b16": ("ViT-B-16", "sd21-base", "voc-vit-b16"),
    "vit-l14": ("ViT-L-14", "sd21-base", "voc-vit-l14"),
}
STAGES = ("decode", "clip_coarse", "vae_encode", "unet_capture", "compensation", "superpixels", "label_assembly",
          "encode_write")  # fmt: skip
CPU_STAGES = ("decode", "superpixels", "label_assembly", "encode_write")
SECTIONS = ("stages", "batch", "dtype", "chain", "busy", "speedwork", "flops")
CLASS_NAMES = ("cat", "dog", "person", "car", "tree", "bird", "boat", "chair")
# NVIDIA H100 datasheet (SXM5, dense, i.e. without the 2:4 sparsity factor).
H100 = {"bf16_tflops": 989.4, "tf32_tflops": 494.7, "fp32_tflops": 66.9, "hbm_tb_s": 3.35}
GOAL_IMAGES_PER_S = 50.0
FINGERPRINT = "0" * 64


# ---------------------------------------------------------------- inputs and models


def synthetic_jpeg(seed: int, w: int = 500, h: int = 375) -> bytes:
    """A 500 x 375 (VOC-sized) JPEG of smooth random colour blobs."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h // 25, w // 25, 3), dtype=np.uint8)
    big = Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class Models:
    """A random-weight CLIP + SD pair of one size, dtype and device."""

    size: str
    clip: ClipModels
    sd: compensation.SDModels
    dtype: str = "float32"


def build_models(size: str, device: str) -> Models:
    """float32 models of ``size`` (seed 0) on ``device``."""
    clip_name, sd_shape, _ = SIZES[size]
    return Models(size, clip_models(clip_name, device=device), sd_models(sd_shape, device=device))


def cast_models(models: Models, dtype: str) -> Models:
    """A copy of ``models`` in ``dtype`` (the same weights, rounded)."""
    if dtype == models.dtype:
        return models
    dt = DTYPES[dtype]
    clip = dataclasses.replace(models.clip, model=copy.deepcopy(models.clip.model).to(dtype=dt))
    sd = dataclasses.replace(
        models.sd, vae=copy.deepcopy(models.sd.vae).to(dtype=dt), unet=copy.deepcopy(models.sd.unet).to(dtype=dt),
        empty_embedding=models.sd.empty_embedding.to(dtype=dt),
    )  # fmt: skip
    return Models(models.size, clip, sd, dtype)


def categories(n_tags: int) -> list[Category]:
    return [Category(i + 1, name, name) for i, name in enumerate(CLASS_NAMES[:n_tags])]


def preset_config(models: Models, batch_size: int = 1) -> Config:
    """The size's preset on the models' device and dtype."""
    device = str(models.clip.model.logit_scale.device)
    return build_config(SIZES[models.size][2], {"batch_size": batch_size,
                                                "model": {"device": device, "dtype": models.dtype}})  # fmt: skip


def make_labeler(models: Models, batch_size: int, n_tags: int) -> Labeler:
    """A labeler over ``models`` with the size's preset, timing with device synchronisation.
    Construction embeds every background class (seconds to a minute on a CPU at full size)."""
    return Labeler(models.clip, models.sd, preset_config(models, batch_size), categories(n_tags), sync_timings=True)


def with_batch_size(labeler: Labeler, batch_size: int) -> Labeler:
    """A shallow copy with another batch size: models and text embeddings shared, not rebuilt."""
    other = copy.copy(labeler)
    other.config = dataclasses.replace(labeler.config, batch_size=batch_size)
    return other


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synced_clock(device: torch.device | str) -> float:
    """``time.perf_counter`` after synchronising ``device``."""
    synchronize(device)
    return time.perf_counter()


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, the device synchronised around each."""
    times = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
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
    for b, chunk in enumerate(_batches(list(blobs), run.batch_size)):
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


# ---------------------------------------------------------------- chain order


def random_maps(layers: int, heads: int, n: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """[layers, heads, n, n] float32 attention-like maps (rows are softmaxes of random logits)."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.empty(layers, heads, n, n)
    for i in range(layers):
        for h in range(heads):
            maps[i, h] = torch.softmax(torch.randn(n, n, generator=g) * 4, dim=-1)
    return maps.to(device)


def full_product_compensate(chain: Sequence[torch.Tensor], coarse: torch.Tensor) -> torch.Tensor:
    """The reference the method rules out: A_f = M_0 @ ... @ M_last formed first, then A_f @ S."""
    side = int(round(chain[0].shape[-1] ** 0.5))
    s = F.interpolate(coarse[None].to(chain[0].dtype), size=(side, side), mode="bilinear", align_corners=False)
    fused = chain[0]
    for m in chain[1:]:
        fused = fused @ m
    return (fused @ s[0].flatten(1).T).T.reshape(-1, side, side)


def chain_comparison(side: int, layers: int, heads: int, classes: int, repeats: int,
                     device: str = "cpu") -> dict[str, float]:  # fmt: skip
    """Right-to-left compensation (the library's) against the full product, on the same maps."""
    maps = random_maps(layers, heads, side * side, device=device)
    coarse = torch.rand(classes, 21, 28, generator=torch.Generator().manual_seed(1)).to(device)
    normalize_s = median_seconds(lambda: compensation.attention_chain(maps, 0.1), repeats, device)
    chain = compensation.attention_chain(maps, 0.1)
    fast = compensation.compensate(chain, coarse)
    slow = full_product_compensate(chain, coarse)
    rtl_s = median_seconds(lambda: compensation.compensate(chain, coarse), repeats, device)
    full_s = median_seconds(lambda: full_product_compensate(chain, coarse), 1, device)  # 1 run: it is slow
    n, k = side * side, layers * heads
    return {
        "n": n, "maps": k, "classes": classes, "normalize_ms": normalize_s * 1e3,
        "right_to_left_ms": rtl_s * 1e3, "full_product_ms": full_s * 1e3, "time_ratio": full_s / rtl_s,
        "right_to_left_gflop": 2 * k * n * n * classes / 1e9,
        "full_product_gflop": (2 * (k - 1) * n**3 + 2 * n * n * classes) / 1e9,
        "max_abs_diff": float((fast - slow).abs().max()),
        "max_rel_diff": float((fast - slow).abs().max() / slow.abs().max()),
    }  # fmt: skip


# ---------------------------------------------------------------- busy fraction and overlap


class InferTimer:
    """Wraps ``labeler.infer`` (as an instance attribute) and adds up its synchronised seconds."""

    def __init__(self, labeler: Labeler) -> None:
        self.labeler, self.inner, self.seconds = labeler, labeler.infer, 0.0

    def __call__(self, requests: Sequence[LabelRequest]) -> list[Any]:
        t0 = time.perf_counter()
        out = self.inner(requests)
        synchronize(self.labeler.clip.model.logit_scale.device)
        self.seconds += time.perf_counter() - t0
        return out

    @contextmanager
    def installed(self) -> Iterator[InferTimer]:
        self.labeler.infer = self  # type: ignore[method-assign]
        try:
            yield self
        finally:
            del self.labeler.infer  # back to the class's method


def synthetic_shard(blobs: Sequence[bytes], tags: Sequence[int], root: str) -> Shard:
    """A shard whose records point at ``blobs`` written under the fsspec ``root``."""
    fs = fsspec.filesystem("memory")
    records = []
    for i, blob in enumerate(blobs):
        uri = f"{root}/img/{i:05d}.jpg"
        fs.pipe(uri, blob)
        records.append({"id": f"s{i:05d}", "uri": uri, "tags": list(tags)})
    return Shard("00000-bench", tuple(records))


def serial_shard(labeler: Labeler, shard: Shard, store: Store) -> None:
    """The shard with nothing overlapped: read, decode, segment, infer, finish, write in turn."""
    fs = fsspec.filesystem("memory")
    results = []
    for chunk in _batches(shard.records, labeler.config.batch_size):
        requests = []
        for rec in chunk:
            image = decode_image(fs.cat(rec["uri"]))
            requests.append(
                LabelRequest(rec["id"], image, tuple(rec["tags"]), refine.superpixels(image, labeler.config.refine))
            )
        results += [labeler.finish(w) for w in labeler.infer(requests)]
    commit.write_shard(store, shard.shard_id, results, [], list(labeler.categories.values()), FINGERPRINT)


def gil_share(fn: Callable[[], object], seconds: float = 1.0) -> float:
    """Speed of a pure-Python loop while ``fn`` runs in a loop on another thread, over its speed
    alone: near 1 when ``fn`` releases the GIL (threads can then run it on other cores), near 0.5
    or below when it holds it."""

    def spin() -> int:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += 1
        return n

    alone, stop = spin(), threading.Event()

    def work() -> None:
        while not stop.is_set():
            fn()

    thread = threading.Thread(target=work)
    thread.start()
    time.sleep(0.1)
    beside = spin()
    stop.set()
    thread.join()
    return beside / alone


def _shard_pass(labeler: Labeler, shard: Shard, overlapped: bool, io_threads: int) -> tuple[float, float]:
    """(wall seconds, seconds inside ``infer``) of one pass over ``shard``."""
    store = Store.open("memory://bench-busy-out")
    with InferTimer(labeler).installed() as timer:
        t0 = time.perf_counter()
        if overlapped:
            label_shard(labeler, store, shard, FINGERPRINT, io_threads=io_threads)
        else:
            serial_shard(labeler, shard, store)
        wall = time.perf_counter() - t0
    fsspec.filesystem("memory").rm("memory://bench-busy-out", recursive=True)
    return wall, timer.seconds


def busy_fraction(labeler: Labeler, blobs: Sequence[bytes], io_threads: int = 4, repeats: int = 1,
                  gil_seconds: float = 1.0) -> dict[str, float]:  # fmt: skip
    """``label_shard`` on a synthetic shard: share of wall time in ``infer`` (the GPU's part),
    and throughput against the same shard done serially; passes interleaved, medians."""
    root = "memory://bench-busy"
    shard = synthetic_shard(blobs, tuple(labeler.categories), root)
    labeler.label([LabelRequest("warm", decode_image(blobs[0]), tuple(labeler.categories))])
    passes: dict[str, list[tuple[float, float]]] = {"overlapped": [], "serial": []}
    for _ in range(max(1, repeats)):
        for mode in passes:
            passes[mode].append(_shard_pass(labeler, shard, mode == "overlapped", io_threads))
    fsspec.filesystem("memory").rm(root, recursive=True)
    out = {}
    for mode, runs in passes.items():
        out[f"{mode}_images_per_s"] = statistics.median(len(blobs) / wall for wall, _ in runs)
        out[f"{mode}_busy_fraction"] = statistics.median(busy / wall for wall, busy in runs)
    out["overlap_speedup"] = out["overlapped_images_per_s"] / out["serial_images_per_s"]
    image = decode_image(blobs[0])
    out["python_speed_beside_superpixels"] = gil_share(
        lambda: refine.superpixels(image, labeler.config.refine), gil_seconds
    )
    return out


class SimulatedGPU:
    """Stands in for ``labeler.infer``: sleeps ``ms_per_image`` per image (a sleep releases the
    GIL, as waiting on a CUDA stream does) and returns that image's precomputed model output, so
    ``label_shard``'s CPU stages run exactly as beside a GPU of that speed."""

    def __init__(self, labeler: Labeler, shard: Shard, ms_per_image: float) -> None:
        fs = fsspec.filesystem("memory")
        requests = [LabelRequest(r["id"], decode_image(fs.cat(r["uri"])), tuple(r["tags"])) for r in shard.records]
        self.labeler, self.ms, self.busy = labeler, ms_per_image, 0.0
        self.work = {w.request.image_id: w for w in labeler.infer(requests)}

    def __call__(self, requests: Sequence[LabelRequest]) -> list[Any]:
        seconds = self.ms * len(requests) / 1e3
        time.sleep(seconds)
        self.busy += seconds
        return [dataclasses.replace(self.work[r.image_id], request=r, timings={}) for r in requests]

    def rate(self, shard: Shard, io_threads: int) -> dict[str, float]:
        """images/s of ``label_shard`` with this stand-in, and the stand-in's busy fraction."""
        self.busy = 0.0
        store = Store.open("memory://bench-sim-out")
        self.labeler.infer = self  # type: ignore[method-assign]
        try:
            t0 = time.perf_counter()
            label_shard(self.labeler, store, shard, FINGERPRINT, io_threads=io_threads)
            wall = time.perf_counter() - t0
        finally:
            del self.labeler.infer
        fsspec.filesystem("memory").rm("memory://bench-sim-out", recursive=True)
        return {"gpu_ms_per_image": self.ms, "io_threads": io_threads, "images_per_s": len(shard.records) / wall,
                "gpu_busy_fraction": self.busy / wall}  # fmt: skip


def simulated_rows(labeler: Labeler, blobs: Sequence[bytes], io_threads: Sequence[int],
                   gpu_ms: Sequence[float]) -> list[dict[str, float]]:  # fmt: skip
    """``label_shard``'s throughput beside a simulated GPU of each speed, per reader thread count."""
    shard = synthetic_shard(blobs, tuple(labeler.categories), "memory://bench-sim")
    sim = SimulatedGPU(labeler, shard, 0.0)
    rows = []
    for ms in gpu_ms:
        sim.ms = ms
        rows += [sim.rate(shard, n) for n in io_threads]
    fsspec.filesystem("memory").rm("memory://bench-sim", recursive=True)
    return rows


# ---------------------------------------------------------------- speed work, one run each


def old_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The capture processor's scores before the change: the scale applied to the [B, n, n] result."""
    return torch.bmm(q, k.transpose(1, 2)) * scale


def old_normalize(m: torch.Tensor, thr: float) -> torch.Tensor:
    """normalize_attention before the change: compare, then masked_fill (two passes)."""
    m = m / (m.amax(dim=-2, keepdim=True) + 1e-5)
    m.masked_fill_(m < thr, 0.0)
    return m.div_(m.sum(dim=-1, keepdim=True) + 1e-5)


def wall(fn: Callable[[], object], device: torch.device | str) -> Callable[[], float]:
    """A timer: runs ``fn`` and returns its synchronised wall seconds."""

    def run() -> float:
        t0 = synced_clock(device)
        fn()
        return synced_clock(device) - t0

    return run


def interleaved(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Seconds of every timer over ``repeats`` rounds, each round running every timer once, so a
    load that drifts during the run falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(max(1, repeats)):
        for name, timer in timers.items():
            times[name].append(timer())
    return times


def ab_row(change: str, times: dict[str, list[float]], old: str, new: str, predicted: str,
           same: bool | None = None) -> dict[str, Any]:  # fmt: skip
    """Before/after medians and the median of the per-round ratios old / new."""
    ratios = [o / n for o, n in zip(times[old], times[new], strict=True)]
    return {"change": change, "before_ms": statistics.median(times[old]) * 1e3,
            "after_ms": statistics.median(times[new]) * 1e3, "speedup": statistics.median(ratios),
            "predicted": predicted, "identical": same}  # fmt: skip


def _ab(name: str, old: Callable[[], Any], new: Callable[[], Any], repeats: int, device: str, predicted: str,
        same: bool | None = None) -> dict[str, Any]:  # fmt: skip
    times = interleaved({"old": wall(old, device), "new": wall(new, device)}, repeats)
    return ab_row(name, times, "old", "new", predicted, same)


def _unet_inputs(sd: compensation.SDModels, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, timestep, context) for one plain UNet pass on ``pixels``."""
    device, dtype = sd.unet.device, sd.unet.dtype
    with torch.no_grad():
        lat = sd.vae.encode(pixels.to(device, sd.vae.dtype)).latent_dist.mean * sd.vae.config.scaling_factor
    t = torch.tensor(981, device=device)
    context = sd.empty_embedding.to(device, dtype).expand(pixels.shape[0], -1, -1)
    return lat.to(dtype), t, context


@contextmanager
def explicit_attention(unet: torch.nn.Module, keep: Sequence[str]) -> Iterator[None]:
    """Every attention layer of ``unet`` but ``keep`` on diffusers' explicit ``AttnProcessor``."""
    from diffusers.models.attention_processor import AttnProcessor

    layers = {n: m for n, m in unet.named_modules() if hasattr(m, "set_processor") and n not in keep}
    previous = {n: m.processor for n, m in layers.items()}
    try:
        for m in layers.values():
            m.set_processor(AttnProcessor())
        yield
    finally:
        for n, m in layers.items():
            m.set_processor(previous[n])


def uncaptured_processors(sd: compensation.SDModels, layers: Sequence[str]) -> dict[str, int]:
    """Processor class names (with counts) of the UNet's attention layers that are not captured."""
    names: dict[str, int] = {}
    for n, m in sd.unet.named_modules():
        if hasattr(m, "set_processor") and n not in layers:
            names[type(m.processor).__name__] = names.get(type(m.processor).__name__, 0) + 1
    return names


class _Stopped(Exception):
    pass


@contextmanager
def stop_after(unet: torch.nn.Module, layers: Sequence[str]) -> Iterator[None]:
    """Forward hooks that stop ``unet`` (raising ``_Stopped``) once every one of ``layers`` ran,
    without touching their processors: the early stop alone, with nothing captured."""
    modules, seen = dict(unet.named_modules()), set()

    def hook(name: str) -> Callable[..., None]:
        def fire(*_: Any) -> None:
            seen.add(name)
            if len(seen) == len(layers):
                seen.clear()
                raise _Stopped

        return fire

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _unet_pass(sd: compensation.SDModels, inputs: tuple[torch.Tensor, ...]) -> None:
    noisy, t, context = inputs
    with suppress(_Stopped):
        sd.unet(noisy, t, encoder_hidden_states=context)


def capture_unet_timer(sd: compensation.SDModels, px: torch.Tensor, layers: Sequence[str],
                       explicit: bool = False) -> Callable[[], float]:  # fmt: skip
    """A timer of the UNet part of ``capture_attention`` (noise, pass, captured maps), with the
    uncaptured layers on diffusers' explicit processor when ``explicit``."""
    device = sd.unet.device

    def run() -> float:
        split: dict[str, float] = {}
        with explicit_attention(sd.unet, layers) if explicit else nullcontext():
            compensation.capture_attention(sd, px, ["x"], layers, timings=split, clock=lambda: synced_clock(device))
        return split["unet_capture"]

    return run


def speedwork_unet(models: Models, cfg: Config, repeats: int) -> list[dict[str, Any]]:
    """The UNet stopped after the captured layers vs a full pass (both SDPA, nothing captured);
    the captured maps' own cost; SDPA vs explicit attention on the uncaptured layers."""
    sd, layers = models.sd, cfg.cliper.sd_layers
    device = str(sd.unet.device)
    px = compensation.sd_pixels(decode_image(synthetic_jpeg(0)))[None]
    inputs = _unet_inputs(sd, px)

    def stopped() -> None:
        with stop_after(sd.unet, layers):
            _unet_pass(sd, inputs)

    with torch.no_grad():
        full_f, stopped_f = count_flops(lambda: _unet_pass(sd, inputs)), count_flops(stopped)
        times = interleaved({
            "full": wall(lambda: _unet_pass(sd, inputs), device), "stopped": wall(stopped, device),
            "capture": capture_unet_timer(sd, px, layers), "explicit": capture_unet_timer(sd, px, layers, True),
        }, repeats)  # fmt: skip
    return [
        ab_row("UNet stopped once the captured layers ran (vs full pass; both SDPA, no capture)", times, "full",
               "stopped", f"FLOPs {full_f / 1e9:.4g} -> {stopped_f / 1e9:.4g} G: x{full_f / stopped_f:.3f}"),
        ab_row("(cost, not a change) explicit maps + noise in the captured pass vs the stopped pass", times,
               "capture", "stopped", "2 layers' [heads, n, n] scores and softmax in float32"),
        ab_row("SDPA kept on uncaptured attention layers (vs explicit AttnProcessor); UNet part", times, "explicit",
               "capture", "same FLOPs; no [heads, n, n] probabilities in memory (GPU: bytes, not FLOPs)"),
    ]  # fmt: skip


def speedwork_kernels(heads: int, n: int, head_dim: int, repeats: int, device: str) -> list[dict[str, Any]]:
    """The three exact changes to the capture and compensation tensors, old vs new, on one image's
    shapes; each also checked for bitwise equality."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(heads, n, head_dim, generator=g).to(device) for _ in range(2))
    scale = head_dim**-0.5
    maps = random_maps(2, heads, n, device=device)
    same_scores = torch.equal(old_scores(q, k, scale), compensation.scaled_scores(q, k, scale))
    new_chain = compensation.attention_chain([maps[0], maps[1]], 0.1)
    same_norm = all(torch.equal(old_normalize(m, 0.1), c) for m, c in zip(maps.flatten(0, 1), new_chain, strict=True))
    stacked = compensation.attention_chain(torch.stack([maps[0], maps[1]]), 0.1)
    same_stack = all(torch.equal(a, b) for a, b in zip(stacked, new_chain, strict=True))
    del new_chain, stacked
    folded = math.frexp(scale)[0] == 0.5
    return [
        _ab(f"softmax scale folded into q (scale {scale:.4g}: {'a power of two, folded' if folded else 'not folded'})",
            lambda: old_scores(q, k, scale), lambda: compensation.scaled_scores(q, k, scale), repeats, device,
            "passes over the [heads, n, n] scores 3 -> 1: up to x3 where memory-bound, less where the bmm "
            "dominates" if folded else "x1 (unchanged path)", same_scores),
        _ab("threshold in one pass (F.threshold) instead of compare + masked_fill",
            lambda: [old_normalize(m, 0.1) for m in maps.flatten(0, 1)],
            lambda: compensation.attention_chain(maps, 0.1), repeats, device,
            "passes over each n x n map 9.5 -> 8: x1.19 where memory-bound", same_norm),
        _ab("no stacked [layers, heads, n, n] copy before the chain",
            lambda: compensation.attention_chain(torch.stack([maps[0], maps[1]]), 0.1),
            lambda: compensation.attention_chain([maps[0], maps[1]], 0.1), repeats, device,
            "passes over each map 10 -> 8: x1.25 where memory-bound", same_stack),
    ]  # fmt: skip


def speedwork_text(labeler: Labeler, repeats: int) -> dict[str, Any]:
    """Model stages of one image with the text embeddings cached (the labeler's way) against the
    same plus what an uncached labeler adds: every tag's templates and the background classes
    through the text encoder."""
    cfg, clip, n_tags = labeler.config.cliper, labeler.clip, len(labeler.categories)
    device = clip.model.logit_scale.device
    prompts = [c.prompt for c in labeler.categories.values()] + list(background_classes(cfg.background))
    tokens = [clip.tokenizer([t.format(p) for t in templates(cfg.templates)]).to(device) for p in prompts]

    def encode_all() -> None:
        with torch.no_grad():
            for tok in tokens:
                clip.model.encode_text(tok)

    req = LabelRequest("t", decode_image(synthetic_jpeg(0)), tuple(labeler.categories))
    labeler.infer([req])  # warm: the tags' own text embeddings are made here, not counted below
    same = text_cache_identical(labeler, req)
    image_flops = count_flops(lambda: labeler.infer([req]))
    text_flops = count_flops(encode_all)
    cached = median_seconds(lambda: labeler.infer([req]), repeats, device)
    text = median_seconds(encode_all, 1, device)  # one run: long at full size
    return {"change": f"text embeddings cached ({n_tags} tags + {len(prompts) - n_tags} background classes "
                      f"x {len(templates(cfg.templates))} templates encoded once, not per image)",
            "before_ms": (cached + text) * 1e3, "after_ms": cached * 1e3, "speedup": (cached + text) / cached,
            "predicted": f"FLOPs {(image_flops + text_flops) / 1e9:.4g} -> {image_flops / 1e9:.4g} G: "
                         f"x{(image_flops + text_flops) / image_flops:.3f}",
            "identical": same}  # fmt: skip


def text_cache_identical(labeler: Labeler, req: LabelRequest) -> bool:
    """Whether ``req`` labelled by ``labeler`` (its text cache already used by an earlier image)
    gives byte-identical arrays to a new labeler that encodes every prompt afresh."""
    other = LabelRequest("t-warm", decode_image(synthetic_jpeg(1)), req.tags)
    cached = labeler.label([other, req])[1]
    fresh = Labeler(labeler.clip, labeler.sd, labeler.config, list(labeler.categories.values())).label([req])[0]
    return all(np.array_equal(getattr(cached, name), getattr(fresh, name))
               for name in ("label_map", "coarse", "compensated", "coarse_scores", "final_scores",
                            "decision"))  # fmt: skip


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


# ---------------------------------------------------------------- FLOPs and bytes


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls and convolutions ``fn`` runs (torch FlopCounterMode; a multiply-add
    counts 2; elementwise ops, norms and softmax are not counted)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def n_params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def model_flops(models: Models, n_tags: int) -> dict[str, int]:
    """FLOPs per image (batch 1, a 500 x 375 input) of each model stage, as they run in the labeler."""
    clip, sd = models.clip, models.sd
    cfg = preset_config(models)
    image = decode_image(synthetic_jpeg(0))
    device, dtype = clip.model.logit_scale.device, clip.model.visual.conv1.weight.dtype
    pixels = cliper.clip_input(image, clip.patch_size, clip.mean, clip.std, cfg.cliper.short_side)[None]
    pixels = pixels.to(device, dtype)
    px = compensation.sd_pixels(image)[None]
    noisy, t, context = _unet_inputs(sd, px)
    capture = count_flops(lambda: compensation.capture_attention(sd, px, ["x"], cfg.cliper.sd_layers))
    vae = count_flops(lambda: sd.vae.encode(px.to(sd.vae.device, sd.vae.dtype)))
    maps = random_maps(len(cfg.cliper.sd_layers), _captured_heads(sd, cfg), 64 * 64)
    chain = compensation.attention_chain(maps, 0.1)
    return {
        "clip_coarse": count_flops(lambda: cliper.early_layer_fusion(clip.model.visual, pixels)),
        "vae_encode": vae,
        "unet_capture": capture - vae,
        "unet_full_pass": count_flops(lambda: sd.unet(noisy, t, encoder_hidden_states=context)),
        "compensation": count_flops(lambda: compensation.compensate(chain, torch.rand(n_tags, 21, 28))),
    }  # fmt: skip


def _captured_heads(sd: compensation.SDModels, cfg: Config) -> int:
    modules = dict(sd.unet.named_modules())
    return int(modules[cfg.cliper.sd_layers[0]].heads)


def byte_counts(models: Models) -> dict[str, float]:
    """Weights read per batch (bf16 and fp32) and the attention maps' bytes per image."""
    cfg = preset_config(models)
    heads = _captured_heads(models.sd, cfg)
    n = 64 * 64
    vae = n_params(models.sd.vae.encoder) + n_params(models.sd.vae.quant_conv)
    params = n_params(models.clip.model.visual) + vae + n_params(models.sd.unet)
    maps = len(cfg.cliper.sd_layers) * heads * n * n * 4
    return {
        "params": params, "weights_bytes_bf16": 2 * params, "weights_bytes_fp32": 4 * params,
        "attention_maps_bytes": maps,
        # reads+writes of each n x n map: capture (bmm write, softmax read+write) 3, normalisation
        # 8, the chain's matvec 1 (after the speed work; 5 + 12.5 before)
        "capture_traffic_bytes": 3 * maps, "compensation_traffic_bytes": 9 * maps,
        "compensation_traffic_bytes_before": 12.5 * maps, "capture_traffic_bytes_before": 5 * maps,
    }  # fmt: skip


def ceilings(flops: dict[str, int], nbytes: dict[str, float]) -> dict[str, float]:
    """H100 images/s bounds: FLOP-bound per precision; what the goal needs; compensation's
    memory-bound time against the FLOP-bound time of the rest."""
    per_image = flops["clip_coarse"] + flops["vae_encode"] + flops["unet_capture"] + flops["compensation"]
    out: dict[str, float] = {"flops_per_image": per_image}
    for prec in ("bf16", "tf32", "fp32"):
        out[f"ceiling_{prec}_images_per_s"] = H100[f"{prec}_tflops"] * 1e12 / per_image
        out[f"goal_needs_{prec}_utilisation"] = GOAL_IMAGES_PER_S * per_image / (H100[f"{prec}_tflops"] * 1e12)
    bw = H100["hbm_tb_s"] * 1e12
    out["compensation_ms_at_hbm"] = nbytes["compensation_traffic_bytes"] / bw * 1e3
    out["compensation_ms_at_hbm_before"] = nbytes["compensation_traffic_bytes_before"] / bw * 1e3
    out["capture_maps_ms_at_hbm"] = nbytes["capture_traffic_bytes"] / bw * 1e3
    out["goal_ms_per_image"] = 1e3 / GOAL_IMAGES_PER_S
    out["compensation_share_at_goal"] = out["compensation_ms_at_hbm"] / out["goal_ms_per_image"]
    # At the BF16 FLOP ceiling, with the maps' traffic at full HBM bandwidth beside it.
    flop_ms = per_image / (H100["bf16_tflops"] * 1e12) * 1e3
    gpu_ms = flop_ms + out["compensation_ms_at_hbm"] + out["capture_maps_ms_at_hbm"]
    out["bf16_bound_ms_per_image"] = gpu_ms
    out["bf16_bound_images_per_s"] = 1e3 / gpu_ms
    out["compensation_share_at_bf16_bound"] = out["compensation_ms_at_hbm"] / gpu_ms
    return out


# ---------------------------------------------------------------- printing


def print_rows(title: str, rows: Sequence[dict[str, Any]]) -> None:
    """A list of flat dicts as a markdown table."""
    print(f"\n### {title}\n")
    if not rows:
        print("(nothing to compare)")
        return
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.4e}"
    return str(v)


def print_flops(flops: dict[str, int], nbytes: dict[str, float], ceil: dict[str, float]) -> None:
    print_rows("FLOPs per image (FlopCounterMode, batch 1, 500 x 375 input)",
               [{"stage": k, "GFLOP": v / 1e9} for k, v in flops.items()])  # fmt: skip
    rows = [{"quantity": "parameters read per batch (millions)", "value": nbytes["params"] / 1e6}]
    rows += [{"quantity": f"{k} (MB)", "value": v / 1e6} for k, v in nbytes.items() if k != "params"]
    print_rows("Bytes (weights per batch; maps and their estimated traffic per image)", rows)
    print_rows(f"H100 bounds (NVIDIA H100 SXM datasheet, dense: {H100})",
               [{"quantity": k, "value": v} for k, v in ceil.items()])  # fmt: skip


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--images", type=int, default=8, help="images per stage run and in the busy shard")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--tags", type=int, default=2, help="tags per image")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement (the median is reported)")
    p.add_argument("--compare", default=",".join(SECTIONS), help=f"sections, from {','.join(SECTIONS)}")
    p.add_argument("--io-threads", type=int, default=4, help="label_shard's reader threads in the busy section")
    p.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA: float32 matmuls on TF32 tensor cores (convolutions already are, by PyTorch's default)",
    )
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    p.add_argument(
        "--method",
        choices=sorted(set(methods.REGISTRY) - {"cliper"}),
        help="also time this method against CLIPer (the methods section)",
    )
    args = p.parse_args(argv)
    if args.method and "--compare" not in " ".join(argv if argv is not None else sys.argv):
        args.compare = "methods"
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.compare = set(args.compare.split(","))
    unknown = (args.compare - set(SECTIONS) - {"methods"}) | (set(args.dtypes) - set(DTYPES))
    if unknown:
        p.error(f"unknown section or dtype: {sorted(unknown)}")
    if args.compare != {"methods"} and args.images < max(args.batch_sizes):
        p.error(f"--images {args.images} is less than the largest batch size {max(args.batch_sizes)}")
    return args


def header(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")  # fmt: skip
    tf32 = {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_conv": torch.backends.cudnn.allow_tf32}
    return {"size": args.size, "clip": SIZES[args.size][0], "sd": SIZES[args.size][1], "device": name,
            "images": args.images, "tags": args.tags, "repeats": args.repeats, "torch": torch.__version__,
            **tf32}  # fmt: skip


class LabelerCache:
    """One labeler per dtype, built on first use (construction embeds the background classes)."""

    def __init__(self, base: Models, n_tags: int) -> None:
        self.base, self.n_tags = base, n_tags
        self.labelers: dict[str, Labeler] = {}

    def get(self, dtype: str = "float32") -> Labeler:
        if dtype not in self.labelers:
            self.labelers[dtype] = make_labeler(cast_models(self.base, dtype), 1, self.n_tags)
        return self.labelers[dtype]


def section_stages(args: argparse.Namespace, labelers: LabelerCache, blobs: list[bytes], out: dict[str, Any]) -> None:
    chosen = [labelers.get(dtype) for dtype in args.dtypes]
    runs = run_stages(chosen, args.batch_sizes, blobs, args.repeats, log=lambda m: print(m, flush=True))
    print("\n### Stages: median ms/image\n\n" + "\n".join(stage_table(runs)))
    out["stages"] = [r.summary() for r in runs]
    if "batch" in args.compare:
        out["batch"] = batch_rows(runs)
        print_rows("Batch size: images/s over the smallest batch, label-map agreement with it", out["batch"])
    if "dtype" in args.compare:
        out["dtype"] = dtype_rows(runs)
        print_rows("Dtype: images/s over float32, fraction of label-map pixels equal to float32's", out["dtype"])


def section_speedwork(args: argparse.Namespace, labelers: LabelerCache, out: dict[str, Any]) -> None:
    base = labelers.base
    cfg = preset_config(base)
    heads = _captured_heads(base.sd, cfg)
    attn = dict(base.sd.unet.named_modules())[cfg.cliper.sd_layers[0]]
    rows = speedwork_unet(base, cfg, args.repeats)
    rows += speedwork_kernels(heads, 64 * 64, attn.inner_dim // heads, args.repeats, args.device)
    rows.append(speedwork_text(labelers.get(), args.repeats))
    out["speedwork"] = rows
    out["uncaptured_processors"] = uncaptured_processors(base.sd, cfg.cliper.sd_layers)
    print_rows("Speed work, each change measured before/after in this run", rows)
    print(f"\nprocessors of the uncaptured UNet attention layers: {out['uncaptured_processors']}")


def section_busy(args: argparse.Namespace, labelers: LabelerCache, blobs: list[bytes], out: dict[str, Any]) -> None:
    labeler = with_batch_size(labelers.get(args.dtypes[0]), args.batch_sizes[0])
    out["busy"] = busy_fraction(labeler, blobs, args.io_threads, args.repeats)
    print_rows(f"Busy fraction (label_shard, {args.dtypes[0]}, batch {args.batch_sizes[0]}, "
               f"{args.io_threads} io threads)", [out["busy"]])  # fmt: skip
    threads = sorted({1, 2, args.io_threads})
    out["simulated_gpu"] = simulated_rows(labeler, blobs, threads, (0.0, 1e3 / GOAL_IMAGES_PER_S))
    print_rows("label_shard beside a simulated GPU (0 ms: the CPU side's own limit)", out["simulated_gpu"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out: dict[str, Any] = {"header": header(args), "command": "python jobs/benchmark.py " + " ".join(
        sys.argv[1:] if argv is None else argv)}  # fmt: skip
    print(json.dumps(out["header"]))
    base = build_models(args.size, args.device)
    labelers = LabelerCache(base, args.tags)
    blobs = [synthetic_jpeg(i) for i in range(args.images)]
    if args.compare & {"stages", "batch", "dtype"}:
        section_stages(args, labelers, blobs, out)
    if "chain" in args.compare:
        heads = _captured_heads(base.sd, preset_config(base))
        out["chain"] = chain_comparison(64, 2, heads, args.tags, args.repeats, args.device)
        print_rows("Compensation: right to left vs forming the n x n chain product first", [out["chain"]])
    if "busy" in args.compare:
        section_busy(args, labelers, blobs, out)
    if "speedwork" in args.compare:
        section_speedwork(args, labelers, out)
    if "methods" in args.compare and args.method:
        out["methods"] = method_rows(base, args.method, blobs, args.tags, args.repeats)
        print_rows(f"{args.method} against CLIPer: ms/image, same models and images, each under its own preset",
                   out["methods"])  # fmt: skip
    if "flops" in args.compare:
        flops, nbytes = model_flops(base, args.tags), byte_counts(base)
        out["flops"], out["bytes"], out["ceilings"] = flops, nbytes, ceilings(flops, nbytes)
        print_flops(flops, nbytes, out["ceilings"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
