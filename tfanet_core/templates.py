"""Choosing the normal image(s) every input is aggregated onto.

The paper simply takes the first training image. A template far from the typical part (an
odd pose, a lighting outlier) makes every reconstruction harder, so ``medoid`` picks the image
whose features are closest to the mean feature map. ``best_of_k`` asks the model instead: short
training runs, identical except for the template, on k candidates spread over that same
distance ranking, and the lowest validation loss (held-out *normal* images only) wins. The
``bank`` keeps k images that cover the training set instead (k-center on pooled features, the
medoid first), and each input is aggregated onto its nearest ones (``TemplateAggregator.nearest_templates``):
one template cannot be aligned with every variant or pose a line produces. ``auto`` lets the product decide
between one template, the nearest of a bank and a blend of the nearest few, by short runs judged on
synthetic defects drawn onto held-out normals (no test label). The
choice and its evidence go into the bundle; ``tfanet template`` writes them to a JSON file that
``tfanet train --template`` reuses, so a pipeline selects once and trains on that choice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tfanet_core.config import TEMPLATE_STRATEGIES, Config
from tfanet_core.errors import TfanetError
from tfanet_core.model import TemplateAggregator, template_keys
from tfanet_core.training import evaluate_loss, feature_statistics, fit, prepared_model

if TYPE_CHECKING:
    from tfanet_core.data.manifest import Manifest

STRATEGIES = TEMPLATE_STRATEGIES
DEFAULT_K = 4
DEFAULT_TRIAL_EPOCHS = 5


@dataclass
class TemplateChoice:
    """The template (``index``) or, for a bank, every template (``bank``, ``index`` first) among the training images."""

    index: int
    strategy: str
    evidence: dict[str, object] = field(default_factory=dict)
    bank: list[int] = field(default_factory=list)
    nearest: int = 1  # bank entries blended per image (1: the nearest one)

    @property
    def indices(self) -> list[int]:
        """The training images whose features the model stores as its templates, in bank order."""
        return self.bank or [self.index]


def select_template(
    features: torch.Tensor,
    strategy: str,
    *,
    val_features: torch.Tensor | None = None,
    config: Config | None = None,
    k: int | None = None,
    trial_epochs: int = DEFAULT_TRIAL_EPOCHS,
    device: torch.device | str = "cpu",
    progress: bool = False,
    selector: Callable[[TemplateAggregator], dict[str, float]] | None = None,
) -> TemplateChoice:
    """The template(s) among ``features`` [N, C, h, w] (training images, in manifest order).

    ``best_of_k`` also needs ``val_features`` and the ``config`` whose model and optimizer the trials use;
    ``auto`` needs the config and the pseudo-anomaly ``selector`` its trials are judged by.
    ``k`` defaults to the config's ``template.k``.
    """
    if len(features) == 0:
        raise ValueError("no training images to choose a template from")
    if k is None:
        k = config.template.k if config is not None else DEFAULT_K
    if strategy == "first":
        return TemplateChoice(0, strategy, {"reason": "first training image (paper)"})
    if strategy == "medoid":
        return _medoid(features)
    nearest = config.template.nearest if config is not None else 1
    if strategy == "bank":
        return k_center_bank(features, k, nearest)
    if strategy == "auto":
        if config is None or selector is None:
            raise ValueError("template strategy auto needs the training config and a pseudo-anomaly selector")
        judge = synthetic_trial(features, val_features, config, selector, trial_epochs, device, progress)
        return auto_choice(features, judge, k, nearest, trial_epochs)
    if strategy == "best_of_k":
        if config is None or val_features is None or len(val_features) == 0:
            raise ValueError(
                "template strategy best_of_k needs held-out normal validation images (train.val_fraction > 0) "
                "and the training config; or choose template.strategy=medoid"
            )
        trial = short_run_trial(features, val_features, config, trial_epochs, device, progress)
        choice = best_of_k(features, trial, k)
        choice.evidence["trial_epochs"] = trial_epochs
        return choice
    raise ValueError(f"unknown template strategy '{strategy}'; choose one of {STRATEGIES}")


def distances_to_mean(features: torch.Tensor) -> torch.Tensor:
    """Mean squared distance [N] of each image's features to the mean feature map (float64)."""
    mean = features.double().mean(dim=0)
    return torch.stack([(f.double() - mean).pow(2).mean() for f in features])


def _medoid(features: torch.Tensor) -> TemplateChoice:
    distances = distances_to_mean(features)
    index = int(distances.argmin())
    return TemplateChoice(
        index,
        "medoid",
        {
            "distance_to_mean": float(distances[index]),
            "median_distance": float(distances.median()),
            "max_distance": float(distances.max()),
        },
    )


def bank_keys(features: torch.Tensor) -> torch.Tensor:
    """Per-image keys [N, C·16] (the model's :func:`template_keys`) of the features standardized per channel over
    the training set, so that no channel dominates the distance by its scale alone."""
    mean, std = feature_statistics(features)
    standardized = (features - mean.view(1, -1, 1, 1)) / std.clamp_min(1e-6).view(1, -1, 1, 1)
    return template_keys(standardized).double()


def k_center_bank(features: torch.Tensor, k: int, nearest: int = 1) -> TemplateChoice:
    """k training images that cover the set: the medoid, then repeatedly the image farthest from every one kept.

    Greedy k-center (Gonzalez) on :func:`bank_keys`: deterministic, O(N·k), and it covers the rare variants and
    poses a k-means would merge into their neighbours. ``evidence`` records the cover radius (the largest
    distance of a training image to its nearest template) so a reader sees what each added template bought.
    ``nearest`` (how many entries an image blends) stays below the bank's size, so that an image in the bank
    always has others to be aggregated onto.
    """
    if k < 1:
        raise ValueError(f"a template bank needs k >= 1, got {k}")
    keys = bank_keys(features)
    first = int(distances_to_mean(features).argmin())
    chosen = [first]
    gap = (keys - keys[first]).pow(2).mean(dim=1)  # each image's distance to its nearest template so far
    radii = [float(gap.max())]
    while len(chosen) < min(k, len(features)):
        far = int(gap.argmax())
        chosen.append(far)
        gap = torch.minimum(gap, (keys - keys[far]).pow(2).mean(dim=1))
        radii.append(float(gap.max()))
    evidence: dict[str, object] = {"k": k, "templates": len(chosen), "cover_radius": radii}
    return TemplateChoice(chosen[0], "bank", evidence, bank=chosen, nearest=max(1, min(nearest, len(chosen) - 1)))


def auto_choice(
    features: torch.Tensor, trial: Callable[[TemplateChoice], float], k: int, nearest: int, trial_epochs: int
) -> TemplateChoice:
    """One template, the nearest of a k-center bank, or a blend of the ``nearest`` nearest: whichever short run
    finds synthetic defects on held-out normals best (``trial``: its best pseudo-anomaly pixel AUROC).

    Label-free, like the checkpoint choice: defects drawn onto held-out normal images stand in for real
    ones. Ties go to the simpler candidate (listed first). Every candidate's signal is evidence.
    """
    bank = k_center_bank(features, k, nearest)
    options = {"single": _medoid(features), "nearest": replace(bank, nearest=1)}
    if nearest > 1:
        options[f"blend of {nearest}"] = bank
    signals = {name: float(trial(choice)) for name, choice in options.items()}
    winner = max(signals, key=lambda name: signals[name])  # the first of equals: dicts keep insertion order
    chosen = options[winner]
    evidence = {
        **chosen.evidence,
        "auto": {"signal": "synthetic_pixel_auroc", "trial_epochs": trial_epochs, "candidates": signals},
        "chosen": winner,
    }
    return replace(chosen, strategy="auto", evidence=evidence)


def candidates(features: torch.Tensor, k: int) -> list[int]:
    """k indices: evenly spaced ranks of the distance-to-mean order (the medoid first), plus image 0.

    The paper's first image is always a candidate, so best_of_k can only match or beat it on
    validation loss; spreading the rest over the ranking tests central *and* less central images.
    """
    if k < 1:
        raise ValueError(f"best_of_k needs k >= 1 candidates, got {k}")
    n = len(features)
    order = distances_to_mean(features).argsort().tolist()
    spread = [order[j * (n - 1) // k] for j in range(k)]  # never the farthest image
    return list(dict.fromkeys([0, *spread, *order]))[: min(k, n)]


def best_of_k(features: torch.Tensor, trial: Callable[[int], float], k: int = DEFAULT_K) -> TemplateChoice:
    """The candidate whose ``trial(index)`` (a validation loss) is lowest; every candidate's loss is evidence."""
    distances = distances_to_mean(features)
    rows = []
    for index in candidates(features, k):
        rows.append({"index": index, "distance_to_mean": float(distances[index]), "val_loss": float(trial(index))})
    winner = min(rows, key=lambda r: (r["val_loss"], r["index"]))
    return TemplateChoice(
        int(winner["index"]), "best_of_k", {"k": k, "candidates": rows, "val_loss": winner["val_loss"]}
    )


def synthetic_trial(
    features: torch.Tensor,
    val_features: torch.Tensor | None,
    config: Config,
    selector: Callable[[TemplateAggregator], dict[str, float]],
    epochs: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Callable[[TemplateChoice], float]:
    """Best pseudo-anomaly pixel AUROC within ``epochs`` of training on a template choice; same seed for all."""
    train_config = replace(config.train, epochs=epochs, selection="synthetic", patience=0, checkpoint_every=epochs)
    stats = feature_statistics(features) if config.features.standardize else None

    def trial(choice: TemplateChoice) -> float:
        model = prepared_model(config, features, choice.indices, stats, nearest=choice.nearest)
        result = fit(model, features, train_config, val_features, device=device, progress=progress, selector=selector)
        return max(h["synthetic_pixel_auroc"] for h in result.history)

    return trial


def short_run_trial(
    features: torch.Tensor,
    val_features: torch.Tensor,
    config: Config,
    epochs: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Callable[[int], float]:
    """Validation loss after ``epochs`` of training with template ``index``; same seed and data for all."""
    train_config = replace(config.train, epochs=epochs, selection="last", checkpoint_every=epochs)
    stats = feature_statistics(features) if config.features.standardize else None

    def trial(index: int) -> float:
        model = prepared_model(config, features, index, stats)
        fit(model, features, train_config, device=device, progress=progress)
        return evaluate_loss(model, val_features, train_config, torch.device(device))

    return trial


# --- the template step's output file (DVC / kfp step between features and train) -------------------


def choice_record(choice: TemplateChoice, paths: Sequence[Path], manifest: Manifest) -> dict[str, Any]:
    """What ``tfanet template`` writes and the bundle's ``template`` section holds: the image by content."""
    row = manifest.row_for(paths[choice.index])
    record = {"image": row.path, "sha256": row.sha256, **asdict(choice)}
    if choice.bank:
        record["bank"] = [
            {"image": r.path, "sha256": r.sha256} for r in (manifest.row_for(paths[i]) for i in choice.bank)
        ]
    return record


def write_choice(record: dict[str, Any], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def read_choice(path: Path | str, paths: Sequence[Path], sha256s: Sequence[str]) -> TemplateChoice:
    """The choice in a ``tfanet template`` file, located among this run's training images by content.

    Matched by sha256, not index or path, so a re-split or moved dataset cannot silently pick
    another image; a template that is no longer a training image is an error.
    """
    record = json.loads(Path(path).read_text())
    images = record.get("bank") or [{"image": record.get("image"), "sha256": record["sha256"]}]
    found = []
    for image in images:
        try:
            found.append(list(sha256s).index(image["sha256"]))
        except ValueError:
            raise TfanetError(
                f"{path}: template image {image.get('image')} (sha256 {image['sha256'][:12]}…) is not among the "
                f"{len(paths)} training images of this run; rerun `tfanet template` on this dataset version"
            ) from None
    evidence = dict(record.get("evidence", {}))
    bank = found if record.get("bank") else []
    return TemplateChoice(found[0], record["strategy"], evidence, bank=bank, nearest=int(record.get("nearest", 1)))
