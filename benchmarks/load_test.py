"""Bounded load test of the TorchServe endpoint on loopback: N requests at concurrency C, then stop.

    .venv/bin/python benchmarks/load_test.py                       # tiny bundle trained on synthetic data
    .venv/bin/python benchmarks/load_test.py --bundle runs/demo/bundles/fabric --product fabric
    .venv/bin/python benchmarks/load_test.py --profile cpu --runtime openvino  # the exported graph in the handler

Starts its own TorchServe (free loopback ports, token auth on, state in a temp dir), registers the
bundle's archive with server-side batching, sends warm-up requests (not counted), then exactly
``--requests`` PNG requests from ``--concurrency`` threads over keep-alive connections. Every answer
is checked: HTTP 200 *and* the score equal to the bundle's own score for that image (1e-4), so
"errors" counts wrong answers as well as failures. With ``--runtime onnxruntime|openvino`` the archive
carries the bundle's parity-checked export and the handler runs it. After the server stops, the same images
are scored in-process by the same runtime (decoding included, batches of ``--batch-size``): the served
figure's ceiling on this machine in the same run. Writes ``<out>.json`` and ``<out>.md``.

Client and server share the machine's cores, so the figures are a lower bound for the server alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from components.naming import torchserve_model_name
from components.serving import server
from components.serving.archive import build_archive
from components.serving.torchserve import TorchServeClient
from tfanet_core.allocator import keep_freed_memory
from tfanet_core.bundle import read_metadata
from tfanet_core.predictor import Predictor
from tfanet_core.runtimes import export_bundle, format_of

REPO = Path(__file__).resolve().parents[1]

TOLERANCE = 1e-4


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "arch": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_gb, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _train(work: Path, product: str, profile: str) -> tuple[Path, Path]:
    """A bundle of ``profile`` briefly trained on the synthetic dataset: speed does not depend on how well."""
    from tfanet_core.config import load_config
    from tfanet_core.data.synth import generate
    from tfanet_core.workflow import train_category

    data = work / "synth"
    generate(data, seed=0)
    bundle = work / "bundle"
    config = load_config(profile, [f"train.epochs={2 if profile == 'tiny' else 1}", "calibration.target_fpr=0.25"])
    train_category(data, product, config, bundle, device="cpu", progress=True)
    return bundle, data / product / "test"


class _Load:
    """Worker threads pull request numbers from a shared counter until ``total`` are sent."""

    def __init__(self, url: str, path: str, token: str, images: list[bytes], expected: list[float], total: int):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.path, self.token, self.images, self.expected, self.total = path, token, images, expected, total
        self.next = 0
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.bar = tqdm(total=total, desc="requests", unit="req")

    def _take(self) -> int | None:
        with self.lock:
            if self.next >= self.total:
                return None
            self.next += 1
            return self.next - 1

    def run_thread(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/octet-stream"}
        while (i := self._take()) is not None:
            k = i % len(self.images)
            start = time.perf_counter()
            try:
                conn.request("POST", self.path, self.images[k], headers)
                resp = conn.getresponse()
                body = resp.read()
                elapsed = time.perf_counter() - start
                error = None
                if resp.status != 200:
                    error = f"HTTP {resp.status}: {body[:200]!r}"
                elif abs(json.loads(body)["score"] - self.expected[k]) > TOLERANCE:
                    error = f"wrong score for image {k}: {json.loads(body)['score']} != {self.expected[k]}"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                elapsed = time.perf_counter() - start
                error = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            with self.lock:
                self.latencies.append(elapsed)
                if error:
                    self.errors.append(error)
                self.bar.update(1)
        conn.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tfanet-load-") as tmp:
        work = Path(tmp)
        if args.bundle is None:
            bundle, test_dir = _train(work, args.product, args.profile)
        else:
            bundle, test_dir = args.bundle, args.images
        paths = sorted(p for p in Path(test_dir).rglob("*.png"))[: args.distinct_images]
        if not paths:
            raise SystemExit(f"no PNG images under {test_dir}: pass --images DIR")
        images = [p.read_bytes() for p in paths]
        reference = Predictor.from_bundle(bundle, device="cpu", runtime="torch")
        expected = [pred.score for pred in reference.predict_paths(paths)]
        export = None
        if args.runtime != "torch":
            export = export_bundle(reference, format_of(args.runtime), work / "export")
        meta = read_metadata(bundle)
        state = work / "torchserve"
        server.start(state, server.free_ports())
        try:
            client = TorchServeClient.from_state_dir(state)
            mar = build_archive(bundle, args.product, "1", state / "model_store", export=export)
            name = torchserve_model_name(args.product)
            client.register(mar.name, name, batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay_ms)
            for data in images[: args.warmup]:
                warm = client.predict(name, data)
                if warm.status != 200:
                    raise SystemExit(f"warm-up request refused ({warm.status}): {warm.message}")
            load = _Load(
                client.inference,
                f"/predictions/{name}",
                client.key("inference") or "",
                images,
                expected,
                args.requests,
            )
            threads = [threading.Thread(target=load.run_thread) for _ in range(args.concurrency)]
            load_before = os.getloadavg()
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            load_after = os.getloadavg()
            load.bar.close()
            worker_rss = [_rss_mib(w["pid"]) for v in client.versions(name) for w in v["workers"]]
        finally:
            server.stop(state)
        in_process = _in_process(bundle, args.runtime, export, paths, args.batch_size)
    lat_ms = np.array(load.latencies) * 1000
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**_machine(), "load_average_1min": {"before": load_before[0], "after": load_after[0]}},
        "model": {
            "profile": meta["config"]["profile"],
            "backbone": meta["backbone"]["tag"],
            "image_size": meta["config"]["features"]["image_size"],
            "product": args.product,
            "bundle": f"{args.profile} profile, briefly trained on the synthetic dataset"
            if args.bundle is None
            else str(args.bundle),
            "runtime": args.runtime,
        },
        "server": {
            "torchserve": "0.12.0",
            "workers": 1,
            "batch_size": args.batch_size,
            "max_batch_delay_ms": args.max_batch_delay_ms,
            "token_auth": True,
        },
        "load": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "warmup_requests": min(args.warmup, len(images)),
            "distinct_images": len(images),
            "image_bytes_mean": round(statistics.mean(len(b) for b in images)),
            "transport": "HTTP/1.1 keep-alive on 127.0.0.1, raw PNG body",
        },
        "results": {
            "errors": len(load.errors),
            "first_errors": load.errors[:5],
            "wall_s": round(wall, 2),
            "throughput_rps": round(args.requests / wall, 2),
            "in_process_images_per_s": round(in_process, 2),
            "worker_rss_mib": worker_rss,
            "served_fraction_of_in_process": round(args.requests / wall / in_process, 3),
            "latency_ms": {
                "p50": round(float(np.percentile(lat_ms, 50)), 1),
                "p90": round(float(np.percentile(lat_ms, 90)), 1),
                "p99": round(float(np.percentile(lat_ms, 99)), 1),
                "max": round(float(lat_ms.max()), 1),
                "mean": round(float(lat_ms.mean()), 1),
            },
        },
    }


def _rss_mib(pid: int) -> int:
    """Resident memory of a local process (Linux /proc: the server is on this machine)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) >> 10  # kB
    raise RuntimeError(f"no VmRSS for process {pid}")


def _in_process(bundle: Path, runtime: str, export: Path | None, paths: list[Path], batch_size: int) -> float:
    """Images/s of the same runtime in this process on the same files (decoding included), best of 3 passes."""
    predictor = Predictor.from_bundle(bundle, device="cpu", batch_size=batch_size, runtime=runtime, export_dir=export)
    predictor.predict_paths(paths[:batch_size])  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        predictor.predict_paths(paths)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def to_markdown(r: dict[str, Any]) -> str:
    m, mod, s, ld, res = r["machine"], r["model"], r["server"], r["load"], r["results"]
    lat, la = res["latency_ms"], m["load_average_1min"]
    gpu = m["gpu"] or "no GPU"
    rss = ", ".join(f"{mib} MiB" for mib in res["worker_rss_mib"])
    return f"""# Serving load test (TorchServe, loopback)

Measured {r["date"]} by `benchmarks/load_test.py`.

- **Machine**: {m["arch"]}, {m["cores"]} cores ({m["cpu"]}), {m["ram_gb"]} GB RAM, {gpu}; Python {m["python"]}, \
torch {m["torch"]}. Client and server share these cores; 1-min load average {la["before"]:.1f} before and \
{la["after"]:.1f} after the run (other jobs on the machine count too).
- **Model**: {mod["profile"]} profile, backbone `{mod["backbone"]}`, {mod["image_size"]} px input, product \
`{mod["product"]}` ({mod["bundle"]}); runtime in the handler: **{mod["runtime"]}**.
- **Server**: TorchServe {s["torchserve"]}, {s["workers"]} worker, server-side batching batch_size={s["batch_size"]}, \
max_batch_delay={s["max_batch_delay_ms"]} ms, token authorization on.
- **Load**: {ld["requests"]} requests at concurrency {ld["concurrency"]} ({ld["transport"]}; {ld["distinct_images"]} \
distinct synthetic {mod["image_size"]} px images, mean {ld["image_bytes_mean"]} B), after {ld["warmup_requests"]} \
warm-up requests. An error is any non-200 answer or a score that differs from the bundle's by more than {TOLERANCE}.

| requests | concurrency | errors | throughput (req/s) | in-process (images/s) | served / in-process | \
p50 (ms) | p90 (ms) | p99 (ms) | max (ms) | wall (s) |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| {ld["requests"]} | {ld["concurrency"]} | {res["errors"]} | {res["throughput_rps"]} | \
{res["in_process_images_per_s"]} | {res["served_fraction_of_in_process"]:.0%} | {lat["p50"]} | {lat["p90"]} | \
{lat["p99"]} | {lat["max"]} | {res["wall_s"]} |

*In-process*: the same runtime scoring the same files in this process after the server stopped (PNG decoding
included, batches of {s["batch_size"]}, best of 3 passes): what the served figure is measured against.
Worker memory after the load (resident, `VmRSS` of each worker process): {rss}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: train a tiny one on synthetic data)")
    parser.add_argument("--images", type=Path, help="PNG images to send (required with --bundle)")
    parser.add_argument("--product", default="fabric")
    parser.add_argument("--profile", default="tiny", help="profile of the trained bundle when no --bundle is given")
    parser.add_argument("--runtime", default="torch", help="torch | onnxruntime | openvino (the handler runs it)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-batch-delay-ms", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--distinct-images", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serving_load")
    args = parser.parse_args(argv)
    if args.bundle is not None and args.images is None:
        parser.error("--bundle needs --images DIR (PNG files to send)")
    keep_freed_memory()  # as the serving worker does: the in-process figure runs under the same allocator
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 1 if result["results"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
