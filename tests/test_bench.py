"""`tfanet bench --quick` writes well-formed results (speed itself is never asserted); the fast path keeps scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tfanet_core.bench import FAST_PATH_TOLERANCE, INT8_TOLERANCE, gemm_gflops
from tfanet_core.cli import main
from tfanet_core.predictor import Predictor


@pytest.mark.slow
def test_quick_bench_writes_markdown_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    files = json.loads(capsys.readouterr().out)
    result = json.loads((tmp_path / "perf.json").read_text())
    assert files == {"markdown": str(tmp_path / "perf.md"), "json": str(tmp_path / "perf.json")}

    assert result["quick"] is True and result["machine"]["threads"] == 2
    assert result["roofline_gflops"] > 0 and len(result["load_average_start"]) == 3
    tiny = result["profiles"]["tiny"]
    assert set(tiny["throughput"]) == {"1", "8"}
    assert all(t["images_per_s"] > 0 and t["cpu_share"] > 0 for t in tiny["throughput"].values())
    assert tiny["latency_ms"]["p50"] <= tiny["latency_ms"]["p99"]
    assert tiny["peak_rss_mib_batch8"] > 100
    variants = {v["variant"]: v for v in tiny["variants"]}
    assert variants["plain (fp32, contiguous)"]["speedup"] == 1.0
    assert {"default, 1 thread", "default + int8 linear layers"} <= set(variants)
    assert variants["default (channels-last)"]["max_relative_score_difference"] <= FAST_PATH_TOLERANCE
    assert [r["image_size"] for r in tiny["image_sizes"]] == [128, 160]

    training = result["training"]
    assert [r["n_images"] for r in training["epochs"]] == [4, 8]
    assert all(r["warm_extract_s"] > 0 and r["cold_cache_mib"] > 0 for r in training["epochs"])
    assert 0 < training["float16_cache"]["max_error_over_channel_max"] <= 2**-11
    assert {g["met"] for g in result["goals"]} <= {True, False} and len(result["goals"]) == 4

    markdown = (tmp_path / "perf.md").read_text()
    for heading in ("## Goals", "## Inference", "## Fast path", "## Image size", "## Training epoch", "## float16"):
        assert heading in markdown
    assert "--quick" in markdown and "Load average" in markdown and "Machine:" in markdown


def test_gemm_roofline_is_measured() -> None:
    assert gemm_gflops(128, repeats=2) > 0.1


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
