"""CPU ranks: glibc's malloc hands freed blocks of 1 MiB and more straight back to the system.

glibc serves a request at or above its mmap threshold with a mapping of its own, unmapped on free, but by
default it raises the threshold to the size of every mapped block freed, up to 32 MiB. From the first
step on, every buffer under 32 MiB (gathered ZeRO-3 parameters, FP8 dequantization stripes, activations,
gradients) then comes from the heap; the freed ones between live ones stay resident and the heap grows by
fragmentation. Measured on the Llama-3.2-1B shape, FP8 frozen weights, gradient checkpointing, 2 CPU
ranks (BENCHMARKS.md, "The planner against measured CPU runs"): at the end of step 2's forward the heap
held 2.97 GiB, 1.30 GiB of it free, and the sampled peak RSS was 4.84 GiB; with a fixed 1 MiB threshold
the heap held 0.30 GiB (0.07 free) and the peak was 3.74 GiB, what `llama-ft plan --device cpu` adds up,
for about 40% more step time at that shape (each large buffer is mapped, and its pages faulted in, anew).
On the tiny test model the difference is within noise.

A fixed threshold set with mallopt also stops glibc's adjustments. MALLOC_MMAP_THRESHOLD_ in the
environment is the user's choice (glibc applied it at start) and is left alone: 33554432 gets back most
of glibc's speed and its retention.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
CPU_MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(threshold: int = CPU_MMAP_THRESHOLD) -> bool:
    """Set glibc's mmap threshold to `threshold` bytes for this process, unless the environment sets one.
    True when it was set here; False with another libc or a user's MALLOC_MMAP_THRESHOLD_."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1)
