"""Metrics against sklearn, brute force, hand-derived values and a slow independent AUPRO."""

from __future__ import annotations

from collections import deque
from itertools import pairwise

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score

from tfanet_core.metrics import (
    Defect,
    au_spro,
    aupro,
    defect_from_config,
    defects_from_loco_channels,
    evaluate_scores,
    f1_max,
    image_auroc,
    loco_saturation_area,
    pixel_auroc,
    pixel_f1_max,
    pro_curve,
    spro_curve,
)

# --------------------------------------------------------------------------------------------------
# helpers


def _blob_masks(rng: np.random.Generator, n: int, size: int, n_defective: int) -> np.ndarray:
    """Masks with a few rectangles and diagonal strokes per defective image (tests connectivity too)."""
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n_defective):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, y : y + h, x : x + w] = True
        y, x = rng.integers(0, size - 5, 2)
        for d in range(4):  # an 8-connected diagonal line
            masks[i, y + d, x + d] = True
    return masks


def _maps_for(rng: np.random.Generator, masks: np.ndarray, signal: float = 1.0) -> np.ndarray:
    return rng.normal(size=masks.shape) + signal * masks


def _label_8(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Breadth-first 8-connected labelling, written out so the reference does not share scipy."""
    labels = np.zeros(mask.shape, dtype=int)
    n = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        n += 1
        labels[start] = n
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    inside = 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1]
                    if inside and mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        queue.append((yy, xx))
    return labels, n


def _slow_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3, thresholds=None) -> float:
    """Deliberately plain AUPRO: loop over thresholds, loop over regions, trapezoid, cut at the limit."""
    regions, region_images = [], []
    for i, mask in enumerate(masks):
        labels, n = _label_8(mask)
        regions.extend(labels == k for k in range(1, n + 1))
        region_images.extend([i] * n)
    ok = ~masks
    if thresholds is None:
        thresholds = np.unique(maps)[::-1]
    points = [(0.0, 0.0)]
    for t in thresholds:
        predicted = maps >= t
        fpr = np.sum(predicted & ok) / np.sum(ok)
        overlaps = [
            np.sum(predicted[i] & region) / np.sum(region) for i, region in zip(region_images, regions, strict=True)
        ]
        points.append((fpr, float(np.mean(overlaps))))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in pairwise(points):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_limit) * (limit - x0)
            break
    return area / limit


# --------------------------------------------------------------------------------------------------
# image level


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # rounded: plenty of ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="good and defective"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])


def _brute_force_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & (labels == 1))
        fp = np.sum(predicted & (labels == 0))
        fn = np.sum(~predicted & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_equals_brute_force_and_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 150)
    scores = np.round(rng.normal(size=150) + 0.8 * labels, 1)
    best, threshold = f1_max(labels, scores)
    assert best == pytest.approx(_brute_force_f1(labels, scores), abs=1e-12)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        sk_f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    assert best == pytest.approx(sk_f1.max(), abs=1e-12)
    predicted = scores >= threshold  # the returned threshold reaches the best F1
    tp = np.sum(predicted & (labels == 1))
    assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(best, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# pixel AUROC


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_auroc_equals_sklearn(dtype: type) -> None:
    rng = np.random.default_rng(1)
    masks = _blob_masks(rng, 8, 32, 5)
    maps = _maps_for(rng, masks, 0.7).astype(dtype)
    maps[0, :4] = np.round(maps[0, :4], 1)  # some ties
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_metrics_accept_images_of_different_sizes() -> None:
    rng = np.random.default_rng(2)
    maps = [rng.normal(size=(20, 30)), rng.normal(size=(16, 16))]
    masks = [np.zeros((20, 30), bool), np.zeros((16, 16), bool)]
    masks[1][4:9, 4:9] = True
    maps[1][masks[1]] += 1.5
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-12)
    best, _ = pixel_f1_max(masks, maps)
    assert best == pytest.approx(_brute_force_f1(flat_masks.astype(int), flat_maps), abs=1e-12)


def test_nan_maps_are_rejected() -> None:
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = np.nan
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 1, 1] = True
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(masks, maps)


# --------------------------------------------------------------------------------------------------
# AUPRO: closed-form cases


def test_aupro_perfect_map_is_one() -> None:
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng, 6, 32, 4)
    assert aupro(masks, masks.astype(float) + 0.01 * rng.random(masks.shape)) == pytest.approx(1.0)
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)  # ties


def test_aupro_inverted_map_is_zero() -> None:
    rng = np.random.default_rng(4)
    masks = _blob_masks(rng, 6, 32, 4)
    assert aupro(masks, -masks.astype(float) - 0.01 * rng.random(masks.shape)) == pytest.approx(0.0)


def test_aupro_half_when_one_of_two_regions_is_found() -> None:
    # Region A scores above every normal pixel, region B below every normal pixel:
    # PRO = 0.5 from FPR 0 until FPR 1, so the normalized area is 0.5 at any limit.
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 2:5, 2:5] = True  # region A
    masks[1, 8:12, 8:10] = True  # region B
    rng = np.random.default_rng(5)
    maps = rng.random(masks.shape)  # normal pixels in [0, 1)
    maps[0][masks[0]] = 5.0
    maps[1][masks[1]] = -5.0
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(0.5, abs=1e-12)


def test_aupro_region_found_after_a_fifth_of_the_normals() -> None:
    # 100 normal pixels with distinct scores 1..100; one region scored 80.5 is found after exactly
    # 20 false positives (FPR 0.2): PRO = 0 on [0, 0.2), 1 on [0.2, 0.3] -> 0.1 / 0.3 = 1/3.
    maps = [np.arange(1.0, 101.0).reshape(10, 10), np.full((4, 4), 80.5)]
    masks = [np.zeros((10, 10), bool), np.ones((4, 4), bool)]
    assert aupro(masks, maps) == pytest.approx(1 / 3, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=0.25) == pytest.approx(0.05 / 0.25, abs=1e-12)


def test_aupro_interpolates_at_the_limit() -> None:
    # 10 normals score high, 20 normals tie with the whole region, 70 score low. The curve goes
    # (0.1, 0) -> (0.3, 1) in one step, so at limit 0.2 the interpolated PRO is 0.5:
    # area = ½ · 0.1 · 0.5 = 0.025 -> 0.125; at limit 0.3: ½ · 0.2 · 1 = 0.1 -> 1/3.
    normal = np.concatenate([np.arange(91.0, 101.0), np.full(20, 80.0), np.arange(1.0, 71.0)])
    maps = [normal.reshape(10, 10), np.full((4, 4), 80.0)]
    masks = [np.zeros((10, 10), bool), np.ones((4, 4), bool)]
    assert aupro(masks, maps, fpr_limit=0.2) == pytest.approx(0.125, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(1 / 3, abs=1e-12)


def test_aupro_regions_are_8_connected() -> None:
    # Diagonal pixels (2,2) and (3,3) form ONE region (8-connectivity, as the official MVTec code);
    # only (2,2) is found, and a second region is fully found: PRO = mean(0.5, 1) = 0.75.
    # With 4-connectivity it would be mean(1, 0, 1) = 2/3.
    mask = np.zeros((1, 12, 12), bool)
    mask[0, 2, 2] = mask[0, 3, 3] = True
    mask[0, 8, 8:10] = True
    maps = np.zeros((1, 12, 12))
    maps[0, 2, 2] = maps[0, 8, 8] = maps[0, 8, 9] = 10.0
    maps[0, 3, 3] = -10.0
    assert aupro(mask, maps) == pytest.approx(0.75, abs=1e-12)


def test_pro_curve_starts_at_origin_and_ends_at_one() -> None:
    rng = np.random.default_rng(6)
    masks = _blob_masks(rng, 4, 24, 3)
    fpr, pro, thresholds = pro_curve(masks, _maps_for(rng, masks))
    assert (fpr[0], pro[0], thresholds[0]) == (0.0, 0.0, np.inf)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)


def test_aupro_is_invariant_to_monotone_transforms() -> None:
    rng = np.random.default_rng(7)
    masks = _blob_masks(rng, 6, 32, 4)
    maps = _maps_for(rng, masks, 1.5)
    value = aupro(masks, maps)
    assert 0.2 < value < 0.99
    assert aupro(masks, 3.0 * maps + 7.0) == pytest.approx(value, abs=1e-12)
    assert aupro(masks, np.exp(maps)) == pytest.approx(value, abs=1e-12)
    assert aupro(masks, np.arctan(maps)) == pytest.approx(value, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# AUPRO against the slow reference


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    masks = _blob_masks(rng, 5, 24, 3)
    maps = _maps_for(rng, masks, 1.2)
    if seed % 2:
        maps = np.round(maps, 1)  # heavy ties
    for limit in (0.3, 0.05):
        assert aupro(masks, maps, limit) == pytest.approx(_slow_aupro(masks, maps, limit), abs=1e-9)


def test_aupro_matches_slow_reference_on_a_threshold_grid() -> None:
    # A 3000-step grid (what grid-based evaluators do) agrees with the exact value to 1e-3.
    rng = np.random.default_rng(200)
    masks = _blob_masks(rng, 5, 24, 3)
    maps = _maps_for(rng, masks, 1.2)
    grid = np.linspace(maps.max(), maps.min(), 3000)
    assert aupro(masks, maps) == pytest.approx(_slow_aupro(masks, maps, 0.3, grid), abs=1e-3)


# --------------------------------------------------------------------------------------------------
# AU-sPRO


def _loco_case(rng: np.random.Generator) -> tuple[np.ndarray, list[list[Defect]]]:
    masks = _blob_masks(rng, 6, 24, 4)
    defects = [[Defect(mask=m, saturation_area=float(m.sum()))] if m.any() else [] for m in masks]
    return masks, defects


def test_au_spro_perfect_and_inverted() -> None:
    rng = np.random.default_rng(8)
    masks, defects = _loco_case(rng)
    perfect = au_spro(masks + 0.01 * rng.random(masks.shape), defects)
    assert set(perfect) == {0.01, 0.05, 0.1, 0.3, 1.0}
    assert all(v == pytest.approx(1.0) for v in perfect.values())
    inverted = au_spro(-masks.astype(float) - 0.01 * rng.random(masks.shape), defects, fpr_limits=(0.05, 0.3, 1.0))
    assert inverted[0.05] == pytest.approx(0.0) and inverted[0.3] == pytest.approx(0.0)
    assert inverted[1.0] == pytest.approx(0.0)


def test_spro_saturates_at_half_the_saturation_area() -> None:
    # A 100-pixel defect saturating at 40 pixels; its 20 top-scored pixels are found first (all above
    # every normal pixel), the other 80 below every normal pixel: sPRO = 20/40 = 0.5 on the way.
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    maps = np.random.default_rng(9).random((20, 20))
    flat = np.flatnonzero(mask.ravel())
    maps.ravel()[flat[:20]] = 10.0
    maps.ravel()[flat[20:]] = -10.0
    defects = [[Defect(mask=mask, saturation_area=40.0)]]
    fpr, spro, _ = spro_curve([maps], defects)
    assert spro[1] == pytest.approx(0.5) and fpr[1] == 0.0
    assert np.allclose(spro[(fpr > 0) & (fpr < 1)], 0.5)
    assert au_spro([maps], defects, fpr_limits=(0.3, 1.0)) == pytest.approx({0.3: 0.5, 1.0: 0.5})
    # More than the saturation area does not help: 40 pixels found is already 1.0.
    maps.ravel()[flat[:40]] = 10.0
    assert au_spro([maps], defects, fpr_limits=(0.3,))[0.3] == pytest.approx(1.0)


def test_spro_defect_is_a_channel_not_a_connected_component() -> None:
    # One channel with two blobs (10 px found, 30 px not): sPRO = 10/40 = 0.25 (PRO would say 0.5).
    mask = np.zeros((16, 16), bool)
    mask[1:3, 1:6] = True  # 10 px
    mask[8:14, 8:13] = True  # 30 px
    maps = np.zeros((16, 16))
    maps[1:3, 1:6] = 5.0
    maps[8:14, 8:13] = -5.0
    result = au_spro([maps], [[Defect(mask=mask, saturation_area=40.0)]], fpr_limits=(0.3,))
    assert result[0.3] == pytest.approx(0.25)


def test_spro_fpr_counts_background_of_defective_images() -> None:
    # Official LOCO (get_fp_tn_areas_per_image): FP pixels are defect-free pixels of *all* images.
    # Good image: 100 px at 0. Defective image: 90 background px at 1.0, 10 defect px at 0.5.
    # The background is flagged before the defect: the curve is 0 until FPR 90/190, then 1.
    good = np.zeros((10, 10))
    bad = np.ones((10, 10))
    mask = np.zeros((10, 10), bool)
    mask[0, :] = True
    bad[mask] = 0.5
    defects = [[], [Defect(mask=mask, saturation_area=10.0)]]
    result = au_spro([good, bad], defects, fpr_limits=(0.3, 1.0))
    assert result[0.3] == pytest.approx(0.0)
    assert result[1.0] == pytest.approx(100 / 190)


def test_spro_overlapping_channels_are_not_false_positives() -> None:
    a = np.zeros((8, 8), bool)
    a[1:4, 1:4] = True
    b = np.zeros((8, 8), bool)
    b[2:6, 2:6] = True
    maps = (a | b).astype(float)
    defects = [[Defect(a, float(a.sum())), Defect(b, float(b.sum()))]]
    assert au_spro([maps], defects, fpr_limits=(0.1,))[0.1] == pytest.approx(1.0)


def test_loco_saturation_area_follows_the_official_rule() -> None:
    assert loco_saturation_area(7, 0.3, relative_saturation=True) == 2.0  # int(2.1)
    assert loco_saturation_area(1000, 0.5, relative_saturation=True) == 500.0
    assert loco_saturation_area(1000, 250, relative_saturation=False) == 250.0
    assert loco_saturation_area(100, 250, relative_saturation=False) == 100.0  # capped at the area
    assert loco_saturation_area(2, 0.3, relative_saturation=True) == 1.0  # official: 0 -> 0/0


def test_defects_from_loco_channels_reads_pixel_values() -> None:
    config = [
        {
            "defect_name": "missing",
            "pixel_value": 255,
            "saturation_threshold": 50,
            "relative_saturation": False,
        },
        {"defect_name": "extra", "pixel_value": 7, "saturation_threshold": 0.5, "relative_saturation": True},
    ]
    first = np.zeros((10, 10), np.uint8)
    first[:2] = 255  # 20 px
    second = np.zeros((10, 10), np.uint8)
    second[5:] = 7  # 50 px
    defects = defects_from_loco_channels([first, second], config)
    assert [d.name for d in defects] == ["missing", "extra"]
    assert [d.saturation_area for d in defects] == [20.0, 25.0]
    assert defects[0].mask.dtype == bool and defects[0].mask.sum() == 20
    assert defect_from_config(second > 0, config[1]).saturation_area == 25.0
    with pytest.raises(ValueError, match="not in defects_config"):
        defects_from_loco_channels([np.full((4, 4), 9, np.uint8)], config)
    mixed = first.copy()
    mixed[9] = 7
    with pytest.raises(ValueError, match="exactly one"):
        defects_from_loco_channels([mixed], config)


# --------------------------------------------------------------------------------------------------
# evaluate_scores


def test_evaluate_scores_matches_the_single_metrics() -> None:
    rng = np.random.default_rng(10)
    masks = _blob_masks(rng, 8, 24, 5)
    maps = _maps_for(rng, masks, 1.0).astype(np.float32)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    result = evaluate_scores(labels, scores, masks, maps)
    assert result["image_auroc"] == pytest.approx(image_auroc(labels, scores))
    assert result["f1_max"] == pytest.approx(f1_max(labels, scores)[0])
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert result["pixel_f1_max"] == pytest.approx(pixel_f1_max(masks, maps)[0])
    assert result["aupro"] == pytest.approx(aupro(masks, maps))
    without_masks = evaluate_scores(labels, scores)
    assert without_masks["pixel_auroc"] is None and without_masks["aupro"] is None
    assert evaluate_scores([0, 0], [0.1, 0.2])["image_auroc"] is None
