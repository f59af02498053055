"""The only module that talks to Ray: labeling actors and the driver loop that feeds them shards.

Each actor loads CLIP and SD once (one GPU each, ``num_gpus=1``; CPU actors where the cluster has
no GPU) and labels whole shards through ``pipeline.shards.label_shard``. The driver keeps two
shards in flight per actor and skips committed shards. Its decisions are made by ``_Driver``,
which sees Ray only through a small backend (``_RayBackend``), so tests drive it with fakes:

- deadline: the shard an actor is working on must finish within ``shard_deadline`` (a floor, or
  ``shard_timeout_factor`` x its images x the slowest seconds per image seen so far; an actor's
  first shard also gets ``startup_timeout_s`` for loading the models). Past it, the actor is
  killed and replaced and the shard retried: a stuck read or a deadlocked CUDA call cannot stall
  the run.
- an actor whose constructor fails (weights missing on a worker, OOM at load) is re-created at
  most ``max_actor_start_failures`` times in all; then the run stops with the actor's error.
- an actor that died, timed out, ran out of memory, or failed ``replace_after_errors`` shards in
  a row is replaced, not retried in place; its other queued shards move to the new actor without
  losing an attempt.
- out of memory (``torch.cuda.OutOfMemoryError``, "out of memory") retries the shard with half
  the batch, down to 1, before it counts as a failed attempt. For a method that is not
  batch-invariant (``Method.batch_invariant``; CLIPer) a smaller batch can change label pixels
  (batched float sums round differently), so it is reported in the run summary.
- retries wait ``backoff_s`` (exponential, capped, jitter derived from the shard id: the same
  run waits the same).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray.exceptions import RayActorError, RayTaskError

from pipeline import malloc, methods, redact
from pipeline.config import Config
from pipeline.labeler import Labeler
from pipeline.manifest import Shard
from pipeline.models import load_models
from pipeline.retry import RetryPolicy
from pipeline.shards import label_shard
from pipeline.storage import commit
from pipeline.storage.store import Store
from pipeline.types import Category

log = logging.getLogger(__name__)
DEFAULT_IO_THREADS = 4  # reader threads when an actor is built without a CPU count (tests)


class _LabelActor:
    def __init__(self, config: Config, categories: list[Category], output: str,
                 storage_options: dict[str, Any], threads: int | None = None,
                 model_fingerprint: dict[str, Any] | None = None,
                 storage_retry: RetryPolicy | None = None, io_threads: int | None = None) -> None:  # fmt: skip
        redact.install(redact.secret_values(storage_options))
        _set_threads(threads)
        if not malloc.keep_freed_memory():  # a fifth of the superpixels' time was page faults
            log.info("malloc thresholds left at their defaults (not glibc)")
        # Reading, decoding, superpixels and label maps release the GIL for most of their time
        # (docs/PERFORMANCE.md), so one thread per core the actor holds keeps those cores busy.
        self.io_threads = io_threads or threads or DEFAULT_IO_THREADS
        # The frozen config arrives as the driver built it (Ray pickles the dataclass). The driver
        # pinned hub revisions in it; what this node loads must match its model fingerprint.
        clip, sd = load_models(config.model, expected=model_fingerprint, storage_options=storage_options,
                               need_sd=methods.needs_sd(config))  # fmt: skip
        self.labeler = Labeler(clip, sd, config, categories)
        self.store = Store.open(output, retry=storage_retry, **storage_options)
        self.storage_options = storage_options

    def label(self, shard: Shard, fingerprint: str, batch_size: int | None = None) -> dict[str, Any]:
        # A retried shard may have committed just before its actor died: never commit it twice.
        marker = commit.read_marker(self.store, shard.shard_id)
        if marker is None or marker["fingerprint"] != fingerprint:
            marker = label_shard(self.labeler, self.store, shard, fingerprint, storage_options=self.storage_options,
                                 io_threads=self.io_threads, batch_size=batch_size)  # fmt: skip
        return marker["counts"]


def _set_threads(threads: int | None) -> None:
    """Size torch's CPU thread pool to the actor's ``num_cpus`` on purpose. Ray exports
    ``OMP_NUM_THREADS`` = the actor's ``num_cpus`` to its worker (measured, Ray 2.60), which torch
    follows; with the old ``num_cpus=1`` the CPU half of labeling (full-resolution scores, label
    maps) ran on one core. Setting it here keeps the count explicit whatever the environment says."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@dataclass
class RunSummary:
    shards_done: int = 0
    shards_skipped: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    images: int = 0
    images_failed: int = 0
    images_skipped: int = 0  # in shards committed before this run: no work, so not in the throughput
    actor_restarts: int = 0
    actor_start_failures: int = 0
    timeouts: int = 0
    smaller_batches: dict[str, int] = field(default_factory=dict)  # shard -> batch size it committed with
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
    actor_cpus: int | None = None  # CPU cores (and torch threads) per actor; default: see ``plan_actors``
    io_threads: int | None = None  # label_shard's reader threads per actor; default: the actor's CPU cores
    shard_timeout_s: float = 900.0  # a shard is never given up on sooner than this
    shard_timeout_factor: float = 5.0  # ... nor sooner than this x its images x slowest seconds per image
    startup_timeout_s: float = 1800.0  # added for an actor's first shard: loading the models
    max_actor_start_failures: int = 3
    replace_after_errors: int = 2  # an actor failing this many shards in a row is replaced
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 60.0
    storage_retry: RetryPolicy = RetryPolicy()  # each storage operation of the driver and the actors

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"--num-actors must be at least 1, got {self.num_actors}")
        if self.actor_cpus is not None and self.actor_cpus < 1:
            raise ValueError(f"actor_cpus must be at least 1, got {self.actor_cpus}")
        if self.io_threads is not None and self.io_threads < 1:
            raise ValueError(f"io_threads must be at least 1, got {self.io_threads}")
        if self.max_attempts < 1 or self.max_actor_start_failures < 1 or self.replace_after_errors < 1:
            raise ValueError("max_attempts, max_actor_start_failures and replace_after_errors must be at least 1")
        if min(self.shard_timeout_s, self.shard_timeout_factor, self.startup_timeout_s) <= 0:
            raise ValueError("shard_timeout_s, shard_timeout_factor and startup_timeout_s must be positive")
        if not 0 <= self.backoff_base_s <= self.backoff_cap_s:
            raise ValueError("the retry backoff needs 0 <= backoff_base_s <= backoff_cap_s")


# ---- pure decisions ---------------------------------------------------------------------------


def shard_deadline(images: int, slowest_per_image_s: float | None, first_on_actor: bool, options: RunOptions) -> float:
    """Seconds a shard of ``images`` images may take once its actor starts it: the floor, or
    ``shard_timeout_factor`` x images x the slowest seconds per image seen in this run, whichever is
    longer; plus ``startup_timeout_s`` when the actor has not finished a shard yet (model load)."""
    limit = options.shard_timeout_s
    if slowest_per_image_s is not None:
        limit = max(limit, options.shard_timeout_factor * max(images, 1) * slowest_per_image_s)
    return limit + (options.startup_timeout_s if first_on_actor else 0.0)


def backoff_s(failed_attempts: int, key: str, options: RunOptions) -> float:
    """Wait before retry number ``failed_attempts`` (1-based) of ``key`` (a shard id): between half
    and all of ``min(cap, base * 2 ** (n - 1))``; the jitter is a hash of key and n, so it spreads
    retries of different shards apart yet is the same in every run."""
    ceiling = min(options.backoff_cap_s, options.backoff_base_s * 2.0 ** (failed_attempts - 1))
    digest = hashlib.sha256(f"{key}:{failed_attempts}".encode()).digest()
    return ceiling * (0.5 + 0.5 * int.from_bytes(digest[:4], "big") / 0xFFFFFFFF)


def is_out_of_memory(message: str) -> bool:
    """True for a CUDA (or host) out-of-memory error, by ``torch.cuda.OutOfMemoryError``'s name or
    the "out of memory" text CUDA and PyTorch use."""
    text = message.lower()
    return "outofmemoryerror" in text or "out of memory" in text


@dataclass(frozen=True)
class ActorPlan:
    count: int
    use_gpu: bool
    cpus: int


def plan_actors(requested: int | None, resources: Mapping[str, float], actor_cpus: int | None,
                nodes: Sequence[Mapping[str, float]] = ()) -> ActorPlan:  # fmt: skip
    """How many actors with what resources, from ``ray.cluster_resources()`` and the alive nodes'
    resources (``ray.nodes()``). One GPU each (CPU actors when the cluster has none). CPU cores:
    ``actor_cpus``, else the cluster's CPUs per actor (decoding, superpixels and label maps run on
    them, one reader thread per core), but no more than the CPUs per GPU of the poorest GPU node
    (CPU actors: the CPUs of the smallest node), so every actor fits beside its GPU: a CPU-only
    head node counts in the cluster's total but hosts no GPU actor. Raises ValueError when the
    actors cannot all be placed: Ray would wait for resources forever."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    count = requested or max(gpus, 1)
    if gpus and count > gpus:
        raise ValueError(f"--num-actors {count} asks for {count} GPU actors (one GPU each) but the cluster has "
                         f"{gpus} GPU(s): Ray would wait forever for the rest. Use --num-actors {gpus} or fewer, "
                         "or add GPU nodes first")  # fmt: skip
    per = actor_cpus or max(1, min(cpus // count, _cpus_per_slot(nodes, gpus > 0) or cpus))
    if count * per > cpus:
        raise ValueError(f"{count} actor(s) x {per} CPU(s) need {count * per} CPUs but the cluster has {cpus}: "
                         "Ray would wait forever. Use fewer actors or fewer CPUs per actor")  # fmt: skip
    return ActorPlan(count, gpus > 0, per)


def _cpus_per_slot(nodes: Sequence[Mapping[str, float]], use_gpu: bool) -> int | None:
    """CPUs per actor slot of the poorest node that can host an actor (per GPU on GPU nodes), or
    None when no node's resources are known."""
    if use_gpu:
        slots = [int(n.get("CPU", 0)) // int(n["GPU"]) for n in nodes if int(n.get("GPU", 0)) >= 1]
    else:
        slots = [int(n.get("CPU", 0)) for n in nodes if int(n.get("CPU", 0)) >= 1]
    return min(slots) if slots else None


def _last_line(message: str, secrets: frozenset[str]) -> str:
    lines = redact.redact(message, secrets).strip().splitlines() or ["(no message)"]
    return lines[-1][:500]


# ---- the driver ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What became of one shard sent to an actor: ``ok`` (with the marker's counts), ``error`` (the
    shard raised), ``died`` (the actor process is gone) or ``init_failed`` (its constructor raised)."""

    kind: str
    counts: dict[str, int] | None = None
    message: str = ""
    oom: bool = False


class Backend(Protocol):
    """What the driver needs from Ray (``_RayBackend``); tests pass a fake."""

    def start(self) -> Any: ...
    def submit(self, actor: Any, shard: Shard, batch_size: int | None) -> Any: ...
    def wait(self, futures: list[Any], timeout: float) -> list[Any]: ...
    def outcome(self, future: Any) -> Outcome: ...
    def kill(self, actor: Any) -> None: ...


@dataclass(eq=False)  # compared by identity: two tries of one shard are different tasks
class _Task:
    shard: Shard
    attempt: int = 1
    batch_size: int | None = None  # None: the config's; smaller after an out-of-memory error
    future: Any = None
    started: float | None = None  # when its actor began it (it became the head of the actor's queue)


@dataclass(eq=False)
class _Slot:
    actor: Any
    tasks: deque[_Task] = field(default_factory=deque)
    finished_any: bool = False
    errors_in_row: int = 0


class _Driver:
    """The driver loop's state and decisions; Ray only through ``backend``, time through ``clock``."""

    QUEUED_PER_ACTOR = 2  # the next shard is ready when one finishes

    def __init__(self, backend: Backend, actors: int, batch_size: int, options: RunOptions,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 secrets: frozenset[str] = frozenset()) -> None:  # fmt: skip
        self.backend, self.options, self.batch_size = backend, options, batch_size
        self.clock, self.sleep, self.secrets = clock, sleep, secrets
        self.summary = RunSummary()
        self.slots = [_Slot(backend.start()) for _ in range(actors)]
        self.retry: list[tuple[float, int, _Task]] = []  # (ready at, sequence, task)
        self.sequence = 0
        self.slowest: float | None = None  # seconds per image, the slowest shard seen
        self.queue: Iterator[Shard] = iter(())
        self.exhausted = False

    def run(self, shards: Iterable[Shard], committed: Callable[[Shard], bool],
            progress: Callable[[RunSummary], None] | None = None,
            stop: Callable[[], str | None] | None = None) -> RunSummary:  # fmt: skip
        """Label every shard that ``committed`` says is not done; returns what happened."""
        start, self.queue, self.committed = self.clock(), iter(shards), committed
        self._fill()
        while not self.summary.stopped_early and (self._futures() or self.retry or not self.exhausted):
            futures = self._futures()
            timeout = max(0.0, self._next_event() - self.clock())
            done = self.backend.wait(list(futures), timeout) if futures else []
            if not futures:
                self.sleep(timeout)
            for future in done:
                slot, task = futures[future]
                if task in slot.tasks and not self.summary.stopped_early:  # not dropped earlier in this round
                    self._handle(slot, task, self.backend.outcome(future))
            self._expire()
            self.summary.seconds = self.clock() - start
            if progress:
                progress(self.summary)
            self._check_stop(stop)
            self._fill()
        if self.summary.stopped_early:
            for slot in self.slots:  # in-flight shards stop uncommitted; a rerun redoes them
                self.backend.kill(slot.actor)
        self.summary.seconds = self.clock() - start
        return self.summary

    def _futures(self) -> dict[Any, tuple[_Slot, _Task]]:
        return {t.future: (slot, t) for slot in self.slots for t in slot.tasks}

    def _deadline(self, slot: _Slot) -> float | None:
        head = slot.tasks[0] if slot.tasks else None
        if head is None or head.started is None:
            return None
        return head.started + shard_deadline(len(head.shard.records), self.slowest, not slot.finished_any,
                                             self.options)  # fmt: skip

    def _next_event(self) -> float:
        times = [d for d in map(self._deadline, self.slots) if d is not None]
        if self.retry and any(len(s.tasks) < self.QUEUED_PER_ACTOR for s in self.slots):
            times.append(min(r[0] for r in self.retry))
        return min(times, default=self.clock())

    def _next_task(self) -> _Task | None:
        now = self.clock()
        ready = [r for r in self.retry if r[0] <= now]
        if ready:
            first = min(ready)
            self.retry.remove(first)
            return first[2]
        while not self.exhausted:
            shard = next(self.queue, None)
            if shard is None:
                self.exhausted = True
            elif self.committed(shard):
                self.summary.shards_skipped += 1
                self.summary.images_skipped += len(shard.records)
                self.summary.committed.append(shard.shard_id)
            else:
                return _Task(shard)
        return None

    def _fill(self) -> None:
        for slot in self.slots:
            while not self.summary.stopped_early and len(slot.tasks) < self.QUEUED_PER_ACTOR:
                task = self._next_task()
                if task is None:
                    return
                task.future = self.backend.submit(slot.actor, task.shard, task.batch_size)
                task.started = self.clock() if not slot.tasks else None
                slot.tasks.append(task)

    def _handle(self, slot: _Slot, task: _Task, outcome: Outcome) -> None:
        now = self.clock()
        slot.tasks.remove(task)
        if slot.tasks and slot.tasks[0].started is None:
            slot.tasks[0].started = now
        sid = task.shard.shard_id
        if outcome.kind == "ok":
            self._done(slot, task, outcome.counts or {}, now)
        elif outcome.kind == "init_failed":
            self.summary.actor_start_failures += 1
            message = _last_line(outcome.message, self.secrets)
            if self.summary.actor_start_failures >= self.options.max_actor_start_failures:
                self.summary.stopped_early = (f"labeling actors failed to start {self.summary.actor_start_failures} "
                                              f"times; the last error: {message}")  # fmt: skip
                return
            log.warning("a labeling actor failed to start (%s); starting another", message)
            self._replace(slot, culprit=None, counted=False)
            self._requeue(task, task.attempt, task.batch_size, delay=False)
        elif outcome.oom and (task.batch_size or self.batch_size) > 1:
            smaller = (task.batch_size or self.batch_size) // 2
            log.warning("shard %s ran out of memory; retrying it with batch size %d on a new actor", sid, smaller)
            self._replace(slot, culprit=task)
            self._requeue(task, task.attempt, smaller, delay=False)
        else:
            slot.errors_in_row += 1
            if outcome.kind == "died" or outcome.oom or slot.errors_in_row >= self.options.replace_after_errors:
                self._replace(slot, culprit=task)
            self._failed_attempt(task, _last_line(outcome.message, self.secrets))

    def _done(self, slot: _Slot, task: _Task, counts: dict[str, int], now: float) -> None:
        s = self.summary
        s.shards_done += 1
        s.committed.append(task.shard.shard_id)
        s.images += counts.get("images", 0)
        s.images_failed += counts.get("failed", 0)
        if task.batch_size is not None:
            s.smaller_batches[task.shard.shard_id] = task.batch_size
        if task.started is not None and slot.finished_any:  # an actor's first shard includes loading the models
            per_image = (now - task.started) / max(len(task.shard.records), 1)
            self.slowest = per_image if self.slowest is None else max(self.slowest, per_image)
        slot.finished_any, slot.errors_in_row = True, 0

    def _failed_attempt(self, task: _Task, message: str) -> None:
        sid = task.shard.shard_id
        if task.attempt < self.options.max_attempts:
            log.warning("shard %s failed (attempt %d): %s; retrying", sid, task.attempt, message)
            self._requeue(task, task.attempt + 1, task.batch_size, delay=True)
        else:
            self.summary.shards_failed[sid] = message

    def _requeue(self, task: _Task, attempt: int, batch_size: int | None, delay: bool) -> None:
        wait = backoff_s(task.attempt, task.shard.shard_id, self.options) if delay else 0.0
        self.sequence += 1
        self.retry.append((self.clock() + wait, self.sequence, _Task(task.shard, attempt, batch_size)))

    def _replace(self, slot: _Slot, culprit: _Task | None, counted: bool = True) -> None:
        """Kill the slot's actor and start another; its other shards go back to the queue with
        their attempts unchanged (they did nothing wrong)."""
        self.backend.kill(slot.actor)
        if counted:
            self.summary.actor_restarts += 1
        for other in list(slot.tasks):
            if other is not culprit:
                self._requeue(other, other.attempt, other.batch_size, delay=False)
        slot.actor, slot.tasks, slot.finished_any, slot.errors_in_row = self.backend.start(), deque(), False, 0

    def _expire(self) -> None:
        now = self.clock()
        for slot in self.slots:
            deadline = self._deadline(slot)
            if deadline is not None and now >= deadline:
                head = slot.tasks[0]
                limit = deadline - head.started if head.started is not None else 0.0
                self.summary.timeouts += 1
                log.warning("shard %s: no result after %.0f s; replacing its actor", head.shard.shard_id, limit)
                self._replace(slot, culprit=head)
                self._failed_attempt(head, f"no result after {limit:.0f} s (the shard deadline); actor replaced")

    def _check_stop(self, stop: Callable[[], str | None] | None) -> None:
        s = self.summary
        rate = s.images_failed / s.images if s.images else 0.0
        if s.images >= self.options.min_images and rate > self.options.max_failure_rate:
            s.stopped_early = f"{rate:.0%} of {s.images} images failed (limit {self.options.max_failure_rate:.0%})"
        reason = stop() if stop and not s.stopped_early else None
        if reason:
            s.stopped_early = reason


class _RayBackend:
    def __init__(self, plan: ActorPlan, args: tuple[Any, ...], fingerprint: str, secrets: frozenset[str]) -> None:
        self.cls = ray.remote(num_gpus=1 if plan.use_gpu else 0, num_cpus=plan.cpus, max_restarts=0)(_LabelActor)
        self.args, self.fingerprint, self.secrets = args, fingerprint, secrets

    def start(self) -> Any:
        return self.cls.remote(*self.args)

    def submit(self, actor: Any, shard: Shard, batch_size: int | None) -> Any:
        return actor.label.remote(shard, self.fingerprint, batch_size)

    def wait(self, futures: list[Any], timeout: float) -> list[Any]:
        ready, _ = ray.wait(futures, num_returns=1, timeout=timeout)
        return ready

    def outcome(self, future: Any) -> Outcome:
        try:
            return Outcome("ok", ray.get(future))
        except RayActorError as err:
            oom = isinstance(err, ray.exceptions.OutOfMemoryError) or is_out_of_memory(str(err))
            return Outcome("init_failed" if err.actor_init_failed else "died", message=str(err), oom=oom)
        except RayTaskError as err:
            return Outcome("error", message=str(err), oom=is_out_of_memory(str(err)))
        except ray.exceptions.OutOfMemoryError as err:  # Ray's memory monitor killed the worker
            return Outcome("died", message=str(err), oom=True)

    def kill(self, actor: Any) -> None:
        ray.kill(actor, no_restart=True)


def run(config: Config, categories: list[Category], shards: Iterable[Shard], output: str, fingerprint: str,
        options: RunOptions, progress: Callable[[RunSummary], None] | None = None,
        stop: Callable[[], str | None] | None = None) -> RunSummary:  # fmt: skip
    """Label every uncommitted shard of ``shards`` under ``output``; returns what happened.
    ``stop`` is asked after every result; a reason it returns ends the run (``stopped_early``).
    Raises ValueError when the cluster cannot place the actors (``plan_actors``)."""
    if not ray.is_initialized():
        ray.init()  # under `ray job submit` this joins the cluster; alone it starts a local one
    store = Store.open(output, retry=options.storage_retry, **options.storage_options)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    plan = plan_actors(options.num_actors, ray.cluster_resources(), options.actor_cpus, nodes)
    secrets = redact.secret_values(options.storage_options)
    args = (config, categories, output, options.storage_options, plan.cpus, options.model_fingerprint,
            options.storage_retry, options.io_threads)  # fmt: skip
    driver = _Driver(_RayBackend(plan, args, fingerprint, secrets), plan.count, config.batch_size, options,
                     secrets=secrets)  # fmt: skip
    return driver.run(shards, lambda s: commit.is_committed(store, s.shard_id, fingerprint), progress, stop)


def map_tasks(fn: Callable[..., Any], items: list[tuple[Any, ...]], shared: tuple[Any, ...] = ()) -> list[Any]:
    """``[fn(*item, *shared) for item in items]`` as one Ray task per item (results in order);
    ``shared`` arguments go to the object store once. Joins a cluster or starts a local Ray."""
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    task = ray.remote(fn)
    refs = [ray.put(x) for x in shared]
    return ray.get([task.remote(*item, *refs) for item in items])
