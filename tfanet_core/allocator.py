"""How a tfanet process gets its memory: freed blocks are kept for reuse instead of handed back to the OS.

Eager torch on the CPU allocates each large activation afresh (a ``cpu``-profile batch of 8 has 50 MB maps at
128×128). glibc serves blocks that large as new pages (mmap) and unmaps them on free, so every batch pays the
kernel to map and zero its memory again: 25-53 thousand page faults per batch of 8, and eager torch ran
anywhere between 35 and 47 images/s from one process to the next depending on how many it hit
(benchmarks/README.md, "Page faults"). With the blocks kept, the same batch faults ~0 times and training steps
are ~13 % faster. The price is that the process keeps its peak heap: +20 % peak RSS for `cpu` inference,
and whatever loading took besides. A long-running process therefore calls :func:`release_freed_memory` once
it has loaded, and keeps only its batches' working set from then on.

Process-wide, so only entry points call these (the ``tfanet`` command, kfp steps, the TorchServe handler,
the benchmark's children); a library import must not change how its host process allocates.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # glibc malloc.h: free memory at the top of the heap above this goes back to the OS
M_MMAP_THRESHOLD = -3  # requests at least this large get their own mapping, unmapped on free
KEEP_BELOW = 1 << 30  # requests under 1 GiB come from the heap (reused); over it, a mapping is still better
TRIM_ABOVE = (1 << 31) - 1  # mallopt takes an int: the largest one, i.e. never trim in practice


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):  # no C library found by name
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # glibc's, not musl's


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc malloc reuse freed memory (no effect, and False, where the C library is not glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))


def release_freed_memory() -> bool:
    """Give the heap's free memory back to the OS now (glibc ``malloc_trim``); True if any was released.

    Measured, `cpu` profile, 300 batches of 1-8 images: a process that loads a bundle *and exports it* kept
    2.5 GiB (torch) and 3.4 GiB (OpenVINO) for good with what loading used; released after loading, 1.5 and
    1.6 GiB (without keeping at all: 1.2-1.3 and 1.8 GiB). A TorchServe worker that loads a stored
    OpenVINO export has little to release: 1236 MiB after 600 requests, 1261 without keeping.
    """
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
