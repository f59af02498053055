"""Labeler benchmark (issue 7): per-stage time and images/s on random-weight models of a chosen
size, the measured comparisons behind the speed work, and the FLOP and byte counts that bound
the GPU time. No Ray, no downloads: timing does not depend on the weights' values.

    python jobs/benchmark.py --size tiny --images 8
    python jobs/benchmark.py --size vit-b16 --images 2 --batch-sizes 1,2 --dtypes float32,bfloat16
    python jobs/benchmark.py --size vit-b16 --device cuda --dtypes float32,bfloat16 --batch-sizes 1,4,16,32
    python jobs/benchmark.py --size vit-b16 --images 2 --method clip-es   # CLIP-ES against CLIPer

Sections (``--compare``, comma-separated, default all):
  stages     ms/image of every stage, images/s and peak GPU memory, per batch size x dtype
  batch      images/s of each batch size against the smallest, and label-map agreement
  dtype      images/s of each dtype against float32 at the same batch size, and the fraction
             of label-map pixels equal to float32's
  chain      compensation right to left against forming the n x n chain product first
  cpu        everything of one image that is not a model call (decode, superpixels, label
             assembly, PNG, COCO RLE, shard write), before and after the CPU speed work in one
             run with byte-identical outputs checked, each stage's GIL share, and the whole
             path on 1 and 2 threads
  busy       a whole shard through ``shards.label_shard``: fraction of wall time in the model
             stages (the GPU's share) while decode, superpixels and writing run on threads,
             the same shard with nothing overlapped, and label_shard beside a simulated GPU
             (0 and 20 ms/image) to show how fast the CPU side alone can go
  speedwork  one-run A/B of each speed change: early UNet stop, SDPA on uncaptured layers,
             the exact scale folding, the one-pass threshold, no stacked copy, text cache
  flops      FLOPs (torch FlopCounterMode on the real modules, batch 1) and bytes per image,
             and the H100 ceilings they imply
  methods    (``--method NAME``; alone unless --compare is given) ms/image of that method and of
             CLIPer on the same models and images, each under its own preset, and their ratio
"""


from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline import methods
from pipeline.bench.busy import busy_fraction, simulated_rows
from pipeline.bench.common import (
    GOAL_IMAGES_PER_S,
    SECTIONS,
    SIZES,
    Models,
    build_models,
    cast_models,
    compile_unet,
    make_labeler,
    preset_config,
    synthetic_jpeg,
    with_batch_size,
)
from pipeline.bench.cpupath import (
    VARIANTS,
    cpu_path_rows,
    gil_rows,
    model_outputs,
    simulated_before_after,
    thread_scaling,
    variant,
)
from pipeline.bench.flops import byte_counts, captured_heads, ceilings, model_flops
from pipeline.bench.speedwork import (
    chain_comparison,
    speedwork_kernels,
    speedwork_text,
    speedwork_unet,
    uncaptured_processors,
)
from pipeline.bench.stages import batch_rows, dtype_rows, method_rows, run_stages, stage_table
from pipeline.bench.tables import print_flops, print_rows
from pipeline.labeler import Labeler
from pipeline.malloc import keep_freed_memory
from pipeline.models import DTYPES

DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}

# ---------------------------------------------------------------- main


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's options (jobs/benchmark.py and ``tag2mask benchmark``)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--images", type=int, default=8, help="images per stage run and in the busy shard")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--dtypes", "--dtype", default="float32,bfloat16",
                   help="comma-separated: float32 (fp32), bfloat16 (bf16), float16 (fp16)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--tags", type=int, default=2, help="tags per image")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement (the median is reported)")
    p.add_argument("--compare", default=",".join(SECTIONS), help=f"sections, from {','.join(SECTIONS)}")
    p.add_argument("--io-threads", type=int, default=4, help="label_shard's reader threads in the busy section")
    p.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA: float32 matmuls on TF32 tensor cores (convolutions already are, by PyTorch's default)",
    )
    p.add_argument("--cpu-path", choices=VARIANTS, default="after",
                   help="the CPU path the other sections run: 'before' = scikit-image Felzenszwalb and the "
                        "per-pixel assembly and COCO masks (benchmark only; the cpu section shows both)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet parts before the captured layers (off by default; first "
                        "batch pays the compile time, so it is warmed up before timing)")  # fmt: skip
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="'keep': glibc keeps freed memory, as labeling actors set it (pipeline.malloc); "
                        "'default': glibc's defaults, to measure what that changes")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    p.add_argument(
        "--method",
        choices=sorted(set(methods.REGISTRY) - {"cliper"}),
        help="also time this method against CLIPer (the methods section)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.method and "--compare" not in " ".join(argv if argv is not None else sys.argv):
        args.compare = "methods"
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.dtypes = [DTYPE_ALIASES.get(d, d) for d in args.dtypes.split(",")]
    args.compare = set(args.compare.split(","))
    unknown = (args.compare - set(SECTIONS) - {"methods"}) | (set(args.dtypes) - set(DTYPES))
    if unknown:
        p.error(f"unknown section or dtype: {sorted(unknown)}")
    if args.compare != {"methods"} and args.images < max(args.batch_sizes):
        p.error(f"--images {args.images} is less than the largest batch size {max(args.batch_sizes)}")
    return args


def header(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")  # fmt: skip
    tf32 = {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_conv": torch.backends.cudnn.allow_tf32}
    return {"size": args.size, "clip": SIZES[args.size][0], "sd": SIZES[args.size][1], "device": name,
            "images": args.images, "tags": args.tags, "repeats": args.repeats, "torch": torch.__version__,
            "malloc": args.malloc, **tf32}  # fmt: skip


class LabelerCache:
    """One labeler per dtype, built on first use (construction embeds the background classes);
    with ``compile``, its UNet parts before the captured layers are compiled (``compile_unet``)."""

    def __init__(self, base: Models, n_tags: int, compile: bool = False) -> None:
        self.base, self.n_tags, self.compile = base, n_tags, compile
        self.labelers: dict[str, Labeler] = {}
        self.compiled: list[str] = []

    def get(self, dtype: str = "float32") -> Labeler:
        if dtype not in self.labelers:
            models = cast_models(self.base, dtype)
            if self.compile:
                if dtype == self.base.dtype:  # cast_models returned the base itself: compile a copy
                    models = dataclasses.replace(models, sd=dataclasses.replace(
                        models.sd, unet=copy.deepcopy(models.sd.unet)))  # fmt: skip
                self.compiled = compile_unet(models.sd, preset_config(models).cliper.sd_layers)
            self.labelers[dtype] = make_labeler(models, 1, self.n_tags)
        return self.labelers[dtype]


def section_stages(args: argparse.Namespace, labelers: LabelerCache, blobs: list[bytes], out: dict[str, Any]) -> None:
    chosen = [labelers.get(dtype) for dtype in args.dtypes]
    runs = run_stages(chosen, args.batch_sizes, blobs, args.repeats, log=lambda m: print(m, flush=True))
    print("\n### Stages: median ms/image\n\n" + "\n".join(stage_table(runs)))
    out["stages"] = [r.summary() for r in runs]
    if "batch" in args.compare:
        out["batch"] = batch_rows(runs)
        print_rows("Batch size: images/s over the smallest batch, label-map agreement with it", out["batch"])
    if "dtype" in args.compare:
        out["dtype"] = dtype_rows(runs)
        print_rows("Dtype: images/s over float32, fraction of label-map pixels equal to float32's", out["dtype"])


def section_speedwork(args: argparse.Namespace, labelers: LabelerCache, out: dict[str, Any]) -> None:
    base = labelers.base
    cfg = preset_config(base)
    heads = captured_heads(base.sd, cfg)
    attn = dict(base.sd.unet.named_modules())[cfg.cliper.sd_layers[0]]
    rows = speedwork_unet(base, cfg, args.repeats)
    rows += speedwork_kernels(heads, 64 * 64, attn.inner_dim // heads, args.repeats, args.device)
    rows.append(speedwork_text(labelers.get(), args.repeats))
    out["speedwork"] = rows
    out["uncaptured_processors"] = uncaptured_processors(base.sd, cfg.cliper.sd_layers)
    print_rows("Speed work, each change measured before/after in this run", rows)
    print(f"\nprocessors of the uncaptured UNet attention layers: {out['uncaptured_processors']}")


def section_busy(args: argparse.Namespace, labelers: LabelerCache, blobs: list[bytes], out: dict[str, Any]) -> None:
    labeler = with_batch_size(labelers.get(args.dtypes[0]), args.batch_sizes[0])
    out["busy"] = busy_fraction(labeler, blobs, args.io_threads, args.repeats)
    print_rows(f"Busy fraction (label_shard, {args.dtypes[0]}, batch {args.batch_sizes[0]}, "
               f"{args.io_threads} io threads)", [out["busy"]])  # fmt: skip
    threads = sorted({1, 2, args.io_threads})
    out["simulated_gpu"] = simulated_rows(labeler, blobs, threads, (0.0, 1e3 / GOAL_IMAGES_PER_S))
    print_rows("label_shard beside a simulated GPU (0 ms: the CPU side's own limit)", out["simulated_gpu"])


def section_cpu(args: argparse.Namespace, labelers: LabelerCache, blobs: list[bytes], out: dict[str, Any]) -> None:
    labeler = with_batch_size(labelers.get(args.dtypes[0]), 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the goal is CPU time on one core: torch's resize runs on the timed thread
    try:
        works = model_outputs(labeler, blobs)  # the model stages once, for all three tables
        rows, identical = cpu_path_rows(labeler, blobs, works, args.repeats)
    finally:
        torch.set_num_threads(threads)
    out["cpu_path"], out["cpu_path_identical"] = rows, identical
    print_rows(f"CPU path per image, before/after ({args.tags} tags, 500 x 375; medians of {args.repeats} "
               f"interleaved passes; label maps, PNGs and COCO byte-identical: {identical})", rows)  # fmt: skip
    out["gil"] = gil_rows(labeler, blobs[0], works[0])
    print_rows("GIL: speed of a Python loop beside each stage (1 = the stage releases the GIL)", out["gil"])
    out["cpu_threads"] = thread_scaling(labeler, blobs, works, args.repeats)
    print_rows("Whole CPU path (decode .. COCO RLE) on 1 and 2 threads", out["cpu_threads"])
    sim = with_batch_size(labeler, args.batch_sizes[0])
    out["simulated_before_after"] = simulated_before_after(sim, blobs, sorted({2, args.io_threads}),
                                                           1e3 / GOAL_IMAGES_PER_S, args.repeats)  # fmt: skip
    print_rows(f"label_shard beside a simulated GPU ({1e3 / GOAL_IMAGES_PER_S:g} ms/image, batch "
               f"{args.batch_sizes[0]}), CPU path before/after", out["simulated_before_after"])  # fmt: skip


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Run the chosen sections, print their tables; returns every number (as --json writes them)."""
    args = parse_args(argv, prog)
    if args.malloc == "keep" and not keep_freed_memory():
        print("--malloc keep: not glibc, or glibc refused the thresholds; running with the defaults")
        args.malloc = "default"
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out: dict[str, Any] = {"header": header(args), "command": "python jobs/benchmark.py " + " ".join(
        sys.argv[1:] if argv is None else argv)}  # fmt: skip
    print(json.dumps(out["header"]))
    base = build_models(args.size, args.device)
    labelers = LabelerCache(base, args.tags, args.compile)
    blobs = [synthetic_jpeg(i) for i in range(args.images)]
    if "cpu" in args.compare:
        section_cpu(args, labelers, blobs, out)
    with variant(args.cpu_path):
        _model_sections(args, labelers, blobs, out)
    if args.compile:
        out["compiled"] = labelers.compiled
        print(f"\ncompiled UNet parts: {labelers.compiled}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


def _model_sections(args: argparse.Namespace, labelers: LabelerCache, blobs: list[bytes], out: dict[str, Any]) -> None:
    base = labelers.base
    if args.compare & {"stages", "batch", "dtype"}:
        section_stages(args, labelers, blobs, out)
    if "chain" in args.compare:
        heads = captured_heads(base.sd, preset_config(base))
        out["chain"] = chain_comparison(64, 2, heads, args.tags, args.repeats, args.device)
        print_rows("Compensation: right to left vs forming the n x n chain product first", [out["chain"]])
    if "busy" in args.compare:
        section_busy(args, labelers, blobs, out)
    if "speedwork" in args.compare:
        section_speedwork(args, labelers, out)
    if "methods" in args.compare and args.method:
        out["methods"] = method_rows(base, args.method, blobs, args.tags, args.repeats)
        print_rows(f"{args.method} against CLIPer: ms/image, same models and images, each under its own preset",
                   out["methods"])  # fmt: skip
    if "flops" in args.compare:
        flops, nbytes = model_flops(base, args.tags), byte_counts(base)
        out["flops"], out["bytes"], out["ceilings"] = flops, nbytes, ceilings(flops, nbytes)
        print_flops(flops, nbytes, out["ceilings"])

