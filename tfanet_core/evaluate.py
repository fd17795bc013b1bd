"""``tfanet evaluate``: MVTec-style metrics, curves and overlays for one category's test split.

Everything is computed at the model's input resolution (maps are H×W of the bundle's geometry, masks are
resized with NEAREST), which is how the paper and anomalib report MVTec numbers. Metrics are
given overall and per defect type (each type against all good test images); LOCO categories
also get AU-sPRO with the saturation areas of ``defects_config.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import auc, roc_curve
from tqdm.auto import tqdm

from tfanet_core.data.images import DataError, image_to_tensor, load_mask, load_rgb, open_mask_image
from tfanet_core.data.layouts import GOOD, Sample, load_defects_config
from tfanet_core.data.manifest import Manifest
from tfanet_core.metrics import Defect, au_spro, defects_from_loco_channels, evaluate_scores, pro_curve
from tfanet_core.predictor import Predictor
from tfanet_core.workflow import manifest_for

log = logging.getLogger(__name__)

#: Per-image test scores written by :func:`evaluate`; the chain's calibrate step reads them back.
SCORES_FILE = "scores.json"

# Original MVTec LOCO image sizes (W, H): absolute saturation thresholds in defects_config.json are
# pixel counts at this resolution, so they shrink with the evaluation resolution.
LOCO_ORIGINAL_SIZES = {
    "breakfast_box": (1600, 1280),
    "juice_bottle": (800, 1600),
    "pushpins": (1700, 1000),
    "screw_bag": (1600, 1100),
    "splicing_connectors": (1700, 850),
}


@dataclass
class ScoredSplit:
    samples: list[Sample]
    scores: np.ndarray  # [N]
    maps: np.ndarray  # [N, H, W] float32
    masks: np.ndarray | None  # [N, H, W] bool, None when the category has no masks at all

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.is_anomalous for s in self.samples], dtype=int)


def score_test_split(predictor: Predictor, samples: list[Sample], progress: bool = True) -> ScoredSplit:
    size = predictor.image_size
    scores, maps = [], []
    batch = predictor.batch_size
    for start in tqdm(range(0, len(samples), batch), desc="evaluate", unit="batch", disable=not progress):
        chunk = samples[start : start + batch]
        images = torch.stack([image_to_tensor(load_rgb(s.path), size) for s in chunk])
        s, m = predictor.score_tensors(images)
        scores.append(s.numpy())
        maps.append(m.numpy().astype(np.float32))
    has_masks = any(s.mask_paths for s in samples)
    masks = None
    if has_masks:
        masks = np.stack(
            [load_mask(s.mask_paths, size) if s.mask_paths else np.zeros(size, dtype=bool) for s in samples]
        )
    return ScoredSplit(samples, np.concatenate(scores), np.concatenate(maps), masks)


def loco_defects(
    samples: list[Sample], config: list[dict[str, Any]], category: str, size: tuple[int, int]
) -> list[list[Defect]]:
    """Per image, one Defect per ground-truth channel (every channel, not just the first).

    Absolute saturation thresholds are pixel counts at the original resolution; they are scaled
    by (evaluation pixels / original pixels) so that sPRO means the same thing at the evaluation size (H, W).
    """
    channels_of = [
        [np.asarray(open_mask_image(p).resize((size[1], size[0]), Image.Resampling.NEAREST)) for p in s.mask_paths]
        for s in samples
    ]
    first_mask = next((p for s in samples for p in s.mask_paths), None)
    original = LOCO_ORIGINAL_SIZES.get(category) or (open_mask_image(first_mask).size if first_mask else size)
    scale = (size[0] * size[1]) / float(original[0] * original[1])
    scaled = [
        {**e, "saturation_threshold": e["saturation_threshold"] * (1.0 if e["relative_saturation"] else scale)}
        for e in config
    ]
    return [defects_from_loco_channels(channels, scaled) for channels in channels_of]


def _subset_metrics(test: ScoredSplit, index: np.ndarray) -> dict[str, float | None]:
    masks = test.masks[index] if test.masks is not None else None
    maps = test.maps[index] if test.masks is not None else None
    result = evaluate_scores(test.labels[index], test.scores[index], masks, maps)
    result["n_images"] = int(index.size)
    result["n_defective"] = int(test.labels[index].sum())
    return result


def compute_metrics(
    test: ScoredSplit, threshold: float | None, defects: list[list[Defect]] | None = None
) -> dict[str, Any]:
    everything = np.arange(len(test.samples))
    metrics: dict[str, Any] = _subset_metrics(test, everything)
    good = np.array([i for i, s in enumerate(test.samples) if s.label == GOOD], dtype=int)
    per_type: dict[str, Any] = {}
    for label in sorted({s.label for s in test.samples} - {GOOD}):
        index = np.concatenate([good, [i for i, s in enumerate(test.samples) if s.label == label]]).astype(int)
        per_type[label] = _subset_metrics(test, index)
        if defects is not None and len(good):
            per_type[label]["au_spro"] = {
                str(k): v for k, v in au_spro(test.maps[index], [defects[i] for i in index]).items()
            }
    metrics["per_type"] = per_type
    if defects is not None:
        metrics["au_spro"] = {str(k): v for k, v in au_spro(test.maps, defects).items()}
    if threshold is not None:
        metrics["at_threshold"] = at_threshold(test.labels, test.scores, threshold)
    return metrics


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float | int]:
    """Confusion counts of the test split at an image threshold (a score above it is flagged)."""
    flagged = np.asarray(scores) > threshold
    labels = np.asarray(labels).astype(bool)
    return {
        "threshold": float(threshold),
        "true_positives": int((flagged & labels).sum()),
        "false_positives": int((flagged & ~labels).sum()),
        "false_negatives": int((~flagged & labels).sum()),
        "true_negatives": int((~flagged & ~labels).sum()),
    }


def write_scores(test: ScoredSplit, root: Path | None, path: Path) -> None:
    """Per-image test scores (path relative to the dataset root, label, score): what calibration reads back."""
    rows = [
        {
            "path": s.path.relative_to(root).as_posix() if root and s.path.is_relative_to(root) else str(s.path),
            "label": s.label,
            "score": float(score),
        }
        for s, score in zip(test.samples, test.scores.tolist(), strict=True)
    ]
    path.write_text(json.dumps(rows, indent=1) + "\n")


# --- pictures a person would rather look at than read -------------------------------------------------


def plot_roc(test: ScoredSplit, path: Path) -> None:
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    good = [i for i, s in enumerate(test.samples) if s.label == GOOD]
    curves = {"all defects": list(range(len(test.samples)))}
    for label in sorted({s.label for s in test.samples} - {GOOD}):
        curves[label] = good + [i for i, s in enumerate(test.samples) if s.label == label]
    for name, index in curves.items():
        labels = test.labels[index]
        if labels.min() == labels.max():
            continue
        fpr, tpr, _ = roc_curve(labels, test.scores[index])
        ax.plot(fpr, tpr, lw=2.2 if name == "all defects" else 1.2, label=f"{name} (AUROC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=1)
    ax.set(xlabel="false positive rate (good images)", ylabel="true positive rate", title="Image-level ROC")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_pro(test: ScoredSplit, path: Path, limit: float = 0.3) -> None:
    assert test.masks is not None
    fpr, pro, _ = pro_curve(test.masks, test.maps)
    keep = fpr <= limit
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.plot(fpr[keep], pro[keep], lw=2)
    ax.set(
        xlim=(0, limit),
        ylim=(0, 1.01),
        xlabel="false positive rate (defect-free pixels)",
        ylabel="per-region overlap",
        title=f"PRO curve (FPR ≤ {limit})",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_scores(samples: list[Sample], scores: np.ndarray, threshold: float | None, path: Path) -> None:
    """Test image scores per folder with the threshold line: where the verdicts fall at a glance."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    labels = sorted({s.label for s in samples}, key=lambda x: (x != GOOD, x))
    data = [scores[[i for i, s in enumerate(samples) if s.label == lab]] for lab in labels]
    ax.boxplot(data, orientation="horizontal", tick_labels=labels, showfliers=False)
    for row, values in enumerate(data, start=1):
        jitter = np.random.default_rng(row).uniform(-0.15, 0.15, size=len(values))
        ax.scatter(values, row + jitter, s=10, alpha=0.6, color="tab:green" if labels[row - 1] == GOOD else "tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.4g}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set(xlabel="image score", title="Image scores per test folder")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def overlay(image: np.ndarray, amap: np.ndarray, vmax: float) -> np.ndarray:
    """The image with the anomaly map as a translucent heat map (alpha grows with the score)."""
    norm = np.clip(amap / max(vmax, 1e-12), 0.0, 1.0)
    heat = matplotlib.colormaps["inferno"](norm)[..., :3]
    alpha = (0.15 + 0.6 * norm)[..., None]
    return (image * (1 - alpha) + heat * alpha).clip(0, 1)


def plot_overlays(
    test: ScoredSplit, predictor: Predictor, threshold: float | None, out: Path, per_type: int = 2
) -> int:
    """A few test images per folder: input, ground truth, heat map; titled with score and verdict."""
    out.mkdir(parents=True, exist_ok=True)
    size = predictor.image_size
    vmax = float(np.percentile(test.maps, 99.9))  # one colour scale for all images: comparable at a glance
    chosen: dict[str, list[int]] = {}
    for i, s in enumerate(test.samples):
        chosen.setdefault(s.label, [])
        if len(chosen[s.label]) < per_type:
            chosen[s.label].append(i)
    written = 0
    for label, indices in chosen.items():
        for i in indices:
            sample = test.samples[i]
            image = image_to_tensor(load_rgb(sample.path), size).permute(1, 2, 0).numpy()
            panels = 3 if test.masks is not None else 2
            fig = Figure(figsize=(3.2 * panels, 3.4))
            axes = fig.subplots(1, panels)
            axes[0].imshow(image)
            axes[0].set_title(f"{label}/{sample.path.name}", fontsize=8)
            if test.masks is not None:
                axes[1].imshow(image)
                axes[1].contour(test.masks[i], levels=[0.5], colors="lime", linewidths=1.2)
                axes[1].set_title("ground truth", fontsize=8)
            axes[-1].imshow(overlay(image, test.maps[i], vmax))
            verdict = "" if threshold is None else (" → ANOMALOUS" if test.scores[i] > threshold else " → good")
            axes[-1].set_title(f"score {test.scores[i]:.4g}{verdict}", fontsize=8)
            for ax in axes:
                ax.axis("off")
            fig.tight_layout()
            fig.savefig(out / f"{label}_{sample.path.stem}.png", dpi=90)
            written += 1
    return written


def evaluate(
    bundle: Path | str,
    root: Path | str,
    category: str,
    out: Path | str,
    *,
    manifest: Manifest | None = None,
    device: str | None = None,
    overlays_per_type: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the manifest's test rows and write metrics.json, scores.json, curve plots and overlays to ``out``.

    Without ``manifest`` it is built in memory from the folder with the bundle's split settings. The
    at-threshold counts and the threshold line appear only for a calibrated bundle.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_bundle(bundle, device=device)
    if manifest is None:
        manifest = manifest_for(root, category, predictor.config, progress=progress)
    samples = manifest.samples("test")
    if not samples:
        raise DataError(f"{Path(root) / category}: no test images (expected test/<type>/ folders)")
    test = score_test_split(predictor, samples, progress)
    threshold = predictor.threshold
    loco_config = load_defects_config(root, category)
    defects = None
    if loco_config is not None and test.masks is not None:
        defects = loco_defects(samples, loco_config, category, predictor.image_size)
    metrics = compute_metrics(test, threshold, defects)
    metrics.update(
        {
            "category": category,
            "bundle": str(bundle),
            "profile": predictor.config.profile,
            "backbone": predictor.bundle.backbone.get("tag"),
            "resolution": list(predictor.image_size),
            "n_test": len(samples),
        }
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    write_scores(test, manifest.root, out / SCORES_FILE)
    plot_roc(test, out / "roc.png")
    if threshold is not None:
        plot_scores(test.samples, test.scores, threshold, out / "scores.png")
    if test.masks is not None and test.masks.any():
        plot_pro(test, out / "pro.png")
    plot_overlays(test, predictor, threshold, out / "overlays", overlays_per_type)
    return metrics
