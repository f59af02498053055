"""The only module that talks to Ray: labeling actors and the driver loop that feeds them shards.

Each actor loads CLIP and SD once (one GPU each, ``num_gpus=1``; CPU actors where the cluster has
no GPU) and labels whole shards through ``pipeline.shards.label_shard``. The driver keeps a few
shards in flight per actor, skips committed shards, replaces actors that die and retries their
shard elsewhere, and stops early when too many images fail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from pipeline import methods, redact, storage
from pipeline.config import Config, build_config
from pipeline.labeler import Category, Labeler
from pipeline.manifest import Shard
from pipeline.models import load_models
from pipeline.shards import label_shard

log = logging.getLogger(__name__)


class _LabelActor:
    def __init__(self, config: dict[str, Any], categories: list[Category], output: str,
                 storage_options: dict[str, Any], model_fingerprint: dict[str, Any] | None = None) -> None:  # fmt: skip
        redact.install(redact.secret_values(storage_options))
        cfg = build_config(config["preset"], config)
        # The driver pinned hub revisions in ``config``; what this node loads must match its fingerprint.
        clip, sd = load_models(cfg.model, expected=model_fingerprint, storage_options=storage_options,
                               need_sd=methods.needs_sd(cfg))  # fmt: skip
        self.labeler = Labeler(clip, sd, cfg, categories)
        self.store = storage.Store.open(output, **storage_options)
        self.storage_options = storage_options

    def label(self, shard: Shard, fingerprint: str) -> dict[str, Any]:
        # A retried shard may have committed just before its actor died: never commit it twice.
        marker = storage.read_marker(self.store, shard.shard_id)
        if marker is None or marker["fingerprint"] != fingerprint:
            marker = label_shard(self.labeler, self.store, shard, fingerprint, storage_options=self.storage_options)
        return marker["counts"]


@dataclass
class RunSummary:
    shards_done: int = 0
    shards_skipped: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    images: int = 0
    images_failed: int = 0
    actor_restarts: int = 0
    stopped_early: str | None = None
    seconds: float = 0.0
    committed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunOptions:
    num_actors: int | None = None  # default: one per GPU, else one
    max_attempts: int = 3
    max_failure_rate: float = 0.9  # stop when this share of images fails (after min_images)
    min_images: int = 20
    storage_options: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: dict[str, Any] | None = None  # the driver's; each actor checks its weights against it


def _actor_class(use_gpu: bool) -> Any:
    return ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, max_restarts=0)(_LabelActor)


def _num_actors(options: RunOptions) -> tuple[int, bool]:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if options.num_actors:
        return options.num_actors, gpus > 0
    return max(gpus, 1), gpus > 0


def run(config: Config, categories: list[Category], shards: Iterable[Shard], output: str, fingerprint: str,
        options: RunOptions, progress: Callable[[RunSummary], None] | None = None) -> RunSummary:  # fmt: skip
    """Label every uncommitted shard of ``shards`` under ``output``; returns what happened."""
    if not ray.is_initialized():
        ray.init()  # under `ray job submit` this joins the cluster; alone it starts a local one
    store = storage.Store.open(output, **options.storage_options)
    n, use_gpu = _num_actors(options)
    cls = _actor_class(use_gpu)
    args = (config.to_dict(), categories, output, options.storage_options, options.model_fingerprint)
    actors = [cls.remote(*args) for _ in range(n)]
    summary, start = RunSummary(), time.perf_counter()
    pending: dict[Any, tuple[Shard, int, int, Any]] = {}  # future -> (shard, actor slot, attempt, actor)
    queue = iter(shards)
    retry: list[tuple[Shard, int]] = []

    def submit(slot: int) -> bool:
        while True:
            if retry:
                shard, attempt = retry.pop()
            else:
                shard = next(queue, None)  # type: ignore[arg-type]
                if shard is None:
                    return False
                attempt = 1
                if storage.is_committed(store, shard.shard_id, fingerprint):
                    summary.shards_skipped += 1
                    summary.committed.append(shard.shard_id)
                    continue
            pending[actors[slot].label.remote(shard, fingerprint)] = (shard, slot, attempt, actors[slot])
            return True

    for slot in range(n):
        for _ in range(2):  # two shards queued per actor: the next is ready when one finishes
            submit(slot)
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        shard, slot, attempt, actor = pending.pop(done)
        try:
            counts = ray.get(done)
        except (RayActorError, RayTaskError) as err:
            if isinstance(err, RayActorError) and actors[slot] is actor:  # its other shards fail too
                summary.actor_restarts += 1
                ray.kill(actor, no_restart=True)
                actors[slot] = cls.remote(*args)
            if attempt < options.max_attempts:
                log.warning("shard %s failed (attempt %d): %s; retrying", shard.shard_id, attempt, err)
                retry.append((shard, attempt + 1))
            else:
                message = redact.redact(str(err), redact.secret_values(options.storage_options))
                summary.shards_failed[shard.shard_id] = message.strip().splitlines()[-1][:500]
        else:
            summary.shards_done += 1
            summary.committed.append(shard.shard_id)
            summary.images += counts["images"]
            summary.images_failed += counts["failed"]
        summary.seconds = time.perf_counter() - start
        if progress:
            progress(summary)
        rate = summary.images_failed / summary.images if summary.images else 0.0
        if summary.images >= options.min_images and rate > options.max_failure_rate:
            summary.stopped_early = (
                f"{rate:.0%} of {summary.images} images failed (limit {options.max_failure_rate:.0%})"
            )
            for actor in actors:  # in-flight shards stop uncommitted; a rerun redoes them
                ray.kill(actor, no_restart=True)
            break
        submit(slot)
    summary.seconds = time.perf_counter() - start
    return summary


def map_tasks(fn: Callable[..., Any], items: list[tuple[Any, ...]], shared: tuple[Any, ...] = ()) -> list[Any]:
    """``[fn(*item, *shared) for item in items]`` as one Ray task per item (results in order);
    ``shared`` arguments go to the object store once. Joins a cluster or starts a local Ray."""
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    task = ray.remote(fn)
    refs = [ray.put(x) for x in shared]
    return ray.get([task.remote(*item, *refs) for item in items])
