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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tfanet_core.config import Config, TrainConfig
from tfanet_core.model import TemplateAggregator, patchify
from tfanet_core.scoring import reconstruction_loss

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainResult:
    model: TemplateAggregator
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def build_model(
    config: Config, in_channels: int, seed: int | None = None, templates: int = 1, nearest: int = 1
) -> TemplateAggregator:
    """A freshly initialized TFA-Net, seeded so that the same config always starts from the same weights.

    ``templates`` is the size of its template bank, ``nearest`` how many of them each image blends.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed if seed is None else seed)
        return TemplateAggregator(
            config.model, in_channels, config.features.feature_hw, templates=templates, nearest=nearest
        )


def prepared_model(
    config: Config,
    train_features: torch.Tensor,
    templates: int | list[int],
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    nearest: int = 1,
) -> TemplateAggregator:
    """A fresh TFA-Net ready to fit: standardization statistics (when configured) and template(s) set.

    ``templates`` indexes the training images used as the template (an int) or as the template bank (a list,
    of which each image blends its ``nearest``: ``TemplateChoice.indices`` and ``.nearest``).
    ``stats`` saves recomputing the statistics when many models share one training set (template trials).
    """
    indices = [templates] if isinstance(templates, int) else list(templates)
    model = build_model(config, train_features.shape[1], templates=len(indices), nearest=nearest)
    if config.features.standardize:
        model.set_feature_stats(*(stats if stats is not None else feature_statistics(train_features)))
    model.set_template(train_features[indices])
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
        model.parameters(), lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay
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
        best_epoch = int(history[-1]["epoch"]) if history else 0
    model.eval()
    return TrainResult(model=model, history=history, best_epoch=int(best_epoch), seconds=time.perf_counter() - started)
