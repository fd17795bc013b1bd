"""Choosing the one normal image every input is aggregated onto.

The paper simply takes the first training image. A template far from the typical part (an
odd pose, a lighting outlier) makes every reconstruction harder, so ``medoid`` picks the image
whose features are closest to the mean feature map. ``best_of_k`` asks the model instead: short
training runs, identical except for the template, on k candidates spread over that same
distance ranking, and the lowest validation loss (held-out *normal* images only) wins. The
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

from tfanet_core.config import Config
from tfanet_core.errors import TfanetError
from tfanet_core.training import evaluate_loss, feature_statistics, fit, prepared_model

if TYPE_CHECKING:
    from tfanet_core.data.manifest import Manifest

STRATEGIES = ("first", "medoid", "best_of_k")
DEFAULT_K = 4
DEFAULT_TRIAL_EPOCHS = 5


@dataclass
class TemplateChoice:
    index: int
    strategy: str
    evidence: dict[str, object] = field(default_factory=dict)


def select_template(
    features: torch.Tensor,
    strategy: str,
    *,
    val_features: torch.Tensor | None = None,
    config: Config | None = None,
    k: int = DEFAULT_K,
    trial_epochs: int = DEFAULT_TRIAL_EPOCHS,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> TemplateChoice:
    """Index into ``features`` [N, C, S, S] (training images, in manifest order) of the template.

    ``best_of_k`` also needs ``val_features`` and the ``config`` whose model and optimizer the trials use.
    """
    if len(features) == 0:
        raise ValueError("no training images to choose a template from")
    if strategy == "first":
        return TemplateChoice(0, strategy, {"reason": "first training image (paper)"})
    if strategy == "medoid":
        return _medoid(features)
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
    return {"image": row.path, "sha256": row.sha256, **asdict(choice)}


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
    try:
        index = list(sha256s).index(record["sha256"])
    except ValueError:
        raise TfanetError(
            f"{path}: template image {record.get('image')} (sha256 {record['sha256'][:12]}…) is not among the "
            f"{len(paths)} training images of this run; rerun `tfanet template` on this dataset version"
        ) from None
    return TemplateChoice(index, record["strategy"], dict(record.get("evidence", {})))
