"""Loss and anomaly maps against hand computations."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from tfanet_core.config import ScoringConfig
from tfanet_core.scoring import anomaly_map, distance_maps, gaussian_blur, image_score, reconstruction_loss


def test_loss_equals_hand_computation() -> None:
    # two tokens of dimension 2 (one image)
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    target = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    # MSE: squared errors 0,0,4,4 -> mean 2.0; cosines: token0 = 1, token1 = 0 -> mean(1-cos) = 0.5
    assert math.isclose(reconstruction_loss(pred, target, cos_weight=5.0).item(), 2.0 + 5.0 * 0.5)
    assert math.isclose(reconstruction_loss(pred, target, cos_weight=0.0).item(), 2.0)


def test_distance_maps_use_per_pixel_channels() -> None:
    target = torch.zeros(1, 2, 1, 2)
    target[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    target[0, :, 0, 1] = torch.tensor([1.0, 1.0])
    predicted = torch.zeros(1, 2, 1, 2)
    predicted[0, :, 0, 0] = torch.tensor([0.0, 1.0])  # orthogonal: cos 0, squared error (1+1)/2
    predicted[0, :, 0, 1] = torch.tensor([2.0, 2.0])  # parallel: cos 1, squared error (1+1)/2
    euclidean, cosine = distance_maps(target, predicted)
    assert torch.allclose(euclidean, torch.tensor([[[1.0, 1.0]]]))
    assert torch.allclose(cosine, torch.tensor([[[1.0, 0.0]]]), atol=1e-6)


def test_gaussian_blur_matches_scipy_reflect() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((2, 40, 40)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(x), 2.0).numpy()
    # torch's "reflect" excludes the edge pixel: scipy calls that "mirror"
    ref = np.stack([gaussian_filter(a, 2.0, mode="mirror", truncate=4.0) for a in x])
    assert np.abs(ours - ref).max() < 1e-5


def test_product_and_sum_maps_and_image_scores() -> None:
    torch.manual_seed(0)
    target = torch.randn(2, 4, 8, 8)
    predicted = target.clone()
    predicted[1, :, 2:4, 2:4] += 3.0
    product = anomaly_map(target, predicted, 32, ScoringConfig(map="product", sigma=1.0))
    summed = anomaly_map(target, predicted, 32, ScoringConfig(map="sum", sigma=1.0))
    assert product.shape == summed.shape == (2, 32, 32)
    assert product[0].abs().max() < 1e-6  # perfect reconstruction -> zero map
    assert product[1].max() > 0 and summed[1].max() > 0
    peak = divmod(int(product[1].argmax()), 32)
    assert 6 <= peak[0] <= 17 and 6 <= peak[1] <= 17  # inside the upsampled 2:4 region (8..16 px)
    maps = torch.zeros(1, 10, 10)
    maps[0, 0, :5] = torch.arange(1.0, 6.0)
    assert image_score(maps, ScoringConfig(image_score="max")).item() == 5.0
    assert image_score(maps, ScoringConfig(image_score="topk", top_k=2)).item() == 4.5
    assert math.isclose(image_score(maps, ScoringConfig(image_score="std")).item(), maps.flatten().std().item())
