"""Threshold calibration: FPR control on held-out normals, F1 on labelled data, honest failure modes."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import optimize, stats
from scipy.stats import norm

from tfanet_core.metrics import f1_max
from tfanet_core.threshold import (
    CalibrationError,
    CalibrationWarning,
    Threshold,
    calibrate,
    calibrate_pixels,
    fpr_upper_bound,
    normal_quantile_threshold,
    normals_needed,
)


def test_normal_only_threshold_gives_the_target_fpr_on_held_out_normals() -> None:
    # One draw, as a user would have it. With 1000 calibration and 1000 held-out normals the held-out
    # FPR scatters with SD ≈ 0.01 around 0.05, so ±0.01 holds for most seeds, not all (seed 0 gives
    # 0.073): the statistically sharp check is the 50-draw mean in the next test.
    rng = np.random.default_rng(4)
    scores = rng.normal(size=2000)
    threshold = calibrate(scores[:1000], target_fpr=0.05)
    assert threshold.method == "normal_quantile" and threshold.n_normal == 1000
    assert threshold.calibration_fpr == pytest.approx(0.05)  # floor(1000 · 0.05) / 1000
    held_out_fpr = np.mean(threshold.is_anomalous(scores[1000:]))
    assert abs(held_out_fpr - 0.05) <= 0.01
    # The true FPR of the threshold under N(0, 1), and the threshold itself vs the 95th percentile.
    assert abs(norm.sf(threshold.value) - 0.05) <= 0.01
    assert threshold.value == pytest.approx(norm.ppf(0.95), abs=0.2)


def test_normal_only_threshold_is_unbiased_over_many_draws() -> None:
    # Mean held-out FPR over 50 independent calibrations: standard error ≈ 0.0014.
    fprs = []
    for seed in range(50):
        scores = np.random.default_rng(seed).gamma(2.0, size=2000)  # skewed, like anomaly scores
        threshold = calibrate(scores[:1000], target_fpr=0.05)
        fprs.append(np.mean(threshold.is_anomalous(scores[1000:])))
    assert abs(np.mean(fprs) - 0.05) < 0.005


def test_normal_only_threshold_is_never_the_minimum_score() -> None:
    scores = np.random.default_rng(1).normal(size=300)
    value = calibrate(scores, labels=np.zeros(300, int), target_fpr=0.01).value
    assert value > np.quantile(scores, 0.98)
    assert np.mean(scores > value) <= 0.01


def test_quantile_rule_is_the_documented_midpoint() -> None:
    # n = 10, α = 0.2: k = ceil(10 · 0.8) = 8 -> midpoint of the 8th and 9th smallest = 8.5.
    threshold = normal_quantile_threshold(np.arange(10.0, 0.0, -1.0), target_fpr=0.2)
    assert threshold.value == 8.5 and threshold.calibration_fpr == pytest.approx(0.2)
    # Ties: [1, 2, 2, 2, 3], α = 0.2 -> k = 4, x(4) = 2, next distinct 3 -> 2.5, one normal above.
    tied = normal_quantile_threshold([2.0, 1.0, 2.0, 3.0, 2.0], target_fpr=0.2)
    assert tied.value == 2.5 and tied.calibration_fpr == pytest.approx(0.2)
    # n · α = 950.0000000000001 must still give k = 950 (no float off-by-one).
    assert normal_quantile_threshold(np.arange(1000.0), target_fpr=0.05).value == 949.5


def test_too_few_normals_warns_and_says_what_to_do() -> None:
    scores = np.random.default_rng(2).normal(size=50)
    with pytest.warns(CalibrationWarning, match=r"only 50 normal images.*at least 100") as record:
        threshold = calibrate(scores, target_fpr=0.01)
    assert "Add normal validation images" in str(record[0].message)
    assert threshold.value == scores.max()  # no normal is rejected, and it says so
    assert threshold.warning is not None and "at least 100" in threshold.warning
    with pytest.raises(CalibrationError, match="at least 100"):
        calibrate(scores, target_fpr=0.01, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 1/α normals is enough: no warning
        assert calibrate(np.arange(100.0), target_fpr=0.01).warning is None


def test_f1_calibration_picks_the_separating_threshold() -> None:
    rng = np.random.default_rng(3)
    normal = rng.uniform(0.0, 1.0, 40)
    defect = rng.uniform(2.0, 3.0, 10)
    scores = np.concatenate([normal, defect])
    labels = np.concatenate([np.zeros(40, int), np.ones(10, int)])
    order = rng.permutation(50)
    threshold = calibrate(scores[order], labels[order])
    assert threshold.method == "f1" and threshold.f1 == 1.0
    assert threshold.value == pytest.approx(0.5 * (normal.max() + defect.min()))
    assert threshold.calibration_fpr == 0.0
    assert (threshold.n_normal, threshold.n_defect) == (40, 10)
    assert np.array_equal(threshold.is_anomalous(scores), labels.astype(bool))


def test_f1_calibration_reaches_f1_max_on_overlapping_classes() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + 1.2 * labels
    threshold = calibrate(scores, labels)
    predicted = threshold.is_anomalous(scores)
    f1 = 2 * np.sum(predicted & (labels == 1)) / (predicted.sum() + labels.sum())
    assert threshold.f1 == pytest.approx(f1_max(labels, scores)[0])
    assert f1 == pytest.approx(threshold.f1)


def test_forced_quantile_uses_only_the_normal_images() -> None:
    rng = np.random.default_rng(5)
    normal = rng.normal(size=500)
    scores = np.concatenate([normal, rng.normal(size=20) + 3])
    labels = np.concatenate([np.zeros(500, int), np.ones(20, int)])
    threshold = calibrate(scores, labels, target_fpr=0.02, method="normal_quantile")
    assert threshold.value == normal_quantile_threshold(normal, 0.02).value
    assert (threshold.n_normal, threshold.n_defect) == (500, 20)


def test_unusable_inputs_raise_clear_errors() -> None:
    with pytest.raises(CalibrationError, match="no good"):
        calibrate([0.3, 0.9], labels=[1, 1])
    with pytest.raises(CalibrationError, match="good and defective"):
        calibrate([0.3, 0.9], labels=[0, 0], method="f1")
    with pytest.raises(CalibrationError, match="no normal"):
        normal_quantile_threshold([], 0.01)
    with pytest.raises(ValueError, match="target_fpr"):
        calibrate([0.1] * 10, target_fpr=0.0)


def test_pixel_calibration_quantile_and_f1() -> None:
    rng = np.random.default_rng(6)
    normal_maps = rng.random((4, 32, 32)).astype(np.float32)
    threshold = calibrate_pixels(normal_maps, target_fpr=0.01)
    assert threshold.level == "pixel" and threshold.method == "normal_quantile"
    assert threshold.n_normal == 4 * 32 * 32
    assert threshold.calibration_fpr == pytest.approx(math.floor(4096 * 0.01) / 4096)

    masks = np.zeros((4, 32, 32), bool)
    masks[1, 8:16, 8:16] = True
    maps = normal_maps.copy()
    maps[masks] += 2.0  # separable pixels
    by_f1 = calibrate_pixels(maps, masks)
    assert by_f1.method == "f1" and by_f1.f1 == 1.0
    assert normal_maps.max() < by_f1.value < maps[masks].min()
    assert by_f1.n_defect == 64


def test_threshold_round_trips_through_json() -> None:
    threshold = calibrate(np.arange(1000.0), target_fpr=0.05)
    restored = Threshold.from_dict(json.loads(json.dumps(threshold.to_dict())))
    assert restored == threshold
    with pytest.raises(ValueError, match="unknown Threshold fields"):
        Threshold.from_dict({**threshold.to_dict(), "colour": "red"})
    assert Threshold(value=1.0, method="f1").is_anomalous(1.5) is True


def _exact_upper_bound(k: int, n: int, confidence: float) -> float:
    """The Clopper-Pearson upper bound by definition: the p where P(Binomial(n, p) <= k) = 1 - confidence."""
    return float(optimize.brentq(lambda p: stats.binom.cdf(k, n, p) - (1 - confidence), 1e-12, 1 - 1e-12))


@pytest.mark.parametrize(("n", "target"), [(20, 0.05), (100, 0.01), (250, 0.02), (12, 0.01)])
def test_image_threshold_states_its_exact_binomial_fpr_bound(n: int, target: float) -> None:
    scores = np.random.default_rng(n).normal(size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        t = calibrate(scores, target_fpr=target)
    k = int(np.count_nonzero(scores > t.value))
    assert t.calibration_fpr == k / n and t.confidence == 0.95
    assert t.fpr_upper_bound == pytest.approx(_exact_upper_bound(k, n, 0.95), rel=1e-9)
    assert t.fpr_upper_bound > t.calibration_fpr
    # normals_needed: the smallest n whose zero-false-alarm bound reaches the target
    needed = t.normals_needed
    assert needed is not None
    assert _exact_upper_bound(0, needed, 0.95) <= target < _exact_upper_bound(0, needed - 1, 0.95)
    assert Threshold.from_dict(t.to_dict()) == t


def test_fpr_bound_edge_cases_and_pixels_carry_none() -> None:
    assert fpr_upper_bound(0, 1) == pytest.approx(0.95)
    assert fpr_upper_bound(5, 5) == 1.0
    assert normals_needed(0.01) == 299  # the rule of three: about 3 / 0.01
    with pytest.raises(ValueError):
        fpr_upper_bound(3, 2)
    pixel = calibrate_pixels(np.random.default_rng(0).random((4, 8, 8)), target_fpr=0.05)
    assert pixel.fpr_upper_bound is None and pixel.normals_needed is None
