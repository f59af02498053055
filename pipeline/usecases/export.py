"""Export a run to FiftyOne, Label Studio or CVAT, honouring review decisions.

    python jobs/export.py s3://bucket/pseudo/run1 --to labelstudio --out ls/ [--rejected skip|tag]
        [--images s3://bucket/coco/train2017/]

fiftyone: ImageSegmentationDirectory (data/, labels/, mask_targets.json, fields.json);
labelstudio: tasks.json with brushlabels predictions and a score, label_config.xml;
cvat: Segmentation mask 1.1 (SegmentationClass/, ImageSets/Segmentation/default.txt, labelmap.txt).
Images rejected in review are left out (--rejected skip, the default) or kept and marked (tag).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.export import EXPORTERS, REJECTED, export


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ``export`` command's options (jobs/export.py and ``tag2mask export``)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run's output prefix (local path, s3://, gs://)")
    p.add_argument("--to", required=True, choices=sorted(EXPORTERS), help="the tool to export to")
    p.add_argument("--out", required=True, help="local folder to write the export into")
    p.add_argument("--rejected", choices=REJECTED, default="skip", help="rejected images: leave out, or keep marked")
    p.add_argument("--images", help="root of relative image file names (COCO inputs); FiftyOne copies the images")
    p.add_argument("--storage-options", help="fsspec options for the run prefix: inline JSON or a JSON file")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from pipeline.cli import storage_options_from_arg

    try:
        s = export(
            args.run, args.to, args.out, args.rejected, args.images, storage_options_from_arg(args.storage_options)
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{s.format}: {s.exported} images exported to {s.out}; rejected: {s.rejected_skipped} left out, "
          f"{s.rejected_tagged} kept and marked")  # fmt: skip
    if s.missing_pictures:
        print(f"{len(s.missing_pictures)} image files not found (give --images ROOT), e.g. {s.missing_pictures[:3]}")
    return 0
