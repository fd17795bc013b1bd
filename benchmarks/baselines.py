"""Reference detectors for the accuracy harness (benchmarks/accuracy.py), on the same backbone features as TFA-Net.

- ``knn_scores``: a PatchCore-style nearest-neighbour detector. Memory bank = every training
  position's feature vector (3×3 locally averaged, as PatchCore does), cut to a greedy k-center
  coreset; a test position's score is its distance to the nearest bank vector; image score = the
  largest position score. The strong *non-learned* peer.
- ``mean_reconstruction``: the network-free floor. The "reconstruction" of every image is the
  per-position mean of the standardized training features, scored with TFA-Net's own anomaly map
  and image score. A trained TFA-Net that does not beat this has learned nothing useful.

Both take features [N, C, S, S] (float32) and return (image scores [N], maps [N, H, W]) on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tfanet_core.config import ScoringConfig
from tfanet_core.scoring import anomaly_map, gaussian_blur, image_score
from tfanet_core.training import feature_statistics


def _positions(features: torch.Tensor) -> torch.Tensor:
    """[N, C, S, S] → [N·S·S, C] after PatchCore's 3×3 local averaging (neighbourhood-aware patches)."""
    pooled = F.avg_pool2d(features, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return pooled.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def greedy_coreset(bank: torch.Tensor, fraction: float, seed: int = 0, projection_dim: int = 64) -> torch.Tensor:
    """Indices of a k-center greedy coreset (PatchCore): each step adds the vector farthest from those chosen.

    Distances are taken in a random projection (Johnson-Lindenstrauss, as PatchCore does; 64 dims
    here, PatchCore uses 128) so that a bank of 2·10⁵ vectors takes about a minute on one core.
    """
    n = len(bank)
    k = max(1, round(n * fraction))
    if k >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    if bank.shape[1] > projection_dim:
        projection = torch.randn(bank.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        x = bank @ projection
    else:
        x = bank
    norms = x.pow(2).sum(1)
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    nearest = norms - 2 * x @ x[chosen[0]] + norms[chosen[0]]
    for i in range(1, k):
        chosen[i] = int(nearest.argmax())
        nearest = torch.minimum(nearest, norms - 2 * x @ x[chosen[i]] + norms[chosen[i]])
    return chosen


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance [Q] of every query to its nearest bank vector, in chunks (memory stays bounded)."""
    bank_norms = bank.pow(2).sum(1)
    out = []
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        d2 = q.pow(2).sum(1, keepdim=True) - 2 * q @ bank.T + bank_norms
        out.append(d2.amin(dim=1).clamp_min(0).sqrt())
    return torch.cat(out)


def knn_scores(
    train: torch.Tensor,
    test: torch.Tensor,
    image_size: tuple[int, int],
    coreset: float = 0.1,
    sigma: float = 4.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """PatchCore-style scores of ``test`` against a coreset of ``train``; plus the bank sizes for the record."""
    bank = _positions(train)
    index = greedy_coreset(bank, coreset, seed)
    memory = bank[index]
    n, _, h, w = test.shape
    distances = nearest_distances(_positions(test), memory).view(n, 1, h, w)
    maps = F.interpolate(distances, image_size, mode="bilinear", align_corners=True).squeeze(1)
    maps = gaussian_blur(maps, sigma)
    return maps.flatten(1).amax(dim=1), maps, {"bank": len(bank), "coreset": len(memory)}


def mean_reconstruction(
    train: torch.Tensor, test: torch.Tensor, image_size: tuple[int, int], scoring: ScoringConfig, batch: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position mean of the standardized training features as every image's reconstruction, scored like TFA-Net."""
    mean, std = feature_statistics(train)  # and the clamp of TemplateAggregator.set_feature_stats
    mean_c, std_c = mean.view(1, -1, 1, 1), std.clamp_min(1e-6).view(1, -1, 1, 1)
    template = ((train - mean_c) / std_c).mean(dim=0, keepdim=True)
    scores, maps = [], []
    for start in range(0, len(test), batch):
        target = (test[start : start + batch] - mean_c) / std_c
        m = anomaly_map(target, template.expand_as(target), image_size, scoring)
        scores.append(image_score(m, scoring))
        maps.append(m)
    return torch.cat(scores), torch.cat(maps)
