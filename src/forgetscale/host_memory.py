"""Host memory on CPU: keep what torch frees inside the process, so the next tensor reuses pages already mapped.

Why: glibc serves each allocation above its mmap threshold (dynamic, at most 32 MB) with a fresh mapping,
and hands the top of the heap back to the kernel whenever enough of it is free. Every training step and
measuring pass allocates and frees the same activations, so with the defaults each step page-faults them
in anew (tens of thousands of minor faults per SmolLM2 step in a sweep, each costly in a VM; figures in
README, from `benchmarks/bench_host_memory.py`). `train.allocator: retain` (auto on CPU) raises both
thresholds with glibc's mallopt once per process; the cost is a peak RSS that stays at its high-water
mark instead of shrinking between phases.
Only glibc has mallopt: elsewhere (macOS, musl) this is a no-op that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
LARGEST = 2**31 - 1  # mallopt takes an int: allocations up to 2 GiB come from the heap, and it is never trimmed


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


@functools.cache
def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for the rest of the process; True if glibc accepted both.
    Cached: once per process, whatever asks again."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGEST)) and bool(libc.mallopt(M_TRIM_THRESHOLD, LARGEST))


def apply_allocator(choice: str, device: torch.device) -> bool:
    """train.allocator: retain (auto on CPU) keeps freed memory in the process; system leaves glibc's defaults.
    Returns whether freed memory is now retained. A process-wide setting that cannot be undone: `system`
    after `retain` in one process changes nothing."""
    if choice == "system" or (choice == "auto" and device.type != "cpu"):
        return False
    return retain_freed_memory()
