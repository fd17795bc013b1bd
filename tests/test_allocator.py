"""keep_freed_memory: a large block freed and asked for again comes back without new page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A fresh process each: the setting is process-wide, and this one may have made it already.
FAULTS_OF_A_REUSED_BLOCK = """
import resource, sys
import torch
from tfanet_core.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for _ in range(8):  # 64 MiB blocks, each freed at once like a batch's activation maps; glibc settles
    torch.empty(16 << 20).fill_(1.0)  # where it puts them (an aligned block does not fit the hole it left)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # the next eight batches'
    torch.empty(16 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_A_REUSED_BLOCK, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc, on Linux")
def test_a_freed_block_is_reused_instead_of_mapped_again() -> None:
    fresh, kept = _faults("default"), _faults("keep")
    assert fresh >= 8000  # each block mapped and zeroed again: ~16k faults of 4 KiB pages per block
    assert kept <= fresh // 4  # at most one in four placed anew, and reused from then on
