"""TFA-Net: template-based feature aggregation (Luo, Yao & Yu, arXiv 2603.22874), spec: docs/architecture.md §Model.

The input's feature tokens and one fixed normal template's tokens are attended jointly (TFAM);
the input half is then dropped and the template half is refined (FDRM) into a reconstruction
of the input's features. A defect has no counterpart in the template, so it cannot be
aggregated onto it and its reconstruction error stays high.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from tfanet_core.config import ModelConfig
from tfanet_core.fader import FeatureAttenuator


def sincos_pos_embed(dim: int, grid: int, cls_row: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding [1, (1+)grid², dim]: half the channels encode rows, half columns."""
    if dim % 4:
        raise ValueError(f"sin-cos positional embedding needs a dimension divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    # Width (column) first then height, as MAE does, so tokens are laid out row-major.
    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    if cls_row:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


def patchify(features: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/p)(W/p), p·p·C] with each token laid out (p, q, c), channel fastest."""
    b, c, h, w = features.shape
    x = features.reshape(b, c, h // patch, patch, w // patch, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, n, _ = tokens.shape
    grid = round(n**0.5)
    x = tokens.reshape(b, grid, grid, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, grid * patch, grid * patch)


def drop_random_tokens(tokens: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Keep a random subset of (1 − ratio) tokens per sample; positions are already embedded."""
    b, n, d = tokens.shape
    keep = max(1, round(n * (1.0 - ratio)))
    noise = torch.rand(b, n, generator=generator, device="cpu").to(tokens.device)
    index = noise.argsort(dim=1)[:, :keep]
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, d))


class TemplateAggregator(nn.Module):
    """TFA-Net on backbone features: [B, C, S, S] → reconstruction tokens [B, (S/K)², K²·C].

    The template's features and the per-channel standardization statistics are persistent
    buffers, so they travel in the state dict with the weights (the bundle needs nothing else).
    """

    # Buffers registered in __init__, declared here so type checkers see Tensors (not Tensor | Module).
    pos_embed: torch.Tensor
    decoder_pos_embed: torch.Tensor
    template: torch.Tensor
    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(self, config: ModelConfig, in_channels: int, feature_size: int) -> None:
        super().__init__()
        if feature_size % config.patch_size:
            raise ValueError(f"feature size {feature_size} is not a multiple of patch size {config.patch_size}")
        self.config = config
        self.in_channels = in_channels
        self.feature_size = feature_size
        self.grid = feature_size // config.patch_size
        self.num_patches = self.grid**2
        k, d, dd = config.patch_size, config.embed_dim, config.decoder_dim
        norm = partial(nn.LayerNorm, eps=1e-6)
        block_norm = cast(type[nn.Module], norm)  # timm annotates norm_layer as a class; any factory works

        self.patch_embed = nn.Conv2d(in_channels, d, kernel_size=k, stride=k, bias=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sincos_pos_embed(d, self.grid), persistent=False)
        self.tfam = nn.ModuleList(
            Block(d, config.tfam_heads, config.mlp_ratio, qkv_bias=True, norm_layer=block_norm)
            for _ in range(config.tfam_depth)
        )
        self.tfam_norm = norm(d)
        self.decoder_embed = nn.Linear(d, dd, bias=True)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dd, self.grid), persistent=False)
        self.fdrm = nn.ModuleList(
            Block(dd, config.fdrm_heads, config.mlp_ratio, qkv_bias=True, norm_layer=block_norm)
            for _ in range(config.fdrm_depth)
        )
        self.fdrm_norm = norm(dd)
        self.head = nn.Linear(dd, k * k * in_channels, bias=True)

        self.register_buffer("template", torch.zeros(in_channels, feature_size, feature_size))
        self.register_buffer("feature_mean", torch.zeros(in_channels))
        self.register_buffer("feature_std", torch.ones(in_channels))
        self._template_cache: torch.Tensor | None = None
        self._init_weights()
        # Built last, so the TFA-Net weights are initialized identically with FADeR on and off.
        self.fader = (
            FeatureAttenuator(d, config.fader_hidden, config.fader_threshold, config.fader_temperature)
            if config.fader
            else None
        )

    def _init_weights(self) -> None:
        # MAE-style: xavier on linear layers and the (flattened) patch projection, small normal cls token.
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(cast(torch.Tensor, self.patch_embed.bias))  # built with bias=True
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # --- state that travels with the weights -------------------------------------------------------

    def set_template(self, features: torch.Tensor) -> None:
        """Store the template's raw backbone features [C, S, S] (computed once, never per call)."""
        self.template.copy_(features.reshape(self.template.shape))
        self._template_cache = None

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel standardization from training images, so MSE and cosine terms are balanced."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))
        self._template_cache = None

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean.view(1, -1, 1, 1)) / self.feature_std.view(1, -1, 1, 1)

    def train(self, mode: bool = True) -> TemplateAggregator:
        self._template_cache = None
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._template_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    # --- forward -------------------------------------------------------------------------------------

    def content_tokens(self, standardized: torch.Tensor) -> torch.Tensor:
        """Patch-embedded tokens [B, L, D] before positions are added: what FADeR reads and attenuates."""
        return self.patch_embed(standardized).flatten(2).transpose(1, 2)

    def _embed(self, standardized: torch.Tensor) -> torch.Tensor:
        return self.content_tokens(standardized) + self.pos_embed[:, 1:]

    def template_tokens(self) -> torch.Tensor:
        """Embedded template tokens [1, L, D]; cached in inference, where weights cannot change."""
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable and self._template_cache is not None and self._template_cache.device == self.template.device:
            return self._template_cache
        tokens = self._embed(self.standardize(self.template.unsqueeze(0)))
        if cacheable:
            self._template_cache = tokens
        return tokens

    def forward(self, standardized: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standardized input features [B, C, S, S] → predicted tokens [B, L, K²·C] (standardized space)."""
        b = standardized.shape[0]
        content = self.content_tokens(standardized)
        if self.fader is not None and self.fader.is_fitted:
            content = content * self.fader.mask(content).unsqueeze(-1)
        inputs = content + self.pos_embed[:, 1:]
        if self.training and self.config.mask_ratio > 0:
            inputs = drop_random_tokens(inputs, self.config.mask_ratio, generator)
        template = self.template_tokens().expand(b, -1, -1)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)

        x = torch.cat([cls, inputs, template], dim=1)
        for block in self.tfam:
            x = block(x)
        x = self.tfam_norm(x)

        x = torch.cat([x[:, :1], x[:, -self.num_patches :]], dim=1)  # [cls + template half]
        x = self.decoder_embed(x) + self.decoder_pos_embed
        for block in self.fdrm:
            x = block(x)
        x = self.head(self.fdrm_norm(x))
        return x[:, 1:]

    def reconstruct(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw features → (standardized target, standardized reconstruction), both [B, C, S, S]."""
        target = self.standardize(features)
        predicted = unpatchify(self(target), self.config.patch_size, self.in_channels)
        return target, predicted

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "cls_token": self.cls_token.numel()}
