"""Per-image time of each labeling stage, on random-weight models of a chosen size (no Ray, no
downloads: timing does not depend on the weights' values).

    python jobs/bench_labeler.py --size tiny --images 8
    python jobs/bench_labeler.py --size full --images 3          # ViT-B/16 + SD 2.1 base shapes
    python jobs/bench_labeler.py --size full --device cuda --dtype bfloat16 --batch-size 8

Prints one table: median milliseconds per image for each stage and in total.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.architectures import clip_models, sd_models  # noqa: E402
from pipeline.config import build_config  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402
from pipeline.labeler import Category, Labeler, LabelRequest  # noqa: E402
from pipeline.models import DTYPES  # noqa: E402

SIZES = {"tiny": ("tiny", "tiny"), "full": ("ViT-B-16", "sd21-base"), "full-l14": ("ViT-L-14", "sd21-base")}
STAGES = ("decode", "clip_coarse", "sd_attention", "compensation", "superpixels", "label_assembly")


def synthetic_jpeg(seed: int, w: int = 500, h: int = 375) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h // 25, w // 25, 3), dtype=np.uint8)
    big = Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--tags", type=int, default=2, help="tags per image")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--preset", default="voc-vit-b16")
    args = p.parse_args()

    clip_name, sd_shape = SIZES[args.size]
    t0 = time.perf_counter()
    dtype = DTYPES[args.dtype]
    clip = clip_models(clip_name, device=args.device, dtype=dtype)
    sd = sd_models(sd_shape, device=args.device, dtype=dtype)
    build_s = time.perf_counter() - t0
    cfg = build_config(
        args.preset, {"batch_size": args.batch_size, "model": {"device": args.device, "dtype": args.dtype}}
    )
    cats = [Category(i + 1, n, n) for i, n in enumerate(["cat", "dog", "person", "car", "tree"][: args.tags])]
    labeler = Labeler(clip, sd, cfg, cats)
    tags = tuple(c.id for c in cats)

    blobs = [synthetic_jpeg(i) for i in range(args.images + 1)]
    # Warm-up (first call allocates, builds text embeddings): not counted.
    labeler.label([LabelRequest("warmup", decode_image(blobs[-1]), tags)])
    rows: dict[str, list[float]] = {s: [] for s in (*STAGES, "total")}
    for start in range(0, args.images, args.batch_size):
        chunk = blobs[start : min(start + args.batch_size, args.images)]
        t_start = time.perf_counter()
        images = [decode_image(b) for b in chunk]
        decode_s = (time.perf_counter() - t_start) / len(chunk)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        results = labeler.label([LabelRequest(f"img{start + i}", im, tags) for i, im in enumerate(images)])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        total = (time.perf_counter() - t_start) / len(chunk)
        for r in results:
            rows["decode"].append(decode_s)
            for s in STAGES[1:]:
                rows[s].append(r.timings.get(s, 0.0))
            rows["total"].append(total)

    print(f"size={args.size} (CLIP {clip_name}, SD {sd_shape}) device={args.device} dtype={args.dtype} "
          f"batch={args.batch_size} images={args.images} tags={args.tags} torch_threads={torch.get_num_threads()} "
          f"(models built in {build_s:.1f} s)")  # fmt: skip
    print(f"{'stage':<16}{'ms/image (median)':>20}{'share':>8}")
    tot = statistics.median(rows["total"])
    for s in (*STAGES, "total"):
        med = statistics.median(rows[s])
        print(f"{s:<16}{med * 1e3:>20.1f}{med / tot:>8.1%}")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
