"""Audit pseudo labels against ground truth: Parquet tables, a one-screen summary and report.html.

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

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fsspec  # noqa: E402
import numpy as np  # noqa: E402

from pipeline import audit, report, stats, types  # noqa: E402
from pipeline.audit import LabelSource  # noqa: E402

OVERLAYS = 4  # worst and best images shown in the report
CHUNK = 256  # images per work unit when the prediction is a PNG folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return p.parse_args(argv)


def _open_pred(url: str) -> tuple[list[LabelSource], list[dict] | None, Any, dict[str, str] | None]:
    """(work units, categories or None, stats_images table or None, file stem by image id or None)."""
    if audit.is_run_output(url):
        run = audit.open_run(url)
        if run.ignored_shards:
            print(f"note: {run.ignored_shards} shard(s) left out: stale (another run's fingerprint) or broken marker",
                  file=sys.stderr)  # fmt: skip
        return list(run.shards.values()), run.categories, run.stats, run.file_stems
    return [audit.PngFolder(url)], None, None, None


def _categories(pred: list[dict] | None, gt: list[dict] | None, path: str | None) -> list[dict]:
    """The categories both sides agree on; a side that names none takes --categories, else the other side's."""
    given = None
    if path:
        with fsspec.open(path, "rt") as f:
            given = json.load(f)
    if pred is None and gt is None and given is None:
        raise ValueError("neither side names its categories (two PNG folders): give --categories FILE")
    pred_side = pred if pred is not None else given if given is not None else gt
    gt_side = gt if gt is not None else given if given is not None else pred
    return audit.match_categories(pred_side, gt_side)


def _read_manifest(path: str | None) -> dict[str, dict]:
    if not path:
        return {}
    from pipeline import manifest  # the manifest reader validates records against our schema

    return {r["id"]: r for r in manifest.read_jsonl(path)}


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


def _overlays(rows, units, gt, records, count: int) -> tuple[list[report.Overlay], list[report.Overlay]]:
    scored = sorted((r for r in rows if r["miou"] is not None), key=lambda r: (r["miou"], r["image_id"]))
    where = {k: u for u in units for k in u.image_ids()}

    def item(row: dict) -> report.Overlay:
        key = row["image_id"]
        return report.Overlay(key, row["miou"], gt.read(key), where[key].read(key), _picture(records.get(key)))

    worst = scored[:count]
    best = [r for r in scored[::-1][:count] if r not in worst]
    return [item(r) for r in worst], [item(r) for r in best]


def _picture(record: dict | None) -> np.ndarray | None:
    if not record or "uri" not in record:
        return None
    from pipeline.decode import ImageDecodeError, decode_image

    try:
        with fsspec.open(record["uri"], "rb") as f:
            return decode_image(f.read())
    except (OSError, ImageDecodeError):
        return None  # the overlay is still drawn, over the label colours only


def write_tables(out: Path, result: audit.Audit, categories: list[dict], corr: list[dict]) -> dict[str, Any]:
    """Parquet tables (byte-identical across runs) and summary.json; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    tables = {"images": audit.image_table(result.sorted_rows()),
              "classes": audit.class_table(result.matrix, categories),
              "confusion": audit.confusion_table(result.matrix, result.class_ids),
              "correlations": audit.correlation_table(corr)}  # fmt: skip
    for name, table in tables.items():
        (out / f"{name}.parquet").write_bytes(stats.parquet_bytes(table))
    summary = audit.summary(result)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def print_summary(summary: dict[str, Any], result: audit.Audit, categories: list[dict], corr: list[dict],
                  out: Path) -> None:  # fmt: skip
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        units, pred_cats, run_stats, stems = _open_pred(args.pred)
        gt = audit.open_ground_truth(args.gt, args.gt_key, args.gt_format)
        categories = _categories(pred_cats, gt.categories, args.categories)
        if isinstance(gt, audit.CocoStuffFolder):
            gt.keep_only(c["id"] for c in categories)
        records = _read_manifest(args.manifest)
        pred_ids = [k for u in units for k in u.image_ids()]
        gt, how = audit.pair(pred_ids, gt, stems, args.pred_key, f"ground truth {args.gt}")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if how != "id":
        print(f"pairing our images with the ground truth by image file stem (--pred-key {how})")
    class_ids = audit.check_class_ids(c["id"] for c in categories)
    tags = {k: r.get("tags", []) for k, r in records.items()} if records else None
    _, only_gt, only_pred = audit.missing((k for u in units for k in u.image_ids()), gt.image_ids())
    work = _work(units, set(gt.image_ids()))
    parts = (_run_ray if args.ray else _run_serial)(work, gt, class_ids, tags)
    result = functools.reduce(audit.Audit.merge, parts, audit.Audit(class_ids))
    _missing_rows(result, only_gt, only_pred, run_stats)
    rows = result.sorted_rows()
    corr = audit.correlations(run_stats, rows) if run_stats is not None else []
    out = Path(args.out)
    summary = write_tables(out, result, categories, corr)
    worst, best = _overlays(rows, units, gt, records, args.overlays)
    page = report.build_report(f"Audit of {args.pred} against {args.gt}", summary,
                               audit.class_table(result.matrix, categories), rows, result.matrix, corr, run_stats,
                               worst, best)  # fmt: skip
    (out / "report.html").write_text(page, encoding="utf-8")
    print_summary(summary, result, categories, corr, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
