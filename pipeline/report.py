"""The audit's HTML report: one static file, charts embedded as base64 PNGs, no JavaScript, no
external URL, so it opens offline in any browser.

Sections (``SECTIONS``, each an ``<section id=...>``): summary, per-class IoU, per-image IoU
histogram, confusion matrix, our statistics against the true IoU, worst images, best images,
missing and failed images. Charts are drawn with matplotlib's Agg canvas (no pyplot, so no global
backend is set).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline import pngs
from pipeline.types import IGNORE

SECTIONS = {
    "summary": "Summary",
    "class-iou": "Per-class IoU",
    "image-iou": "Per-image mIoU",
    "confusion": "Confusion matrix",
    "stats-vs-iou": "Our statistics against the true IoU",
    "worst": "Worst images",
    "best": "Best images",
    "missing": "Missing and failed images",
}
MAX_SCATTERS = 8  # stats columns drawn against IoU (the correlation table lists them all)
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#eee}td:first-child{text-align:left}img{max-width:100%}section{margin-bottom:2.5em}"""


@dataclass(frozen=True)
class Overlay:
    """One image to show: [H, W] uint8 ground truth and prediction, optional HWC uint8 RGB."""

    image_id: str
    miou: float | None
    gt: np.ndarray
    pred: np.ndarray
    rgb: np.ndarray | None = None


def png_base64(fig: Figure, dpi: int = 90) -> str:
    """A figure as a ``data:image/png;base64,...`` URI."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def class_iou_chart(classes: pa.Table) -> str:
    rows = sorted((r for r in classes.to_pylist() if r["iou"] is not None), key=lambda r: r["iou"])
    fig = Figure(figsize=(8, max(2.0, 0.22 * len(rows) + 1)))
    ax = fig.add_subplot()
    ax.barh([f"{r['name']} ({r['category_id']})" for r in rows], [r["iou"] for r in rows], color="#4878a8")
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    fig.tight_layout()
    return png_base64(fig)


def image_iou_chart(images: Sequence[Mapping[str, Any]]) -> str:
    values = [r["miou"] for r in images if r["miou"] is not None]
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    ax.hist(values, bins=20, range=(0, 1), color="#4878a8", edgecolor="white")
    ax.set_xlabel("per-image mIoU")
    ax.set_ylabel("images")
    fig.tight_layout()
    return png_base64(fig)


def confusion_chart(matrix: np.ndarray, names: Sequence[str]) -> str:
    """Rows normalised by ground-truth pixels; the last column is "ignored by us" (255)."""
    rows = matrix.sum(axis=1, keepdims=True)
    norm = matrix / np.where(rows > 0, rows, 1)
    n = len(names)
    size = min(16.0, 3 + 0.25 * n)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fontsize = 8 if n <= 40 else 4
    ax.set_xticks(range(n + 1), [*names, "ignored"], rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), names, fontsize=fontsize)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of the ground-truth row")
    fig.tight_layout()
    return png_base64(fig)


def stats_chart(stats: pa.Table, images: Sequence[Mapping[str, Any]], corr: Sequence[Mapping[str, Any]]) -> str | None:
    """Scatter of each correlated stats column against the per-image mIoU (up to ``MAX_SCATTERS``)."""
    truth = {r["image_id"]: r["miou"] for r in images if r["miou"] is not None}
    defined = [c for c in corr if c["spearman"] is not None]  # constant columns say nothing
    shown = sorted(defined, key=lambda c: -abs(c["spearman"]))[:MAX_SCATTERS]
    if not shown:
        return None
    cols = min(4, len(shown))
    nrows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.0 * nrows))
    ids = stats.column("image_id").to_pylist()
    for k, c in enumerate(shown):
        pts = [(v, truth[i]) for i, v in zip(ids, stats.column(c["stat"]).to_pylist(), strict=True)
               if v is not None and i in truth]  # fmt: skip
        ax = fig.add_subplot(nrows, cols, k + 1)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, alpha=0.6, color="#4878a8")
        ax.set_title(f"{c['stat']}\nr={fmt(c['pearson'])} rho={fmt(c['spearman'])}", fontsize=8)
        ax.set_ylabel("mIoU", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return png_base64(fig)


def colorize(label_map: np.ndarray) -> np.ndarray:
    """[H, W] uint8 labels -> HWC uint8 RGB with the label PNGs' palette."""
    colours = np.frombuffer(pngs.palette(), dtype=np.uint8).reshape(256, 3)
    return colours[label_map]


def error_map(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """HWC uint8: green correct, red wrong, yellow ignored by us, grey ground-truth ignore."""
    out = np.full((*gt.shape, 3), 128, dtype=np.uint8)
    valid = gt != IGNORE
    out[valid & (pred == gt)] = (40, 170, 60)
    out[valid & (pred != gt)] = (210, 40, 40)
    out[valid & (pred == IGNORE)] = (230, 200, 40)
    return out


def overlay_chart(item: Overlay) -> str:
    """Ground truth, prediction and error map side by side (over the image when given)."""
    panels = [("ground truth", colorize(item.gt)), ("prediction", colorize(item.pred)),
              ("errors", error_map(item.gt, item.pred))]  # fmt: skip
    if item.rgb is not None and item.rgb.shape[:2] == item.gt.shape:
        panels = [("image", item.rgb)] + [(t, (0.45 * item.rgb + 0.55 * p).astype(np.uint8)) for t, p in panels]
    return panels_chart(panels, f"{item.image_id}  mIoU {fmt(item.miou)}")


def panels_chart(panels: Sequence[tuple[str, np.ndarray]], title: str) -> str:
    """HWC uint8 pictures side by side, each with its caption, under ``title``; a base64 PNG."""
    fig = Figure(figsize=(3.2 * len(panels), 3.0))
    for k, (caption, pixels) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.imshow(pixels, interpolation="nearest")
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return png_base64(fig)


def _section(key: str, body: str) -> str:
    return f'<section id="{key}"><h2>{html.escape(SECTIONS[key])}</h2>{body}</section>'


def build_report(title: str, summary: Mapping[str, Any], classes: pa.Table, images: Sequence[Mapping[str, Any]],
                 matrix: np.ndarray, correlations: Sequence[Mapping[str, Any]], stats: pa.Table | None,
                 worst: Sequence[Overlay], best: Sequence[Overlay]) -> str:  # fmt: skip
    """The report as one HTML string. ``images``: per-image rows (``audit.IMAGE_SCHEMA``)."""
    scored = [r for r in images if r["status"] == "ok"]
    names = [f"{r['name']}" for r in classes.to_pylist()]
    headline = table_html([{"figure": k, "value": v} for k, v in summary.items()], ["figure", "value"])
    parts = [_section("summary", headline),
             _section("class-iou", _img(class_iou_chart(classes), "per-class IoU")
                      + table_html(classes.to_pylist(), classes.column_names)),
             _section("image-iou", _img(image_iou_chart(scored), "per-image mIoU histogram")),
             _section("confusion", _img(confusion_chart(matrix, names), "confusion matrix"))]  # fmt: skip
    chart = stats_chart(stats, scored, correlations) if stats is not None else None
    body = (_img(chart, "statistics against IoU") if chart else "<p>No statistics to correlate (no stats_images "
            "table under the prediction prefix, or fewer than 2 scored images).</p>")  # fmt: skip
    parts.append(_section("stats-vs-iou", body + table_html(correlations, ["stat", "n", "pearson", "spearman"])))
    for key, items in (("worst", worst), ("best", best)):
        parts.append(_section(key, "".join(_img(overlay_chart(o), o.image_id) for o in items) or "<p>None.</p>"))
    unscored = [r for r in images if r["status"] != "ok"]
    parts.append(_section("missing", table_html(unscored, ["image_id", "status", "error"]) if unscored
                          else "<p>Every image was scored.</p>"))  # fmt: skip
    return html_page(title, parts)


def html_page(title: str, sections: Sequence[str]) -> str:
    """A self-contained HTML page: ``title`` as heading, then the sections, in the reports' style."""
    head = f'<head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>'
    page = f"<body><h1>{html.escape(title)}</h1>{''.join(sections)}</body>"
    return f'<!DOCTYPE html>\n<html lang="en">{head}{page}</html>\n'
