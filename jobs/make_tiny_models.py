"""Write tiny random-weight CLIP and SD checkpoints (the shapes the tests use) for offline runs.

python jobs/make_tiny_models.py --out /tmp/tiny
"""

from __future__ import annotations

import argparse

from pipeline.bench.architectures import save_models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    paths = save_models(args.out, seed=args.seed)
    print(f"--clip-model {paths['clip_config']} --clip-checkpoint {paths['clip_checkpoint']}", end=" ")
    print(f"--sd-checkpoint {paths['sd_dir']}")


if __name__ == "__main__":
    main()
