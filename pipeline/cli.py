"""The ``tag2mask`` command (``tag2mask label|plan|explain|audit|...``) and the command-line options
every job shares, turned into a ``Config`` at the boundary.

Options default to None and are dropped before the config is built, so defaults live only in
``pipeline.config``. Each subcommand is the same parser and ``main`` as its job in ``jobs/`` (the
``ray job submit`` entries): ``COMMANDS`` names the module that holds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import methods, redact, retry
from pipeline.config import (
    PRESETS,
    SD21_BASE,
    SD21_BASE_FORMER,
    Config,
    build_config,
    load_config_file,
    merge_overrides,
)
from pipeline.discovery import UNKNOWN_MODES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models and settings")
    g.add_argument("--clip-model", help="open_clip model name, or path of an open_clip model config JSON")
    g.add_argument("--clip-pretrained", metavar="TAG", help="open_clip pretrained tag (default: openai)")
    g.add_argument(
        "--clip-checkpoint",
        metavar="FILE|URL",
        help="open_clip state dict (.pt/.safetensors): a local file, or an s3://, gs:// URL staged "
        "with jobs/stage_weights.py (copied once per node, checked against its sha256 manifest)",
    )
    g.add_argument(
        "--sd-model",
        metavar="ID",
        help=f"diffusers hub id (default: {SD21_BASE}; the former id {SD21_BASE_FORMER} "
        "is still found in a local cache)",
    )
    g.add_argument(
        "--sd-checkpoint",
        metavar="DIR|URL",
        help="diffusers-format directory: local, or an s3://, gs:// prefix staged with "
        "jobs/stage_weights.py (copied once per node, checked against its sha256 manifest)",
    )
    g.add_argument("--preset", choices=sorted(PRESETS), help="published settings (default: voc-vit-b16)")
    g.add_argument(
        "--method",
        choices=sorted(methods.REGISTRY),
        help="labeling method (default: the preset's; presets clip-es-voc / clip-es-coco "
        "hold CLIP-ES's published settings)",
    )
    g.add_argument("--config", metavar="FILE", help="JSON/YAML file of setting overrides")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")


def add_discovery_arguments(parser: argparse.ArgumentParser) -> None:
    """Discovery's options (docs/DISCOVERY.md); each overrides the ``discovery`` section of ``--config``."""
    g = parser.add_argument_group("discovery (objects nobody tagged; off by default)")
    g.add_argument("--discovery", action="store_const", const=True,
                   help="find potential objects in the untagged area and suggest the missing tags")  # fmt: skip
    g.add_argument("--unknown", choices=UNKNOWN_MODES,
                   help="what the label map does with them: background (default; as without discovery), ignore "
                   "(their background pixels become 255) or regions (a region map and COCO file beside)")  # fmt: skip
    g.add_argument("--discovery-vocabulary", metavar="coco|dataset|FILE",
                   help="class names to suggest from: the run's classes (dataset, default), the 80 COCO "
                   "classes, or a text file with one name a line (its content enters the fingerprint)")  # fmt: skip


def _discovery_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {"discovery.enabled": getattr(args, "discovery", None), "discovery.unknown": getattr(args, "unknown", None),
            "discovery.vocabulary": getattr(args, "discovery_vocabulary", None)}  # fmt: skip


def _check_discovery(config: Config, args: argparse.Namespace) -> None:
    """--unknown / --discovery-vocabulary without discovery on would be silently ignored: refuse."""
    given = [f for f, v in (("--unknown", getattr(args, "unknown", None)),
                            ("--discovery-vocabulary", getattr(args, "discovery_vocabulary", None))) if v]  # fmt: skip
    if given and not config.discovery.enabled:
        raise ValueError(f"{' and '.join(given)} need discovery on: add --discovery (or discovery.enabled in --config)")


def _nested(pairs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in pairs.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def config_from_args(args: argparse.Namespace) -> Config:
    """Config = defaults <- preset <- --config file <- explicit model and discovery options."""
    overrides = load_config_file(args.config) if args.config else {}
    flags = _nested({
        "model.clip.model": args.clip_model,
        "model.clip.pretrained": args.clip_pretrained,
        "model.clip.checkpoint": args.clip_checkpoint,
        "model.sd.model": args.sd_model,
        "model.sd.checkpoint": args.sd_checkpoint,
        "model.device": args.device,
        "method": getattr(args, "method", None),
        **_discovery_flags(args),
    })  # fmt: skip
    if args.clip_checkpoint and args.clip_pretrained is None and args.clip_model and args.clip_model.endswith(".json"):
        # A custom architecture has no open_clip tag: its checkpoint stands alone.
        flags["model"]["clip"]["pretrained"] = None
    overrides = merge_overrides(overrides, flags)
    preset = args.preset or overrides.pop("preset", None)
    config = build_config(preset, overrides)
    _check_discovery(config, args)
    return config


def add_storage_retry_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("storage retries (the output prefix's reads and writes)")
    g.add_argument(
        "--storage-retries",
        type=int,
        metavar="N",
        help=f"attempts per storage operation, the first included (default: {retry.DEFAULT.attempts})",
    )
    g.add_argument("--storage-backoff", type=float, metavar="S",
                   help=f"seconds before the first retry, doubled for each next one up to "
                        f"{retry.DEFAULT.cap_s:g} s, with jitter (default: {retry.DEFAULT.base_s:g})")  # fmt: skip


def retry_policy_from_args(args: argparse.Namespace) -> retry.RetryPolicy:
    """``--storage-retries`` / ``--storage-backoff`` over ``retry.DEFAULT`` (options not given keep
    its values); ValueError naming the options for values it refuses."""
    given = {"attempts": getattr(args, "storage_retries", None), "base_s": getattr(args, "storage_backoff", None)}
    try:
        return dataclasses.replace(retry.DEFAULT, **{k: v for k, v in given.items() if v is not None})
    except ValueError as err:
        raise ValueError(f"--storage-retries / --storage-backoff: {err}") from None


def storage_options_from_arg(text: str | None) -> dict[str, Any]:
    """``--storage-options``: inline JSON, or the path of a JSON file (the place for credentials:
    a command line is visible in ``ps`` and stored in Ray's job history, so inline secrets are refused)."""
    if not text:
        return {}
    inline = text.lstrip().startswith("{")
    source = "--storage-options" if inline else f"--storage-options file {text}"
    if not inline and not Path(text).is_file():
        raise ValueError(f"--storage-options: {text} is neither inline JSON nor an existing file")
    try:
        opts = json.loads(text if inline else Path(text).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON ({err.msg})") from None
    if not isinstance(opts, dict):
        raise ValueError("--storage-options must be a JSON object of fsspec options")
    secret = redact.secret_option_keys(opts) if inline else []
    if secret:
        raise ValueError(
            f"--storage-options: {secret} hold credentials; put them in a JSON file and pass its path, "
            "or use the environment (AWS_ACCESS_KEY_ID, ...): a command line is stored"
        )
    return opts


# ---------------------------------------------------------------- the tag2mask command


@dataclass(frozen=True)
class Command:
    """A subcommand: the module holding its ``build_parser(prog)`` and ``main(argv, prog)``, its job,
    and extra arguments put before the user's (``plan`` is ``label --dry-run``)."""

    module: str
    job: str
    help: str
    prefix: tuple[str, ...] = ()


# A new command is one entry here (e.g. "review": Command("pipeline.review...", "jobs/review.py", ...)).
COMMANDS: dict[str, Command] = {
    "label": Command("pipeline.usecases.label", "jobs/label_coco.py", "label a dataset (COCO JSON or JSONL manifest)"),
    "plan": Command("pipeline.usecases.label", "jobs/label_coco.py --dry-run",
                    "what label would do: shards, committed, remaining (label --dry-run)", ("--dry-run",)),
    "explain": Command("pipeline.usecases.explain", "jobs/explain.py", "heatmaps and label map of one image"),
    "audit": Command("pipeline.usecases.audit", "jobs/audit_masks.py", "pseudo labels against ground truth"),
    "compare": Command("pipeline.usecases.compare", "jobs/compare_runs.py", "two runs image by image"),
    "consensus": Command("pipeline.usecases.consensus", "jobs/consensus.py", "where several runs agree"),
    "benchmark": Command("pipeline.bench.main", "jobs/benchmark.py", "labeler speed on random-weight models"),
    "stage-weights": Command("pipeline.usecases.weights", "jobs/stage_weights.py", "copy the weights to a bucket"),
    "demo": Command("pipeline.usecases.demo", "jobs/demo.py", "the whole job on tiny models, on a local Ray"),
    "review": Command("pipeline.usecases.review", "jobs/review.py", "look at a run in the browser and judge it"),
    "export": Command("pipeline.usecases.export", "jobs/export.py", "a run to FiftyOne, Label Studio or CVAT"),
}  # fmt: skip


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``: the very ``build_parser`` its job uses."""
    cmd = COMMANDS[name]
    return importlib.import_module(cmd.module).build_parser(f"tag2mask {name}")


def top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<15}{cmd.help} ({cmd.job})" for name, cmd in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="tag2mask",
        description="Pixel pseudo-labels from image-level tags. Each command is also a job for "
        "`ray job submit` (in brackets); `tag2mask COMMAND --help` lists its options.",
        epilog=f"commands:\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's options")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``tag2mask COMMAND [options]``: runs the command's ``main`` (its job's) with the options."""
    args = top_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    cmd = COMMANDS[args.command]
    status = importlib.import_module(cmd.module).main([*cmd.prefix, *args.args], prog=f"tag2mask {args.command}")
    return status if isinstance(status, int) else 0  # the benchmark returns its numbers


if __name__ == "__main__":
    sys.exit(main())
