"""Reject-threshold calibration on held-out validation data (docs/architecture.md §Calibration).

Two rules, chosen by what the validation split holds:

- **labelled defects present** → the threshold that maximises F1 (precision-recall curve);
- **normal images only** → a high quantile of the normal validation scores, set so that a chosen
  fraction ``target_fpr`` of normal parts is rejected.

Never the minimum (or maximum) score as a silent fall-back: anomalib's normal-only adaptive
threshold degenerated to the minimum score (issues #2433, #3357) and flagged every part. When the
data cannot support the requested FPR we say so (``CalibrationWarning``, or an error with
``strict=True``) and record the warning in the threshold itself, so it travels with the bundle.

Decision rule everywhere: a score is anomalous when ``score > threshold.value``. Calibrated values lie
halfway between two distinct validation scores, so ``>`` and ``>=`` agree on the calibration data.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import numpy as np
from scipy import stats

from tfanet_core.errors import TfanetError
from tfanet_core.metrics import _f1_from_groups, _flat_masks, _flat_scores, _TieGroups

__all__ = [
    "CalibrationError",
    "CalibrationWarning",
    "Threshold",
    "calibrate",
    "calibrate_normals",
    "calibrate_pixels",
    "fpr_upper_bound",
    "normal_quantile_threshold",
    "normals_needed",
]

Method = Literal["auto", "f1", "normal_quantile"]


class CalibrationWarning(UserWarning):
    """The threshold was computed, but the data are too few for the requested FPR to be trusted."""


class CalibrationError(TfanetError):
    """No meaningful threshold can be computed from the given data."""


@dataclass(frozen=True)
class Threshold:
    """A calibrated reject threshold and how it was obtained (stored as JSON in the model bundle).

    ``n_normal``/``n_defect`` count images for ``level="image"`` and pixels for ``level="pixel"``.
    ``calibration_fpr`` is the fraction of normal calibration samples above ``value`` (the FPR the
    threshold achieves on its own data); ``f1`` is the F1 it reaches there when defects were labelled.

    What the threshold guarantees (image level only: pixels of one image are not independent draws):
    ``fpr_upper_bound`` is the one-sided ``confidence`` upper bound (exact binomial, Clopper-Pearson)
    on the false-alarm rate on new normal parts, given ``calibration_fpr`` on ``n_normal`` images;
    ``normals_needed`` is how many held-out normals it takes, none of them above the threshold, for
    that bound to reach ``target_fpr``.
    """

    value: float
    method: str  # "f1" | "normal_quantile"
    level: str = "image"  # "image" | "pixel"
    target_fpr: float | None = None
    n_normal: int = 0
    n_defect: int = 0
    calibration_fpr: float | None = None
    f1: float | None = None
    warning: str | None = None
    confidence: float | None = None
    fpr_upper_bound: float | None = None
    normals_needed: int | None = None

    def is_anomalous(self, scores: Any) -> np.ndarray | bool:
        """``score > value``, element-wise for arrays."""
        result = np.asarray(scores) > self.value
        return bool(result) if result.ndim == 0 else result

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def guarantee(self) -> str:
        """What the threshold promises, in one sentence an operator can act on."""
        flagged = f"{self.calibration_fpr or 0:.1%} of {self.n_normal} held-out normal images flagged"
        line = f"threshold {self.value:.6g}: {flagged}"
        if self.fpr_upper_bound is None:
            return line
        line += (
            f"; false-alarm rate on new normal parts <= {self.fpr_upper_bound:.1%} "
            f"({(self.confidence or 0) * 100:.0f} % confidence, exact binomial)"
        )
        if self.target_fpr and self.normals_needed and self.n_normal < self.normals_needed:
            line += f"; bounding it by the target {self.target_fpr:.1%} takes >= {self.normals_needed} held-out normals"
        return line

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Threshold:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TfanetError(f"unknown Threshold fields {sorted(unknown)}; written by a newer tfanet?")
        return cls(**data)


CONFIDENCE = 0.95


def fpr_upper_bound(false_alarms: int, n_normal: int, confidence: float = CONFIDENCE) -> float:
    """One-sided exact (Clopper-Pearson) upper confidence bound on a rate seen as ``false_alarms`` / ``n_normal``.

    The largest p with P(Binomial(n, p) <= k) >= 1 - confidence, i.e. the ``confidence`` quantile of
    Beta(k + 1, n - k); 1.0 when every normal was a false alarm.
    """
    if n_normal < 1 or not 0 <= false_alarms <= n_normal:
        raise ValueError(f"need 0 <= false_alarms <= n_normal and n_normal >= 1, got {false_alarms}/{n_normal}")
    if false_alarms == n_normal:
        return 1.0
    return float(stats.beta.ppf(confidence, false_alarms + 1, n_normal - false_alarms))


def normals_needed(target_fpr: float, confidence: float = CONFIDENCE) -> int:
    """Smallest n such that n held-out normals, none above the threshold, bound the FPR by ``target_fpr``.

    With no false alarm in n images the exact bound is 1 - (1 - confidence)^(1/n); solving for n gives
    ceil(ln(1 - confidence) / ln(1 - target_fpr)): 299 normals for 1 % at 95 % (the "rule of three").
    """
    return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - target_fpr) - 1e-9)


def _with_guarantee(threshold: Threshold, target_fpr: float | None) -> Threshold:
    """The image threshold with its FPR bound and, when a target was asked for, the normals it needs."""
    if threshold.level != "image" or not threshold.n_normal or threshold.calibration_fpr is None:
        return threshold
    false_alarms = round(threshold.calibration_fpr * threshold.n_normal)
    return replace(
        threshold,
        confidence=CONFIDENCE,
        fpr_upper_bound=fpr_upper_bound(false_alarms, threshold.n_normal),
        normals_needed=normals_needed(target_fpr) if target_fpr else None,
    )


def _midpoint_below(values_desc: np.ndarray, index: int) -> float:
    """Halfway between distinct score ``values_desc[index]`` and the next lower one.

    A threshold between two observed scores, not on one, is unaffected by ``>`` vs ``>=`` and leaves
    a margin on both sides (the max-margin choice on separable data).
    """
    upper = float(values_desc[index])
    if index + 1 < values_desc.size:
        return 0.5 * (upper + float(values_desc[index + 1]))
    return float(np.nextafter(upper, -np.inf))


def _too_few_message(n: int, target_fpr: float, unit: str) -> str:
    needed = math.ceil(1.0 / target_fpr)
    return (
        f"only {n} normal {unit} for target_fpr={target_fpr}: resolving an FPR of {target_fpr} needs at "
        f"least {needed} (better {10 * needed}), so the threshold is the largest normal score and the "
        f"real false-positive rate is unknown. Add normal validation {unit}, or use target_fpr >= "
        f"{1.0 / max(n, 1):.3g}."
    )


def normal_quantile_threshold(
    normal_scores: Any, target_fpr: float = 0.01, *, strict: bool = False, unit: str = "images"
) -> Threshold:
    """Threshold rejecting a fraction ``target_fpr`` of normal samples (quantile rule).

    Interpolation choice, stated exactly: with the n normal scores sorted ascending
    x(1) <= ... <= x(n) and k = ceil(n * (1 - target_fpr)), the threshold is the midpoint of x(k)
    and the next larger distinct score. So exactly n - k = floor(n * target_fpr) calibration normals
    (ties at x(k) included in the kept ones) score above it: the empirical FPR never exceeds the
    target, and on new normal data it is target_fpr within the sampling error ≈ sqrt(α(1-α)/n).

    If n < 1 / target_fpr, k = n and no normal sample is rejected: that cannot estimate the target
    FPR. A ``CalibrationWarning`` says so (``CalibrationError`` with ``strict=True``), the warning is
    kept in ``Threshold.warning``, and the threshold is the largest normal score (scores strictly
    above it are anomalous).
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    scores = np.asarray(normal_scores, dtype=np.float64).reshape(-1)
    n = int(scores.size)
    if n == 0:
        raise CalibrationError("no normal validation scores: cannot calibrate a threshold without them")
    if not np.isfinite(scores).all():
        raise CalibrationError("normal validation scores contain NaN or inf")
    warning = None
    if n * target_fpr < 1.0:
        warning = _too_few_message(n, target_fpr, unit)
        if strict:
            raise CalibrationError(warning)
        warnings.warn(warning, CalibrationWarning, stacklevel=2)
    k = min(n, math.ceil(n * (1.0 - target_fpr) - 1e-9))  # -1e-9: n*(1-α) = 950.0000000001 is 950
    if k >= n:
        value = float(scores.max())
    else:
        part = np.partition(scores, (k - 1, k))
        kept_max = float(part[k - 1])
        above = scores[scores > kept_max]
        value = 0.5 * (kept_max + float(above.min())) if above.size else kept_max
    threshold = Threshold(
        value=value,
        method="normal_quantile",
        level="pixel" if unit == "pixels" else "image",
        target_fpr=float(target_fpr),
        n_normal=n,
        n_defect=0,
        calibration_fpr=float(np.count_nonzero(scores > value)) / n,
        warning=warning,
    )
    return _with_guarantee(threshold, target_fpr)


def _f1_threshold(groups: _TieGroups, positive: np.ndarray, level: str, target_fpr: float | None) -> Threshold:
    best_f1, best_t = _f1_from_groups(groups, positive)
    values_desc = groups.values[::-1]
    index = int(np.searchsorted(-values_desc, -best_t))  # position of best_t in the descending values
    value = _midpoint_below(values_desc, index)
    n_defect = int(np.count_nonzero(positive))
    n_normal = int(positive.size - n_defect)
    normal_above = int(np.count_nonzero(groups.values[groups.gid[~positive]] > value)) if n_normal else 0
    return Threshold(
        value=value,
        method="f1",
        level=level,
        target_fpr=target_fpr,
        n_normal=n_normal,
        n_defect=n_defect,
        calibration_fpr=normal_above / n_normal if n_normal else None,
        f1=best_f1,
    )


def calibrate(
    scores: Any,
    labels: Any | None = None,
    target_fpr: float = 0.01,
    method: Method = "auto",
    *,
    strict: bool = False,
) -> Threshold:
    """Image-level threshold from validation image scores (labels 0 = good, 1 = defect).

    ``method="auto"``: F1-optimal when the labels contain defects *and* normals, otherwise the
    normal-score quantile at ``target_fpr``. ``"normal_quantile"`` forces the FPR rule (it uses the
    normal images only) even when defects are labelled, e.g. when the line's false-alarm budget
    matters more than F1 on a handful of defects.
    """
    scores_arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels is None:
        labels_arr = np.zeros(scores_arr.size, dtype=bool)
    else:
        raw = np.asarray(labels).reshape(-1)
        if raw.shape != scores_arr.shape:
            raise ValueError(f"{raw.size} labels but {scores_arr.size} scores")
        if not np.isin(raw, (0, 1)).all():
            raise ValueError("labels must be 0 (good) or 1 (defect)")
        labels_arr = raw.astype(bool)
    n_defect = int(labels_arr.sum())
    n_normal = int(labels_arr.size - n_defect)
    if method == "auto":
        method = "f1" if n_defect and n_normal else "normal_quantile"
    if method == "f1":
        if not (n_defect and n_normal):
            raise CalibrationError(
                f"F1 calibration needs labelled good and defective validation images, got {n_normal} "
                f"good and {n_defect} defective; use method='normal_quantile' with good images"
            )
        if not np.isfinite(scores_arr).all():
            raise CalibrationError("validation scores contain NaN or inf")
        return _with_guarantee(_f1_threshold(_TieGroups.of(scores_arr), labels_arr, "image", None), target_fpr)
    if method != "normal_quantile":
        raise ValueError(f"unknown calibration method {method!r}; use 'auto', 'f1' or 'normal_quantile'")
    if n_normal == 0:
        raise CalibrationError(
            "no good (label 0) validation images: the quantile rule needs normal scores; add good "
            "images to the validation split"
        )
    threshold = normal_quantile_threshold(scores_arr[~labels_arr], target_fpr, strict=strict)
    return Threshold(**{**threshold.to_dict(), "n_defect": n_defect})


def calibrate_pixels(
    maps: np.ndarray | list[np.ndarray],
    masks: np.ndarray | list[np.ndarray] | None = None,
    target_fpr: float = 0.01,
    method: Method = "auto",
    *,
    strict: bool = False,
) -> Threshold:
    """Pixel-level threshold (for segmentation overlays) from validation anomaly maps.

    With ``masks`` that mark defect pixels: F1 over all pixels. Without defect pixels (``masks`` None
    or all False): the quantile rule over the pixels of the given maps, which must then be maps of
    normal images. Pixels of one image are correlated, so the effective sample is smaller than the
    pixel count: keep ``target_fpr`` well above 1 / (number of pixels).
    """
    scores, shapes = _flat_scores(maps)
    defect = np.zeros(scores.size, dtype=bool) if masks is None else _flat_masks(masks, shapes)
    has_defects, has_normals = bool(defect.any()), not bool(defect.all())
    if method == "auto":
        method = "f1" if has_defects and has_normals else "normal_quantile"
    if method == "f1":
        if not (has_defects and has_normals):
            raise CalibrationError("pixel F1 calibration needs masks with defect and defect-free pixels")
        return _f1_threshold(_TieGroups.of(scores), defect, "pixel", None)
    if method != "normal_quantile":
        raise ValueError(f"unknown calibration method {method!r}; use 'auto', 'f1' or 'normal_quantile'")
    if not has_normals:
        raise CalibrationError("every pixel is marked defective: no normal pixels to calibrate on")
    normal = scores if not has_defects else scores[~defect]
    threshold = normal_quantile_threshold(normal, target_fpr, strict=strict, unit="pixels")
    return Threshold(**{**threshold.to_dict(), "n_defect": int(defect.sum())})


def calibrate_normals(scores: Any, maps: Any, target_fpr: float) -> dict[str, Threshold]:
    """The image and pixel thresholds of a bundle, from the scores and maps of its held-out normal images."""
    return {
        "image": calibrate(scores, target_fpr=target_fpr),
        "pixel": calibrate_pixels(maps, target_fpr=target_fpr),
    }
