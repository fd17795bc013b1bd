"""The synthetic default is learnable by TFA-Net (tiny profile) and not by a trivial detector."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tfanet_core.config import load_config
from tfanet_core.evaluate import evaluate
from tfanet_core.workflow import train_category

REPO = Path(__file__).resolve().parents[1]


def _trivial_baseline():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("trivial_baseline", REPO / "benchmarks" / "trivial_baseline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("product", ["fabric", "bracket"])
def test_tiny_profile_beats_the_trivial_detector(product: str, synth_root: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    train_category(synth_root, product, load_config("tiny"), bundle, device="cpu", progress=False)
    ours = evaluate(bundle, synth_root, product, tmp_path / "eval", device="cpu", overlays_per_type=0, progress=False)
    trivial = _trivial_baseline().score_category(synth_root, product)
    assert ours["image_auroc"] >= 0.90 and ours["pixel_auroc"] >= 0.90
    assert ours["image_auroc"] >= trivial["image_auroc"] + 0.25
    assert ours["aupro"] > trivial["aupro"]
