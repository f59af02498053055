"""Review a run in the browser: gallery, image pages with keyboard decisions, classes, failures, "try it".

    python jobs/review.py --run s3://bucket/pseudo/run1 [--audit report/] [--gt instances_val2017.json]
        [--images s3://bucket/coco/train2017/] [--host 127.0.0.1 --port 8000] [--allowed-host NAME]

Binds 127.0.0.1 unless told otherwise; on a cluster head, tunnel to it:
``ssh -L 8000:127.0.0.1:8000 head`` and open http://127.0.0.1:8000. The app answers only
requests whose Host is a loopback name, the --host address or an --allowed-host name (so a web
page cannot reach it by rebinding its DNS name): with --host 0.0.0.0, name the host browsers use
(--allowed-host review.lab.example). Decisions are saved under the run prefix
(review/decisions-<session>.jsonl) as they are made.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.cli import storage_options_from_arg
from pipeline.review.app import LOOPBACK_HOSTS, create_app, serve


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ``review`` command's options (jobs/review.py and ``tag2mask review``)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run's output prefix (local path, s3://, gs://)")
    p.add_argument("--audit", help="the --out folder of audit_masks.py: per-image and per-class IoU")
    p.add_argument("--gt", help="ground truth shown beside the labels, as audit_masks.py --gt reads it")
    p.add_argument("--gt-format", choices=("png", "cocostuff"), default="png", help="as audit_masks.py --gt-format")
    p.add_argument("--images", help="root of relative image file names (COCO inputs: audit/label_coco --images)")
    p.add_argument("--storage-options", help="fsspec options for the run prefix: inline JSON or a JSON file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: tunnel over SSH)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name (or address) browsers reach the app by, answered besides the loopback "
                        "names and --host; repeatable (needed with --host 0.0.0.0)")  # fmt: skip
    return p


def allowed_hosts(host: str, names: Sequence[str]) -> list[str]:
    """The Host header values served: loopback names, ``host`` (the bound address) and ``names``
    (``--allowed-host``). Raises ValueError for a name with a scheme, port or path, which no Host
    value would match."""
    for name in names:
        bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name  # [::1]
        if not name or any(c in name for c in "/ ") or (":" in name and bare == name):
            raise ValueError(f"--allowed-host {name!r}: give a bare host name or address as browsers send it "
                             "in Host, without scheme, port or path (e.g. review.lab.example, 10.0.0.5)")  # fmt: skip
    return sorted({*LOOPBACK_HOSTS, host, *names})


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        hosts = allowed_hosts(args.host, args.allowed_host)
        options = storage_options_from_arg(args.storage_options)
        app = create_app(args.run, args.audit, gt=args.gt, gt_format=args.gt_format, images=args.images,
                         storage_options=options, allowed_hosts=hosts)  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: anyone who reaches it can read the run and write decisions. "
              f"It answers only requests whose Host is one of {', '.join(hosts)}; browsers that reach it "
              "by another name get 400 'Invalid host header': add that name with --allowed-host NAME",
              file=sys.stderr)  # fmt: skip
    print(f"review of {args.run}: http://{args.host}:{args.port}/")
    serve(app, args.host, args.port)
    return 0
