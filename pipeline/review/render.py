"""Pictures for the review pages, as pure functions of arrays: overlays, per-class masks, score
heatmaps (PNG bytes) and score histograms (inline SVG). Colours are the label PNGs' palette."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipeline.review.run import palette
from pipeline.types import IGNORE, MAX_CLASS_ID

THUMB = 192  # longest side of a gallery thumbnail, pixels
OVERLAY_ALPHA = 0.55


def colours() -> np.ndarray:
    """[256, 3] uint8 RGB of each label value."""
    return np.frombuffer(palette(), dtype=np.uint8).reshape(256, 3)


def hex_colour(label: int) -> str:
    r, g, b = colours()[label]
    return f"#{r:02x}{g:02x}{b:02x}"


def png_bytes(array: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of ``array`` ([H, W] uint8: grey; HWC uint8 RGB or RGBA); level 1 by default:
    pictures made per request favour speed over size."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def overlay(image: np.ndarray | None, label_map: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """HWC uint8 RGB: the label colours over ``image`` (HWC uint8 RGB, same H, W) where the label
    is neither background nor ignore; without an image, the colours over grey."""
    lm = np.asarray(label_map)
    base = np.full((*lm.shape, 3), 96, np.uint8) if image is None else image
    if base.shape[:2] != lm.shape:
        raise ValueError(f"image {base.shape[:2]} and label map {lm.shape} must have the same height and width")
    painted = (lm != 0) & (lm != IGNORE)
    out = base.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * colours()[lm[painted]].astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def thumbnail_png(image: np.ndarray | None, label_map: np.ndarray, size: int = THUMB) -> bytes:
    """PNG bytes of the overlay, its longest side ``size`` pixels."""
    pic = Image.fromarray(overlay(image, label_map))
    pic.thumbnail((size, size), Image.Resampling.BILINEAR)
    return png_bytes(np.asarray(pic))


def class_mask_png(label_map: np.ndarray, label: int) -> bytes:
    """RGBA PNG: the class's colour where the label map holds ``label``, transparent elsewhere."""
    rgba = np.zeros((*label_map.shape, 4), np.uint8)
    where = label_map == label
    rgba[where, :3] = colours()[label]
    rgba[where, 3] = 255
    return png_bytes(rgba)


def regions_png(region_map: np.ndarray) -> bytes:
    """RGBA PNG of a [H, W] uint16 region map (discovery): each region in a palette colour (its id
    taken modulo ``MAX_CLASS_ID``, skipping 0 and 255), transparent where there is none."""
    rgba = np.zeros((*region_map.shape, 4), np.uint8)
    where = region_map > 0
    rgba[where, :3] = colours()[(region_map[where].astype(np.int64) - 1) % MAX_CLASS_ID + 1]
    rgba[where, 3] = 255
    return png_bytes(rgba)


def colour_png(label_map: np.ndarray) -> bytes:
    """RGB PNG of a label map in the palette's colours (ground truth, the final map)."""
    return png_bytes(colours()[label_map])


def photo_png(image: np.ndarray) -> bytes:
    return png_bytes(image)


def heatmap_png(scores: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    """[h, w] float scores -> RGB PNG (dark blue low, yellow high, scaled to the map's own range),
    resized to ``size`` (width, height) when given."""
    s = np.asarray(scores, np.float64)
    lo, hi = float(np.nanmin(s)), float(np.nanmax(s))
    t = np.zeros_like(s) if hi <= lo else (s - lo) / (hi - lo)
    rgb = np.stack([t * 250, 40 + t * 190, 140 * (1 - t) + 20], axis=-1)
    pic = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if size is not None:
        pic = pic.resize(size, Image.Resampling.BILINEAR)
    return png_bytes(np.asarray(pic))


def histogram_svg(counts: Sequence[int], width: int = 160, height: int = 48, title: str = "") -> str:
    """An inline SVG bar chart of ``counts`` (bins of equal width over [0, 1])."""
    top = max(max(counts, default=0), 1)
    bar = width / max(len(counts), 1)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}">'
        f"<title>{i / len(counts):.1f}-{(i + 1) / len(counts):.1f}: {c}</title></rect>"
        for i, c in enumerate(counts)
        for h in [height * c / top]
    )
    label = html.escape(title)
    return (f'<svg class="hist" role="img" aria-label="{label}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{bars}</svg>')  # fmt: skip
