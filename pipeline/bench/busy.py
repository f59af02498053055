"""A whole shard through ``shards.label_shard``: the GPU's busy fraction, the same shard with nothing
overlapped, and label_shard beside a simulated GPU."""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import fsspec

from pipeline import refine, shards
from pipeline.bench.common import FINGERPRINT, synchronize
from pipeline.decode import decode_image
from pipeline.labeler import Labeler
from pipeline.manifest import Shard
from pipeline.shards import label_shard
from pipeline.storage import commit
from pipeline.storage.store import Store
from pipeline.types import LabelRequest

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
    """The shard with nothing overlapped: read, decode, segment, infer, finish, write in turn.
    Reading, decoding and segmenting are ``label_shard``'s own steps (``shards._request``), and so
    is the batching, so the two passes differ only in what overlaps."""
    results = []
    for chunk in shards._batches(shard.records, labeler.config.batch_size):
        loaded = [shards._request(rec, labeler.config, labeler.config.max_pixels, {}) for rec in chunk]
        requests = [r for r in loaded if isinstance(r, LabelRequest)]
        if len(requests) != len(loaded):
            raise ValueError(f"shard {shard.shard_id}: an image of the benchmark's own shard failed to load")
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


