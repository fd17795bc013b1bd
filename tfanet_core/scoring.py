"""The training loss, anomaly maps and image scores (docs/architecture.md §Model).

Two different cosines live here on purpose: the loss compares each *token* over its whole
K²·C vector; the anomaly map compares each *pixel* over its C channels.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from tfanet_core.config import ScoringConfig, as_hw


def reconstruction_loss(predicted: torch.Tensor, target: torch.Tensor, cos_weight: float = 5.0) -> torch.Tensor:
    """Reference loss: global MSE + cos_weight · mean over tokens of (1 − cos), tokens [B, L, K²·C]."""
    mse = (predicted - target).pow(2).mean()
    cosine = 1.0 - F.cosine_similarity(predicted, target, dim=-1)
    return mse + cos_weight * cosine.mean()


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian on [..., H, W] with reflected borders (scipy's default truncate of 4σ)."""
    if sigma <= 0:
        return maps
    return upsample_smooth(maps, (maps.shape[-2], maps.shape[-1]), sigma)


def distance_maps(target: torch.Tensor, predicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: mean squared channel difference, and 1 − cosine over channels. [B, S, S] each."""
    euclidean = (target - predicted).pow(2).mean(dim=1)
    cosine = 1.0 - F.cosine_similarity(target, predicted, dim=1)
    return euclidean, cosine


def anomaly_map(
    target: torch.Tensor, predicted: torch.Tensor, image_size: int | tuple[int, int], config: ScoringConfig
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
        maps.append(_single_scale_map(t, p, as_hw(image_size), config))
    if len(maps) == 1:
        return maps[0]
    return torch.stack(maps).clamp_min(torch.finfo(maps[0].dtype).tiny).log().mean(dim=0).exp()


@lru_cache(maxsize=64)
def upsample_smooth_operator(n_in: int, n_out: int, sigma: float) -> np.ndarray:
    """[n_out, n_in] float64: bilinear upsampling (align_corners=True), then a Gaussian with reflected borders
    (torch's "reflect", scipy's "mirror": the edge sample is not repeated), along one axis.

    Both steps are linear and act on rows and columns separately, so upsampling a map [h, w] to [H, W] and
    smoothing it is ``rows @ map @ cols.T`` with ``rows = operator(h, H)``, ``cols = operator(w, W)``: two
    small matrix products, where interpolation plus two 33-tap single-channel convolutions ran at a few
    GFLOP/s and took a seventh of an exported ``cpu`` batch. numpy, not torch: a constant that an export
    folds in, never a tensor created (and cached) while a graph is being traced.
    """
    position = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    low = np.minimum(np.floor(position).astype(int), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    upsample = np.zeros((n_out, n_in))
    np.add.at(upsample, (np.arange(n_out), low), 1.0 - (position - low))
    np.add.at(upsample, (np.arange(n_out), high), position - low)
    if sigma <= 0:
        return upsample
    kernel = gaussian_kernel1d(sigma)
    radius = len(kernel) // 2
    if radius >= n_out:
        raise ValueError(f"a Gaussian of sigma {sigma} reaches {radius} px, more than the map's {n_out} px")
    source = np.arange(n_out)[:, None] + np.arange(-radius, radius + 1)[None, :]  # [n_out, taps]
    source = np.abs(source)  # reflect at the first sample ...
    source = np.where(source > n_out - 1, 2 * (n_out - 1) - source, source)  # ... and at the last
    smooth = np.zeros((n_out, n_out))
    np.add.at(smooth, (np.repeat(np.arange(n_out), len(kernel)), source.ravel()), np.tile(kernel, n_out))
    return smooth @ upsample


def upsample_smooth(maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Maps [..., h, w] upsampled (bilinear, align_corners=True) to ``size`` and Gaussian-smoothed (reflected
    borders): :func:`upsample_smooth_operator` on each axis."""
    rows = torch.from_numpy(upsample_smooth_operator(maps.shape[-2], size[0], sigma)).to(maps)
    cols = torch.from_numpy(upsample_smooth_operator(maps.shape[-1], size[1], sigma)).to(maps)
    return rows @ maps @ cols.T


def _single_scale_map(
    target: torch.Tensor, predicted: torch.Tensor, image_size: tuple[int, int], config: ScoringConfig
) -> torch.Tensor:
    """Each distance upsampled to the image and smoothed, then multiplied (paper) or summed (reference script)."""
    euclidean, cosine = upsample_smooth(
        torch.stack(distance_maps(target, predicted), dim=1), image_size, config.sigma
    ).unbind(1)
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
