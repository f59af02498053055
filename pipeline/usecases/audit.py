"""Audit pseudo labels against ground truth: ``run_audit`` (tables, summary.json and report.html
under an output folder or fsspec prefix) and the ``audit`` command in front of it
(``jobs/audit_masks.py``, ``tag2mask audit``)."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from pipeline import audit, report, stats, types
from pipeline.audit import LabelSource

DESCRIPTION = """Audit pseudo labels against ground truth: Parquet tables, a one-screen summary and report.html.

    python jobs/audit_masks.py --pred s3://bucket/pseudo/run1 --gt instances_val2017.json --out report/
    python jobs/audit_masks.py --pred labels/ --gt VOC2012/SegmentationClass --categories voc.json --out report/

    python jobs/audit_masks.py --pred out/ --gt cocostuff/stuffthingmaps/val2017 --gt-format cocostuff --out report/

--pred is our output prefix (the shards committed under its run.json fingerprint: their COCO files
and stats; stale shards are left out and counted) or a folder of PNG label maps; --gt a COCO
instances/stuff JSON (semantic maps painted from its annotations) or a folder of PNG label maps
(255 ignore; --gt-format cocostuff for COCO-Stuff's maps, which store category id - 1). Images
pair up by key: on our side the manifest id or the image file's stem (--pred-key; "auto" takes
the one that pairs more), on theirs the COCO image id (--gt-key) or the PNG file stem. When
nothing pairs, the audit stops (exit 2) and shows keys of both sides. Categories come from our
run, the COCO ground truth or --categories (JSON list of {id, name}, needed for two PNG folders).
--manifest (JSONL, our manifest) adds each image's tags to the per-image rows and its picture to
the overlays. --ray spreads the work over shards with Ray (same tables either way). Writes under
--out: images.parquet, classes.parquet, confusion.parquet, correlations.parquet, summary.json,
report.html.
"""
OVERLAYS = 4  # worst and best images shown in the report
CHUNK = 256  # images per work unit when the prediction is a PNG folder


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ``audit`` command's options (jobs/audit_masks.py and ``tag2mask audit``)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--pred", required=True, help="our output prefix, or a folder of PNG label maps")
    p.add_argument("--gt", required=True, help="COCO JSON (instances or stuff), or a folder of PNG label maps")
    p.add_argument("--out", required=True, help="folder for the tables and report.html")
    p.add_argument("--gt-key", choices=sorted(audit.KEY_FIELDS), default="id",
                   help="which COCO image field names a ground-truth image (default: id)")  # fmt: skip
    p.add_argument(
        "--gt-format",
        choices=audit.GT_FORMATS,
        default="png",
        help="PNG ground truth: 'png' pixel = category id; 'cocostuff' pixel = id - 1, 255 unlabeled",
    )
    p.add_argument(
        "--pred-key",
        choices=audit.PRED_KEYS,
        default="auto",
        help="name our images by manifest id or image file stem for pairing (default: the one that pairs)",
    )
    p.add_argument("--categories", help="JSON list of {id, name}, for PNG folders on both sides")
    p.add_argument("--manifest", help="our JSONL manifest: tags per image and image URIs for the overlays")
    p.add_argument("--overlays", type=int, default=OVERLAYS, help="worst and best images drawn in the report")
    p.add_argument("--ray", action="store_true", help="audit the shards in parallel on Ray (local or cluster)")
    return p


@dataclass(frozen=True)
class _Pred:
    units: list[LabelSource]  # work units: a run's shards, or one PNG folder
    categories: list[dict] | None
    stats: Any  # the run's stats_images table, or None
    stems: dict[str, str] | None  # image file stem by image id
    ignored_shards: int = 0


def _open_pred(url: str, opts: dict) -> _Pred:
    if audit.is_run_output(url, **opts):
        run = audit.open_run(url, **opts)
        return _Pred(list(run.shards.values()), run.categories, run.stats, run.file_stems, run.ignored_shards)
    return _Pred([audit.PngFolder(url, **opts)], None, None, None)


def _categories(pred: list[dict] | None, gt: list[dict] | None, path: str | None, opts: dict) -> list[dict]:
    """The categories both sides agree on; a side that names none takes --categories, else the other side's."""
    given = None
    if path:
        with fsspec.open(path, "rt", **opts) as f:
            given = json.load(f)
    if pred is None and gt is None and given is None:
        raise ValueError("neither side names its categories (two PNG folders): give --categories FILE")
    pred_side = pred if pred is not None else given if given is not None else gt
    gt_side = gt if gt is not None else given if given is not None else pred
    return audit.match_categories(pred_side, gt_side)


def _read_manifest(path: str | None, opts: dict) -> dict[str, dict]:
    if not path:
        return {}
    from pipeline import manifest  # the manifest reader validates records against our schema

    return {r["id"]: r for r in manifest.read_jsonl(path, **opts)}


def _work(units: list[LabelSource], gt_keys: set[str]) -> list[tuple[LabelSource, list[str]]]:
    """(source, keys present on both sides) per shard, or per chunk of a PNG folder."""
    work = []
    for unit in units:
        keys = [k for k in unit.image_ids() if k in gt_keys]
        work += [(unit, keys[i : i + CHUNK]) for i in range(0, len(keys), CHUNK)]
    return work


def _run_serial(work, gt, class_ids, tags) -> list[audit.Audit]:
    return [audit.audit_images(unit, gt, keys, class_ids, tags) for unit, keys in work]


def _run_ray(work, gt, class_ids, tags) -> list[audit.Audit]:
    """One Ray task per work unit; the ground truth is put in the object store once."""
    from pipeline import runner  # the one module that talks to Ray

    return runner.map_tasks(_audit_unit, [(unit, keys) for unit, keys in work], (gt, class_ids, tags))


def _audit_unit(unit, keys, gt, class_ids, tags) -> audit.Audit:
    return audit.audit_images(unit, gt, keys, class_ids, tags)


def _missing_rows(result: audit.Audit, only_gt: list[str], only_pred: list[str], run_stats: Any) -> None:
    failed = {}
    if run_stats is not None:
        for r in run_stats.select(["image_id", "status", "error"]).to_pylist():
            if r["status"] != types.OK:
                failed[r["image_id"]] = f"the run failed this image: {r['status']}: {r['error']}"
    for key in only_gt:
        result.add_unscored(key, audit.MISSING_PRED, failed.get(key, "not in the prediction"))
    for key in only_pred:
        result.add_unscored(key, audit.MISSING_GT, "not in the ground truth")


def _overlays(rows, units, gt, records, count: int, opts: dict) -> tuple[list[report.Overlay], list[report.Overlay]]:
    scored = sorted((r for r in rows if r["miou"] is not None), key=lambda r: (r["miou"], r["image_id"]))
    where = {k: u for u in units for k in u.image_ids()}

    def item(row: dict) -> report.Overlay:
        key = row["image_id"]
        return report.Overlay(key, row["miou"], gt.read(key), where[key].read(key), _picture(records.get(key), opts))

    worst = scored[:count]
    best = [r for r in scored[::-1][:count] if r not in worst]
    return [item(r) for r in worst], [item(r) for r in best]


def _picture(record: dict | None, opts: dict) -> np.ndarray | None:
    if not record or "uri" not in record:
        return None
    from pipeline.decode import ImageDecodeError, decode_image

    try:
        with fsspec.open(record["uri"], "rb", **opts) as f:
            return decode_image(f.read())
    except (OSError, ImageDecodeError):
        return None  # the overlay is still drawn, over the label colours only


def write_tables(out: str, result: audit.Audit, categories: list[dict], corr: list[dict],
                 opts: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """Parquet tables (byte-identical across runs) and summary.json under the folder or fsspec
    prefix ``out``; returns the summary."""
    fs, root = fsspec.core.url_to_fs(str(out), **(opts or {}))
    fs.makedirs(root, exist_ok=True)
    tables = {"images": audit.image_table(result.sorted_rows()),
              "classes": audit.class_table(result.matrix, categories),
              "confusion": audit.confusion_table(result.matrix, result.class_ids),
              "correlations": audit.correlation_table(corr)}  # fmt: skip
    for name, table in tables.items():
        fs.pipe_file(f"{root}/{name}.parquet", stats.parquet_bytes(table))
    summary = audit.summary(result)
    fs.pipe_file(f"{root}/summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def print_summary(summary: dict[str, Any], result: audit.Audit, categories: list[dict], corr: list[dict],
                  out: str) -> None:  # fmt: skip
    print(f"audit: {summary['images_scored']} images scored, {summary['images_missing_pred']} missing in the "
          f"prediction, {summary['images_missing_gt']} missing in the ground truth, "
          f"{summary['images_error']} errors")  # fmt: skip
    for name in ("miou", "miou_fg", "pixel_accuracy", "ignored_fraction", "labelled_accuracy"):
        print(f"  {name:<22}{report.fmt(summary[name]):>10}")
    classes = [r for r in audit.class_table(result.matrix, categories).to_pylist() if r["iou"] is not None]
    worst = sorted(classes, key=lambda r: r["iou"])[:5]
    print("  worst classes: " + ", ".join(f"{r['name']} {r['iou']:.3f}" for r in worst))
    ranked = sorted((c for c in corr if c["spearman"] is not None), key=lambda c: -abs(c["spearman"]))
    if ranked:
        print("  stats vs mIoU (Spearman): " + ", ".join(f"{c['stat']} {c['spearman']:+.2f}" for c in ranked[:4]))
    print(f"  tables and report: {out}/ (report.html)")


@dataclass(frozen=True)
class AuditOutcome:
    """What ``run_audit`` wrote and found: the summary (as summary.json), the merged per-image and
    per-class counts, the categories audited, the stats-vs-mIoU correlations, how images paired
    ("id" or "stem") and how many of the run's shards were left out (stale or broken)."""

    summary: dict[str, Any]
    result: audit.Audit
    categories: list[dict]
    correlations: list[dict]
    paired_by: str
    ignored_shards: int


def run_audit(pred: str, gt: str, out: str, *, gt_key: str = "id", gt_format: str = "png", pred_key: str = "auto",
              categories: str | None = None, manifest: str | None = None, overlays: int = OVERLAYS,
              use_ray: bool = False, storage_options: dict | None = None) -> AuditOutcome:  # fmt: skip
    """Audit the prediction ``pred`` (our output prefix or a folder of PNG maps) against ``gt`` (a
    COCO JSON or a folder of PNG maps); write images/classes/confusion/correlations.parquet,
    summary.json and report.html under ``out`` (a folder or fsspec prefix). Raises ``ValueError`` or
    ``FileNotFoundError`` when the sides cannot be read or paired (nothing is written then)."""
    opts = storage_options or {}
    p = _open_pred(pred, opts)
    truth = audit.open_ground_truth(gt, gt_key, gt_format, **opts)
    cats = _categories(p.categories, truth.categories, categories, opts)
    if isinstance(truth, audit.CocoStuffFolder):
        truth.keep_only(c["id"] for c in cats)
    records = _read_manifest(manifest, opts)
    pred_ids = [k for u in p.units for k in u.image_ids()]
    truth, how = audit.pair(pred_ids, truth, p.stems, pred_key, f"ground truth {gt}")
    class_ids = audit.check_class_ids(c["id"] for c in cats)
    tags = {k: r.get("tags", []) for k, r in records.items()} if records else None
    _, only_gt, only_pred = audit.missing(pred_ids, truth.image_ids())
    work = _work(p.units, set(truth.image_ids()))
    parts = (_run_ray if use_ray else _run_serial)(work, truth, class_ids, tags)
    result = functools.reduce(audit.Audit.merge, parts, audit.Audit(class_ids))
    _missing_rows(result, only_gt, only_pred, p.stats)
    rows = result.sorted_rows()
    corr = audit.correlations(p.stats, rows) if p.stats is not None else []
    summary = write_tables(out, result, cats, corr, opts)
    worst, best = _overlays(rows, p.units, truth, records, overlays, opts)
    page = report.build_report(f"Audit of {pred} against {gt}", summary, audit.class_table(result.matrix, cats), rows,
                               result.matrix, corr, p.stats, worst, best)  # fmt: skip
    fs, root = fsspec.core.url_to_fs(str(out), **opts)
    fs.pipe_file(f"{root}/report.html", page.encode("utf-8"))
    return AuditOutcome(summary, result, cats, corr, how, p.ignored_shards)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The ``audit`` command; exit status 0, or 2 when the sides cannot be read or paired."""
    args = build_parser(prog).parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        done = run_audit(args.pred, args.gt, args.out, gt_key=args.gt_key, gt_format=args.gt_format,
                         pred_key=args.pred_key, categories=args.categories, manifest=args.manifest,
                         overlays=args.overlays, use_ray=args.ray)  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if done.ignored_shards:
        print(f"note: {done.ignored_shards} shard(s) left out: stale (another run's fingerprint) or broken marker",
              file=sys.stderr)  # fmt: skip
    if done.paired_by != "id":
        print(f"pairing our images with the ground truth by image file stem (--pred-key {done.paired_by})")
    print_summary(done.summary, done.result, done.categories, done.correlations, args.out)
    return 0
