"""The comparison's HTML report, in the audit report's style (``pipeline/report.py``): one static
file, charts as embedded PNGs, no JavaScript, no URL.

Sections (``SECTIONS``): summary, categories, per-class IoU of A against B, per-image agreement,
the least agreeing images (A, B and where they disagree), and with ground truth: per-class IoU of
each run side by side and the per-image mIoU deltas; then missing and failed images.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from pipeline.report import colorize, fmt, html_page, panels_chart, png_base64, table_html
from pipeline.types import IGNORE

SECTIONS = {
    "summary": "Summary",
    "categories": "Categories",
    "class-agreement": "Per-class IoU of A against B",
    "image-agreement": "Per-image agreement",
    "disagreeing": "Least agreeing images",
    "gt-classes": "Per-class IoU against the ground truth, A and B",
    "gt-images": "Per-image mIoU against the ground truth: B minus A",
    "missing": "Missing and failed images",
}
COLOURS = ("#4878a8", "#d08a3a")  # run A, run B


@dataclass(frozen=True)
class Pair:
    """One image to show: [H, W] uint8 label maps of A and B."""

    image_id: str
    agreement: float | None
    a: np.ndarray
    b: np.ndarray


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _section(key: str, body: str) -> str:
    return f'<section id="{key}"><h2>{html.escape(SECTIONS[key])}</h2>{body}</section>'


def class_agreement_chart(classes: pa.Table) -> str:
    rows = sorted((r for r in classes.to_pylist() if r["iou"] is not None), key=lambda r: r["iou"])
    fig = Figure(figsize=(8, max(2.0, 0.22 * len(rows) + 1)))
    ax = fig.add_subplot()
    ax.barh([f"{r['name']} ({r['category_id']})" for r in rows], [r["iou"] for r in rows], color=COLOURS[0])
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU of A against B")
    fig.tight_layout()
    return png_base64(fig)


def histogram_chart(values: Sequence[float], label: str, value_range: tuple[float, float] = (0, 1)) -> str:
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    ax.hist(list(values), bins=20, range=value_range, color=COLOURS[0], edgecolor="white")
    ax.set_xlabel(label)
    ax.set_ylabel("images")
    fig.tight_layout()
    return png_base64(fig)


def gt_class_chart(classes: pa.Table) -> str:
    """Grouped horizontal bars: each class's IoU for A and B."""
    rows = [r for r in classes.to_pylist() if r["iou_a"] is not None or r["iou_b"] is not None]
    rows.sort(key=lambda r: (r["iou_a"] or 0.0) + (r["iou_b"] or 0.0))
    fig = Figure(figsize=(8, max(2.0, 0.32 * len(rows) + 1)))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    for k, side in enumerate(("a", "b")):
        ax.barh(y + (k - 0.5) * 0.4, [r[f"iou_{side}"] or 0.0 for r in rows], height=0.4, color=COLOURS[k],
                label=f"run {side.upper()}")  # fmt: skip
    ax.set_yticks(y, [f"{r['name']} ({r['category_id']})" for r in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU against the ground truth")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return png_base64(fig)


def miou_scatter_chart(rows: Sequence[Mapping[str, Any]]) -> str:
    pts = [(r["miou_a"], r["miou_b"]) for r in rows if r["miou_delta"] is not None]
    fig = Figure(figsize=(4, 4))
    ax = fig.add_subplot()
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, alpha=0.6, color=COLOURS[0])
    ax.plot([0, 1], [0, 1], color="#999", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mIoU of A")
    ax.set_ylabel("mIoU of B")
    fig.tight_layout()
    return png_base64(fig)


def disagreement_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """HWC uint8: green where A and B agree, red where they differ, yellow where either is 255."""
    out = np.full((*a.shape, 3), (210, 40, 40), dtype=np.uint8)
    out[a == b] = (40, 170, 60)
    out[(a == IGNORE) | (b == IGNORE)] = (230, 200, 40)
    return out


def pair_chart(item: Pair) -> str:
    panels = [("run A", colorize(item.a)), ("run B", colorize(item.b))]
    if item.a.shape == item.b.shape:
        panels.append(("agreement", disagreement_map(item.a, item.b)))
    return panels_chart(panels, f"{item.image_id}  agreement {fmt(item.agreement)}")


def _gt_sections(gt_classes: pa.Table, gt_images: Sequence[Mapping[str, Any]]) -> list[str]:
    deltas = [r["miou_delta"] for r in gt_images if r["miou_delta"] is not None]
    worst = sorted(
        (r for r in gt_images if r["miou_delta"] is not None), key=lambda r: (r["miou_delta"], r["image_id"])
    )
    columns = ["image_id", "miou_a", "miou_b", "miou_delta"]
    images = (_img(histogram_chart(deltas, "per-image mIoU of B minus A", (-1, 1)), "per-image mIoU deltas")
              + _img(miou_scatter_chart(gt_images), "per-image mIoU, A against B")
              + "<h3>B furthest behind A</h3>" + table_html(worst[:10], columns)
              + "<h3>B furthest ahead of A</h3>" + table_html(worst[::-1][:10], columns))  # fmt: skip
    return [_section("gt-classes", _img(gt_class_chart(gt_classes), "per-class IoU, A and B")
                     + table_html(gt_classes.to_pylist(), gt_classes.column_names)),
            _section("gt-images", images)]  # fmt: skip


def build_report(title: str, summary: Mapping[str, Any], categories: pa.Table, classes: pa.Table,
                 images: Sequence[Mapping[str, Any]], disagreeing: Sequence[Pair],
                 gt_classes: pa.Table | None = None, gt_images: Sequence[Mapping[str, Any]] | None = None,
                 gt_summary: Mapping[str, Any] | None = None) -> str:  # fmt: skip
    """The report as one HTML string. ``images``: per-image rows (``compare.IMAGE_SCHEMA``)."""
    scored = [r for r in images if r["status"] == "ok"]
    figures = [{"figure": k, "value": v} for k, v in summary.items()]
    if gt_summary is not None:
        for side in ("a", "b"):
            figures += [{"figure": f"ground truth, run {side.upper()}: {k}", "value": v}
                        for k, v in gt_summary[side].items()]  # fmt: skip
    not_compared = [r for r in categories.to_pylist() if not r["compared"]]
    cats = (f"<p>{categories.num_rows - len(not_compared)} categories compared (same id and name in both runs).</p>"
            + (table_html(not_compared, categories.column_names) if not_compared else ""))  # fmt: skip
    parts = [_section("summary", table_html(figures, ["figure", "value"])), _section("categories", cats),
             _section("class-agreement", _img(class_agreement_chart(classes), "per-class IoU of A against B")
                      + table_html(classes.to_pylist(), classes.column_names)),
             _section("image-agreement", _img(histogram_chart([r["agreement"] for r in scored
                                                               if r["agreement"] is not None], "per-image agreement"),
                                              "per-image agreement histogram")),
             _section("disagreeing", "".join(_img(pair_chart(p), p.image_id) for p in disagreeing)
                      or "<p>None.</p>")]  # fmt: skip
    if gt_classes is not None and gt_images is not None:
        parts += _gt_sections(gt_classes, gt_images)
    unscored = [r for r in images if r["status"] != "ok"]
    parts.append(_section("missing", table_html(unscored, ["image_id", "status", "error"]) if unscored
                          else "<p>Every image was compared.</p>"))  # fmt: skip
    return html_page(title, parts)
