"""pipeline.malloc: glibc keeps the pages of freed arrays, so an image's buffers are not faulted in
afresh for every image (the speed figure is jobs/bench_felzenszwalb.py's; this checks the cause)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import resource, sys, numpy as np
from pipeline.felzenszwalb import felzenszwalb
from pipeline.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
felzenszwalb(image, 100, 0.8, 50)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    felzenszwalb(image, 100, 0.8, 50)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_call(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CODE, mode], check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def test_kept_memory_spares_the_page_faults_of_every_image() -> None:
    """In fresh processes (the setting is the process's); "keep" also asserts glibc took it."""
    default, kept = _faults_per_call("default"), _faults_per_call("keep")
    assert default > 1000  # 375 x 500: ~6 MiB of edge costs alone, faulted in again each call
    assert kept < default / 10, (default, kept)

