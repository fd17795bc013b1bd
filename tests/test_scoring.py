"""Loss and anomaly maps against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from tfanet_core.config import ScoringConfig, load_config
from tfanet_core.metrics import pixel_auroc
from tfanet_core.scoring import (
    anomaly_map,
    distance_maps,
    gaussian_blur,
    image_score,
    reconstruction_loss,
    upsample_smooth,
)


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


def test_coarse_scale_finds_a_large_faint_defect_that_single_positions_hide() -> None:
    """A weak shift over a quarter of the image, under per-position reconstruction noise twice its size."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(8, 4, 16, 16, generator=generator)
    predicted = target + torch.randn(target.shape, generator=generator)
    predicted[4:, :, :8, :8] += 0.5  # images 4..7: a faint, large defect in the top-left quadrant
    masks = np.zeros((8, 64, 64), dtype=bool)
    masks[4:, :32, :32] = True

    def pix(scales: list[int]) -> float:
        return pixel_auroc(masks, anomaly_map(target, predicted, 64, ScoringConfig(sigma=1.0, scales=scales)).numpy())

    fine, coarse, both = pix([1]), pix([4]), pix([1, 4])
    assert fine < 0.7 < both < coarse  # the noise hides it position by position; 4×4 averages the noise away
    single = [anomaly_map(target, predicted, 64, ScoringConfig(sigma=1.0, scales=[k])) for k in (1, 4)]
    combined = anomaly_map(target, predicted, 64, ScoringConfig(sigma=1.0, scales=[1, 4]))
    assert torch.allclose(combined, (single[0] * single[1]).sqrt(), rtol=1e-4)  # their geometric mean


@pytest.mark.parametrize("scales", [[], [3], [1, 1], [0]])
def test_scales_must_be_distinct_divisors_of_the_feature_size(scales: list[int]) -> None:
    with pytest.raises(ValueError, match=r"scoring\.scales"):
        load_config("tiny", [f"scoring.scales={scales}"])  # tiny: feature_size 16


def test_upsampling_and_smoothing_as_one_operator_equal_interpolation_then_blur() -> None:
    """The map's upsample-and-smooth is two matrix products; they must be bilinear interpolation
    (align_corners) followed by scipy's Gaussian with mirrored borders, on a non-square map."""
    rng = np.random.default_rng(1)
    small = torch.from_numpy(rng.random((2, 6, 11)))
    up = torch.nn.functional.interpolate(small.unsqueeze(1), (40, 70), mode="bilinear", align_corners=True)
    ref = np.stack([gaussian_filter(a, 3.0, mode="mirror", truncate=4.0) for a in up.squeeze(1).numpy()])
    assert np.abs(upsample_smooth(small, (40, 70), 3.0).numpy() - ref).max() < 1e-12
    assert torch.allclose(upsample_smooth(small, (40, 70), 0.0), up.squeeze(1), atol=1e-12)
    with pytest.raises(ValueError, match="reaches 12 px"):
        upsample_smooth(small, (8, 70), 3.0)
