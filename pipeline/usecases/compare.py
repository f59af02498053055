"""Compare two runs image by image: ``compare_runs`` (tables, summary.json and report.html)
and the ``compare`` command in front of it (``jobs/compare_runs.py``, ``tag2mask compare``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline import audit, compare, compare_report, report, stats

DESCRIPTION = """Compare two runs image by image: Parquet tables, summary.json and report.html under --out.

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

OVERLAYS = 4  # least agreeing images drawn in the report


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ``compare`` command's options (jobs/compare_runs.py and ``tag2mask compare``)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("run_a", metavar="RUN_A", help="output prefix of run A")
    p.add_argument("run_b", metavar="RUN_B", help="output prefix of run B")
    p.add_argument("--out", required=True, help="folder for the tables and report.html")
    p.add_argument("--gt", help="ground truth: COCO JSON (instances or stuff) or a folder of PNG label maps")
    p.add_argument("--gt-key", choices=sorted(audit.KEY_FIELDS), default="id",
                   help="which COCO image field names a ground-truth image (default: id)")  # fmt: skip
    p.add_argument("--gt-format", choices=audit.GT_FORMATS, default="png",
                   help="PNG ground truth: 'png' pixel = category id; 'cocostuff' pixel = id - 1")  # fmt: skip
    p.add_argument("--overlays", type=int, default=OVERLAYS, help="least agreeing images drawn in the report")
    return p


def _write(out: str, tables: dict[str, Any], summary: dict[str, Any], page: str) -> None:
    fs, root = fsspec.core.url_to_fs(str(out))
    fs.makedirs(root, exist_ok=True)
    for name, table in tables.items():
        fs.pipe_file(f"{root}/{name}.parquet", stats.parquet_bytes(table))
    fs.pipe_file(f"{root}/summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    fs.pipe_file(f"{root}/report.html", page.encode("utf-8"))


def _with_gt(path: str, gt_key: str, gt_format: str, a: compare.RunImages, b: compare.RunImages,
             rows: list[dict]) -> dict:  # fmt: skip
    cats = compare.gt_categories(a, b)
    gt = audit.open_ground_truth(path, gt_key, gt_format)
    if isinstance(gt, audit.CocoStuffFolder):
        gt.keep_only(c["id"] for c in a.categories)
    keys = [r["image_id"] for r in rows if r["status"] == compare.OK]
    audit_a, audit_b = (compare.audit_run(run, gt, keys, f"ground truth {path}") for run in (a, b))
    return {"gt_classes": compare.gt_class_table(audit_a, audit_b, cats),
            "gt_images": compare.gt_image_rows(audit_a, audit_b),
            "gt_summary": compare.gt_summary(audit_a, audit_b)}  # fmt: skip


def _pairs(rows: list[dict], a: compare.RunImages, b: compare.RunImages, count: int) -> list[compare_report.Pair]:
    scored = sorted((r for r in rows if r["agreement"] is not None), key=lambda r: (r["agreement"], r["image_id"]))
    return [compare_report.Pair(r["image_id"], r["agreement"], a.read(r["image_id"]), b.read(r["image_id"]))
            for r in scored[:count]]  # fmt: skip


@dataclass(frozen=True)
class CompareOutcome:
    """The summary written as summary.json (with "ground_truth" when a ground truth was given)."""

    summary: dict[str, Any]


def compare_runs(run_a: str, run_b: str, out: str, *, gt: str | None = None, gt_key: str = "id",
                 gt_format: str = "png", overlays: int = OVERLAYS) -> CompareOutcome:  # fmt: skip
    """Compare runs A and B image by image (optionally each against ground truth ``gt``); write the
    tables, summary.json and report.html under ``out`` (a folder or fsspec prefix). Raises
    ``ValueError``/``FileNotFoundError`` when a run cannot be read or the runs share no categories."""
    a, b = compare.open_images(run_a), compare.open_images(run_b)
    cats = compare.share_categories(a.categories, b.categories)
    result = compare.compare_runs(a, b, cats)
    rows = result.sorted_rows()
    truth = _with_gt(gt, gt_key, gt_format, a, b, rows) if gt else None
    summary = compare.summary(result, cats)
    tables = {"agreement": compare.image_table(rows), "classes": compare.class_table(result.matrix, cats),
              "pairs": compare.pairs_table(result.matrix, result.class_ids),
              "categories": compare.category_table(cats)}  # fmt: skip
    if truth is not None:
        tables.update(gt_classes=truth["gt_classes"], gt_images=compare.gt_image_table(truth["gt_images"]))
        summary["ground_truth"] = truth["gt_summary"]
    headline = {k: v for k, v in summary.items() if k != "ground_truth"}
    gt_parts = (truth["gt_classes"], truth["gt_images"], truth["gt_summary"]) if truth else (None, None, None)
    page = compare_report.build_report(f"{run_a} (A) against {run_b} (B)", headline, tables["categories"],
                                       tables["classes"], rows, _pairs(rows, a, b, overlays), *gt_parts)  # fmt: skip
    _write(out, tables, summary, page)
    return CompareOutcome(summary)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The ``compare`` command; exit status 0, or 2 when the runs cannot be compared."""
    args = build_parser(prog).parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = compare_runs(args.run_a, args.run_b, args.out, gt=args.gt, gt_key=args.gt_key,
                               gt_format=args.gt_format, overlays=args.overlays).summary  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"compare: {summary['images_compared']} images compared, {summary['images_missing_a']} missing in A, "
          f"{summary['images_missing_b']} missing in B, {summary['images_error']} errors")  # fmt: skip
    for name in ("agreement", "miou", "ignore_fraction_a", "ignore_fraction_b", "unshared_fraction"):
        print(f"  {name:<22}{report.fmt(summary[name]):>10}")
    if "ground_truth" in summary:
        for name in ("miou", "labelled_accuracy", "ignored_fraction"):
            ga, gb = summary["ground_truth"]["a"][name], summary["ground_truth"]["b"][name]
            print(f"  ground truth {name:<18} A {report.fmt(ga):>8}  B {report.fmt(gb):>8}")
    print(f"  tables and report: {args.out}/ (report.html)")
    return 0
