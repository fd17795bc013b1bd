"""Evaluation metrics: image/pixel AUROC, AUPRO (MVTec AD), AU-sPRO (MVTec LOCO AD) and F1-max.

Every pixel-level metric here is *exact*: all anomaly scores are sorted once and every distinct
score is a threshold (like the official MVTec AD ``compute_pro``), instead of a fixed threshold grid
whose resolution silently changes the numbers. Ties are handled by grouping equal scores: a curve has
one point per distinct score, taken after *all* pixels with that score turned positive.

Conventions shared by all functions:

- a pixel/image is predicted anomalous at threshold ``t`` when ``score >= t``;
- ``maps`` is a float array ``[N, H, W]`` or a sequence of 2-D arrays (sizes may differ per image);
- ``masks`` is the matching boolean ground truth (``True`` = defect pixel), all ``False`` for good images;
- scores must be finite: NaN would sort arbitrarily and corrupt every curve, so it is rejected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = [
    "LOCO_MAX_FPRS",
    "Defect",
    "au_spro",
    "aupro",
    "defect_from_config",
    "defects_from_loco_channels",
    "evaluate_scores",
    "f1_max",
    "image_auroc",
    "loco_saturation_area",
    "pixel_auroc",
    "pixel_f1_max",
    "pro_curve",
    "spro_curve",
]

# Connected components of a ground-truth mask are the PRO "regions". The official MVTec AD
# evaluation (generic_util.compute_pro) labels them with scipy.ndimage.label and
# structure = np.ones((3, 3)), i.e. 8-connectivity; anomalib's AUPRO uses cv2.connectedComponents,
# whose default connectivity is also 8. Diagonal neighbours therefore belong to the same region.
EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)

# Integration limits of the official MVTec LOCO AD evaluation (evaluate_experiment.py, MAX_FPRS).
LOCO_MAX_FPRS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 1.0)


# --------------------------------------------------------------------------------------------------
# input handling and the shared sort


def _flat_scores(maps: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """All scores as one 1-D array (a view when possible) plus each image's shape."""
    if isinstance(maps, np.ndarray) and maps.ndim == 3:
        shapes = [tuple(maps.shape[1:])] * maps.shape[0]
        flat = maps.reshape(-1)
    else:
        arrays = [np.asarray(m) for m in maps]
        if any(a.ndim != 2 for a in arrays):
            raise ValueError("maps must be an [N, H, W] array or a sequence of 2-D arrays")
        shapes = [tuple(a.shape) for a in arrays]
        flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    if not np.issubdtype(flat.dtype, np.floating):
        flat = flat.astype(np.float64)
    if flat.size == 0:
        raise ValueError("no scores given")
    if not np.isfinite(flat).all():
        raise ValueError("anomaly maps contain NaN or inf; fix the scorer (or clip) before evaluating")
    return flat, shapes


def _flat_masks(masks: np.ndarray | Sequence[np.ndarray], shapes: list[tuple[int, ...]]) -> np.ndarray:
    """Ground-truth masks as one flat bool array aligned with ``_flat_scores``."""
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        if len(shapes) != masks.shape[0] or any(s != masks.shape[1:] for s in shapes):
            raise ValueError(f"masks shape {masks.shape} does not match the maps")
        return masks.reshape(-1).astype(bool, copy=False)
    arrays = [np.asarray(m) for m in masks]
    if [a.shape for a in arrays] != shapes:
        raise ValueError("masks and maps differ in number or in per-image shape")
    return np.concatenate([a.reshape(-1) for a in arrays]).astype(bool, copy=False)


def _stable_sort(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``argsort`` of finite scores and a sorted array whose equal entries mark equal scores.

    float32 scores (what the model produces; float64 that round-trips through float32 too) are mapped
    to order-preserving uint32 keys and packed with their index into one uint64 that numpy sorts with
    its SIMD sort: ~3x faster than ``np.argsort`` on 10 M pixels, and stable. Other input falls back
    to ``np.argsort``.
    """
    as32 = scores.astype(np.float32)
    if scores.size < 2**32 and (scores.dtype == np.float32 or np.array_equal(as32, scores)):
        as32 += np.float32(0.0)  # -0.0 -> +0.0 so that equal values get equal keys
        bits = as32.view(np.uint32)
        # IEEE-754 order as unsigned integers: flip all bits of negatives, set the sign bit of positives.
        keys = np.where(bits >> np.uint32(31) == 1, ~bits, bits | np.uint32(0x80000000))
        packed = (keys.astype(np.uint64) << np.uint64(32)) | np.arange(scores.size, dtype=np.uint64)
        del keys, bits, as32
        packed.sort()
        order = (packed & np.uint64(0xFFFFFFFF)).astype(np.intp)
        packed >>= np.uint64(32)
        return order, packed
    order = np.argsort(scores, kind="stable")
    return order, scores[order]


@dataclass(frozen=True)
class _TieGroups:
    """Every score mapped to the index of its distinct value (ascending).

    One ``argsort`` serves every metric: counts per distinct score (``bincount`` on ``gid``) give
    exact ROC/PRO/PR curves, and ``evaluate_scores`` reuses the same sort for all pixel metrics.
    """

    gid: np.ndarray  # [P] int, group index of each score
    values: np.ndarray  # [G] distinct scores, ascending

    @classmethod
    def of(cls, scores: np.ndarray) -> _TieGroups:
        if scores.size == 0:
            raise ValueError("no scores given")
        order, sorted_keys = _stable_sort(scores)
        starts = np.empty(sorted_keys.size, dtype=bool)
        starts[0] = True
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
        gid_dtype = np.int32 if scores.size < 2**31 else np.int64
        gid = np.empty(scores.size, dtype=gid_dtype)
        gid[order] = np.cumsum(starts, dtype=gid_dtype) - 1
        return cls(gid=gid, values=scores[order[starts]])

    @property
    def n_groups(self) -> int:
        return int(self.values.size)

    def count(self, index: np.ndarray | None = None) -> np.ndarray:
        """Number of selected pixels (flat indices or bool mask) per distinct score, ascending."""
        gid = self.gid if index is None else self.gid[index]
        return np.bincount(gid, minlength=self.n_groups)

    def total(self, index: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Sum of ``weights`` of the selected pixels per distinct score, ascending."""
        return np.bincount(self.gid[index], weights=weights, minlength=self.n_groups)


def _auroc_from_groups(groups: _TieGroups, positive: np.ndarray) -> float:
    """Exact AUROC = P(score_pos > score_neg) + ½ P(tie), i.e. the Mann-Whitney U statistic.

    Integer arithmetic until the final division, so it equals sklearn's trapezoidal ROC AUC to
    floating-point precision without sklearn's float64 copies of every pixel.
    """
    pos = groups.count(positive).astype(np.int64)
    neg = groups.count().astype(np.int64) - pos
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative samples")
    pos_above = n_pos - np.cumsum(pos)  # positives with a strictly higher score than each group
    twice_u = 2 * int(np.dot(neg, pos_above)) + int(np.dot(neg, pos))
    return twice_u / (2 * n_pos * n_neg)


def _area_up_to(fpr: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under ``y(fpr)`` on [0, limit], divided by ``limit`` (a perfect curve gives 1).

    Same rule as the official MVTec ``trapezoid(x, y, x_max)``: points with ``fpr <= limit`` are
    integrated and the segment crossing ``limit`` is cut there with a linearly interpolated y.
    ``fpr`` must be non-decreasing and start at 0.
    """
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"FPR limit must be in (0, 1], got {limit}")
    inside = int(np.searchsorted(fpr, limit, side="right"))
    x, v = fpr[:inside], y[:inside]
    area = float(np.sum(0.5 * (v[1:] + v[:-1]) * np.diff(x)))
    if inside < fpr.size and x[-1] < limit:
        x0, y0, x1, y1 = fpr[inside - 1], y[inside - 1], fpr[inside], y[inside]
        y_at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at_limit) * (limit - x0)
    return area / limit


def _descending_curve(
    groups: _TieGroups, fp_per_group: np.ndarray, y_per_group: np.ndarray, n_ok: int, y_total: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn per-distinct-score increments into (fpr, y, thresholds), thresholds descending.

    The curve starts at (0, 0) with threshold +inf (nothing positive); its last point has every pixel
    positive, so it ends at (1, 1). Values are clipped at 1 against cumulative rounding.
    """
    fpr = np.concatenate(([0.0], np.cumsum(fp_per_group[::-1], dtype=np.float64) / n_ok))
    y = np.concatenate(([0.0], np.cumsum(y_per_group[::-1], dtype=np.float64) / y_total))
    np.clip(fpr, None, 1.0, out=fpr)
    np.clip(y, None, 1.0, out=y)
    thresholds = np.concatenate(([np.inf], groups.values[::-1].astype(np.float64)))
    return fpr, y, thresholds


# --------------------------------------------------------------------------------------------------
# image level


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    labels_arr = np.asarray(labels).reshape(-1)
    scores_arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels_arr.shape != scores_arr.shape:
        raise ValueError(f"{labels_arr.size} labels but {scores_arr.size} scores")
    if not np.isin(labels_arr, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defect)")
    if not np.isfinite(scores_arr).all():
        raise ValueError("scores contain NaN or inf")
    return labels_arr.astype(bool), scores_arr


def image_auroc(labels: Any, scores: Any) -> float:
    """Image-level AUROC (labels 0 = good, 1 = defect); exactly sklearn's ``roc_auc_score``."""
    positive, scores_arr = _image_inputs(labels, scores)
    if positive.all() or not positive.any():
        raise ValueError("image AUROC needs good and defective images")
    return float(roc_auc_score(positive, scores_arr))


def _f1_from_groups(groups: _TieGroups, positive: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds ``score >= t`` (t = each distinct score) and that ``t``.

    These are exactly the points of the precision-recall curve; F1 = 2TP / (predicted + actual
    positives) avoids the 0/0 of precision at empty predictions. Among equally good thresholds the
    highest wins (fewest alarms).
    """
    pos = groups.count(positive)[::-1]
    n_pos = int(pos.sum())
    if n_pos == 0:
        raise ValueError("F1 needs at least one positive (defect) sample")
    tp = np.cumsum(pos, dtype=np.float64)
    predicted = np.cumsum(groups.count()[::-1], dtype=np.float64)
    f1 = 2.0 * tp / (predicted + n_pos)
    best = int(np.argmax(f1))  # first maximum = highest threshold
    return float(f1[best]), float(groups.values[::-1][best])


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """Best F1 over the precision-recall curve and the threshold ``t`` reaching it (``score >= t``)."""
    positive, scores_arr = _image_inputs(labels, scores)
    return _f1_from_groups(_TieGroups.of(scores_arr), positive)


# --------------------------------------------------------------------------------------------------
# pixel level: AUROC, PRO


def pixel_auroc(masks: np.ndarray | Sequence[np.ndarray], maps: np.ndarray | Sequence[np.ndarray]) -> float:
    """AUROC over all pixels of all images (defect pixels vs every other pixel)."""
    scores, shapes = _flat_scores(maps)
    return _auroc_from_groups(_TieGroups.of(scores), _flat_masks(masks, shapes))


def pixel_f1_max(
    masks: np.ndarray | Sequence[np.ndarray], maps: np.ndarray | Sequence[np.ndarray]
) -> tuple[float, float]:
    """Best pixel-level F1 and its threshold (all pixels of all images pooled)."""
    scores, shapes = _flat_scores(maps)
    return _f1_from_groups(_TieGroups.of(scores), _flat_masks(masks, shapes))


def _region_labels(defect: np.ndarray, shapes: list[tuple[int, ...]]) -> tuple[np.ndarray, int]:
    """Globally numbered 8-connected regions of every image's mask (0 = no defect), and their count."""
    labels = np.zeros(defect.size, dtype=np.int32)
    n_regions, start = 0, 0
    for shape in shapes:
        size = math.prod(shape)
        image_mask = defect[start : start + size]
        if image_mask.any():
            image_labels, n = ndimage.label(image_mask.reshape(shape), structure=EIGHT_CONNECTIVITY)
            image_labels = image_labels.reshape(-1)
            hit = image_labels > 0
            labels[start : start + size][hit] = image_labels[hit] + n_regions
            n_regions += n
        start += size
    return labels, n_regions


def _pro_curve_from_groups(
    groups: _TieGroups, defect: np.ndarray, shapes: list[tuple[int, ...]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    regions, n_regions = _region_labels(defect, shapes)
    if n_regions == 0:
        raise ValueError("PRO needs at least one defect region (no mask has a defect pixel)")
    defect_idx = np.flatnonzero(regions)
    n_ok = defect.size - defect_idx.size
    if n_ok == 0:
        raise ValueError("PRO needs defect-free pixels for the false-positive rate; every pixel is a defect")
    region_sizes = np.bincount(regions[defect_idx])
    # Each defect pixel adds 1/|its region| to that region's overlap; the sum over regions / count
    # is the mean overlap, so one cumulative sum gives PRO at every threshold.
    per_pixel_overlap = 1.0 / region_sizes[regions[defect_idx]]
    overlap_per_group = groups.total(defect_idx, per_pixel_overlap)
    fp_per_group = groups.count() - groups.count(defect_idx)
    return _descending_curve(groups, fp_per_group, overlap_per_group, n_ok, float(n_regions))


def pro_curve(
    masks: np.ndarray | Sequence[np.ndarray], maps: np.ndarray | Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact MVTec AD per-region-overlap curve: ``(fpr, pro, thresholds)``.

    Regions are the 8-connected components of each mask; PRO(t) is the mean over all regions of all
    images of the fraction of the region with ``score >= t``; FPR(t) is the fraction of all
    defect-free pixels (good images and the background of defective ones) with ``score >= t``.
    Thresholds are every distinct score, descending, after a leading ``+inf`` (the point (0, 0)).
    """
    scores, shapes = _flat_scores(maps)
    return _pro_curve_from_groups(_TieGroups.of(scores), _flat_masks(masks, shapes), shapes)


def aupro(
    masks: np.ndarray | Sequence[np.ndarray],
    maps: np.ndarray | Sequence[np.ndarray],
    fpr_limit: float = 0.3,
) -> float:
    """Area under the PRO curve for FPR in [0, fpr_limit], normalized by ``fpr_limit`` (perfect = 1).

    Matches the official MVTec AD evaluation (``compute_pro`` + ``trapezoid(..., x_max)``) exactly:
    same regions, same FPR pixels, every distinct score a threshold, linear interpolation at the limit.
    """
    fpr, pro, _ = pro_curve(masks, maps)
    return _area_up_to(fpr, pro, fpr_limit)


# --------------------------------------------------------------------------------------------------
# MVTec LOCO AD: saturated PRO


@dataclass(frozen=True)
class Defect:
    """One annotated defect of a LOCO image: one ground-truth channel (PNG), not a connected component.

    ``saturation_area`` is the number of detected pixels at which this defect counts as fully found
    (sPRO = min(1, overlap / saturation_area)): LOCO's logical defects (e.g. a missing object) need
    not be covered completely to be found. Use ``defect_from_config`` to derive it from a
    ``defects_config.json`` entry.
    """

    mask: np.ndarray  # bool [H, W]
    saturation_area: float
    name: str = ""

    def __post_init__(self) -> None:
        if self.mask.ndim != 2:
            raise ValueError("Defect.mask must be a 2-D array")
        if not self.saturation_area > 0:
            raise ValueError(f"saturation_area must be positive, got {self.saturation_area}")


def loco_saturation_area(defect_area: int, saturation_threshold: float, relative_saturation: bool) -> float:
    """Saturation area in pixels, as the official LOCO code computes it (``get_saturation_area``).

    Relative: ``int(saturation_threshold * defect_area)`` (truncated, as the official code does);
    absolute: ``min(saturation_threshold, defect_area)``. Where the official code would get 0 pixels
    (a defect smaller than 1 / threshold, or an empty mask) and then divide by zero, we use 1 pixel.
    """
    if relative_saturation:
        if not 0.0 < saturation_threshold <= 1.0:
            raise ValueError(f"relative saturation_threshold must be in (0, 1], got {saturation_threshold}")
        area = float(int(saturation_threshold * defect_area))
    else:
        area = float(min(saturation_threshold, defect_area))
    return max(area, 1.0)


def defect_from_config(mask: np.ndarray, entry: Mapping[str, Any]) -> Defect:
    """A ``Defect`` from a boolean mask and its ``defects_config.json`` entry.

    The entry needs ``saturation_threshold`` and ``relative_saturation``; ``defect_name`` is kept.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    area = loco_saturation_area(
        int(mask.sum()), float(entry["saturation_threshold"]), bool(entry["relative_saturation"])
    )
    return Defect(mask=mask, saturation_area=area, name=str(entry.get("defect_name", "")))


def defects_from_loco_channels(
    channels: Iterable[np.ndarray], defects_config: Sequence[Mapping[str, Any]]
) -> list[Defect]:
    """``Defect``s of one LOCO image from its ground-truth PNG arrays (one PNG per defect).

    In a LOCO ground-truth PNG the defect pixels hold the defect type's ``pixel_value`` (e.g. 255 or
    a type code), not 1; each PNG must hold exactly one such value, looked up in ``defects_config``
    (the parsed ``defects_config.json`` list). Every channel is kept: the official loader reads all
    of them (TFA-Net's reference loader reads only the first, which we do not copy).
    """
    by_value = {int(e["pixel_value"]): e for e in defects_config}
    defects = []
    for i, channel in enumerate(channels):
        channel = np.asarray(channel)
        if channel.ndim == 3:  # a PNG saved as RGB/RGBA: all channels hold the same code
            channel = channel[..., 0]
        values = np.unique(channel[channel > 0])
        if values.size != 1:
            raise ValueError(
                f"ground-truth channel {i} must contain exactly one positive pixel value, found {values.tolist()}"
            )
        value = int(values[0])
        if value not in by_value:
            raise ValueError(
                f"pixel value {value} of channel {i} is not in defects_config.json (known: {sorted(by_value)})"
            )
        defects.append(defect_from_config(channel > 0, by_value[value]))
    return defects


def spro_curve(
    maps: np.ndarray | Sequence[np.ndarray], defects: Sequence[Sequence[Defect]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact MVTec LOCO FPR / mean-sPRO curve: ``(fpr, mean_spro, thresholds)``.

    ``defects[i]`` lists the defects of image ``i`` (empty for good images). sPRO of a defect at
    threshold t is ``min(1, |defect ∩ {score >= t}| / saturation_area)``; the curve's y is the mean
    over all defects of all images. FPR pixels follow the official ``get_fp_tn_areas_per_image``:
    every pixel that is defect-free in *all* channels of its image, i.e. all pixels of good images
    *and* the background of defective images (not only good images).

    The official code samples thresholds adaptively (``curve_max_distance`` = 0.01); this is the
    limit of that refinement: every distinct score is a threshold.
    """
    scores, shapes = _flat_scores(maps)
    if len(defects) != len(shapes):
        raise ValueError(f"{len(shapes)} maps but defect lists for {len(defects)} images")
    groups = _TieGroups.of(scores)
    union = np.zeros(scores.size, dtype=bool)
    spro_per_group = np.zeros(groups.n_groups, dtype=np.float64)
    n_defects, start = 0, 0
    for shape, image_defects in zip(shapes, defects, strict=True):
        size = math.prod(shape)
        for defect in image_defects:
            if defect.mask.shape != shape:
                raise ValueError(f"defect mask {defect.mask.shape} does not match its map {shape}")
            idx = start + np.flatnonzero(defect.mask)
            union[idx] = True
            n_defects += 1
            if idx.size == 0:
                continue  # an empty channel is a defect never found
            # The j-th pixel of the defect to turn positive (highest score first) raises its sPRO by
            # (min(j, s) - min(j - 1, s)) / s: full steps until saturation, then nothing. Within a
            # run of equal scores the order is arbitrary, but only the value after the run counts.
            idx = idx[np.argsort(-scores[idx], kind="stable")]
            sat = float(defect.saturation_area)
            j = np.arange(1, idx.size + 1, dtype=np.float64)
            gain = (np.minimum(j, sat) - np.minimum(j - 1, sat)) / sat
            spro_per_group += groups.total(idx, gain)
        start += size
    if n_defects == 0:
        raise ValueError("sPRO needs at least one defect")
    n_ok = int(scores.size - union.sum())
    if n_ok == 0:
        raise ValueError("sPRO needs defect-free pixels for the false-positive rate")
    fp_per_group = groups.count() - groups.count(union)
    return _descending_curve(groups, fp_per_group, spro_per_group, n_ok, float(n_defects))


def au_spro(
    maps: np.ndarray | Sequence[np.ndarray],
    defects: Sequence[Sequence[Defect]],
    fpr_limits: Sequence[float] = LOCO_MAX_FPRS,
) -> dict[float, float]:
    """Area under the mean-sPRO curve up to each FPR limit, normalized by the limit (perfect = 1).

    The official LOCO evaluation reports it per test subdirectory with the good images added
    (``get_auc_spros_per_subdir(add_good_images=True)``) and a "mean" of the structural and logical
    values: call this once with good + structural images and once with good + logical images.
    """
    fpr, spro, _ = spro_curve(maps, defects)
    return {float(limit): _area_up_to(fpr, spro, float(limit)) for limit in fpr_limits}


# --------------------------------------------------------------------------------------------------
# everything at once


def evaluate_scores(
    labels: Any,
    scores: Any,
    masks: np.ndarray | Sequence[np.ndarray] | None = None,
    maps: np.ndarray | Sequence[np.ndarray] | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float | None]:
    """All MVTec metrics of one set of predictions, as fractions in [0, 1]; None where undefined.

    Image metrics need good and defective images; pixel metrics need ``masks`` and ``maps`` with at
    least one defect pixel. The pixel metrics share a single sort of all scores.
    """
    positive, scores_arr = _image_inputs(labels, scores)
    result: dict[str, float | None] = {
        "image_auroc": None,
        "f1_max": None,
        "f1_threshold": None,
        "pixel_auroc": None,
        "pixel_f1_max": None,
        "aupro": None,
    }
    if positive.any() and not positive.all():
        result["image_auroc"] = image_auroc(positive.astype(int), scores_arr)
    if positive.any():
        result["f1_max"], result["f1_threshold"] = f1_max(positive.astype(int), scores_arr)
    if masks is not None and maps is not None:
        flat, shapes = _flat_scores(maps)
        defect = _flat_masks(masks, shapes)
        if defect.any() and not defect.all():
            groups = _TieGroups.of(flat)
            result["pixel_auroc"] = _auroc_from_groups(groups, defect)
            result["pixel_f1_max"] = _f1_from_groups(groups, defect)[0]
            fpr, pro, _ = _pro_curve_from_groups(groups, defect, shapes)
            result["aupro"] = _area_up_to(fpr, pro, fpr_limit)
    return result
