"""The trivial detector that the synthetic dataset must defeat, scored like TFA-Net is.

Detector: the anomaly map is |x − mean training image| (RGB mean, Gaussian-blurred σ=2), the
image score is its maximum. It has no learned features, so any product it solves is too easy
to say anything about a real model.

    python benchmarks/trivial_baseline.py --data runs/demo/data [--category fabric ...]
prints one JSON line per category with image AUROC, pixel AUROC and AUPRO.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from tfanet_core.data.images import image_to_tensor, load_mask, load_rgb
from tfanet_core.data.layouts import discover
from tfanet_core.metrics import evaluate_scores


def _array(path: Path, size: int) -> np.ndarray:
    return image_to_tensor(load_rgb(path), size).numpy()


def score_category(root: Path, category: str, size: int = 128) -> dict[str, object]:
    samples = discover(root, category)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    mean = np.mean([_array(s.path, size) for s in train], axis=0)
    maps = np.stack([gaussian_filter(np.abs(_array(s.path, size) - mean).mean(0), 2.0) for s in test])
    labels = np.array([s.is_anomalous for s in test], dtype=int)
    masks = np.stack(
        [load_mask(s.mask_paths, (size, size)) if s.mask_paths else np.zeros((size, size), bool) for s in test]
    )
    metrics = evaluate_scores(labels, maps.reshape(len(test), -1).max(1), masks, maps.astype(np.float32))
    keys = ("image_auroc", "pixel_auroc", "aupro")
    return {"category": category, "detector": "max |x - mean train image|", **{k: metrics[k] for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--category", nargs="*", default=["fabric", "bracket"])
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    for category in args.category:
        print(json.dumps(score_category(args.data, category, args.size)))


if __name__ == "__main__":
    main()
