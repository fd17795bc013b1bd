"""The training loop: AdamW on cached (frozen-backbone) features, resumable bit for bit.

Every source of randomness is derived from (seed, epoch) — the shuffle and the token masking —
so a run resumed from a checkpoint takes exactly the same steps as one that was never
interrupted; the checkpoint only needs the weights, the optimizer state and the history.
Checkpoints are chosen on the validation loss of held-out *normal* images or by a fixed
schedule, never on test labels (the reference code's leak).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tfanet_core.bundle import Bundle
from tfanet_core.cache import FeatureCache, resolve_cache_dir
from tfanet_core.config import Config, TrainConfig
from tfanet_core.data.images import DataError
from tfanet_core.data.layouts import discover, split_validation
from tfanet_core.fader import fit_fader
from tfanet_core.features import FeatureExtractor, extract_features, sha256_file
from tfanet_core.model import TemplateAggregator, patchify
from tfanet_core.predictor import Predictor, default_device
from tfanet_core.pseudo_anomalies import separation_selector
from tfanet_core.scoring import reconstruction_loss
from tfanet_core.templates import read_choice, select_template
from tfanet_core.threshold import calibrate, calibrate_pixels

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainResult:
    model: TemplateAggregator
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def build_model(config: Config, in_channels: int, seed: int | None = None) -> TemplateAggregator:
    """A freshly initialized TFA-Net, seeded so that the same config always starts from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed if seed is None else seed)
        return TemplateAggregator(config.model, in_channels, config.features.feature_size)


def prepared_model(
    config: Config,
    train_features: torch.Tensor,
    template_index: int,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TemplateAggregator:
    """A fresh TFA-Net ready to fit: standardization statistics (when configured) and template set.

    ``stats`` saves recomputing the statistics when many models share one training set (template trials).
    """
    model = build_model(config, train_features.shape[1])
    if config.features.standardize:
        model.set_feature_stats(*(stats if stats is not None else feature_statistics(train_features)))
    model.set_template(train_features[template_index])
    return model


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over training images and positions (for ``features.standardize``)."""
    flat = features.transpose(0, 1).reshape(features.shape[1], -1).double()
    return flat.mean(dim=1).float(), flat.std(dim=1).float()


def selection_score(record: dict[str, float], selection: str) -> float | None:
    """The number a checkpoint is chosen by (higher is better); None for a fixed schedule."""
    if selection == "val_loss":
        return -record["val_loss"]
    if selection == "synthetic":
        return record["synthetic_pixel_auroc"]
    return None


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_loss(model: TemplateAggregator, features: torch.Tensor, config: TrainConfig, generator=None) -> torch.Tensor:
    target = model.standardize(features)
    predicted = model(target, generator=generator)
    return reconstruction_loss(predicted.float(), patchify(target, model.config.patch_size), config.cos_weight)


@torch.no_grad()
def evaluate_loss(
    model: TemplateAggregator, features: torch.Tensor, config: TrainConfig, device: torch.device
) -> float:
    """Mean loss over images (weighted by batch size), in eval mode."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(features), config.batch_size):
        batch = features[start : start + config.batch_size].to(device)
        with _autocast(device):
            total += batch_loss(model, batch, config).item() * len(batch)
    model.train(was_training)
    return total / max(1, len(features))


def _fingerprint(model: TemplateAggregator, config: TrainConfig, n_train: int) -> str:
    """Identifies the run a checkpoint belongs to: never resume someone else's training."""
    payload = json.dumps({"train": config.__dict__, "model": model.config.__dict__, "n": n_train}, sort_keys=True)
    digest = hashlib.sha256(payload.encode())
    digest.update(model.template.cpu().numpy().tobytes())
    return digest.hexdigest()


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the old checkpoint intact


def fit(
    model: TemplateAggregator,
    train_features: torch.Tensor,
    config: TrainConfig,
    val_features: torch.Tensor | None = None,
    checkpoint_dir: Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    stop_after_epoch: int | None = None,
    selector: Callable[[TemplateAggregator], dict[str, float]] | None = None,
) -> TrainResult:
    """Train ``model`` in place on raw features [N, C, S, S]; resumes from ``checkpoint_dir`` if it holds this run.

    ``selector`` (``train.selection=synthetic``) returns the pseudo-anomaly separation of the model
    after each epoch, see tfanet_core/pseudo_anomalies.py. ``stop_after_epoch`` ends the run early as
    a kill would, after that epoch and without saving anything extra: resumption then restarts from
    the last periodic checkpoint.
    """
    device = torch.device(device)
    model.to(device)
    if config.selection == "val_loss" and (val_features is None or len(val_features) == 0):
        raise ValueError("train.selection=val_loss needs held-out normal images (train.val_fraction > 0)")
    if config.selection == "synthetic" and selector is None:
        raise ValueError("train.selection=synthetic needs a pseudo-anomaly selector (pseudo_anomalies.py)")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay
    )
    fingerprint = _fingerprint(model, config, len(train_features))
    history: list[dict[str, float]] = []
    best_score, best_epoch, best_state = float("-inf"), 0, None
    start_epoch, stopped = 1, False
    checkpoint = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir else None
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["fingerprint"] == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            history = [dict(h) for h in state["history"]]
            best_score, best_epoch, best_state = state["best_score"], state["best_epoch"], state["best_state"]
            start_epoch, stopped = state["epoch"] + 1, state["stopped"]

    started = time.perf_counter()
    epochs = tqdm(
        range(start_epoch, 0 if stopped else config.epochs + 1),
        desc="train",
        unit="epoch",
        disable=not progress,
        initial=start_epoch - 1,
        total=config.epochs,
    )
    for epoch in epochs:
        model.train()
        generator = _epoch_generator(config.seed, epoch)
        order = torch.randperm(len(train_features), generator=generator)
        running, seen = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch = train_features[order[start : start + config.batch_size]].to(device)
            with _autocast(device):
                loss = batch_loss(model, batch, config, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(batch)
            seen += len(batch)
        record = {"epoch": epoch, "train_loss": running / seen}
        if val_features is not None and len(val_features):
            record["val_loss"] = evaluate_loss(model, val_features, config, device)
        if selector is not None:
            record.update(selector(model))
        history.append(record)
        epochs.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "epoch"})

        score = selection_score(record, config.selection)
        if score is not None and score > best_score:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stopped = score is not None and bool(config.patience) and epoch - best_epoch >= config.patience
        last = epoch == config.epochs or stopped
        if checkpoint is not None and (epoch % config.checkpoint_every == 0 or last):
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            _atomic_save(
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                    "stopped": stopped,
                },
                checkpoint,
            )
        if stopped or (stop_after_epoch is not None and epoch >= stop_after_epoch):
            break

    if config.selection != "last" and best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = history[-1]["epoch"] if history else 0
    model.eval()
    return TrainResult(model=model, history=history, best_epoch=int(best_epoch), seconds=time.perf_counter() - started)


def train_category(
    root: Path | str,
    category: str,
    config: Config,
    out: Path | str,
    *,
    checkpoint_dir: Path | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    dataset_version: str | None = None,
    cache_dir: Path | str | None = None,
    template_file: Path | str | None = None,
) -> Bundle:
    """Everything ``tfanet train`` does: data → features → template → fit → calibrate → bundle.

    Features go through the feature cache at ``cache_dir`` (default ``$TFANET_CACHE_DIR`` or
    ``~/.cache/tfanet/features``; ``"off"`` disables it). ``template_file`` (from ``tfanet template``)
    fixes the template instead of selecting it here.
    """
    device = torch.device(device) if device is not None else default_device()
    samples = split_validation(discover(root, category), config.train.val_fraction, config.train.seed)
    train = [s for s in samples if s.split == "train"]
    val = [s for s in samples if s.split == "val"]
    if not train:
        raise DataError(f"{Path(root) / category}: no training images left after the validation split")

    extractor = FeatureExtractor(config.features)
    cache_root = resolve_cache_dir(cache_dir)
    cache = FeatureCache(cache_root) if cache_root is not None else None
    train_features = extract_features(
        extractor, [s.path for s in train], device=device, progress=progress, desc="train features", cache=cache
    )
    val_features = extract_features(
        extractor, [s.path for s in val], device=device, progress=progress, desc="val features", cache=cache
    )

    if template_file is not None:
        choice = read_choice(template_file, [s.path for s in train], [sha256_file(s.path) for s in train])
    else:
        choice = select_template(
            train_features,
            config.template.strategy,
            val_features=val_features,
            config=config,
            device=device,
            progress=progress,
        )
    model = prepared_model(config, train_features, choice.index)
    selector = None
    if config.train.selection == "synthetic":
        selector = separation_selector(
            extractor, [s.path for s in val], [s.path for s in train], val_features, config, device
        )
    result = fit(model, train_features, config.train, val_features, checkpoint_dir, device, progress, selector=selector)
    fader_history = (
        fit_fader(result.model, train_features, config, val_features, device, progress) if config.model.fader else None
    )

    template_path = train[choice.index].path
    bundle = Bundle(
        config=config,
        model=result.model,
        backbone=extractor.describe(),
        template={
            "image": str(Path(template_path).relative_to(root))
            if Path(template_path).is_relative_to(root)
            else str(template_path),
            "sha256": sha256_file(template_path),
            "strategy": choice.strategy,
            "evidence": choice.evidence,
        },
        dataset={
            "root": str(root),
            "category": category,
            "version": dataset_version,
            "n_train": len(train),
            "n_val": len(val),
        },
        training={
            "history": result.history,
            "best_epoch": result.best_epoch,
            "seconds": round(result.seconds, 2),
            **({"fader_history": fader_history} if fader_history is not None else {}),
        },
    )
    predictor = Predictor(bundle, device=device, extractor=extractor)
    bundle.thresholds = calibrate_on_normals(predictor, val_features, config.calibration.target_fpr)
    bundle.save(out)
    return bundle


def calibrate_on_normals(predictor: Predictor, val_features: torch.Tensor, target_fpr: float) -> dict[str, dict]:
    """Image and pixel thresholds from held-out normal images at the target false-positive rate."""
    if len(val_features) == 0:
        warnings.warn(
            "no validation images: the bundle has no calibrated threshold (set train.val_fraction > 0)",
            stacklevel=2,
        )
        return {}
    scores, maps = predictor.score_features(val_features)
    return {
        "image": calibrate(scores.numpy(), target_fpr=target_fpr).to_dict(),
        "pixel": calibrate_pixels(maps.numpy(), target_fpr=target_fpr).to_dict(),
    }
