"""Discovery: potential objects in the untagged part of an image, from the CLIP dense tokens the
method already computed (issue 17; docs/DISCOVERY.md). Pure numpy; no torch at import.

Steps, in the order ``discover`` runs them (each a small function, testable on its own):
    labelled grid cells -> window-grid centres per scale -> cosine K-means over the unlabelled
    tokens -> near-identical centres merged -> candidates of every scale fused (NMS on mask IoU,
    the more coherent kept) -> overlaps resolved, areas and coherence measured -> filters.
Then ``apply_unknown`` decides what the label map does with the regions, and ``score_regions`` /
``run_suggestions`` name them against a vocabulary.

Conventions: tokens [h, w, D] float32, L2-normalised, on the ViT grid; grid masks [R, h, w] bool;
label maps [H, W] uint8 (0 background, 1..254 classes, 255 ignore); region maps [H, W] uint16
(0 none, 1..R).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.types import IGNORE

if TYPE_CHECKING:
    from pipeline.config import DiscoveryConfig
    from pipeline.types import Category

UNKNOWN_MODES = ("background", "ignore", "regions")
_EPS = 1e-12
BUILTIN_VOCABULARIES = ("dataset", "coco")
UNKNOWN_OBJECT_ID = 1000  # COCO category id of discovered regions: dataset ids are 1..254 (pipeline.types)
UNKNOWN_OBJECT = {"id": UNKNOWN_OBJECT_ID, "name": "unknown object", "supercategory": ""}
DIGITS = 6  # scores, areas and coherence are rounded in the outputs: float32 carries ~7 digits


@dataclass(frozen=True)
class Regions:
    """Potential-object regions of one image, on the ViT grid, ids 1..R in this order.

    masks: [R, h, w] bool, disjoint; centres: [R, D] float32 unit vectors (the region embeddings);
    coherence: [R] float32 mean cosine of a region's tokens to its centre; areas: [R] float32
    fraction of the grid's cells.
    """

    masks: np.ndarray
    centres: np.ndarray
    coherence: np.ndarray
    areas: np.ndarray

    @property
    def ids(self) -> np.ndarray:
        return np.arange(1, len(self.masks) + 1, dtype=np.uint16)

    def region_map(self, size: tuple[int, int]) -> np.ndarray:
        """[H, W] uint16 region map at ``size`` (H, W): each region's grid mask resized bilinearly
        (half-pixel centres, as the label map's scores are: ``F.interpolate(align_corners=False)``)
        and each pixel given to the largest, "none" winning ties; for one region this is
        bilinear-then-threshold at 0.5."""
        if not len(self.masks):
            return np.zeros(size, np.uint16)
        h, w = self.masks.shape[1:]
        ry, rx = _interp_matrix(size[0], h), _interp_matrix(size[1], w)
        masks = self.masks.astype(np.float64)
        stack = np.concatenate([1.0 - masks.sum(axis=0, keepdims=True), masks])
        up = np.einsum("Hh,khw,Ww->kHW", ry, stack, rx, optimize=True)
        return up.argmax(axis=0).astype(np.uint16)


def check_config(cfg: DiscoveryConfig) -> None:
    """Raise ValueError for discovery settings that cannot run (called by ``config.build_config``)."""
    if cfg.unknown not in UNKNOWN_MODES:
        raise ValueError(f"config discovery.unknown must be one of {list(UNKNOWN_MODES)}, got {cfg.unknown!r}")
    if not cfg.scales or any(s < 1 for s in cfg.scales):
        raise ValueError(f"config discovery.scales must be a non-empty list of windows per side >= 1, got {cfg.scales}")
    if cfg.iterations < 1:
        raise ValueError(f"config discovery.iterations must be at least 1, got {cfg.iterations}")
    for name in ("fusion_iou", "min_area", "max_area"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"config discovery.{name} must lie in [0, 1], got {getattr(cfg, name)}")
    for name in ("merge_similarity", "min_coherence"):
        if not -1 <= getattr(cfg, name) <= 1:
            raise ValueError(f"config discovery.{name} is a cosine and must lie in [-1, 1], got {getattr(cfg, name)}")
    if cfg.min_area > cfg.max_area:
        raise ValueError(f"config discovery.min_area ({cfg.min_area}) exceeds discovery.max_area ({cfg.max_area})")


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] float64 weights of 1-D linear resizing with half-pixel centres (the
    convention of ``F.interpolate(mode="bilinear", align_corners=False)``)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def grid_cells(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[H, W] bool pixel mask -> [h, w] bool: a cell is set when at least half of the pixels it
    covers are (cell i spans pixel rows floor(i H / h) .. floor((i + 1) H / h), same for columns).
    A mask smaller than the grid (a tiny image) is first repeated up to cover it."""
    h, w = grid
    mask = np.repeat(np.repeat(mask, -(-h // mask.shape[0]), axis=0), -(-w // mask.shape[1]), axis=1)
    rows, cols = mask.shape
    ys = (np.arange(h) * rows) // h
    xs = (np.arange(w) * cols) // w
    sums = np.add.reduceat(np.add.reduceat(mask.astype(np.int64), ys, axis=0), xs, axis=1)
    counts = np.diff(np.append(ys, rows))[:, None] * np.diff(np.append(xs, cols))[None, :]
    return sums * 2 >= counts


def labelled_cells(label_map: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[h, w] bool: grid cells covered by a tagged class (ids 1..254) in a [H, W] uint8 label map."""
    return grid_cells((label_map > 0) & (label_map != IGNORE), grid)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)).astype(np.float32)


def window_centres(tokens: np.ndarray, free: np.ndarray, per_side: int) -> np.ndarray:
    """[K, D] initial centres for one scale: the grid tiled by ``per_side`` x ``per_side`` windows
    (side ceil(h / per_side) cells, stride equal to the side, so windows do not overlap and the
    last row/column of windows may be smaller); each centre is the normalised mean of the
    unlabelled (``free``) tokens in its window. Windows without one are skipped."""
    h, w = free.shape
    sy, sx = math.ceil(h / per_side), math.ceil(w / per_side)
    centres = []
    for y in range(0, h, sy):
        for x in range(0, w, sx):
            cell = free[y : y + sy, x : x + sx]
            if cell.any():
                centres.append(tokens[y : y + sy, x : x + sx][cell].mean(axis=0))
    return _normalise(np.stack(centres)) if centres else np.zeros((0, tokens.shape[-1]), np.float32)


def cosine_kmeans(x: np.ndarray, centres: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Spherical K-means of [n, D] unit rows from [K, D] unit ``centres``: at most ``iterations``
    rounds of (assign each row to its most similar centre, lowest index on ties; centre = the
    normalised mean of its rows), stopping early once no assignment changes. A centre left
    without rows keeps its place and value. Returns ([n] int64 assignment, [K, D] centres)."""
    assign = np.full(len(x), -1, np.int64)
    centres = centres.copy()
    for _ in range(iterations):
        new = (x @ centres.T).argmax(axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        onehot = (assign[None, :] == np.arange(len(centres))[:, None]).astype(np.float32)
        used = onehot.any(axis=1)
        centres[used] = _normalise(onehot[used] @ x)  # the sum's direction is the mean's
    return assign, centres


def merge_similar(assign: np.ndarray, centres: np.ndarray, similarity: float) -> np.ndarray:
    """Relabel clusters whose centres have cosine >= ``similarity`` as one (transitively; the
    lowest index names the group), so a K-means that split one object by noise reports it once.
    Returns the new [n] assignment."""
    k = len(centres)
    parent = np.arange(k)
    close = (centres @ centres.T) >= similarity
    for i in range(k):
        for j in range(i + 1, k):
            if close[i, j]:
                a, b = _root(parent, i), _root(parent, j)
                parent[max(a, b)] = min(a, b)
    roots = np.array([_root(parent, i) for i in range(k)])
    return roots[assign] if len(assign) else assign


def _root(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        i = parent[i]
    return int(i)


def _candidates(tokens: np.ndarray, free: np.ndarray, cfg: DiscoveryConfig) -> list[np.ndarray]:
    """[h, w] bool masks of every cluster of every scale, in scale order then cluster order."""
    x = tokens[free]
    masks = []
    for per_side in cfg.scales:
        centres = window_centres(tokens, free, per_side)
        if not len(centres):
            continue
        assign, centres = cosine_kmeans(x, centres, cfg.iterations)
        assign = merge_similar(assign, centres, cfg.merge_similarity)
        for k in np.unique(assign):
            mask = np.zeros(free.shape, bool)
            mask[free] = assign == k
            masks.append(mask)
    return masks


def coherence(tokens: np.ndarray, mask: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean cosine of the masked tokens to their normalised mean, that [D] centre)."""
    rows = tokens[mask]
    centre = _normalise(rows.mean(axis=0))
    return float((rows @ centre).mean()), centre


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def fuse(tokens: np.ndarray, masks: Sequence[np.ndarray], fusion_iou: float) -> list[np.ndarray]:
    """Mask fusion in the manner of NMS: candidates by coherence (descending; ties by the order
    given), each kept unless its IoU with an already kept mask exceeds ``fusion_iou``."""
    scored = sorted(range(len(masks)), key=lambda i: (-round(coherence(tokens, masks[i])[0], 6), i))
    kept: list[np.ndarray] = []
    for i in scored:
        if all(iou(masks[i], k) <= fusion_iou for k in kept):
            kept.append(masks[i])
    return kept


def _disjoint(tokens: np.ndarray, kept: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Kept masks may still overlap (below ``fusion_iou``): a shared cell goes to the mask whose
    centre its token is most similar to (earlier mask on ties)."""
    if not kept:
        return []
    centres = np.stack([coherence(tokens, m)[1] for m in kept])
    sims = np.where(np.stack(kept), np.einsum("hwd,kd->khw", tokens, centres), -np.inf)
    owner = sims.argmax(axis=0)
    covered = np.any(np.stack(kept), axis=0)
    return [covered & (owner == k) for k in range(len(kept))]


def discover(tokens: np.ndarray, labelled: np.ndarray, cfg: DiscoveryConfig) -> Regions:
    """Potential-object regions of one image.

    tokens: [h, w, D] float32 L2-normalised CLIP patch features; labelled: [h, w] bool cells
    covered by tagged classes (``labelled_cells``). Only the other cells are clustered. Regions
    covering less than ``min_area`` or more than ``max_area`` of the grid (the largest cluster of
    the untagged area is usually the background itself), or less coherent than
    ``min_coherence``, are dropped; the rest are ordered by area (largest first, then by their
    first cell in raster order) and numbered 1..R.
    """
    if tokens.ndim != 3 or tokens.shape[:2] != labelled.shape:
        raise ValueError(
            f"tokens [h, w, D] and a labelled mask [h, w] expected, got {tokens.shape} and {labelled.shape}"
        )
    tokens = _normalise(tokens.astype(np.float32))
    free = ~labelled.astype(bool)
    kept = _disjoint(tokens, fuse(tokens, _candidates(tokens, free, cfg), cfg.fusion_iou))
    n = free.size
    rows = []
    for m in kept:
        if not m.any():
            continue
        coh, centre = coherence(tokens, m)
        area = m.sum() / n
        if cfg.min_area <= area <= cfg.max_area and coh >= cfg.min_coherence:
            rows.append((-int(m.sum()), int(np.flatnonzero(m)[0]), m, centre, coh, area))
    rows.sort(key=lambda r: r[:2])
    d = tokens.shape[-1]
    return Regions(
        masks=np.stack([r[2] for r in rows]) if rows else np.zeros((0, *free.shape), bool),
        centres=np.stack([r[3] for r in rows]) if rows else np.zeros((0, d), np.float32),
        coherence=np.array([r[4] for r in rows], np.float32),
        areas=np.array([r[5] for r in rows], np.float32),
    )


def apply_unknown(label_map: np.ndarray, regions: Regions, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """What the label map does with discovered regions. Returns (label map, region map or None).

    ``background``: the label map as it is; ``ignore``: region pixels that are background (0)
    become 255, tagged pixels stay; ``regions``: the label map as it is, and the [H, W] uint16
    region map (``Regions.region_map``) beside it. The input map is never modified.
    """
    if mode not in UNKNOWN_MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {list(UNKNOWN_MODES)}")
    if mode == "background":
        return label_map, None
    region_map = regions.region_map(label_map.shape)
    if mode == "regions":
        return label_map, region_map
    out = label_map.copy()
    out[(region_map > 0) & (label_map == 0)] = IGNORE
    return out, None


def text_matrix(text_embeddings: np.ndarray) -> np.ndarray:
    """[V, D] text embeddings -> [V, D] float64 unit rows for ``score_regions``, made once per
    vocabulary (``Labeler.vocabulary``). Rows are normalised in float32, then stored column-major,
    so ``x @ m.T`` multiplies a C-contiguous [D, V] float64 matrix: the same operands, and so the
    same bits, as casting the float32 rows inside every product."""
    return np.asfortranarray(_normalise(np.asarray(text_embeddings, np.float32)), dtype=np.float64)


def score_regions(
    region_embeddings: np.ndarray, text_embeddings: np.ndarray, names: Sequence[str], logit_scale: float = 100.0
) -> list[tuple[str, float]]:
    """Best vocabulary class per region: ([R, D] region embeddings, [V, D] unit text embeddings,
    ``text_matrix``'s, V names) -> R (name, probability), the softmax over the vocabulary of
    ``logit_scale`` x cosine, as CLIPer scores patches against its candidates (ties go to the
    earlier name). Region rows are normalised here; text rows are taken as unit vectors."""
    if len(names) != len(text_embeddings):
        raise ValueError(f"{len(names)} names for {len(text_embeddings)} text embeddings")
    if not len(names):
        raise ValueError("the vocabulary is empty: give at least one class name")
    logits = logit_scale * (_normalise(region_embeddings).astype(np.float64) @ text_embeddings.T)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    best = probs.argmax(axis=1)
    return [(names[b], float(probs[r, b])) for r, b in enumerate(best)]


def run_suggestions(
    tables: Iterable[Mapping[str, Sequence]], tagged: Collection[str], top: int | None = None
) -> list[tuple[str, int, float]]:
    """Classes most often suggested but never tagged in a run: ``tables`` are per-shard column
    mappings (``pyarrow.Table.to_pydict()`` of ``suggestions.parquet``) with columns
    ``suggested_class`` and ``score``; ``tagged`` the class names tagged anywhere in the run.
    Returns (class, regions suggested, mean score), most suggested first, then by name."""
    counts: Counter[str] = Counter()
    totals: dict[str, float] = defaultdict(float)
    for table in tables:
        for name, score in zip(table["suggested_class"], table["score"], strict=True):
            if name not in tagged:
                counts[name] += 1
                totals[name] += float(score)
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [(name, n, totals[name] / n) for name, n in rows]


def load_vocabulary(spec: str, dataset_names: Sequence[str]) -> tuple[str, ...]:
    """Class names to suggest from: ``dataset`` (the run's own classes), ``coco`` (the 80 COCO
    names), or the path or fsspec URL of a UTF-8 text file with one name a line (an LVIS list, for
    example; blank lines and lines starting with # are skipped). Names keep their first occurrence."""
    if spec == "dataset":
        names: Iterable[str] = dataset_names
    elif spec == "coco":
        from pipeline.prompts import COCO_CLASSES  # here: prompts imports open_clip (torch)

        names = COCO_CLASSES
    else:
        lines = (ln.strip() for ln in _vocabulary_bytes(spec).decode("utf-8").splitlines())
        names = [ln for ln in lines if ln and not ln.startswith("#")]
    out = tuple(dict.fromkeys(names))
    if not out:
        raise ValueError(f"discovery.vocabulary {spec!r} holds no class names")
    return out


def _vocabulary_bytes(spec: str) -> bytes:
    import fsspec  # here: only a vocabulary file needs it

    try:
        with fsspec.open(spec, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError) as err:
        raise ValueError(f"discovery.vocabulary {spec!r} is neither 'dataset', 'coco' nor an existing file") from err


def vocabulary_sha256(spec: str) -> str | None:
    """sha256 of a vocabulary file's bytes (it enters the run's fingerprint: editing the file
    changes the suggestions); None for the built-in vocabularies."""
    return None if spec in BUILTIN_VOCABULARIES else hashlib.sha256(_vocabulary_bytes(spec)).hexdigest()


def vocabulary_prompts(
    spec: str, categories: Sequence[Category], prompt: Callable[[Category], str] | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names, prompts) of a vocabulary: with ``dataset`` each category's name and ``prompt(category)``
    (give the method's ``class_prompt``, the text it labels with; default ``Category.prompt``);
    otherwise each name is its own prompt."""
    if spec == "dataset":
        unique = list({c.name: c for c in categories}.values())
        if not unique:
            raise ValueError("discovery.vocabulary 'dataset' holds no class names: the run has no categories")
        return tuple(c.name for c in unique), tuple((prompt or _own_prompt)(c) for c in unique)
    names = load_vocabulary(spec, ())
    return names, names


def _own_prompt(category: Category) -> str:
    return category.prompt


def suggestion_rows(
    regions: Regions, suggestions: Sequence[tuple[str, float]], shard_id: str, image_id: str
) -> list[dict[str, Any]]:
    """Rows of ``suggestions.parquet`` for one image: one per region (id 1..R), with its best
    vocabulary class and score (``score_regions``), its area (fraction of the ViT grid) and
    coherence."""
    if len(suggestions) != len(regions.masks):
        raise ValueError(f"image {image_id}: {len(suggestions)} suggestions for {len(regions.masks)} regions")
    return [
        {"shard_id": shard_id, "image_id": image_id, "region": int(rid), "suggested_class": name,
         "score": round(float(score), DIGITS), "area": round(float(area), DIGITS),
         "coherence": round(float(coh), DIGITS)}
        for rid, (name, score), area, coh in zip(regions.ids, suggestions, regions.areas, regions.coherence,
                                                 strict=True)
    ]  # fmt: skip


def unknown_fraction(regions: Regions) -> float:
    """Fraction of the ViT grid's cells inside a region (the same in every ``unknown`` mode)."""
    return round(float(regions.areas.sum()), DIGITS) if len(regions.areas) else 0.0


def encode_region_png(region_map: np.ndarray) -> bytes:
    """[H, W] uint16 region map -> bytes of a 16-bit greyscale PNG (no metadata; deterministic)."""
    from PIL import Image  # here: readers of suggestions do not need Pillow

    if not isinstance(region_map, np.ndarray) or region_map.ndim != 2 or region_map.dtype != np.uint16:
        raise ValueError(f"expected an [H, W] uint16 region map, got {getattr(region_map, 'dtype', type(region_map))}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(region_map)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_region_png(data: bytes) -> np.ndarray:
    """Bytes of a region PNG (``encode_region_png``) -> [H, W] uint16 region map."""
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data))).astype(np.uint16)


def regions_coco(
    items: Sequence[tuple[str, np.ndarray, Sequence[Mapping[str, Any]], str]], info: Mapping[str, Any]
) -> dict[str, Any]:
    """COCO document of discovered regions from ``(source_id, [H, W] uint16 region map, the
    image's suggestion rows, file_name)`` items: every image, one annotation per region present
    in the map, category ``UNKNOWN_OBJECT`` (id 1000, outside the dataset's 1..254), compressed
    RLE as the main COCO file, ``score`` the region's coherence, ``region`` its id in the map, and
    its suggestion (``suggested_class``, ``suggestion_score``). Image ids as ``coco.build_coco``."""
    from pycocotools import mask as mask_utils

    from pipeline import coco  # here: pycocotools is not needed by the algorithm

    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for coco_id, (source_id, region_map, rows, file_name) in zip(
        coco.coco_image_ids([it[0] for it in items]), items, strict=True
    ):
        images.append({"id": coco_id, "source_id": source_id, "file_name": file_name,
                       "height": int(region_map.shape[0]), "width": int(region_map.shape[1])})  # fmt: skip
        by_id = {int(r["region"]): r for r in rows}
        present = [int(v) for v in np.unique(region_map) if v]
        if not present:
            continue
        rles = coco.encode_masks(region_map[:, :, None] == np.array(present, np.uint16))
        raw = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
        areas, boxes = mask_utils.area(raw), mask_utils.toBbox(raw)
        for k, rid in enumerate(present):
            row = by_id.get(rid, {})
            anns.append({"id": len(anns) + 1, "image_id": coco_id, "category_id": UNKNOWN_OBJECT_ID,
                         "segmentation": rles[k], "area": int(areas[k]), "bbox": [float(v) for v in boxes[k]],
                         "iscrowd": 0, "score": row.get("coherence", 0.0), "region": rid,
                         "suggested_class": row.get("suggested_class"),
                         "suggestion_score": row.get("score")})  # fmt: skip
    return {"info": dict(info), "licenses": [], "images": images, "annotations": anns, "categories": [UNKNOWN_OBJECT]}
