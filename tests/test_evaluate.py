"""`tfanet evaluate`: metrics JSON (docs/architecture.md §Command line), plots, overlays, LOCO sPRO per channel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfanet_core.cli import main
from tfanet_core.data.layouts import Sample
from tfanet_core.evaluate import ScoredSplit, compute_metrics, loco_defects


def test_evaluate_writes_metrics_plots_and_overlays(
    fabric_bundle: Path, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--bundle",
                str(fabric_bundle),
                "--data",
                str(synth_root),
                "--category",
                "fabric",
                "--out",
                str(out),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert 0.0 <= metrics[key] <= 1.0
        assert summary[key] == metrics[key]
    assert set(metrics["per_type"]) == {"scratch", "hole", "stain"}
    assert metrics["per_type"]["hole"]["n_images"] == metrics["n_test"] - 2 * metrics["per_type"]["hole"]["n_defective"]
    at = metrics["at_threshold"]
    assert at["true_positives"] + at["false_negatives"] == metrics["n_defective"]
    for name in ("roc.png", "pro.png", "scores.png"):
        assert Image.open(out / name).size[0] > 300
    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert len(overlays) == 8 and overlays[0].startswith("good_")


def test_pixel_metrics_are_null_without_masks() -> None:
    samples = [Sample(Path(f"{i}.png"), "test", "good" if i < 3 else "defect") for i in range(6)]
    test = ScoredSplit(samples, np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), np.zeros((6, 4, 4), np.float32), None)
    metrics = compute_metrics(test, threshold=0.35)
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["at_threshold"]["false_positives"] == 0 and metrics["at_threshold"]["true_positives"] == 3


def test_loco_defects_read_every_channel_and_scale_absolute_saturation(tmp_path: Path) -> None:
    config = [
        {"defect_name": "missing", "pixel_value": 255, "saturation_threshold": 3200, "relative_saturation": False},
        {"defect_name": "extra", "pixel_value": 254, "saturation_threshold": 0.5, "relative_saturation": True},
    ]
    a = np.zeros((40, 20), np.uint8)
    a[:20, :10] = 255  # 200 px at file resolution
    b = np.zeros((40, 20), np.uint8)
    b[30:, 10:] = 254
    paths = [tmp_path / "000.png", tmp_path / "001.png"]
    for arr, path in zip((a, b), paths, strict=True):
        Image.fromarray(arr).save(path)
    [defects] = loco_defects(
        [Sample(tmp_path / "img.png", "test", "logical", tuple(paths))], config, "custom", (20, 20)
    )
    assert [d.name for d in defects] == ["missing", "extra"]
    # original 20x40 = 800 px, evaluated at 20x20 = 400 px: absolute 3200 -> 1600, capped at the defect's 100 px
    assert defects[0].mask.sum() == 100 and defects[0].saturation_area == 100
    assert defects[1].saturation_area == pytest.approx(0.5 * defects[1].mask.sum(), abs=1)
