"""Label a dataset on a Ray cluster (or a local Ray) and write COCO annotations, PNG label maps and
Parquet statistics under --output. Rerun the same command to finish an interrupted run.

    ray job submit --working-dir . -- python jobs/label_coco.py \\
        --annotations s3://bucket/coco/instances_train2017.json \\
        --images s3://bucket/coco/train2017/ --output s3://bucket/pseudo/run1

    python jobs/label_coco.py --manifest images.jsonl --categories categories.json --output out/
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import lease, manifest, methods, redact  # noqa: E402
from pipeline.cli import (  # noqa: E402
    add_model_arguments,
    add_storage_retry_arguments,
    config_from_args,
    retry_policy_from_args,
    storage_options_from_arg,
)
from pipeline.config import build_config  # noqa: E402
from pipeline.models import WeightsUnavailableError, pin_weights  # noqa: E402
from pipeline.storage import commit  # noqa: E402
from pipeline.storage.merge import merge  # noqa: E402
from pipeline.storage.store import Store, check_access  # noqa: E402
from pipeline.types import Category, run_fingerprint  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    run.add_argument("--actor-cpus", type=int, help="CPU cores and torch threads per actor (default: the cluster's "
                                                    "CPUs per actor, at most 4)")  # fmt: skip
    run.add_argument("--lease-ttl", type=float, default=300.0, metavar="S",
                     help="the lease on --output expires S seconds after its last renewal (every S/3)")  # fmt: skip
    run.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    run.add_argument("--overwrite", action="store_true", help="accept a changed config/weights/manifest")
    run.add_argument("--no-merge", action="store_true", help="skip the final merge (very large datasets)")
    run.add_argument("--storage-options", metavar="JSON|FILE",
                     help="fsspec options for every URL (endpoint, region, ...): inline JSON, or a JSON file's path "
                          "(credentials only in a file or the environment)")  # fmt: skip
    add_model_arguments(p)
    add_storage_retry_arguments(p)
    args = p.parse_args(argv)
    if bool(args.annotations) == bool(args.manifest):
        p.error("give either --annotations with --images, or --manifest with --categories")
    if args.annotations and not args.images:
        p.error("--annotations needs --images (the folder holding the files it names)")
    if args.manifest and not args.categories:
        p.error("--manifest needs --categories (a JSON list of {id, name})")
    return args


MAX_SHOWN = 20  # manifest problems printed before "... and N more"


@dataclass(frozen=True)
class Inputs:
    """The checked manifest: categories, a factory of record streams, and what the one full scan
    measured (the manifest's fingerprint and record count)."""

    categories: list[Category]
    records: Callable[[], Iterator[dict]]
    fingerprint: str
    count: int


def _inputs(args: argparse.Namespace, prompt_set: str, opts: dict) -> Inputs:
    """One full scan, before any model is loaded, that finds every manifest problem (schema,
    duplicate ids, unknown tags) and fingerprints and counts the records on the way."""
    problems: list[str] = []
    if args.annotations:
        cats, loaded = manifest.read_coco(args.annotations, args.images, prompt_set, problems, **opts)
        factory, scan = (lambda: iter(loaded)), iter(loaded)
    else:
        cats = manifest.read_categories(args.categories, prompt_set, **opts)
        factory = lambda: manifest.read_jsonl(args.manifest, cats, **opts)  # noqa: E731
        scan = manifest.read_jsonl(args.manifest, cats, problems, **opts)
    count = [0]

    def counted() -> Iterator[dict]:
        for record in scan:
            count[0] += 1
            yield record

    fingerprint = manifest.fingerprint(counted(), cats)
    if problems:
        shown = "\n  ".join(problems[:MAX_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise manifest.ManifestError(f"{len(problems)} manifest record(s) cannot be used; nothing was labeled:\n  "
                                     f"{shown}{more}")  # fmt: skip
    return Inputs(cats, factory, fingerprint, count[0])


def _check_image_root(records, opts: dict) -> None:
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


def eta_s(summary, total_images: int | None) -> float | None:
    """Seconds left: images not yet labeled (this run's and those of shards committed before it
    excepted) at this run's own rate; None until there is a rate."""
    rate = summary.images / summary.seconds if summary.seconds else 0.0
    if not total_images or not rate:
        return None
    return max(0, total_images - summary.images - summary.images_skipped) / rate


def _progress(total_images: int | None):
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = storage_options_from_arg(args.storage_options)
        redact.install(redact.secret_values(opts))
        config = config_from_args(args)
        if args.shard_size is not None:
            config = build_config(config.preset, {**config.to_dict(), "shard_size": args.shard_size})
        inputs = _inputs(args, config.cliper.prompt_set, opts)
        records, manifest_fp = inputs.records, inputs.fingerprint
        _check_image_root(records, opts)
        pinned, models_fp = pin_weights(config.model, opts, need_sd=methods.needs_sd(config))  # hub commits pinned
        config = dataclasses.replace(config, model=pinned)
        run_fp = run_fingerprint(config.fingerprint(), models_fp, manifest_fp)
        store = Store.open(args.output, retry=retry_policy_from_args(args), **opts)
        if args.dry_run:
            shard_ids = [s.shard_id for s in manifest.shards(records(), config.shard_size)]
            committed = sum(commit.is_committed(store, sid, run_fp.digest) for sid in shard_ids)
            old = commit.read_run(store)
            same = not old or old["fingerprint"] == run_fp.digest
            print(f"plan: {len(shard_ids)} shards, {committed} committed, {len(shard_ids) - committed} remaining, "
                  f"about {(len(shard_ids) - committed) * config.shard_size} images; "
                  f"{'same run' if same else 'A DIFFERENT RUN is stored'}")  # fmt: skip
            return 0
        check_access(store)
        keeper = lease.Keeper(store, args.lease_ttl)
        with keeper:  # one driver per prefix: a second one is refused here (LeaseHeldError, exit 2)
            commit.write_run(store, run_fp, config.to_dict(), models_fp, overwrite=args.overwrite)
            return _run(args, config, inputs, run_fp.digest, models_fp, store, opts, keeper)
    except (WeightsUnavailableError, ValueError, OSError) as err:  # ValueError: ManifestError, StorageAccessError
        print(f"error: {redact.redact(str(err), redact.secret_values())}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, config, inputs: Inputs, fingerprint: str, models_fp: dict, store, opts: dict,
         keeper: lease.Keeper) -> int:  # fmt: skip
    """Label under the lease; exit status 0 (done), 1 (shards failed) or 3 (stopped early).
    Raises ValueError when the cluster cannot place the actors."""
    from pipeline import runner  # imports Ray only once the inputs are known to be good

    timeouts = {"shard_timeout_s": args.shard_timeout, "startup_timeout_s": args.startup_timeout}
    options = runner.RunOptions(num_actors=args.num_actors, max_attempts=args.max_attempts,
                                max_failure_rate=args.max_failure_rate, storage_options=opts,
                                actor_cpus=args.actor_cpus, model_fingerprint=models_fp,
                                storage_retry=store.retry_policy,
                                **{k: v for k, v in timeouts.items() if v is not None})  # fmt: skip
    summary = runner.run(config, inputs.categories, manifest.shards(inputs.records(), config.shard_size), args.output,
                         fingerprint, options, _progress(inputs.count), stop=keeper.lost)  # fmt: skip
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
              f"from batch size {config.batch_size}; see docs/RELIABILITY.md)")  # fmt: skip
    if summary.stopped_early:
        print(f"stopped early: {summary.stopped_early}", file=sys.stderr)
        return 3
    if summary.shards_failed:
        return 1
    if not args.no_merge and summary.committed:
        merged = merge(store, sorted(summary.committed), fingerprint)
        print(f"merged {len(merged['shards'])} shards into {args.output}/merged/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
