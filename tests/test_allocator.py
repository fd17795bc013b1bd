"""keep_freed_memory: a large block freed and asked for again comes back without new page faults;
release_freed_memory: what was kept goes back to the OS."""

from __future__ import annotations

import subprocess
import sys

import pytest

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


def _printed(script: str, *args: str) -> int:
    """The number ``script`` prints, run in a fresh process: the setting is process-wide, and this one may have
    made it already."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc, on Linux")
def test_a_freed_block_is_reused_instead_of_mapped_again() -> None:
    fresh, kept = _printed(FAULTS_OF_A_REUSED_BLOCK, "default"), _printed(FAULTS_OF_A_REUSED_BLOCK, "keep")
    assert fresh >= 8000  # each block mapped and zeroed again: ~16k faults of 4 KiB pages per block
    assert kept <= fresh // 4  # at most one in four placed anew, and reused from then on


RSS_AFTER_RELEASE = """
import resource
import torch
from tfanet_core.allocator import keep_freed_memory, release_freed_memory
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() >> 20
assert keep_freed_memory()
torch.empty(64 << 20).fill_(1.0)  # 256 MiB, freed at once: what loading a model may take
kept = rss_mib()
assert release_freed_memory()
print(kept - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc, on Linux")
def test_release_hands_kept_memory_back() -> None:
    assert _printed(RSS_AFTER_RELEASE) >= 200  # MiB of the 256 freed
