"""The training loss, anomaly maps and image scores (docs/architecture.md §Model).

Two different cosines live here on purpose: the loss compares each *token* over its whole
K²·C vector; the anomaly map compares each *pixel* over its C channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tfanet_core.config import ScoringConfig


def reconstruction_loss(predicted: torch.Tensor, target: torch.Tensor, cos_weight: float = 5.0) -> torch.Tensor:
    """Reference loss: global MSE + cos_weight · mean over tokens of (1 − cos), tokens [B, L, K²·C]."""
    mse = (predicted - target).pow(2).mean()
    cosine = 1.0 - F.cosine_similarity(predicted, target, dim=-1)
    return mse + cos_weight * cosine.mean()


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian on [B, H, W] with reflected borders (scipy's default truncate of 4σ)."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def distance_maps(target: torch.Tensor, predicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: mean squared channel difference, and 1 − cosine over channels. [B, S, S] each."""
    euclidean = (target - predicted).pow(2).mean(dim=1)
    cosine = 1.0 - F.cosine_similarity(target, predicted, dim=1)
    return euclidean, cosine


def anomaly_map(
    target: torch.Tensor, predicted: torch.Tensor, image_size: tuple[int, int], config: ScoringConfig
) -> torch.Tensor:
    """Dual-mode map (paper Eq. 8) at ``image_size`` (H, W) at every scale of ``config.scales``; several give their
    geometric mean.

    Scale k compares the features average-pooled over k×k positions. A large low-contrast defect whose
    every position still looks like normal texture (magnetic_tile's "uneven") stands out once its
    area is averaged; a small one is best seen at scale 1. The geometric mean needs no per-scale
    normalization: a constant factor on one scale's map scales every pixel alike.
    """
    maps = []
    for k in config.scales:
        t, p = (F.avg_pool2d(target, k), F.avg_pool2d(predicted, k)) if k > 1 else (target, predicted)
        maps.append(_single_scale_map(t, p, image_size, config))
    if len(maps) == 1:
        return maps[0]
    return torch.stack(maps).clamp_min(torch.finfo(maps[0].dtype).tiny).log().mean(dim=0).exp()


def _single_scale_map(
    target: torch.Tensor, predicted: torch.Tensor, image_size: tuple[int, int], config: ScoringConfig
) -> torch.Tensor:
    """Each distance upsampled to the image and smoothed, then multiplied (paper) or summed (reference script)."""
    euclidean, cosine = distance_maps(target, predicted)
    size = image_size

    def upsample_smooth(d: torch.Tensor) -> torch.Tensor:
        d = F.interpolate(d.unsqueeze(1), size, mode="bilinear", align_corners=True).squeeze(1)
        return gaussian_blur(d, config.sigma)

    euclidean, cosine = upsample_smooth(euclidean), upsample_smooth(cosine)
    if config.map == "product":
        return euclidean * cosine
    return 5.0 * cosine + euclidean  # "sum": the reference's MVTec test script


def image_score(maps: torch.Tensor, config: ScoringConfig) -> torch.Tensor:
    """std of the map (paper), its max (official LOCO evaluation), or the mean of its top-k pixels."""
    flat = maps.flatten(1)
    if config.image_score == "std":
        return flat.std(dim=1)
    if config.image_score == "max":
        return flat.amax(dim=1)
    k = min(max(1, config.top_k), flat.shape[1])
    return flat.topk(k, dim=1).values.mean(dim=1)
