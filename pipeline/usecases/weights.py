"""Copy the model weights to a bucket prefix once, so GPU workers load them from there.

    python jobs/stage_weights.py --dest s3://bucket/tag2mask-weights
    python jobs/stage_weights.py --dest gs://bucket/w --sd-checkpoint ~/sd21 --storage-options opts.json

Takes the weights the labeling job would use (the same model options; by default the hub cache's
copies of the default ids, downloading them where the hub answers), writes CLIP under DEST/clip/
and Stable Diffusion under DEST/sd/, each with a weights_manifest.json of sha256 digests written
last, and prints the options that load them. Workers copy them once per node into
$TAG2MASK_WEIGHTS_CACHE (default ~/.cache/tag2mask/weights) and refuse a file whose bytes differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import redact  # noqa: E402
from pipeline.cli import add_model_arguments, config_from_args, storage_options_from_arg  # noqa: E402
from pipeline.models import WeightsUnavailableError, stage_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", required=True, help="prefix to stage under: s3://, gs://, any fsspec URL or a folder")
    p.add_argument("--storage-options", metavar="JSON|FILE", help="fsspec options for --dest (as in label_coco.py)")
    add_model_arguments(p)
    args = p.parse_args(argv)
    opts: dict = {}
    try:
        opts = storage_options_from_arg(args.storage_options)
        urls = stage_weights(config_from_args(args).model, args.dest, opts)
    except (WeightsUnavailableError, ValueError, OSError) as err:
        print(f"error: {redact.redact(str(err), redact.secret_values(opts))}", file=sys.stderr)
        return 2
    print(f"staged; label with: --clip-checkpoint {urls['clip']} --sd-checkpoint {urls['sd']}")
    print(f"(keep the same --clip-model/--clip-pretrained; on a cluster: export TAG2MASK_WEIGHTS={args.dest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
