"""The runner's decisions without Ray: ``runner._Driver`` with a simulated cluster (a fake backend
whose actors run shards in order and take simulated seconds), a simulated clock, and no sleeping.
Deadlines, replacing actors, giving up on constructors, out-of-memory retries and backoff."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from pipeline import types
from pipeline.manifest import shards as make_shards
from pipeline.runner import (
    Outcome,
    RunOptions,
    _Driver,
    backoff_s,
    is_out_of_memory,
    plan_actors,
    shard_deadline,
)
from pipeline.storage import commit
from pipeline.storage.store import Store

OPTIONS = RunOptions(shard_timeout_s=100, shard_timeout_factor=5, startup_timeout_s=50, backoff_base_s=2,
                     backoff_cap_s=60)  # fmt: skip


@dataclass(eq=False)  # hashable by identity, as Ray's object refs are
class _Future:
    actor: int
    shard_id: str
    at: float  # simulated time it resolves (inf: never)
    outcome: Outcome


@dataclass
class FakeCluster:
    """Actors run their shards one after another; ``behaviour(actor, shard_id, batch_size)``
    returns ("ok", seconds), ("error", message, seconds), ("hang",) or ("died", message, seconds);
    ``init_error(actor)`` a constructor error or None."""

    behaviour: object
    init_error: object = lambda actor: None
    now: float = 0.0
    waits: int = 0
    started: int = 0
    killed: list[int] = field(default_factory=list)
    free_at: dict[int, float] = field(default_factory=dict)
    submits: list[tuple[float, int, str, int | None]] = field(default_factory=list)

    def start(self) -> int:
        self.started += 1
        self.free_at[self.started] = self.now
        return self.started

    def submit(self, actor: int, shard, batch_size):
        sid = shard.shard_id
        self.submits.append((self.now, actor, sid, batch_size))
        error = self.init_error(actor)
        if error:
            return _Future(actor, sid, self.now, Outcome("init_failed", message=error))
        kind, *rest = self.behaviour(actor, sid, batch_size)
        if kind == "hang":
            self.free_at[actor] = math.inf
            return _Future(actor, sid, math.inf, Outcome("error"))
        seconds = rest[-1]
        self.free_at[actor] = max(self.free_at[actor], self.now) + seconds
        if kind == "ok":
            outcome = Outcome("ok", {"images": len(shard.records), "failed": 0})
        else:
            outcome = Outcome(kind, message=rest[0], oom=is_out_of_memory(rest[0]))
        return _Future(actor, sid, self.free_at[actor], outcome)

    def wait(self, futures, timeout):
        self.waits += 1
        if self.now > 1e7 or self.waits > 10_000:
            raise RuntimeError("the driver is waiting forever")
        live = [f for f in futures if f.actor not in self.killed]
        first = min((f.at for f in live), default=math.inf)
        self.now = max(self.now, min(first, self.now + timeout))
        return [f for f in live if f.at <= self.now]

    def sleep(self, seconds):
        self.now += seconds

    def outcome(self, future):
        return future.outcome

    def kill(self, actor):
        self.killed.append(actor)


def _shards(n: int, size: int = 4):
    records = [{"id": f"im{i:03d}", "uri": f"x/{i}.jpg", "tags": [1]} for i in range(n * size)]
    return list(make_shards(records, size))


def _run(cluster: FakeCluster, shards, options=OPTIONS, actors: int = 1, batch_size: int = 8, committed=()):
    driver = _Driver(cluster, actors, batch_size, options, clock=lambda: cluster.now, sleep=cluster.sleep,
                     secrets=frozenset({"s3cr3t-value"}))  # fmt: skip
    return driver.run(shards, lambda s: s.shard_id in committed)


def test_a_hung_shard_is_abandoned_at_its_deadline_and_retried_on_a_new_actor():
    shards = _shards(4)
    hung = shards[1].shard_id

    def behaviour(actor, sid, batch):
        return ("hang",) if actor == 1 and sid == hung else ("ok", 10.0)

    cluster = FakeCluster(behaviour)
    summary = _run(cluster, shards)
    assert summary.shards_done == 4 and summary.shards_failed == {} and summary.timeouts == 1
    assert cluster.killed == [1] and summary.actor_restarts == 1
    # The hung shard started when its predecessor finished (t=10) and had the floor (100 s; its
    # actor had loaded its models already); its retry waited out its backoff, then for room on
    # actor 2 (busy with the two shards moved off actor 1 until t=120).
    assert 1 <= backoff_s(1, hung, OPTIONS) <= 2
    assert [t for t, actor, sid, _ in cluster.submits if sid == hung] == [0.0, 120.0]


def test_the_deadline_follows_the_slowest_measured_shard_so_slow_actors_are_not_killed():
    # The first two shards take 100 s (the first, which includes loading the models, is not
    # measured); the others 400 s, four times the floor, but within 5 x 4 images x 25 s per image.
    shards = _shards(4)
    fast = {shards[0].shard_id, shards[1].shard_id}
    cluster = FakeCluster(lambda actor, sid, batch: ("ok", 100.0 if sid in fast else 400.0))
    summary = _run(cluster, shards)
    assert summary.shards_done == 4 and summary.timeouts == 0 and cluster.killed == []


def test_deadline_values():
    assert shard_deadline(4, None, False, OPTIONS) == 100  # nothing measured: the floor
    assert shard_deadline(4, None, True, OPTIONS) == 150  # an actor's first shard: + model load
    assert shard_deadline(4, 1.0, False, OPTIONS) == 100  # 5 x 4 x 1 s = 20 s: the floor wins
    assert shard_deadline(4, 10.0, False, OPTIONS) == 200  # 5 x 4 x 10 s


def test_the_other_shard_queued_on_a_replaced_actor_keeps_its_attempt():
    shards = _shards(2)
    first = shards[0].shard_id
    cluster = FakeCluster(lambda actor, sid, batch: ("hang",) if actor == 1 and sid == first else ("ok", 5.0))
    summary = _run(cluster, shards, RunOptions(**{**OPTIONS.__dict__, "max_attempts": 1}))
    # max_attempts 1: the hung shard fails for good; the one queued behind it moves and commits.
    assert summary.shards_done == 1 and list(summary.shards_failed) == [first]
    assert "no result after 150 s" in summary.shards_failed[first]


def test_constructor_failures_stop_the_run_with_the_actor_s_error():
    cluster = FakeCluster(lambda *a: ("ok", 1.0),
                          init_error=lambda actor: "RuntimeError: CLIP weights not found at s3://b/clip.pt?"
                                                   "X-Amz-Signature=s3cr3t-value")  # fmt: skip
    summary = _run(cluster, _shards(5), actors=1)
    assert cluster.started == 3 and summary.actor_start_failures == 3  # max_actor_start_failures
    assert summary.stopped_early.startswith("labeling actors failed to start 3 times; the last error: ")
    assert "CLIP weights not found" in summary.stopped_early and "s3cr3t-value" not in summary.stopped_early
    assert summary.shards_done == 0 and summary.shards_failed == {}  # no shard was tried: none counted failed


def test_one_failed_start_is_replaced_and_the_run_finishes():
    cluster = FakeCluster(lambda *a: ("ok", 1.0), init_error=lambda actor: "OOM at load" if actor == 1 else None)
    summary = _run(cluster, _shards(3))
    assert summary.shards_done == 3 and summary.actor_start_failures == 1 and summary.stopped_early is None


def test_an_actor_failing_every_shard_is_replaced_not_retried_in_place():
    cluster = FakeCluster(lambda actor, sid, batch: ("error", "CUDA error: an illegal memory access", 1.0)
                          if actor == 1 else ("ok", 1.0))  # fmt: skip
    summary = _run(cluster, _shards(4))
    assert summary.shards_done == 4 and summary.shards_failed == {}
    assert cluster.killed == [1] and summary.actor_restarts == 1  # after 2 failures in a row


def test_retries_back_off_exponentially():
    shards = _shards(1)
    sid = shards[0].shard_id
    cluster = FakeCluster(lambda actor, s, batch: ("error", "IsADirectoryError: labels/x.png", 1.0))
    options = RunOptions(**{**OPTIONS.__dict__, "max_attempts": 4, "replace_after_errors": 10})
    summary = _run(cluster, shards, options)
    assert "IsADirectoryError" in summary.shards_failed[sid]
    times = [t for t, _, s, _ in cluster.submits if s == sid]
    gaps = [b - a - 1.0 for a, b in zip(times, times[1:], strict=False)]  # minus the 1 s the shard ran
    assert gaps == pytest.approx([backoff_s(n, sid, options) for n in (1, 2, 3)])
    assert 1 <= gaps[0] <= 2 and 2 <= gaps[1] <= 4 and 4 <= gaps[2] <= 8


def test_backoff_is_capped_and_the_same_in_every_run():
    assert backoff_s(30, "s", OPTIONS) <= 60
    assert backoff_s(3, "00001-abc", OPTIONS) == backoff_s(3, "00001-abc", OPTIONS)
    assert len({backoff_s(3, f"{i:05d}", OPTIONS) for i in range(20)}) > 10  # spread across shards


def test_out_of_memory_retries_the_shard_with_half_the_batch_on_a_fresh_actor():
    def behaviour(actor, sid, batch):
        if (batch or 8) > 2:
            return ("error", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", 1.0)
        return ("ok", 1.0)

    cluster = FakeCluster(behaviour)
    shards = _shards(1)
    summary = _run(cluster, shards, RunOptions(**{**OPTIONS.__dict__, "max_attempts": 1}))
    # Halving does not use up attempts: with max_attempts 1 the shard still commits, at batch 2.
    assert summary.shards_done == 1 and summary.smaller_batches == {shards[0].shard_id: 2}
    assert [b for *_, b in cluster.submits] == [None, 4, 2]
    assert cluster.killed == [1, 2]  # a CUDA context after OOM is not trusted


def test_out_of_memory_at_batch_one_fails_the_shard_after_its_attempts():
    cluster = FakeCluster(lambda actor, sid, batch: ("error", "RuntimeError: CUDA out of memory", 1.0))
    shards = _shards(1)
    summary = _run(cluster, shards, RunOptions(**{**OPTIONS.__dict__, "max_attempts": 2}), batch_size=1)
    assert "out of memory" in summary.shards_failed[shards[0].shard_id]
    assert [b for *_, b in cluster.submits] == [None, None]


def test_committed_shards_are_skipped_and_their_images_counted_apart():
    shards = _shards(3)
    cluster = FakeCluster(lambda *a: ("ok", 1.0))
    summary = _run(cluster, shards, committed={shards[0].shard_id})
    assert (summary.shards_skipped, summary.images_skipped, summary.shards_done, summary.images) == (1, 4, 2, 8)
    assert shards[0].shard_id not in {sid for _, _, sid, _ in cluster.submits}


def test_a_stop_reason_ends_the_run_and_kills_the_actors():
    cluster = FakeCluster(lambda *a: ("ok", 1.0))
    driver = _Driver(cluster, 1, 8, OPTIONS, clock=lambda: cluster.now, sleep=lambda s: None)
    summary = driver.run(_shards(5), lambda s: False, stop=lambda: "the lease was lost")
    assert summary.stopped_early == "the lease was lost" and summary.shards_done < 5 and cluster.killed == [1]


def test_more_actors_than_gpus_is_refused():
    with pytest.raises(ValueError, match=r"--num-actors 4 asks for 4 GPU actors .* the cluster has 2 GPU"):
        plan_actors(4, {"GPU": 2.0, "CPU": 32.0}, None)
    with pytest.raises(ValueError, match="need 8 CPUs but the cluster has 2"):
        plan_actors(2, {"CPU": 2.0}, 4)


def test_actor_plan_sizes_cpus_on_purpose():
    # The node's cores per GPU, not 4: a GPU node has 12-26 of them for decoding and superpixels.
    assert plan_actors(None, {"GPU": 2.0, "CPU": 32.0}, None) == plan_actors(2, {"GPU": 2.0, "CPU": 32.0}, 16)
    assert plan_actors(None, {"GPU": 2.0, "CPU": 32.0}, 3).cpus == 3  # --actor-cpus wins
    plan = plan_actors(None, {"GPU": 8.0, "CPU": 16.0}, None)
    assert (plan.count, plan.use_gpu, plan.cpus) == (8, True, 2)
    plan = plan_actors(None, {"CPU": 2.0}, None)
    assert (plan.count, plan.use_gpu, plan.cpus) == (1, False, 2)


def test_bad_run_options_are_refused_with_a_sentence():
    with pytest.raises(ValueError, match="--num-actors must be at least 1"):
        RunOptions(num_actors=0)
    with pytest.raises(ValueError, match="must be positive"):
        RunOptions(shard_timeout_s=0)


def test_a_resume_with_another_device_and_batch_size_skips_committed_shards_and_a_changed_label_setting_is_refused(
    tiny_paths, tmp_path
):
    """What ``jobs/label_coco.py`` does at a resume (run.json, then the driver with ``is_committed``),
    on a real committed shard: batch 2 on "cpu", then batch 4 on "auto", CLIP-ES (batch-invariant)."""
    from PIL import Image

    from pipeline import methods
    from pipeline.config import build_config
    from pipeline.labeler import Labeler
    from pipeline.models import model_fingerprint
    from pipeline.shards import label_shard
    from tests.conftest import CATEGORIES, blob_image, tiny_overrides

    records = []
    for i in range(4):
        Image.fromarray(blob_image(32, 40, seed=i)).save(tmp_path / f"{i}.png")
        records.append({"id": f"im{i}", "uri": str(tmp_path / f"{i}.png"), "tags": [1, 7]})
    shards = list(make_shards(records, 2))
    store = Store.open(str(tmp_path / "out"))

    def run_fp(config):
        models_fp = model_fingerprint(config.model, need_sd=methods.needs_sd(config))
        manifest_fp = types.manifest_fingerprint(records)
        return types.run_fingerprint(config.fingerprint(), models_fp, manifest_fp), models_fp

    first = build_config("clip-es-voc", tiny_overrides(tiny_paths) | {"batch_size": 2})
    fp, models_fp = run_fp(first)
    commit.write_run(store, fp, first.to_dict(), models_fp)
    label_shard(Labeler.from_config(first, CATEGORIES), store, shards[0], fp.digest)  # then the run stopped

    over = tiny_overrides(tiny_paths)
    again = build_config("clip-es-voc", over | {"batch_size": 4, "model": {**over["model"], "device": "auto"}})
    fp2, models_fp2 = run_fp(again)
    commit.write_run(store, fp2, again.to_dict(), models_fp2)  # accepted: the same labels
    cluster = FakeCluster(lambda *a: ("ok", 1.0))
    driver = _Driver(cluster, 1, again.batch_size, OPTIONS, clock=lambda: cluster.now, sleep=cluster.sleep)
    summary = driver.run(shards, lambda s: commit.is_committed(store, s.shard_id, fp2.digest))
    assert (summary.shards_skipped, summary.shards_done) == (1, 1)
    assert [sid for _, _, sid, _ in cluster.submits] == [shards[1].shard_id]

    changed = build_config("clip-es-voc", over | {"batch_size": 4, "refine": {"scale": 90.0}})
    fp3, models_fp3 = run_fp(changed)
    with pytest.raises(ValueError, match=r"config changed \(settings: refine.scale 100.0 -> 90.0"):
        commit.write_run(store, fp3, changed.to_dict(), models_fp3)


def test_actor_cpus_fit_the_poorest_gpu_node_not_the_cluster_average():
    # A 64-core CPU-only head and two 8-GPU nodes of 96 cores: 224 CPUs / 16 GPUs = 14 per actor on
    # average, but a GPU node has 12 per GPU; 14 would leave the last actors waiting forever.
    nodes = [{"CPU": 64.0}, {"CPU": 96.0, "GPU": 8.0}, {"CPU": 96.0, "GPU": 8.0}]
    plan = plan_actors(None, {"CPU": 256.0, "GPU": 16.0}, None, nodes)
    assert (plan.count, plan.use_gpu, plan.cpus) == (16, True, 12)
    # CPU actors: no more than the smallest node holds.
    assert plan_actors(None, {"CPU": 24.0}, None, [{"CPU": 16.0}, {"CPU": 8.0}]).cpus == 8
    assert plan_actors(None, {"GPU": 1.0, "CPU": 26.0}, None, [{"CPU": 26.0, "GPU": 1.0}]).cpus == 26


def test_io_threads_must_be_positive():
    with pytest.raises(ValueError, match="io_threads must be at least 1"):
        RunOptions(io_threads=0)
