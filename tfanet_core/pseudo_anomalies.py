"""Synthetic defects on held-out normal images: a label-free signal for choosing the checkpoint.

The validation loss on normal images only says how well the model reconstructs *normal*
features, and it keeps falling while a reconstruction network also learns to reproduce
defects (measured on KolektorSDD: val loss falls to epoch 40 while test AUROC falls from
epoch 10). What selection needs is how well the model *separates* defects from normals, and
no test label may be used for it. So defects are drawn onto the validation normals — a patch
cut from another normal image (CutPaste), a smooth blob that changes brightness or colour,
and a thin dark or bright scratch — and the checkpoint is scored by the pixel AUROC of these
pasted regions against the untouched validation normals.

Deterministic for a seed; images are float RGB in [0, 1], [N, 3, H, W].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tfanet_core.config import Config, ScoringConfig
from tfanet_core.data.images import image_to_tensor, load_rgb
from tfanet_core.features import FeatureExtractor
from tfanet_core.metrics import image_auroc, pixel_auroc
from tfanet_core.model import TemplateAggregator
from tfanet_core.scoring import anomaly_map, image_score

KINDS = ("cutpaste", "blob", "scratch")
TARGET_COUNT = 48  # pseudo-anomalies per run: enough for a stable pixel AUROC, cheap to score every epoch
MAX_DONORS = 16  # training images that CutPaste patches are taken from
MIN_AREA, MAX_AREA = 0.003, 0.05  # fraction of the image a drawn defect covers


@dataclass
class PseudoAnomalies:
    images: torch.Tensor  # [N, 3, H, W] float in [0, 1]
    masks: np.ndarray  # [N, H, W] bool
    kinds: list[str]


def _cutpaste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = image.shape[:2]
    h, w = (rng.uniform(0.06, 0.2, 2) * (rows, cols)).astype(int)
    sy, sx = rng.integers(0, rows - h), rng.integers(0, cols - w)
    dy, dx = rng.integers(0, rows - h), rng.integers(0, cols - w)
    out = image.copy()
    out[dy : dy + h, dx : dx + w] = np.clip(donor[sy : sy + h, sx : sx + w] * rng.uniform(0.7, 1.3), 0, 1)
    mask = np.zeros((rows, cols), dtype=bool)
    mask[dy : dy + h, dx : dx + w] = True
    return out, mask


def _blob_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth random shape: upsampled noise above a high quantile, inside a random window (sized by the short side)."""
    h, w = shape
    n = min(h, w)
    rows, cols = np.mgrid[:h, :w]
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(50):
        grid = int(rng.integers(4, 12))
        noise = Image.fromarray(rng.standard_normal((grid, grid)).astype(np.float32))
        field = np.asarray(noise.resize((w, h), Image.Resampling.BICUBIC))
        mask = field > np.quantile(field, rng.uniform(0.97, 0.995))
        cy, cx = rng.integers(np.array([h // 8, w // 8]), np.array([h - h // 8, w - w // 8]))
        half = rng.integers(n // 10, n // 4)
        mask &= (np.abs(rows - cy) < half) & (np.abs(cols - cx) < half)
        if MIN_AREA < mask.mean() < MAX_AREA:
            break
    return mask


def _blob(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mask = _blob_mask(image.shape[:2], rng)
    if rng.random() < 0.5:
        gain = rng.uniform(0.3, 0.7) if rng.random() < 0.5 else rng.uniform(1.4, 2.0)
        content = image * gain
    else:
        content = np.broadcast_to(rng.uniform(0, 1, 3), image.shape)
    alpha = rng.uniform(0.6, 1.0)
    out = image.copy()
    out[mask] = np.clip((1 - alpha) * image[mask] + alpha * content[mask], 0, 1)
    return out, mask


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    canvas = Image.new("L", (w, h), 0)
    x, y = rng.uniform(0.15, 0.85, 2) * (w, h)
    angle, length = rng.uniform(0, np.pi), rng.uniform(0.1, 0.35) * min(h, w)
    points = [(x, y)]
    for _ in range(4):  # a slightly curved polyline
        angle += rng.normal(0, 0.2)
        x, y = x + np.cos(angle) * length / 4, y + np.sin(angle) * length / 4
        points.append((x, y))
    ImageDraw.Draw(canvas).line(points, fill=255, width=int(rng.integers(2, 5)))
    mask = np.asarray(canvas) > 127
    out = image.copy()
    out[mask] = np.clip(rng.choice([0.05, 0.95]) + rng.normal(0, 0.03, 3), 0, 1)
    return out, mask


def synthesize(normals: torch.Tensor, donors: torch.Tensor, per_image: int, seed: int) -> PseudoAnomalies:
    """``per_image`` defective copies of each normal image [N, 3, H, W]; CutPaste patches come from ``donors``."""
    rng = np.random.default_rng(seed)
    base = normals.permute(0, 2, 3, 1).numpy().astype(np.float32)
    donor_images = donors.permute(0, 2, 3, 1).numpy().astype(np.float32)
    images, masks, kinds = [], [], []
    for image in base:
        for _ in range(per_image):
            kind = str(rng.choice(KINDS))
            if kind == "cutpaste":
                out, mask = _cutpaste(image, donor_images[rng.integers(len(donor_images))], rng)
            elif kind == "blob":
                out, mask = _blob(image, rng)
            else:
                out, mask = _scratch(image, rng)
            images.append(torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1))
            masks.append(mask)
            kinds.append(kind)
    return PseudoAnomalies(torch.stack(images), np.stack(masks), kinds)


@torch.no_grad()
def separation(
    model: TemplateAggregator,
    normal_features: torch.Tensor,
    anomaly_features: torch.Tensor,
    anomaly_masks: np.ndarray,
    image_size: tuple[int, int],
    scoring: ScoringConfig,
) -> dict[str, float]:
    """Image and pixel AUROC of pseudo-anomalies against the normals; the pixel AUROC is the selection signal.

    With ~10 validation normals the image AUROC moves in steps of 1/(10·48) and is mostly noise from
    one epoch to the next (on magnetic_tile it picked epoch 2 of a flat curve); the pixel AUROC pools
    millions of pixels and is smooth.
    """
    was_training = model.training
    model.eval()

    def score(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = [], []
        for start in range(0, len(features), 16):
            target, predicted = model.reconstruct(features[start : start + 16])
            m = anomaly_map(target.float(), predicted.float(), image_size, scoring)
            scores.append(image_score(m, scoring))
            maps.append(m)
        return torch.cat(scores).cpu().numpy(), torch.cat(maps).cpu().numpy()

    normal_scores, normal_maps = score(normal_features)
    anomaly_scores, anomaly_maps = score(anomaly_features)
    model.train(was_training)
    labels = np.r_[np.zeros(len(normal_scores), dtype=int), np.ones(len(anomaly_scores), dtype=int)]
    image = image_auroc(labels, np.r_[normal_scores, anomaly_scores])
    masks = np.concatenate([np.zeros(normal_maps.shape, dtype=bool), anomaly_masks])
    pixel = pixel_auroc(masks, np.concatenate([normal_maps, anomaly_maps]))
    return {"synthetic_image_auroc": image, "synthetic_pixel_auroc": pixel}


def separation_selector(
    extractor: FeatureExtractor,
    val_paths: Sequence[Path],
    donor_paths: Sequence[Path],
    val_features: torch.Tensor,
    config: Config,
    device: torch.device | str = "cpu",
) -> Callable[[TemplateAggregator], dict[str, float]]:
    """What ``train.selection=synthetic`` evaluates after every epoch: pseudo-anomalies drawn once, scored each time.

    About ``TARGET_COUNT`` defects are drawn over the validation normals (at least one per image); their
    backbone features are extracted once here, so an epoch's check costs only the small network's forward.
    """
    if not val_paths:
        raise ValueError("train.selection=synthetic needs held-out normal images (train.val_fraction > 0)")
    size = extractor.config.image_hw
    normals = torch.stack([image_to_tensor(load_rgb(p), size) for p in val_paths])
    donors = torch.stack([image_to_tensor(load_rgb(p), size) for p in list(donor_paths)[:MAX_DONORS]])
    per_image = max(1, -(-TARGET_COUNT // len(val_paths)))
    pseudo = synthesize(normals, donors, per_image, seed=config.train.seed)
    extractor.to(device)
    anomaly_features = torch.cat(
        [extractor(pseudo.images[start : start + 8].to(device)).float() for start in range(0, len(pseudo.images), 8)]
    )
    normal_features = val_features.to(device)  # both stay on the device for every epoch's check

    def select(model: TemplateAggregator) -> dict[str, float]:
        return separation(model, normal_features, anomaly_features, pseudo.masks, size, config.scoring)

    return select
