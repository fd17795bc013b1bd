"""Training loop: the loss goes down, selection never sees test data, resumption is exact."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from tfanet_core.config import Config, load_config
from tfanet_core.training import build_model, feature_statistics, fit


def _toy_features(n: int = 12, channels: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, channels, size, size, generator=g)
    return base + 0.1 * torch.randn(n, channels, size, size, generator=g)


def _model(config: Config, features: torch.Tensor):  # type: ignore[no-untyped-def]
    model = build_model(config, features.shape[1])
    model.set_feature_stats(*feature_statistics(features))
    model.set_template(features[0])
    return model


def test_loss_decreases_on_a_fixed_batch() -> None:
    config = load_config("tiny", ["train.epochs=15", "train.batch_size=12", "train.lr=3e-3"])
    features = _toy_features()
    result = fit(_model(config, features), features, config.train, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.6 * losses[0]
    assert all(b < a * 1.05 for a, b in itertools.pairwise(losses))


def test_same_seed_same_weights() -> None:
    config = load_config("tiny", ["train.epochs=2"])
    features = _toy_features()
    a = fit(_model(config, features), features, config.train, progress=False).model.state_dict()
    b = fit(_model(config, features), features, config.train, progress=False).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    config = load_config(
        "tiny", ["train.epochs=6", "train.checkpoint_every=2", "model.mask_ratio=0.25", "train.selection=val_loss"]
    )
    features, val = _toy_features(), _toy_features(4, seed=1)
    reference = fit(_model(config, features), features, config.train, val, progress=False)

    # "killed" after epoch 5: the last checkpoint on disk is from epoch 4, so epoch 5 is redone
    fit(
        _model(config, features),
        features,
        config.train,
        val,
        checkpoint_dir=tmp_path,
        progress=False,
        stop_after_epoch=5,
    )
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 4
    resumed = fit(_model(config, features), features, config.train, val, checkpoint_dir=tmp_path, progress=False)

    assert [h["epoch"] for h in resumed.history] == list(range(1, 7))
    assert resumed.history == reference.history
    assert resumed.best_epoch == reference.best_epoch
    ref_state, res_state = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(ref_state[k], res_state[k]) for k in ref_state)


def test_checkpoint_of_another_run_is_not_resumed(tmp_path: Path) -> None:
    config = load_config("tiny", ["train.epochs=2", "train.checkpoint_every=1"])
    features = _toy_features()
    fit(_model(config, features), features, config.train, checkpoint_dir=tmp_path, progress=False)
    other = load_config("tiny", ["train.epochs=2", "train.checkpoint_every=1", "train.lr=5e-4"])
    result = fit(_model(other, features), features, other.train, checkpoint_dir=tmp_path, progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2]  # started afresh


def test_val_loss_selection_keeps_the_best_epoch() -> None:
    config = load_config("tiny", ["train.epochs=5", "train.selection=val_loss"])
    features, val = _toy_features(), _toy_features(4, seed=1)
    result = fit(_model(config, features), features, config.train, val, progress=False)
    val_losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == 1 + val_losses.index(min(val_losses))


def _scripted_selector(values: list[float]):  # type: ignore[no-untyped-def]
    """A stand-in for the pseudo-anomaly check that returns a fixed sequence, one value per epoch."""
    calls = iter(values)
    return lambda model: {"synthetic_pixel_auroc": next(calls)}


def test_synthetic_selection_keeps_the_best_epoch_and_stops_after_patience(tmp_path: Path) -> None:
    config = load_config("tiny", ["train.epochs=10", "train.selection=synthetic", "train.patience=2"])
    features, val = _toy_features(), _toy_features(4, seed=1)
    signal = [0.5, 0.9, 0.7, 0.8, 0.95, 0.99]  # the best (0.9) is not beaten for 2 epochs: stop after epoch 4
    weights: list[dict[str, torch.Tensor]] = []

    def selector(model):  # type: ignore[no-untyped-def]
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"synthetic_pixel_auroc": signal[len(weights) - 1]}

    def run(select):  # type: ignore[no-untyped-def]
        model = _model(config, features)
        return fit(model, features, config.train, val, checkpoint_dir=tmp_path, progress=False, selector=select)

    result = run(selector)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.best_epoch == 2
    state = result.model.state_dict()
    assert all(torch.equal(state[k], weights[1][k]) for k in state)  # the epoch-2 weights, not the last ones

    # a finished (early-stopped) run is not continued when started again on its checkpoint
    again = run(_scripted_selector([0.0] * 10))
    assert again.history == result.history and again.best_epoch == 2


def test_synthetic_selection_needs_a_selector() -> None:
    config = load_config("tiny", ["train.epochs=2", "train.selection=synthetic"])
    features = _toy_features()
    with pytest.raises(ValueError, match="pseudo-anomaly selector"):
        fit(_model(config, features), features, config.train, _toy_features(4, seed=1), progress=False)


def test_patience_needs_a_selection_signal_and_is_ignored_on_a_fixed_schedule() -> None:
    with pytest.raises(ValueError, match=r"train\.patience"):
        load_config("tiny", ["train.patience=-1"])
    config = load_config("tiny", ["train.epochs=4", "train.patience=1"])  # selection: last
    features = _toy_features()
    result = fit(_model(config, features), features, config.train, progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4] and result.best_epoch == 4
