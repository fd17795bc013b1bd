"""What a benchmark ran on: the machine, its load, and its dense fp32 GEMM throughput (the roofline).

On a shared machine absolute numbers move with the load, so every result file records these beside its figures.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
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


def gemm_kernels(n: int, threads: int) -> dict[str, Callable[[], object]]:
    """An ``n``×``n`` fp32 matmul in each library that runs the product's arithmetic: torch and OpenVINO.

    The roofline is the faster of the two, because neither library's GEMM is the machine's everywhere: on the
    AMD EPYC (AVX2, 2 threads) of one of the development machines, torch's matmul ran at 145–154 GFLOP/s and
    OpenVINO's at 186–198 (numpy's OpenBLAS 185). Against torch's alone, OpenVINO's whole network read as 89 %
    of a "roofline" that its own GEMM beat by a quarter.
    """
    import openvino as ov
    from openvino import opset13

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    x = opset13.parameter([n, n], np.float32)
    model = ov.Model([opset13.matmul(x, opset13.constant(b), False, False)], [x])
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    return {
        "torch": lambda: ta @ tb,
        "openvino": lambda: request.infer({0: a}, share_inputs=True, share_outputs=True),
    }


def gemm_gflops(n: int, threads: int, repeats: int = 5) -> dict[str, float]:
    """Each library's dense fp32 ``n``×``n`` matmul throughput now (GFLOP/s), best of ``repeats`` after a warm-up."""
    out = {}
    for name, kernel in gemm_kernels(n, threads).items():
        kernel()
        best = float("inf")
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            kernel()
            best = min(best, time.perf_counter() - start)
        out[name] = 2 * n**3 / best / 1e9
    return out
