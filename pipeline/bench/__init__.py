"""Benchmarks: speed and memory measured on random-weight models and synthetic inputs (no Ray, no
downloads). The jobs ``jobs/benchmark.py`` and ``jobs/bench_*.py`` and ``tag2mask benchmark`` put a
command line in front of them.

    architectures  model shapes built from configs (tests and benchmarks; no weights downloaded)
    common         synthetic JPEGs, models of a size, labelers at a batch size, clocks, FLOP counter
    stages         per-stage time, batch sizes, dtypes, a method against CLIPer (serial passes)
    busy           a whole shard through shards.label_shard: GPU busy fraction, simulated GPU
    speedwork      the measured comparisons behind the speed work (chain order, UNet stop, kernels)
    flops          FLOPs and bytes per image and the H100 bounds they imply
    tables         printing the tables
    main           the labeler benchmark's sections and command line (jobs/benchmark.py)
    audit, clip_es, consensus, outputs, runner   the other benchmarks (jobs/bench_*.py)
"""

from pipeline.bench.busy import SimulatedGPU, busy_fraction, serial_shard, simulated_rows, synthetic_shard
from pipeline.bench.common import (
    DTYPES,
    SECTIONS,
    SIZES,
    STAGES,
    Models,
    build_models,
    cast_models,
    count_flops,
    make_labeler,
    preset_config,
    synthetic_jpeg,
    with_batch_size,
)
from pipeline.bench.flops import byte_counts, ceilings, model_flops
from pipeline.bench.speedwork import chain_comparison, speedwork_kernels, speedwork_text, text_cache_identical
from pipeline.bench.stages import StageRun, agreement, batch_rows, dtype_rows, method_rows, run_stages, stage_table

__all__ = [
    "DTYPES", "SECTIONS", "SIZES", "STAGES", "Models", "SimulatedGPU", "StageRun", "agreement", "batch_rows",
    "build_models", "busy_fraction", "byte_counts", "cast_models", "ceilings", "chain_comparison", "count_flops",
    "dtype_rows", "make_labeler", "method_rows", "model_flops", "preset_config", "run_stages", "serial_shard",
    "simulated_rows", "speedwork_kernels", "speedwork_text", "stage_table", "synthetic_jpeg", "synthetic_shard",
    "text_cache_identical", "with_batch_size",
]  # fmt: skip
