"""Added cost of discovery per image, as a share of the labeler's time, at GPU shapes on this CPU.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python jobs/bench_discovery.py --images 3 --repeats 20

Discovery (``pipeline.discovery``) runs in the labeler's CPU finish step (``Labeler._discover``:
labelled cells, ``discover``, ``apply_unknown``, ``score_regions`` against the vocabulary) on
[28, 28, D] tokens (ViT-B/16 at 448 px; D = 512 for ViT-B/16's projection, 768 as a wider
model's). Timed: the ViT-B/16 labeler (random weights, compensation off, so the denominator is the
smallest labeler and the share an upper bound) with discovery off, and ``Labeler._discover`` of
the same labeler with discovery on (``unknown: ignore``, the ``dataset`` vocabulary) on the
model's own tokens and on planted tokens (a background and three objects, the first one tagged);
for D = 768 the vocabulary is random unit rows of that width. Medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import discovery
from pipeline.bench.architectures import clip_models
from pipeline.bench.common import median_seconds
from pipeline.config import build_config
from pipeline.labeler import Labeler
from pipeline.malloc import keep_freed_memory
from pipeline.types import Category, LabelRequest

SIDE, GRID = 448, 28
CATEGORIES = (Category(1, "cat", "cat"), Category(2, "dog", "dog"))


@dataclass(frozen=True)
class Row:
    """One table row: ms per image of ``Labeler._discover`` and of ``discover`` alone."""

    tokens: str
    shape: str
    regions: int
    discover_ms: float
    total_ms: float


def planted(d: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """[GRID, GRID, d] float32 unit tokens with a background and three objects, and a [SIDE, SIDE]
    uint8 label map with the first object labelled as class 1."""
    rng = np.random.default_rng(seed)
    layout = np.zeros((GRID, GRID), int)
    layout[2:12, 2:14], layout[4:12, 17:26], layout[16:26, 5:20] = 1, 2, 3
    dirs = rng.normal(size=(4, d))
    noise = 0.3 * rng.normal(size=(GRID, GRID, d)) / d**0.5
    tok = dirs[layout] / np.linalg.norm(dirs, axis=1)[layout][..., None] + noise
    tok = (tok / np.linalg.norm(tok, axis=-1, keepdims=True)).astype(np.float32)
    label_map = np.kron(layout == 1, np.ones((SIDE // GRID, SIDE // GRID), bool)).astype(np.uint8)
    return torch.from_numpy(tok), label_map


def time_discovery(labeler: Labeler, name: str, tokens: torch.Tensor, label_map: np.ndarray, repeats: int) -> Row:
    """``Labeler._discover`` (and ``discover`` alone) on one image's [h, w, D] tokens."""
    grid = tokens.float().numpy()
    labelled = discovery.labelled_cells(label_map, grid.shape[:2])
    cfg = labeler.config.discovery
    regions, *_ = labeler._discover(tokens, label_map)
    total = median_seconds(lambda: labeler._discover(tokens, label_map), repeats)
    alone = median_seconds(lambda: discovery.discover(grid, labelled, cfg), repeats)
    shape = "x".join(str(n) for n in grid.shape)
    return Row(name, shape, len(regions.masks), 1e3 * alone, 1e3 * total)


def wide_vocabulary(labeler: Labeler, d: int) -> Labeler:
    """A shallow copy of ``labeler`` whose vocabulary is random [V, d] unit rows (a wider model's
    text width) under the same names."""
    names, _ = labeler.vocabulary()
    wide = copy.copy(labeler)
    rows = np.random.default_rng(d).normal(size=(len(names), d)).astype(np.float32)
    wide._vocabularies = {labeler.config.discovery.vocabulary: (names, discovery.text_matrix(rows))}
    return wide


def run(images: int, repeats: int) -> tuple[float, list[Row]]:
    """(labeler ms per image with discovery off, one row per token case)."""
    clip = clip_models("ViT-B-16")
    image = np.random.default_rng(0).integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
    request = LabelRequest("bench", image, (1,))
    labelers = {}
    for name, on in (("off", False), ("on", True)):
        cfg = build_config("voc-vit-b16", {"cliper": {"compensation": False, "short_side": SIDE},
                                           "discovery": {"enabled": on, "unknown": "ignore"}})  # fmt: skip
        labelers[name] = Labeler(clip, None, cfg, list(CATEGORIES))
    label_map = labelers["off"].label([request])[0].label_map  # also the warm-up
    labeler_ms = 1e3 * median_seconds(lambda: labelers["off"].label([request]), images)
    [item] = labelers["on"].infer([request])
    assert item.output is not None and item.output.tokens is not None  # discovery is on
    rows = [time_discovery(labelers["on"], "ViT-B/16 model tokens (random weights)", item.output.tokens, label_map,
                           repeats)]  # fmt: skip
    for d in (512, 768):
        lab = labelers["on"] if d == item.output.tokens.shape[-1] else wide_vocabulary(labelers["on"], d)
        rows.append(time_discovery(lab, f"planted, D={d}", *planted(d), repeats))
    return labeler_ms, rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3, help="labeler repeats (one 448 x 448 image each)")
    p.add_argument("--repeats", type=int, default=20, help="discovery repeats")
    args = p.parse_args(argv)
    keep_freed_memory()  # as labeling actors run (pipeline.malloc)
    labeler_ms, rows = run(args.images, args.repeats)
    print(f"labeler (ViT-B/16, 448 x 448, compensation off, discovery off): {labeler_ms:.1f} ms/image on CPU\n")
    print("| tokens | shape | regions | discover ms | Labeler._discover ms | share of labeler % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        share = 100 * r.total_ms / labeler_ms
        print(f"| {r.tokens} | {r.shape} | {r.regions} | {r.discover_ms:.2f} | {r.total_ms:.2f} | {share:.2f} |")
