"""Added cost of discovery per image, as a share of the labeler's time, at GPU shapes on this CPU.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python jobs/bench_discovery.py --images 3

Discovery (``pipeline.discovery``) runs in the labeler's CPU finish step on [28, 28, D] tokens
(ViT-B/16 at 448 px; D = 512 for ViT-B/16's projection, 768 as a wider model's). Timed: the
ViT-B/16 labeler (random weights, compensation off, so the denominator is the smallest labeler and
the share an upper bound) with discovery off, and discovery + ``apply_unknown`` on planted tokens
(a background and three objects, the first one tagged) and on the model's own tokens. Medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from pipeline import discovery
from pipeline.bench.architectures import clip_models
from pipeline.config import build_config
from pipeline.labeler import Labeler
from pipeline.types import Category, LabelRequest

SIDE, GRID = 448, 28


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def planted_tokens(d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[GRID, GRID, d] unit tokens with a background and three objects; [GRID, GRID] cells of the
    first object marked as labelled."""
    rng = np.random.default_rng(seed)
    layout = np.zeros((GRID, GRID), int)
    layout[2:12, 2:14], layout[4:12, 17:26], layout[16:26, 5:20] = 1, 2, 3
    dirs = rng.normal(size=(4, d))
    tok = (
        dirs[layout] / np.linalg.norm(dirs, axis=1)[layout][..., None] + 0.3 * rng.normal(size=(GRID, GRID, d)) / d**0.5
    )
    return (tok / np.linalg.norm(tok, axis=-1, keepdims=True)).astype(np.float32), layout == 1


def discovery_ms(tokens: np.ndarray, labelled: np.ndarray, repeats: int) -> tuple[float, int]:
    cfg = build_config(None, {"discovery": {"enabled": True, "unknown": "ignore"}}).discovery
    label_map = np.zeros((SIDE, SIDE), np.uint8)
    regions = discovery.discover(tokens, labelled, cfg)
    ms = median_ms(lambda: discovery.apply_unknown(label_map, discovery.discover(tokens, labelled, cfg), "ignore"),
                   repeats)  # fmt: skip
    return ms, len(regions.masks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3, help="labeler repeats (one 448 x 448 image each)")
    p.add_argument("--repeats", type=int, default=20, help="discovery repeats")
    args = p.parse_args()
    clip = clip_models("ViT-B-16")
    cats = [Category(1, "cat", "cat"), Category(2, "dog", "dog")]
    image = np.random.default_rng(0).integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
    request = LabelRequest("bench", image, (1,))
    rows = []
    labelers = {}
    for name, on in (("off", False), ("on", True)):
        cfg = build_config("voc-vit-b16", {"cliper": {"compensation": False, "short_side": SIDE},
                                           "discovery": {"enabled": on, "unknown": "ignore"}})  # fmt: skip
        labelers[name] = Labeler(clip, None, cfg, cats)
    labelers["off"].label([request])  # warm-up
    labeler_ms = median_ms(lambda: labelers["off"].label([request]), args.images)
    [item] = labelers["on"].infer([request])
    own = item.output.tokens.numpy()
    own_labelled = discovery.labelled_cells(labelers["off"].label([request])[0].label_map, own.shape[:2])
    cases = [("ViT-B/16 model tokens", own, own_labelled)]
    cases += [(f"planted, D={d}", *planted_tokens(d)) for d in (512, 768)]
    for name, tokens, labelled in cases:
        ms, n = discovery_ms(tokens, labelled, args.repeats)
        rows.append((name, f"{tokens.shape[0]}x{tokens.shape[1]}x{tokens.shape[2]}", n, ms, 100 * ms / labeler_ms))
    print(f"labeler (ViT-B/16, 448 x 448, compensation off, discovery off): {labeler_ms:.1f} ms/image on CPU\n")
    print("| tokens | shape | regions | discovery + apply_unknown ms | share of labeler % |")
    print("|---|---|---|---|---|")
    for name, shape, n, ms, share in rows:
        print(f"| {name} | {shape} | {n} | {ms:.2f} | {share:.2f} |")


if __name__ == "__main__":
    main()
