"""Label a dataset: ``label_dataset`` (the whole run) and ``plan`` (what a run would do), and the
``label`` command in front of them (``jobs/label_coco.py``, ``tag2mask label``).

The order of a run: read and check the whole manifest (no model loaded yet), check that the first
image's folder can be read, pin the weights, fingerprint the run, take the lease on the output
prefix, label on Ray (``pipeline.runner``), and merge the committed shards when nothing failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline import lease, manifest, methods, redact, types
from pipeline.cli import (
    add_discovery_arguments,
    add_model_arguments,
    add_storage_retry_arguments,
    config_from_args,
    retry_policy_from_args,
    storage_options_from_arg,
)
from pipeline.config import Config, build_config
from pipeline.models import WeightsUnavailableError, pin_weights
from pipeline.retry import RetryPolicy
from pipeline.storage import commit
from pipeline.storage.merge import merge
from pipeline.storage.store import Store, check_access
from pipeline.types import Category

DESCRIPTION = """Label a dataset on a Ray cluster (or a local Ray) and write COCO annotations, PNG label maps and
Parquet statistics under --output. Rerun the same command to finish an interrupted run.

    ray job submit --working-dir . -- python jobs/label_coco.py \\
        --annotations s3://bucket/coco/instances_train2017.json \\
        --images s3://bucket/coco/train2017/ --output s3://bucket/pseudo/run1

    python jobs/label_coco.py --manifest images.jsonl --categories categories.json --output out/
    tag2mask label --manifest images.jsonl --categories categories.json --output out/
"""
MAX_SHOWN = 20  # manifest problems printed before "... and N more"


@dataclass(frozen=True)
class Dataset:
    """Where the images and their tags are: a COCO instances JSON with its image folder, or a JSONL
    manifest (schemas/manifest_record.v1.schema.json) with a JSON list of {id, name} categories."""

    annotations: str | None = None
    images: str | None = None
    manifest: str | None = None
    categories: str | None = None

    def __post_init__(self) -> None:
        if bool(self.annotations) == bool(self.manifest):
            raise ValueError("give either --annotations with --images, or --manifest with --categories")
        if self.annotations and not self.images:
            raise ValueError("--annotations needs --images (the folder holding the files it names)")
        if self.manifest and not self.categories:
            raise ValueError("--manifest needs --categories (a JSON list of {id, name})")


@dataclass(frozen=True)
class JobSettings:
    """How the label job drives the cluster (none of it changes the labels): actors, retries, deadlines,
    the lease, overwrite and merging; passed on as ``runner.RunOptions``. The config's own how-to-run
    part is ``config.RunSettings``."""

    num_actors: int | None = None
    max_attempts: int = 3
    max_failure_rate: float = 0.9
    shard_timeout_s: float | None = None
    startup_timeout_s: float | None = None
    actor_cpus: int | None = None
    lease_ttl_s: float = 300.0
    overwrite: bool = False
    merge: bool = True
    storage_retry: RetryPolicy | None = None  # the output prefix's reads and writes; None: retry.DEFAULT


@dataclass(frozen=True)
class Inputs:
    """The checked manifest: categories, a factory of record streams, and what the one full scan
    measured (the manifest's fingerprint and record count, and for a JSONL manifest its shard ids)."""

    categories: list[Category]
    records: Callable[[], Iterator[dict]]
    fingerprint: str
    count: int
    shard_ids: tuple[str, ...] | None = None  # the shards' ids at read_inputs' shard_size, when the scan gave them


@dataclass(frozen=True)
class Plan:
    """What a run of the dataset into ``output`` would do: its shards and how many are committed
    under this run's fingerprint; ``same_run`` is False when the prefix holds another run."""

    shards: int
    committed: int
    shard_size: int
    same_run: bool

    def __str__(self) -> str:
        left = self.shards - self.committed
        return (f"plan: {self.shards} shards, {self.committed} committed, {left} remaining, "
                f"about {left * self.shard_size} images; "
                f"{'same run' if self.same_run else 'A DIFFERENT RUN is stored'}")  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    """A finished (or stopped) run: the runner's summary and the merge's record (None when not merged)."""

    summary: Any  # runner.RunSummary (runner imports Ray, so it is not imported here)
    merged: dict[str, Any] | None

    @property
    def exit_code(self) -> int:
        """0 done, 1 shards failed, 3 stopped early."""
        return 3 if self.summary.stopped_early else 1 if self.summary.shards_failed else 0


@dataclass(frozen=True)
class _Prepared:
    config: Config
    inputs: Inputs
    fingerprint: types.RunFingerprint
    models_fp: dict
    store: Store


def read_inputs(dataset: Dataset, prompt_set: str, opts: dict, shard_size: int | None = None) -> Inputs:
    """One full scan, before any model is loaded, that finds every manifest problem (schema,
    duplicate ids, unknown tags) and fingerprints and counts the records on the way; given
    ``shard_size``, a JSONL scan also gives the shard ids (``Inputs.shard_ids``).
    Raises ``manifest.ManifestError`` listing the problems."""
    problems: list[str] = []
    shard_ids = None
    if dataset.annotations:
        cats, loaded = manifest.read_coco(dataset.annotations, dataset.images, prompt_set, problems, **opts)
        factory = lambda: iter(loaded)  # noqa: E731
        fingerprint, count = manifest.fingerprint(loaded, cats), len(loaded)
    else:
        cats = manifest.read_categories(dataset.categories, prompt_set, **opts)
        factory = lambda: manifest.read_jsonl(dataset.manifest, cats, **opts)  # noqa: E731
        scan = manifest.scan_jsonl(dataset.manifest, cats, problems, shard_size, **opts)
        fingerprint, count, shard_ids = scan.fingerprint, scan.count, scan.shard_ids
    if problems:
        shown = "\n  ".join(problems[:MAX_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise manifest.ManifestError(f"{len(problems)} manifest record(s) cannot be used; nothing was labeled:\n  "
                                     f"{shown}{more}")  # fmt: skip
    return Inputs(cats, factory, fingerprint, count, shard_ids)


def check_image_root(records: Callable[[], Iterator[dict]], opts: dict) -> None:
    """Stop before any GPU work when the first image's folder (or bucket) does not exist or
    cannot be read: every image would fail. A single missing image is only a stats row."""
    import fsspec

    first = next(iter(records()), None)
    if first is None:
        raise ValueError("the manifest has no records: nothing to label")
    fs, path = fsspec.core.url_to_fs(first["uri"], **opts)
    try:
        fs.info(path)
    except FileNotFoundError:
        parent = path.rstrip("/").rsplit("/", 1)[0]
        if not fs.exists(parent):
            raise ValueError(f"image {first['uri']} (id {first['id']!r}) is missing and so is its folder {parent}: "
                             "check --images or the manifest's uris") from None  # fmt: skip
    except PermissionError as err:
        raise ValueError(
            f"cannot read image {first['uri']}: permission denied ({err}); check the credentials"
        ) from None


def _prepare(dataset: Dataset, output: str, config: Config, opts: dict, retry: RetryPolicy | None = None) -> _Prepared:
    """Inputs checked, weights pinned (hub commits), the run fingerprinted; nothing written."""
    redact.install(redact.secret_values(opts))  # storage libraries' error texts must not carry them
    inputs = read_inputs(dataset, config.cliper.prompt_set, opts, config.shard_size)
    check_image_root(inputs.records, opts)
    pinned, models_fp = pin_weights(config.model, opts, need_sd=methods.needs_sd(config))
    config = dataclasses.replace(config, model=pinned)
    run_fp = types.run_fingerprint(config.fingerprint(), models_fp, inputs.fingerprint)
    return _Prepared(config, inputs, run_fp, models_fp, Store.open(output, retry=retry, **opts))


def _plan(p: _Prepared) -> Plan:
    shard_ids = p.inputs.shard_ids  # scanned at config.shard_size (_prepare)
    if shard_ids is None:  # a COCO file: records in memory
        shard_ids = tuple(s.shard_id for s in manifest.shards(p.inputs.records(), p.config.shard_size))
    committed = sum(commit.is_committed(p.store, sid, p.fingerprint.digest) for sid in shard_ids)
    old = commit.read_run(p.store)
    return Plan(len(shard_ids), committed, p.config.shard_size, not old or old["fingerprint"] == p.fingerprint.digest)


def plan(dataset: Dataset, output: str, config: Config, storage_options: dict | None = None) -> Plan:
    """What ``label_dataset`` would do with these arguments, reading only (the dry run).
    Raises ``ManifestError``/``ValueError`` on bad inputs, ``WeightsUnavailableError`` when the
    weights cannot be found."""
    return _plan(_prepare(dataset, output, config, storage_options or {}))


def label_dataset(dataset: Dataset, output: str, config: Config, settings: JobSettings = JobSettings(),
                  storage_options: dict | None = None,
                  progress: Callable[[int | None], Callable[[Any], None]] | None = None) -> Outcome:  # fmt: skip
    """Label ``dataset`` into the prefix ``output`` (local path or fsspec URL) under one lease,
    resuming from the shards committed by an earlier run of the same fingerprint, and merge them
    when every shard committed (``settings.merge``). ``progress(total_images)`` returns the
    callback the runner calls with its running summary. Raises ``ValueError`` (bad manifest, a
    prefix held by another driver or run, storage not writable, actors that cannot be placed),
    ``WeightsUnavailableError`` or ``OSError``; per-image problems are stats rows, not errors."""
    opts = storage_options or {}
    p = _prepare(dataset, output, config, opts, settings.storage_retry)
    check_access(p.store)
    keeper = lease.Keeper(p.store, settings.lease_ttl_s)
    with keeper:  # one driver per prefix: a second one is refused here (LeaseHeldError)
        commit.write_run(p.store, p.fingerprint, p.config.to_dict(), p.models_fp, overwrite=settings.overwrite)
        summary = _run(p, output, settings, opts, progress(p.inputs.count) if progress else None, keeper.lost)
    merged = None
    if settings.merge and not summary.stopped_early and not summary.shards_failed and summary.committed:
        merged = merge(p.store, sorted(summary.committed), p.fingerprint.digest)
    return Outcome(summary, merged)


def _run(p: _Prepared, output: str, settings: JobSettings, opts: dict, progress, stop) -> Any:
    from pipeline import runner  # imports Ray only once the inputs are known to be good

    timeouts = {"shard_timeout_s": settings.shard_timeout_s, "startup_timeout_s": settings.startup_timeout_s}
    options = runner.RunOptions(num_actors=settings.num_actors, max_attempts=settings.max_attempts,
                                max_failure_rate=settings.max_failure_rate, storage_options=opts,
                                actor_cpus=settings.actor_cpus, model_fingerprint=p.models_fp,
                                storage_retry=p.store.retry_policy,
                                **{k: v for k, v in timeouts.items() if v is not None})  # fmt: skip
    shards = manifest.shards(p.inputs.records(), p.config.shard_size)
    return runner.run(p.config, p.inputs.categories, shards, output, p.fingerprint.digest, options, progress,
                      stop=stop)  # fmt: skip


# ---------------------------------------------------------------- the command


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ``label`` command's options (jobs/label_coco.py and ``tag2mask label`` share them)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    src = p.add_argument_group("input")
    src.add_argument("--annotations", help="COCO instances JSON: tags are each image's annotated categories")
    src.add_argument("--images", help="folder of the COCO images (with --annotations)")
    src.add_argument("--manifest", help="JSONL manifest (schemas/manifest_record.v1.schema.json)")
    src.add_argument("--categories", help="with --manifest: JSON list of {id, name} categories")
    run = p.add_argument_group("run")
    run.add_argument("--output", required=True, help="output prefix: local path, s3://, gs://, memory://")
    run.add_argument("--shard-size", type=int, help="images per shard (default: config shard_size, 256)")
    run.add_argument("--num-actors", type=int, help="labeling actors (default: one per GPU, else one)")
    run.add_argument("--max-attempts", type=int, default=3, help="tries per shard before it is reported failed")
    run.add_argument("--max-failure-rate", type=float, default=0.9, help="stop early above this failed-image share")
    run.add_argument("--shard-timeout", type=float, metavar="S",
                     help="give up on a shard (kill and replace its actor, retry the shard) after S seconds, or "
                          "5 x the slowest seconds per image seen so far times its images when longer "
                          "(default 900)")  # fmt: skip
    run.add_argument("--startup-timeout", type=float, metavar="S",
                     help="extra seconds for an actor's first shard: loading the models (default 1800)")  # fmt: skip
    run.add_argument("--actor-cpus", type=int, help="CPU cores, torch threads and reader threads per actor (default: "
                                                    "the cluster's CPUs per actor, but no more than the CPUs per GPU "
                                                    "of the poorest GPU node; CPU actors: the CPUs of the smallest "
                                                    "node)")  # fmt: skip
    run.add_argument("--lease-ttl", type=float, default=300.0, metavar="S",
                     help="the lease on --output expires S seconds after its last renewal (every S/3)")  # fmt: skip
    run.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    run.add_argument("--overwrite", action="store_true", help="accept a changed config/weights/manifest")
    run.add_argument("--no-merge", action="store_true", help="skip the final merge (very large datasets)")
    run.add_argument("--storage-options", metavar="JSON|FILE",
                     help="fsspec options for every URL (endpoint, region, ...): inline JSON, or a JSON file's path "
                          "(credentials only in a file or the environment)")  # fmt: skip
    add_model_arguments(p)
    add_discovery_arguments(p)
    add_storage_retry_arguments(p)
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_args(argv)
    try:
        args.dataset = Dataset(args.annotations, args.images, args.manifest, args.categories)
    except ValueError as err:
        p.error(str(err))
    return args


def eta_s(summary: Any, total_images: int | None) -> float | None:
    """Seconds left: images not yet labeled (this run's and those of shards committed before it
    excepted) at this run's own rate; None until there is a rate."""
    rate = summary.images / summary.seconds if summary.seconds else 0.0
    if not total_images or not rate:
        return None
    return max(0, total_images - summary.images - summary.images_skipped) / rate


def progress_printer(total_images: int | None) -> Callable[[Any], None]:
    """A progress callback that prints a line at most every 5 s (at once when a shard failed)."""
    last = [0.0]

    def show(s) -> None:
        now = time.perf_counter()
        if now - last[0] < 5 and s.shards_failed == {}:
            return
        last[0] = now
        rate = s.images / s.seconds if s.seconds else 0.0
        left = eta_s(s, total_images)
        eta = f", ETA {left:.0f} s" if left is not None else ""
        print(f"[progress] shards done {s.shards_done} skipped {s.shards_skipped} ({s.images_skipped} images) "
              f"failed {len(s.shards_failed)} | images {s.images} ({s.images_failed} failed) | "
              f"{rate:.2f} img/s{eta}", flush=True)  # fmt: skip

    return show


def _settings(args: argparse.Namespace) -> JobSettings:
    return JobSettings(num_actors=args.num_actors, max_attempts=args.max_attempts,
                       max_failure_rate=args.max_failure_rate, shard_timeout_s=args.shard_timeout,
                       startup_timeout_s=args.startup_timeout, actor_cpus=args.actor_cpus,
                       lease_ttl_s=args.lease_ttl, overwrite=args.overwrite, merge=not args.no_merge,
                       storage_retry=retry_policy_from_args(args))  # fmt: skip


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The ``label`` command; exit status 0 (done), 1 (shards failed), 2 (refused), 3 (stopped early)."""
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = storage_options_from_arg(args.storage_options)
        redact.install(redact.secret_values(opts))
        config = config_from_args(args)
        if args.shard_size is not None:
            config = build_config(config.preset, {**config.to_dict(), "shard_size": args.shard_size})
        if args.dry_run:
            print(plan(args.dataset, args.output, config, opts))
            return 0
        outcome = label_dataset(args.dataset, args.output, config, _settings(args), opts, progress_printer)
    except (WeightsUnavailableError, ValueError, OSError) as err:  # ValueError: ManifestError, StorageAccessError
        print(f"error: {redact.redact(str(err), redact.secret_values())}", file=sys.stderr)
        return 2
    print_outcome(outcome, args.output, config.batch_size)
    return outcome.exit_code


def print_outcome(outcome: Outcome, output: str, batch_size: int) -> None:
    summary = outcome.summary
    rate = summary.images / summary.seconds if summary.seconds else 0.0
    print(f"summary: shards done {summary.shards_done}, skipped (already committed) {summary.shards_skipped}, "
          f"failed {len(summary.shards_failed)}; images {summary.images}, failed images {summary.images_failed}; "
          f"actor restarts {summary.actor_restarts}; {summary.seconds:.1f} s")  # fmt: skip
    rows = [("shards labeled", summary.shards_done), ("shards skipped (committed before)", summary.shards_skipped),
            ("  their images (not in the rate)", summary.images_skipped),
            ("shards failed", len(summary.shards_failed)), ("images labeled or recorded", summary.images),
            ("images failed (rows with status/error)", summary.images_failed),
            ("actor restarts", summary.actor_restarts), ("actor start failures", summary.actor_start_failures),
            ("shards past their deadline", summary.timeouts), ("seconds", f"{summary.seconds:.1f}"),
            ("images per second", f"{rate:.2f}")]  # fmt: skip
    for name, value in rows:
        print(f"  {name:<42}{value:>12}")
    for sid, err in summary.shards_failed.items():
        print(f"  failed shard {sid}: {err}")
    for sid, size in sorted(summary.smaller_batches.items()):
        print(f"  shard {sid} ran out of memory and was labeled at batch size {size} (its pixels may differ slightly "
              f"from batch size {batch_size}; see docs/RELIABILITY.md)")  # fmt: skip
    if summary.stopped_early:
        print(f"stopped early: {summary.stopped_early}", file=sys.stderr)
    if outcome.merged is not None:
        print(f"merged {len(outcome.merged['shards'])} shards into {output}/merged/")
        missing = outcome.merged.get("missing_tags")
        if missing is not None:  # discovery on: the classes most often suggested but never tagged
            print(f"  suggested but never tagged (discovery; all in {output}/merged/missing_tags.parquet): "
                  + (", ".join(f"{name} ({n} regions, mean score {score:.2f})" for name, n, score in missing)
                     or "none"))  # fmt: skip
