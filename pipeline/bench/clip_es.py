"""Milliseconds per image of CLIP-ES (pipeline/clip_es.py) at tiny and ViT-B/16 shapes, random
weights, on this machine; text features are embedded once per run and timed apart.

    python jobs/bench_clip_es.py                                  # tiny and ViT-B-16, 500x375, 2 tags
    python jobs/bench_clip_es.py --shapes ViT-B-16 --size 640x480 --tags 1 3 --images 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline import clip_es
from pipeline.bench.architectures import clip_models
from pipeline.clip_es_prompts import VOC_BACKGROUND, VOC_SYNONYMS


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["tiny", "ViT-B-16"], help="tiny or open_clip model names")
    p.add_argument("--size", type=_size, default=(500, 375), help="image WxH (VOC's most common: 500x375)")
    p.add_argument("--tags", type=int, nargs="+", default=[2], help="tags per image")
    p.add_argument("--images", type=int, default=3, help="timed images per row (after one warm-up)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)  # as in the labeler; CLIP-ES takes its gradients locally
    rng = np.random.default_rng(0)
    w, h = args.size
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(args.images + 1)]
    print(f"threads {torch.get_num_threads()}, device {args.device}, image {w}x{h}, background {len(VOC_BACKGROUND)}")
    print(f"{'shape':10s} {'tags':>4s} {'text ms':>8s} {'ms/image':>9s}")
    for shape in args.shapes:
        clip = clip_models(shape, device=args.device)
        for n_tags in args.tags:
            t0 = time.perf_counter()
            text = clip_es.text_features(clip.model, clip.tokenizer, [*VOC_SYNONYMS[:n_tags], *VOC_BACKGROUND])
            text_ms = (time.perf_counter() - t0) * 1e3
            times = []
            for img in images:
                t0 = time.perf_counter()
                pixels = clip_es.clip_es_input(img, clip.patch_size, clip.mean, clip.std)[None]
                clip_es.clip_es_from_text(clip.model, pixels, text, n_tags, (h, w))
                times.append((time.perf_counter() - t0) * 1e3)
            print(f"{shape:10s} {n_tags:4d} {text_ms:8.1f} {np.median(times[1:]):9.1f}")

