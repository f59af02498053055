"""Per-image time of each labeling stage: the ``stages`` section of ``jobs/benchmark.py`` (pipeline/bench/main.py) under
its earlier options (kept so existing commands still work).

    python jobs/bench_labeler.py --size tiny --images 8
    python jobs/bench_labeler.py --size full --images 3          # ViT-B/16 + SD 2.1 base shapes
    python jobs/bench_labeler.py --size full --device cuda --dtype bfloat16 --batch-size 8
"""

from __future__ import annotations

import argparse

from pipeline.bench import main as benchmark
from pipeline.models import DTYPES

SIZES = {"tiny": "tiny", "full": "vit-b16", "full-l14": "vit-l14"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--tags", type=int, default=2, help="tags per image")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = p.parse_args(argv)
    benchmark.main([
        "--size", SIZES[args.size], "--images", str(args.images), "--batch-sizes", str(args.batch_size),
        "--tags", str(args.tags), "--device", args.device, "--dtypes", args.dtype, "--repeats", "1",
        "--compare", "stages",
    ])  # fmt: skip

