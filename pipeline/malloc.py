"""Keep freed memory in the process (glibc's malloc) instead of handing it back to the kernel.

The CPU side of labeling allocates and frees arrays of a few MiB per image (edge costs and sort
buffers of the superpixels, score maps, label maps). By default glibc serves large allocations
with fresh ``mmap`` pages and returns a freed heap top to the kernel, so each image touches its
buffers as new pages again: about 5,800 page faults in one 500 x 375 Felzenszwalb call, a fifth
of its time on the CI VM (docs/PERFORMANCE.md). Raising the mmap threshold to glibc's maximum and
the trim threshold keeps those pages mapped and reused; the process's resident memory stays at
its peak (a labeling actor holds models of GiBs; the CPU path's peak is tens of MiB).

``keep_freed_memory`` is called where a process starts labeling (the Ray actor, the benchmarks);
it changes nothing but speed. Elsewhere than Linux with glibc it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; True if both were accepted."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
