"""What a benchmark ran on: the machine, its load, and its dense fp32 GEMM throughput (the roofline).

On a shared machine absolute numbers move with the load, so every result file records these beside its figures.
"""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (`uptime`), rounded: how busy the machine was."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package(name: str) -> str:
    try:
        return version(name)
    except Exception:
        return "not installed"


def machine_info(threads: int) -> dict[str, Any]:
    """CPU, cores, memory, OS and the versions of everything that decides the speed of a figure."""
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _package("timm"),
        "numpy": _package("numpy"),
        "onnxruntime": _package("onnxruntime"),
        "openvino": _package("openvino"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def gemm_gflops(n: int, repeats: int = 5) -> float:
    """Dense fp32 ``n``×``n`` matmul throughput of this machine now, best of ``repeats`` after one warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
