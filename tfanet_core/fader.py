"""FADeR (feature attenuation of defective representation, Park et al., arXiv 2407.04597) as a TFA-Net plug-in.

A two-layer MLP learns, without labels, which input tokens the frozen TFA-Net reconstructs badly, and a
per-image mask turns their content down before TFAM, so the model has less of a defect to copy into its
reconstruction. The formulation (input, target, ranking loss, schedule, mask): docs/architecture.md §FADeR.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from tfanet_core.config import Config
    from tfanet_core.model import TemplateAggregator

# float32 sigmoid rounds to exactly 0 or 1 beyond |x| ≈ 17; ±15 keeps the mask strictly inside (0, 1).
LOGIT_LIMIT = 15.0


def margin_ranking_loss(pred: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over pairs (i, j) of max(0, −sign(l_i − l_j)·(l̂_i − l̂_j) + ξ).

    ``pred`` (l̂) and ``target`` (l) are [..., 2n]; token k of the first half is paired with token
    n + k of the second (shuffle beforehand for random pairs). Pairs with tied targets carry no
    order and are left out of the mean; with no untied pair the loss is 0.
    """
    if pred.shape != target.shape or pred.shape[-1] % 2:
        raise ValueError(f"pred and target need the same shape with an even last dimension, got {pred.shape}")
    n = pred.shape[-1] // 2
    sign = torch.sign(target[..., :n] - target[..., n:])
    hinge = torch.clamp(-sign * (pred[..., :n] - pred[..., n:]) + margin, min=0.0)
    untied = sign != 0
    return (hinge * untied).sum() / untied.sum().clamp_min(1)


def token_errors(target: torch.Tensor, predicted: torch.Tensor, patch: int, cos_weight: float) -> torch.Tensor:
    """Per-token reconstruction error [B, L] from maps [B, C, S, S]: the training loss's terms per token.

    ``unfold`` orders each token's values differently from ``patchify`` but in the same token order;
    the squared error and the cosine do not depend on the order of a token's values.
    """
    t = F.unfold(target.float(), kernel_size=patch, stride=patch).transpose(1, 2)
    p = F.unfold(predicted.float(), kernel_size=patch, stride=patch).transpose(1, 2)
    return (p - t).pow(2).mean(dim=-1) + cos_weight * (1.0 - F.cosine_similarity(p, t, dim=-1))


class FeatureAttenuator(nn.Module):
    """Two-layer MLP: content token [.., D] → predicted error rank score; and the soft mask built from it.

    ``scale`` and ``fitted`` are persistent buffers so a bundle carries them with the weights; an
    unfitted attenuator leaves the model untouched (TFA-Net trains without it).
    """

    scale: torch.Tensor  # buffers registered in __init__, declared so type checkers see Tensors
    fitted: torch.Tensor

    def __init__(self, dim: int, hidden: int, threshold: float, temperature: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.threshold = threshold
        self.temperature = temperature
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def forward(self, content: torch.Tensor) -> torch.Tensor:
        """Content tokens [B, L, D] → scores [B, L]; higher = the TFA-Net is expected to reconstruct it worse."""
        return self.mlp(content).squeeze(-1)

    def deviation(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores relative to the image's median token: the per-image part of the normalization."""
        return scores - scores.median(dim=-1, keepdim=True).values

    def mask(self, content: torch.Tensor) -> torch.Tensor:
        """Soft mask [B, L] strictly inside (0, 1): ≈ 1 on ordinary tokens, → 0 on likely-defective ones."""
        z = self.deviation(self(content)) / self.scale
        logits = ((self.threshold - z) / self.temperature).clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
        return torch.sigmoid(logits)


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * epoch + 1)


@torch.no_grad()
def _content_and_errors(
    model: TemplateAggregator, features: torch.Tensor, cos_weight: float, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Content tokens [N, L, D] and the unattenuated TFA-Net's per-token errors [N, L], on the CPU."""
    contents, errors = [], []
    for start in range(0, len(features), batch_size):
        batch = features[start : start + batch_size].to(device)
        target, predicted = model.reconstruct(batch)
        contents.append(model.content_tokens(target).float().cpu())
        errors.append(token_errors(target, predicted, model.config.patch_size, cos_weight).cpu())
    return torch.cat(contents), torch.cat(errors)


@torch.no_grad()
def _robust_scale(attenuator: FeatureAttenuator, content: torch.Tensor) -> float:
    """1.4826 · median |deviation| over normal tokens (the std for Gaussian deviations, blind to the tail)."""
    deviation = torch.cat([attenuator.deviation(attenuator(c.unsqueeze(0))).flatten() for c in content])
    return max(1.4826 * float(deviation.abs().median()), 1e-6)


def fit_fader(
    model: TemplateAggregator,
    train_features: torch.Tensor,
    config: Config,
    val_features: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train the model's FADeR MLP in place on raw features [N, C, S, S], the TFA-Net frozen; returns the history.

    Seeded by ``train.seed``: the same model and features give the same MLP bit for bit. The mask's
    scale is measured on ``val_features`` (held-out normal images) when there are any, else on the
    training images.
    """
    attenuator = model.fader
    if attenuator is None:
        raise ValueError("this model was built without FADeR; build it with model.fader=true to fit one")
    m, t = config.model, config.train
    device = torch.device(device)
    model.to(device).eval()
    attenuator.fitted.fill_(False)  # targets are the errors of TFA-Net without attenuation
    content, errors = _content_and_errors(model, train_features, t.cos_weight, t.batch_size, device)
    parameters = list(attenuator.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    n, tokens = errors.shape
    half = tokens // 2
    history: list[dict[str, float]] = []
    attenuator.train()
    for epoch in tqdm(range(1, m.fader_epochs + 1), desc="fader", unit="epoch", disable=not progress):
        generator = _generator(t.seed, epoch)
        order = torch.randperm(n, generator=generator)
        running, seen = 0.0, 0
        for start in range(0, n, t.batch_size):
            index = order[start : start + t.batch_size]
            # a fresh random pairing of each image's tokens: first half against second half
            pairs = torch.rand(len(index), tokens, generator=generator).argsort(dim=1)[:, : 2 * half]
            scores = attenuator(content[index].to(device))
            pred = torch.gather(scores, 1, pairs.to(device))
            target = torch.gather(errors[index], 1, pairs).to(device)
            loss = margin_ranking_loss(pred, target, m.fader_margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(index)
            seen += len(index)
        history.append({"epoch": epoch, "ranking_loss": running / seen})
    attenuator.eval()
    if val_features is not None and len(val_features):
        calibration, _ = _content_and_errors(model, val_features, t.cos_weight, t.batch_size, device)
    else:
        calibration = content
    attenuator.scale.fill_(_robust_scale(attenuator, calibration.to(device)))
    attenuator.fitted.fill_(True)
    for p in parameters:
        p.grad = None
    return history
