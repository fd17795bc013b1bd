"""How a tfanet process gets its memory: freed blocks are kept for reuse instead of handed back to the OS.

Eager torch on the CPU allocates each large activation afresh (a ``cpu``-profile batch of 8 has 50 MB maps at
128×128). glibc serves blocks that large as new pages (mmap) and unmaps them on free, so every batch pays the
kernel to map and zero its memory again: 25-53 thousand page faults per batch of 8, and eager torch ran
anywhere between 35 and 47 images/s from one process to the next depending on how many it hit
(benchmarks/README.md, "Page faults"). With the blocks kept, the same batch faults ~0 times and training steps
are ~13 % faster. The price is that the process keeps its peak heap: +20 % peak RSS for `cpu` inference.

Process-wide, so only entry points call it (the ``tfanet`` command, kfp steps, the benchmark's children); a
library import must not change how its host process allocates.
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
def keep_freed_memory() -> bool:
    """Have glibc malloc reuse freed memory (no effect, and False, where the C library is not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no libc found, or one without mallopt (musl, macOS)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))
