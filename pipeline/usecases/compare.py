"""Compare two runs image by image: Parquet tables, summary.json and report.html under --out.

    python jobs/compare_runs.py s3://bucket/pseudo/cliper s3://bucket/pseudo/clip-es --out compare/
    python jobs/compare_runs.py out/cliper out/clip-es --gt instances_val2017.json --out compare/

RUN_A and RUN_B are output prefixes (the shards committed under each run.json fingerprint);
images pair by manifest id. Without ground truth: agreement.parquet (per image: pixel agreement,
mIoU of A against B, ignore and unshared pixels), classes.parquet (per-class IoU of A against B),
pairs.parquet (A class x B class pixel counts), categories.parquet. With --gt (a COCO JSON or a
folder of PNG maps, read as jobs/audit_masks.py reads them): also gt_classes.parquet (per-class
IoU of A and B side by side) and gt_images.parquet (per-image mIoU of each and B minus A).
Conventions: pipeline/compare.py. Every table is byte-identical across reruns.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import audit, compare, compare_report, report, stats  # noqa: E402

OVERLAYS = 4  # least agreeing images drawn in the report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", metavar="RUN_A", help="output prefix of run A")
    p.add_argument("run_b", metavar="RUN_B", help="output prefix of run B")
    p.add_argument("--out", required=True, help="folder for the tables and report.html")
    p.add_argument("--gt", help="ground truth: COCO JSON (instances or stuff) or a folder of PNG label maps")
    p.add_argument("--gt-key", choices=sorted(audit.KEY_FIELDS), default="id",
                   help="which COCO image field names a ground-truth image (default: id)")  # fmt: skip
    p.add_argument("--gt-format", choices=audit.GT_FORMATS, default="png",
                   help="PNG ground truth: 'png' pixel = category id; 'cocostuff' pixel = id - 1")  # fmt: skip
    p.add_argument("--overlays", type=int, default=OVERLAYS, help="least agreeing images drawn in the report")
    return p.parse_args(argv)


def _write(out: Path, tables: dict[str, Any], summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        (out / f"{name}.parquet").write_bytes(stats.parquet_bytes(table))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def _with_gt(args: argparse.Namespace, a: compare.RunImages, b: compare.RunImages, rows: list[dict]) -> dict:
    cats = compare.gt_categories(a, b)
    gt = audit.open_ground_truth(args.gt, args.gt_key, args.gt_format)
    if isinstance(gt, audit.CocoStuffFolder):
        gt.keep_only(c["id"] for c in a.categories)
    keys = [r["image_id"] for r in rows if r["status"] == compare.OK]
    audit_a, audit_b = (compare.audit_run(run, gt, keys, f"ground truth {args.gt}") for run in (a, b))
    return {"gt_classes": compare.gt_class_table(audit_a, audit_b, cats),
            "gt_images": compare.gt_image_rows(audit_a, audit_b),
            "gt_summary": compare.gt_summary(audit_a, audit_b)}  # fmt: skip


def _pairs(rows: list[dict], a: compare.RunImages, b: compare.RunImages, count: int) -> list[compare_report.Pair]:
    scored = sorted((r for r in rows if r["agreement"] is not None), key=lambda r: (r["agreement"], r["image_id"]))
    return [compare_report.Pair(r["image_id"], r["agreement"], a.read(r["image_id"]), b.read(r["image_id"]))
            for r in scored[:count]]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        a, b = compare.open_images(args.run_a), compare.open_images(args.run_b)
        cats = compare.share_categories(a.categories, b.categories)
        result = compare.compare_runs(a, b, cats)
        rows = result.sorted_rows()
        gt = _with_gt(args, a, b, rows) if args.gt else None
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = compare.summary(result, cats)
    tables = {"agreement": compare.image_table(rows), "classes": compare.class_table(result.matrix, cats),
              "pairs": compare.pairs_table(result.matrix, result.class_ids),
              "categories": compare.category_table(cats)}  # fmt: skip
    if gt is not None:
        tables.update(gt_classes=gt["gt_classes"], gt_images=compare.gt_image_table(gt["gt_images"]))
        summary["ground_truth"] = gt["gt_summary"]
    out = Path(args.out)
    _write(out, tables, summary)
    headline = {k: v for k, v in summary.items() if k != "ground_truth"}
    gt_parts = (gt["gt_classes"], gt["gt_images"], gt["gt_summary"]) if gt is not None else (None, None, None)
    title = f"{args.run_a} (A) against {args.run_b} (B)"
    page = compare_report.build_report(title, headline, tables["categories"], tables["classes"], rows,
                                       _pairs(rows, a, b, args.overlays), *gt_parts)  # fmt: skip
    (out / "report.html").write_text(page, encoding="utf-8")
    print(f"compare: {summary['images_compared']} images compared, {summary['images_missing_a']} missing in A, "
          f"{summary['images_missing_b']} missing in B, {summary['images_error']} errors")  # fmt: skip
    for name in ("agreement", "miou", "ignore_fraction_a", "ignore_fraction_b", "unshared_fraction"):
        print(f"  {name:<22}{report.fmt(summary[name]):>10}")
    if gt is not None:
        for name in ("miou", "labelled_accuracy", "ignored_fraction"):
            ga, gb = gt["gt_summary"]["a"][name], gt["gt_summary"]["b"][name]
            print(f"  ground truth {name:<18} A {report.fmt(ga):>8}  B {report.fmt(gb):>8}")
    print(f"  tables and report: {out}/ (report.html)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
