"""Drift statistics: is a window of recent production images still like the champion's training data?

Three views of a window, each with a test that returns a p-value, combined with a Bonferroni-corrected
alpha so that the false-alarm rate of the whole check stays ≤ ``alpha`` when nothing has drifted:

* **Embeddings** — global-average-pooled backbone maps per layer, standardized with the reference's
  per-dimension mean/std. Tested with a kernel two-sample test: unbiased MMD² with a Gaussian kernel
  (median-heuristic bandwidth on the pooled sample) and a permutation p-value with the +1 correction.
  Why MMD and not a KS test per dimension: drift (lighting, focus, a new variant) moves many correlated
  dimensions at once; MMD sees the joint distribution in one test, and one test needs no correction for
  the hundreds of comparisons per-dimension KS would. The permutation p-value is exact under
  exchangeability (the bandwidth is computed on the pooled sample, so it is permutation-invariant).
  Exchangeability fails where images come in correlated groups (KolektorSDD: 8 photos per commutator;
  windows of *new* commutators are flagged although nothing drifted): :func:`calibrate_null` replaces the
  permutation null by MMD² of windows of held-out normals from other groups (benchmarks/results/drift.md).
* **Anomaly scores** — the window's image scores against the reference's *held-out* normal scores
  (training-image scores are optimistically low and would raise false alarms): two-sample KS p-value,
  and the reject rate against the calibrated false-positive rate with a one-sided binomial test.
  PSI (quantile bins from the reference) is reported as a severity figure but does not vote: its
  usual 0.1/0.25 thresholds are rules of thumb with no false-alarm guarantee, and with small
  references it is noisy.
* **Template aggregation** — no separate statistic: the image score already *is* a function of how
  well TFA-Net reconstructs the input from the template (the anomaly map is the reconstruction
  residual), so a "mean reconstruction loss" test would re-test the same quantity.

Pure numpy/scipy/torch: the CLI verb and the retraining trigger live in components/.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from tfanet_core.config import section_from_mapping
from tfanet_core.data.images import image_to_tensor, load_rgb
from tfanet_core.errors import ConfigError, TfanetError
from tfanet_core.features import FeatureExtractor

if TYPE_CHECKING:
    from tfanet_core.predictor import Predictor

REFERENCE_FILE = "drift_reference.npz"
_STD_FLOOR = 1e-6


@dataclass
class DriftConfig:
    """The ``drift`` section of params.yaml."""

    window: int = 50  # images per checked window
    alpha: float = 0.05  # family-wise false-alarm rate of one check (Bonferroni over the voting tests)
    n_permutations: int = 500  # MMD permutations; the smallest attainable p-value is 1 / (n + 1)
    psi_bins: int = 10  # quantile bins of the reference scores
    psi_threshold: float = 0.25  # reported as "major shift" when exceeded; does not vote (no error rate)
    reject_tolerance: float = 0.02  # reject rate may exceed the calibrated FPR by this much before it counts
    max_reference: int = 500  # reference embeddings kept (random subset): the permutation test is O(n²)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ConfigError(f"drift.window must be >= 2 images, got {self.window}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"drift.alpha must be in (0, 1), got {self.alpha}")
        if self.n_permutations < 1 / self.alpha:
            raise ConfigError(
                f"drift.n_permutations={self.n_permutations} cannot reach p < alpha={self.alpha}; "
                f"use at least {int(np.ceil(3 / self.alpha))}"
            )
        if self.psi_bins < 2:
            raise ConfigError(f"drift.psi_bins must be >= 2, got {self.psi_bins}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DriftConfig:
        return section_from_mapping(cls, data, "params 'drift'")


# --- embeddings -----------------------------------------------------------------------------------------


def pool_maps(maps: Sequence[torch.Tensor]) -> np.ndarray:
    """Per-layer backbone maps [B, C_l, H_l, W_l] → global-average-pooled, concatenated [B, ΣC_l] (float64)."""
    return torch.cat([m.float().mean(dim=(2, 3)) for m in maps], dim=1).double().cpu().numpy()


def _batches(
    images: torch.Tensor | Sequence[Path | str], size: tuple[int, int], batch_size: int, progress: bool, desc: str
) -> Iterator[torch.Tensor]:
    """Batches [B, 3, H, W] of a tensor or of image files (loaded lazily, so the bar tracks the work)."""
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = images[start : start + batch_size]
        if isinstance(chunk, torch.Tensor):
            yield chunk
        else:
            yield torch.stack([image_to_tensor(load_rgb(p), size) for p in chunk])


def embed(
    extractor: FeatureExtractor,
    images: torch.Tensor | Sequence[Path | str],
    batch_size: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """Pooled backbone embeddings [N, D] of image files or of a tensor [N, 3, S, S] in [0, 1] at the input size."""
    parts = [
        pool_maps(extractor.layer_maps(b))
        for b in _batches(images, extractor.config.image_hw, batch_size, progress, "embed")
    ]
    return np.concatenate(parts) if parts else np.empty((0, extractor.out_channels))


def measure(
    predictor: Predictor,
    images: torch.Tensor | Sequence[Path | str],
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N, D], anomaly scores [N]) with one backbone pass per image: what a window check needs."""
    embeddings, scores = [], []
    for b in _batches(images, predictor.image_size, batch_size, progress, "drift window"):
        maps = predictor.extractor.layer_maps(b.to(predictor.device))
        embeddings.append(pool_maps(maps))
        scores.append(predictor.score_features(predictor.extractor.fuse(maps).float().contiguous())[0].numpy())
    if not embeddings:
        return np.empty((0, predictor.extractor.out_channels)), np.empty(0)
    return np.concatenate(embeddings), np.concatenate(scores).astype(np.float64)


# --- the reference ----------------------------------------------------------------------------------------


@dataclass
class Reference:
    """What a window is compared with: the champion's training-set embeddings and held-out normal scores.

    Stored as ``drift_reference.npz`` in the bundle directory, so it travels with the model it describes.
    """

    embeddings: np.ndarray  # [N, D] pooled, *not* standardized
    scores: np.ndarray | None = None  # held-out normal image scores of the bundle's model
    threshold: float | None = None  # the bundle's image threshold
    expected_fpr: float | None = None  # reject rate of normal images at that threshold
    backbone: dict[str, Any] = field(default_factory=dict)  # tag and weight sha256 of the embedding backbone
    null_mmd2: np.ndarray | None = None  # MMD² of normal windows not in the reference (calibrate_null)

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float64)
        if self.embeddings.ndim != 2 or len(self.embeddings) < 2:
            raise ValueError(f"reference needs >= 2 embeddings of shape [N, D], got {self.embeddings.shape}")
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64).ravel()
        self.mean = self.embeddings.mean(axis=0)
        self.std = np.maximum(self.embeddings.std(axis=0), _STD_FLOOR)

    def standardize(self, embeddings: np.ndarray) -> np.ndarray:
        """Per-dimension z-scores with the reference's statistics: every layer's channels weigh alike."""
        return (np.asarray(embeddings, dtype=np.float64) - self.mean) / self.std

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / REFERENCE_FILE
        optional: dict[str, Any] = {
            "scores": self.scores,
            "threshold": None if self.threshold is None else np.float64(self.threshold),
            "expected_fpr": None if self.expected_fpr is None else np.float64(self.expected_fpr),
            "null_mmd2": self.null_mmd2,
        }
        np.savez(
            path,
            embeddings=self.embeddings,
            backbone_tag=np.str_(self.backbone.get("tag", "")),
            backbone_sha256=np.str_(self.backbone.get("sha256", "")),
            **{k: v for k, v in optional.items() if v is not None},
        )
        return path

    @classmethod
    def load(cls, path: Path | str) -> Reference:
        path = Path(path)
        if path.is_dir():
            path = path / REFERENCE_FILE
        if not path.is_file():
            raise TfanetError(
                f"{path}: no drift reference; build one from the champion bundle (drift.build_reference) first"
            )
        with np.load(path, allow_pickle=False) as data:
            return cls(
                embeddings=data["embeddings"],
                scores=data.get("scores"),
                threshold=float(data["threshold"]) if "threshold" in data else None,
                expected_fpr=float(data["expected_fpr"]) if "expected_fpr" in data else None,
                backbone={"tag": str(data["backbone_tag"]), "sha256": str(data["backbone_sha256"])},
                null_mmd2=data.get("null_mmd2"),
            )


def build_reference(
    predictor: Predictor,
    train_images: torch.Tensor | Sequence[Path | str],
    heldout_images: torch.Tensor | Sequence[Path | str],
    progress: bool = False,
) -> Reference:
    """Embeddings of all normal training images (train + held-out) and the model's scores on held-out normals.

    The expected reject rate is the larger of the threshold's calibrated FPR and its rate on these held-out
    normals, so a threshold calibrated on few images does not make the reject-rate test fire on day one.
    """
    train_emb = embed(predictor.extractor, train_images, progress=progress)
    heldout_emb, heldout_scores = measure(predictor, heldout_images, progress=progress)
    threshold = predictor.threshold
    expected = None
    if threshold is not None:
        image = predictor.bundle.thresholds.get("image")
        calibrated = (image.calibration_fpr if image is not None else None) or 0.0
        expected = max(float(calibrated), float(np.mean(heldout_scores > threshold)) if len(heldout_scores) else 0.0)
    return Reference(
        embeddings=np.concatenate([train_emb, heldout_emb]),
        scores=heldout_scores if len(heldout_scores) else None,
        threshold=threshold,
        expected_fpr=expected,
        backbone=predictor.extractor.describe(),
    )


# --- tests ------------------------------------------------------------------------------------------------


def _sq_distances(z: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", z, z)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)


def _mmd2_split(x: np.ndarray, y: np.ndarray, n_permutations: int, seed: int) -> np.ndarray:
    """Unbiased MMD² of the observed split (element 0) and of ``n_permutations`` random re-splits."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2 or x.ndim != 2 or x.shape[1:] != y.shape[1:]:
        raise ValueError(f"mmd_test needs two samples [>=2, D] with equal D, got {x.shape} and {y.shape}")
    z = np.concatenate([x, y])
    d2 = _sq_distances(z)
    off_diag = d2[np.triu_indices(m + n, k=1)]
    bandwidth2 = float(np.median(off_diag[off_diag > 0])) if np.any(off_diag > 0) else 1.0
    kernel = np.exp(-d2 / bandwidth2)
    np.fill_diagonal(kernel, 0.0)  # unbiased: only i ≠ j pairs

    rng = np.random.default_rng(seed)
    members = np.zeros((n_permutations + 1, m + n))
    members[0, :m] = 1.0  # row 0: the observed split
    for row in members[1:]:
        row[rng.permutation(m + n)[:m]] = 1.0
    total = kernel.sum()
    kx = members @ kernel
    xx = np.einsum("ij,ij->i", kx, members)  # Σ_{i≠j∈X} k
    xy = np.einsum("ij,ij->i", kx, 1.0 - members)  # Σ_{i∈X, j∈Y} k
    yy = total - xx - 2.0 * xy
    return xx / (m * (m - 1)) + yy / (n * (n - 1)) - 2.0 * xy / (m * n)


def mmd_test(x: np.ndarray, y: np.ndarray, n_permutations: int = 500, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD² between samples ``x`` [m, D] and ``y`` [n, D], and its permutation p-value.

    Gaussian kernel, bandwidth = median pairwise distance of the pooled sample (permutation-invariant,
    so the test stays exact). p = (1 + #{permuted MMD² ≥ observed}) / (1 + n_permutations): never 0,
    valid at every sample size — *if* images are exchangeable. Images that come in correlated groups (8
    photos of one part, one shift's lighting) are not: a window of new parts then differs from the reference
    more than any re-split of the pooled sample does, see :func:`calibrate_null`.
    """
    mmd2 = _mmd2_split(x, y, n_permutations, seed)
    return float(mmd2[0]), float((1.0 + np.sum(mmd2[1:] >= mmd2[0] - 1e-12)) / (1.0 + n_permutations))


def mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² statistic alone (same kernel and bandwidth rule as :func:`mmd_test`)."""
    return float(_mmd2_split(x, y, 0, 0)[0])


def _reference_sample(reference: Reference, config: DriftConfig) -> np.ndarray:
    """The standardized reference embeddings a check uses (a fixed random subset above ``max_reference``)."""
    ref = reference.embeddings
    if len(ref) > config.max_reference:
        rng = np.random.default_rng(config.seed)
        ref = ref[np.sort(rng.choice(len(ref), config.max_reference, replace=False))]
    return reference.standardize(ref)


def calibrate_null(
    reference: Reference, normal_embeddings: np.ndarray, config: DriftConfig, n_windows: int = 200
) -> np.ndarray:
    """MMD² of windows of normal images *not in the reference* against it: an empirical null.

    Use it when images come in correlated groups (parts, batches, shifts): the permutation test treats every
    image as exchangeable and flags any new group as drift. Windows are runs of ``config.window`` consecutive
    images in the order given, from random starts: pass the calibration normals in acquisition order, because
    production windows are consecutive images too, and a random draw would average the between-part variation
    away (measured: the null is then far too narrow). The calibration normals must be new groups (other parts,
    later days than the reference). Store the result in ``reference.null_mmd2``; :func:`check_window` then uses
    it instead of permutations.
    """
    normal_embeddings = np.asarray(normal_embeddings, dtype=np.float64)
    starts = len(normal_embeddings) - config.window + 1
    if starts < 10:
        raise ValueError(
            f"{len(normal_embeddings)} calibration images give only {max(starts, 0)} distinct windows of "
            f"drift.window={config.window}; use more held-out normal images (several times the window)"
        )
    ref = _reference_sample(reference, config)
    rng = np.random.default_rng(config.seed + 1)
    return np.array(
        [
            mmd2(ref, reference.standardize(normal_embeddings[start : start + config.window]))
            for start in rng.integers(0, starts, n_windows)
        ]
    )


def psi(reference: np.ndarray, window: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index with quantile bins of the reference: Σ (w − r) · ln(w / r)."""
    reference, window = np.asarray(reference, dtype=np.float64), np.asarray(window, dtype=np.float64)
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1))[1:-1])
    r = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1) / len(reference)
    w = np.bincount(np.searchsorted(edges, window, side="right"), minlength=len(edges) + 1) / len(window)
    r, w = np.maximum(r, eps), np.maximum(w, eps)
    return float(np.sum((w - r) * np.log(w / r)))


@dataclass
class ScoreShift:
    ks_statistic: float
    ks_p_value: float
    psi: float
    reject_rate: float | None
    expected_reject_rate: float | None
    reject_p_value: float | None


def score_shift(
    ref_scores: np.ndarray,
    window_scores: np.ndarray,
    threshold: float | None = None,
    expected_fpr: float | None = None,
    psi_bins: int = 10,
    reject_tolerance: float = 0.0,
) -> ScoreShift:
    """KS two-sample test and PSI of the window's scores against the reference's; with a threshold, the
    window's reject rate against ``expected_fpr + reject_tolerance`` (one-sided exact binomial test)."""
    ref_scores, window_scores = np.asarray(ref_scores, dtype=np.float64), np.asarray(window_scores, dtype=np.float64)
    ks = stats.ks_2samp(ref_scores, window_scores)
    rate = expected = p_reject = None
    if threshold is not None:
        flagged = int(np.sum(window_scores > threshold))
        rate = flagged / len(window_scores)
        expected = min(1.0, (expected_fpr or 0.0) + reject_tolerance)
        p_reject = float(stats.binomtest(flagged, len(window_scores), expected, alternative="greater").pvalue)
    return ScoreShift(
        ks_statistic=float(ks.statistic),
        ks_p_value=float(ks.pvalue),
        psi=psi(ref_scores, window_scores, psi_bins),
        reject_rate=rate,
        expected_reject_rate=expected,
        reject_p_value=p_reject,
    )


@dataclass
class DriftReport:
    """One window's decision, every statistic behind it, and the reason in words."""

    drift: bool
    reason: str
    n_window: int
    alpha: float
    alpha_per_test: float
    p_values: dict[str, float]  # the tests that vote
    mmd2: float
    mmd_null: str  # how the MMD p-value was obtained
    score: ScoreShift | None = None
    psi_major: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_window(
    reference: Reference,
    window_embeddings: np.ndarray,
    window_scores: np.ndarray | None,
    config: DriftConfig,
) -> DriftReport:
    """Drift if any voting test's p-value < alpha / (number of voting tests) (Bonferroni).

    Voting tests: MMD on embeddings always (p-value from ``reference.null_mmd2`` when calibrated, else from
    permutations); KS on scores and the reject-rate binomial test when the
    reference has held-out scores (and a threshold). Windows smaller than ``config.window`` are checked but
    the reason says so: the error rates in benchmarks/results/drift.md hold for the configured size.
    """
    window_embeddings = np.asarray(window_embeddings, dtype=np.float64)
    if window_embeddings.ndim != 2 or window_embeddings.shape[1] != reference.embeddings.shape[1]:
        raise ValueError(
            f"window embeddings have shape {window_embeddings.shape}, the reference has "
            f"D={reference.embeddings.shape[1]}: embed the window with the reference's backbone and layers"
        )
    n = len(window_embeddings)
    if n < 2:
        raise ValueError(f"a drift window needs >= 2 images, got {n}")
    ref, window = _reference_sample(reference, config), reference.standardize(window_embeddings)
    if reference.null_mmd2 is not None:
        statistic = mmd2(ref, window)
        null = reference.null_mmd2
        p_mmd = float((1.0 + np.sum(null >= statistic - 1e-12)) / (1.0 + len(null)))
        mmd_null = f"calibrated ({len(null)} normal windows)"
    else:
        statistic, p_mmd = mmd_test(ref, window, config.n_permutations, config.seed)
        mmd_null = f"permutation ({config.n_permutations})"
    p_values = {"mmd": p_mmd}
    shift = None
    if window_scores is not None and reference.scores is not None and len(reference.scores) >= 2:
        window_scores = np.asarray(window_scores, dtype=np.float64)
        if len(window_scores) != n:
            raise ValueError(f"{len(window_scores)} window scores for {n} window embeddings; pass one per image")
        shift = score_shift(
            reference.scores,
            window_scores,
            reference.threshold,
            reference.expected_fpr,
            config.psi_bins,
            config.reject_tolerance,
        )
        p_values["ks"] = shift.ks_p_value
        if shift.reject_p_value is not None:
            p_values["reject_rate"] = shift.reject_p_value
    alpha_each = config.alpha / len(p_values)
    fired = sorted(name for name, p in p_values.items() if p < alpha_each)
    detail = ", ".join(f"{k} p={v:.4f}" for k, v in p_values.items())
    if fired:
        reason = f"drift: {' and '.join(fired)} below alpha/{len(p_values)}={alpha_each:.4f} ({detail})"
    else:
        reason = f"no drift: every p-value >= alpha/{len(p_values)}={alpha_each:.4f} ({detail})"
    if n < config.window:
        reason += f"; window has {n} images, fewer than drift.window={config.window} (less power)"
    return DriftReport(
        drift=bool(fired),
        reason=reason,
        n_window=n,
        alpha=config.alpha,
        alpha_per_test=alpha_each,
        p_values=p_values,
        mmd2=statistic,
        mmd_null=mmd_null,
        score=shift,
        psi_major=None if shift is None else shift.psi > config.psi_threshold,
    )
