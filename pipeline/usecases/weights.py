"""Stage the model weights under a bucket prefix: the ``stage-weights`` command
(``jobs/stage_weights.py``, ``tag2mask stage-weights``) in front of ``pipeline.models.stage_weights``."""

from __future__ import annotations

import argparse
import sys

from pipeline import redact
from pipeline.cli import add_model_arguments, config_from_args, storage_options_from_arg
from pipeline.models import WeightsUnavailableError, stage_weights

DESCRIPTION = """Copy the model weights to a bucket prefix once, so GPU workers load them from there.

    python jobs/stage_weights.py --dest s3://bucket/tag2mask-weights
    python jobs/stage_weights.py --dest gs://bucket/w --sd-checkpoint ~/sd21 --storage-options opts.json

Takes the weights the labeling job would use (the same model options; by default the hub cache's
copies of the default ids, downloading them where the hub answers), writes CLIP under DEST/clip/
and Stable Diffusion under DEST/sd/, each with a weights_manifest.json of sha256 digests written
last, and prints the options that load them. Workers copy them once per node into
$TAG2MASK_WEIGHTS_CACHE (default ~/.cache/tag2mask/weights) and refuse a file whose bytes differ.
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ``stage-weights`` command's options (jobs/stage_weights.py and ``tag2mask stage-weights``)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--dest", required=True, help="prefix to stage under: s3://, gs://, any fsspec URL or a folder")
    p.add_argument("--storage-options", metavar="JSON|FILE", help="fsspec options for --dest (as in label_coco.py)")
    add_model_arguments(p)
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The ``stage-weights`` command; exit status 0, or 2 when the weights cannot be staged."""
    args = build_parser(prog).parse_args(argv)
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
