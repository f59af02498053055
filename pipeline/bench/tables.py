"""Printing the benchmark's tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.bench.common import H100

# ---------------------------------------------------------------- printing


def print_rows(title: str, rows: Sequence[dict[str, Any]]) -> None:
    """A list of flat dicts as a markdown table."""
    print(f"\n### {title}\n")
    if not rows:
        print("(nothing to compare)")
        return
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.4e}"
    return str(v)


def print_flops(flops: dict[str, int], nbytes: dict[str, float], ceil: dict[str, float]) -> None:
    print_rows("FLOPs per image (FlopCounterMode, batch 1, 500 x 375 input)",
               [{"stage": k, "GFLOP": v / 1e9} for k, v in flops.items()])  # fmt: skip
    rows = [{"quantity": "parameters read per batch (millions)", "value": nbytes["params"] / 1e6}]
    rows += [{"quantity": f"{k} (MB)", "value": v / 1e6} for k, v in nbytes.items() if k != "params"]
    print_rows("Bytes (weights per batch; maps and their estimated traffic per image)", rows)
    print_rows(f"H100 bounds (NVIDIA H100 SXM datasheet, dense: {H100})",
               [{"quantity": k, "value": v} for k, v in ceil.items()])  # fmt: skip


