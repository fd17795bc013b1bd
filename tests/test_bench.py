"""`tfanet bench --quick` writes well-formed, self-consistent results (speed itself is never asserted); the fast
path and the exported runtimes keep scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import machine
from tfanet_core.cli import main
from tfanet_core.predictor import FAST_PATH_TOLERANCE, INT8_TOLERANCE, Predictor
from tfanet_core.runtimes import PARITY_TOLERANCE


@pytest.mark.slow
def test_quick_bench_writes_markdown_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    files = json.loads(capsys.readouterr().out)
    result = json.loads((tmp_path / "perf.json").read_text())
    assert files == {"markdown": str(tmp_path / "perf.md"), "json": str(tmp_path / "perf.json")}

    assert result["quick"] is True and result["machine"]["threads"] == 2
    assert len(result["load_average_start"]) == 3 and len(result["load_average_end"]) == 3
    tiny = result["profiles"]["tiny"]
    samples = [result["gemm_gflops_start"], result["gemm_gflops_end"], tiny["gemm_gflops"]]
    assert all(set(sample) == {"torch", "openvino"} for sample in samples)
    assert result["roofline_gflops"] == max(gflops for sample in samples for gflops in sample.values())
    assert set(tiny["throughput"]) == {"1", "8"}
    for batch, t in tiny["throughput"].items():
        assert t["images_per_s"] == pytest.approx(int(batch) / t["best_s"])
        assert t["gflops_achieved"] == pytest.approx(t["images_per_s"] * tiny["gflop_per_image"])
        assert t["best_s"] <= t["median_s"] and 0 < t["cpu_share"] <= 1.5
    assert tiny["latency_ms"]["p50"] <= tiny["latency_ms"]["p99"]
    assert tiny["peak_rss_mib_batch8"] > 100

    variants = {v["variant"]: v for v in tiny["variants"]}
    assert set(variants) == {
        "plain (fp32, contiguous)",
        "default (channels-last)",
        "default + int8 linear layers",
        "default, 1 thread",
    }
    plain = variants["plain (fp32, contiguous)"]
    for v in variants.values():  # every speed-up is the ratio of the two rows' own speeds
        assert v["speedup"] == pytest.approx(v["images_per_s"] / plain["images_per_s"])
    assert variants["default (channels-last)"]["max_relative_score_difference"] <= FAST_PATH_TOLERANCE
    assert variants["default + int8 linear layers"]["max_relative_score_difference"] > 0  # int8 does move scores
    assert [r["image_size"] for r in tiny["image_sizes"]] == [128, 160]

    runtimes = {r["runtime"]: r for r in tiny["runtimes"]}
    assert list(runtimes) == ["torch", "onnxruntime", "openvino"]
    assert runtimes["torch"]["max_relative_score_difference"] == 0.0 and runtimes["torch"]["export_s"] is None
    for name in ("onnxruntime", "openvino"):
        row = runtimes[name]
        assert 0 < row["max_relative_score_difference"] <= PARITY_TOLERANCE and row["export_s"] > 0
        assert row["latency_ms"]["p50"] <= row["latency_ms"]["p99"] and row["latency_ms"]["runs"] == 3
        b8 = row["batches"]["8"]
        torch_b8 = runtimes["torch"]["batches"]["8"]["images_per_s"]
        assert b8["speedup_over_torch"] == pytest.approx(b8["images_per_s"] / torch_b8)
        # against the larger of the profile's own GEMM and the run's best: never above a measured roofline
        roofline = max(*tiny["gemm_gflops"].values(), result["roofline_gflops"])
        assert row["roofline_gflops"] == roofline
        assert b8["roofline_fraction"] == pytest.approx(b8["images_per_s"] * tiny["gflop_per_image"] / roofline)

    training = result["training"]
    assert [r["n_images"] for r in training["epochs"]] == [4, 8]
    assert all(r["warm_extract_s"] > 0 and r["cold_cache_mib"] > 0 for r in training["epochs"])
    assert 0 < training["float16_cache"]["max_error_over_channel_max"] <= 2**-11

    goals = {g["goal"]: g for g in result["goals"]}
    assert len(goals) == 8
    fast = next(g for name, g in goals.items() if name.startswith("default fast path"))
    worst = max(
        variants["default (channels-last)"]["max_relative_score_difference"],
        training["scores"]["channels_last_max_relative_difference"],
    )
    assert fast["met"] is (worst <= FAST_PATH_TOLERANCE) and fast["measured"] == f"max {worst:.1e}"
    parity = next(g for name, g in goals.items() if name.startswith("every exported runtime"))
    assert parity["met"] is True
    ratio = next(g for name, g in goals.items() if "eager torch" in name)
    needed = 2.5 * runtimes["torch"]["batches"]["8"]["images_per_s"]
    fraction = needed * tiny["gflop_per_image"] / runtimes["openvino"]["roofline_gflops"]
    assert f"would be {needed:.1f} images/s, {fraction:.0%} of the roofline" in ratio["measured"]

    markdown = (tmp_path / "perf.md").read_text()
    for heading in (
        "## Goals",
        "## Inference",
        "## Exported runtimes",
        "## Fast path",
        "## Image size",
        "## Training epoch",
        "## float16",
    ):
        assert heading in markdown
    assert "| tiny | openvino " in markdown and "| tiny | onnxruntime " in markdown
    assert "--quick" in markdown and "Load average" in markdown and "Machine:" in markdown


def test_gemm_roofline_is_flops_over_each_librarys_best_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: torch's calls take 0.4, 0.2 and 0.3 s, OpenVINO's 0.1, 0.5 and 0.5 s; each library's
    figure is 2n³ over its own best."""
    ticks = iter([0.0, 0.4, 1.0, 1.2, 2.0, 2.3, 3.0, 3.1, 4.0, 4.5, 5.0, 5.5])
    monkeypatch.setattr(machine.time, "perf_counter", lambda: next(ticks))
    assert machine.gemm_gflops(64, threads=1, repeats=3) == pytest.approx(
        {"torch": 2 * 64**3 / 0.2 / 1e9, "openvino": 2 * 64**3 / 0.1 / 1e9}
    )


def test_every_gemm_kernel_multiplies_the_same_matrices() -> None:
    """The libraries race on the same product, so their figures compare the same work."""
    products = {name: kernel() for name, kernel in machine.gemm_kernels(32, threads=1).items()}
    torch_product = products["torch"].numpy()
    openvino_product = next(iter(products["openvino"].values()))
    assert openvino_product.shape == (32, 32)
    assert abs(openvino_product - torch_product).max() <= 1e-4 * abs(torch_product).max()


def test_int8_predictor_quantizes_linear_layers_and_keeps_scores(fabric_bundle: Path, synth_root: Path) -> None:
    paths = sorted((synth_root / "fabric" / "test").glob("*/*.png"))[::3]
    plain = Predictor.from_bundle(fabric_bundle, device="cpu")
    quantized = Predictor.from_bundle(fabric_bundle, device="cpu", int8=True)
    assert not any(type(m) is torch.nn.Linear for m in quantized.model.modules())
    assert any(type(m) is torch.nn.Linear for m in plain.model.modules())  # the bundle's model is untouched
    exact = torch.tensor([p.score for p in plain.predict_paths(paths)])
    fast = torch.tensor([p.score for p in quantized.predict_paths(paths)])
    assert not torch.equal(exact, fast)
    assert float(((fast - exact).abs() / exact.abs()).max()) <= INT8_TOLERANCE
