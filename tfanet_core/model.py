"""TFA-Net: template-based feature aggregation (Luo, Yao & Yu, arXiv 2603.22874), spec: docs/architecture.md §Model.

The input's feature tokens and one fixed normal template's tokens are attended jointly (TFAM);
the input half is then dropped and the template half is refined (FDRM) into a reconstruction
of the input's features. A defect has no counterpart in the template, so it cannot be
aggregated onto it and its reconstruction error stays high.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import nn

from tfanet_core.config import ModelConfig
from tfanet_core.fader import FeatureAttenuator


def sincos_pos_embed(dim: int, grid: int | tuple[int, int], cls_row: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding [1, (1+)rows·cols, dim]: half the channels encode rows, half columns.

    ``grid`` is an int (a square) or (rows, cols): a non-square feature map keeps each token's true row and column.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positional embedding needs a dimension divisible by 4, got {dim}")
    n_rows, n_cols = (grid, grid) if isinstance(grid, int) else grid
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(n_rows, dtype=np.float64), np.arange(n_cols, dtype=np.float64), indexing="ij")

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


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify` for a token grid of (rows, cols)."""
    b = tokens.shape[0]
    rows, cols = grid
    x = tokens.reshape(b, rows, cols, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, rows * patch, cols * patch)


def drop_random_tokens(tokens: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Keep a random subset of (1 − ratio) tokens per sample; positions are already embedded."""
    b, n, d = tokens.shape
    keep = max(1, round(n * (1.0 - ratio)))
    noise = torch.rand(b, n, generator=generator, device="cpu").to(tokens.device)
    index = noise.argsort(dim=1)[:, :keep]
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, d))


def block_at(block: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``block(x)[:, rows]`` without computing the other rows: every token of ``x`` is a key and a value, only
    the tokens at ``rows`` (row indices) are queries and go through the projection and the MLP.

    TFAM's last block feeds only its cls and template rows on (the input half is dropped), so its input rows'
    attention, projection and MLP would be computed to be thrown away: ~40 % of the last block, 3 % of a
    ``cpu`` image, in training and inference alike. A pre-norm block is row-wise everywhere but in the
    attention, hence the same numbers as the whole block at those rows. The block's modules are called as
    they are (never their weights read), so a quantized copy of it (``quantize_linear_int8``) runs the same way.
    """
    vit = cast(Block, block)
    attn = cast(Attention, vit.attn)
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError("block_at covers timm's plain pre-norm Block, not a gated attention")
    b, n, dim = x.shape
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    q, k, v = attn.qkv(vit.norm1(x)).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q[:, :, rows]), attn.k_norm(k)
    dropout = float(cast(nn.Dropout, attn.attn_drop).p) if vit.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout).transpose(1, 2).reshape(b, len(rows), dim)
    kept = x[:, rows] + vit.drop_path1(vit.ls1(attn.proj_drop(attn.proj(attn.norm(out)))))
    return kept + vit.drop_path2(vit.ls2(vit.mlp(vit.norm2(kept))))


#: Side of the pooled feature grid a template bank is searched on: coarse enough to ignore small defects and
#: noise, fine enough to tell poses and part variants apart (a 4×4 layout of the part).
KEY_GRID = 4
#: A bank entry within this relative squared distance of an input is the input itself (or a byte-identical
#: copy, up to the feature cache's float16 rounding): training never reconstructs an image from itself.
SELF_TOLERANCE = 1e-4


def template_keys(standardized: torch.Tensor) -> torch.Tensor:
    """Search keys [N, C·16] of standardized features [N, C, h, w]: average-pooled to KEY_GRID × KEY_GRID.

    What the bank is chosen on (templates.k_center_bank) and searched with (nearest_templates).
    """
    return F.adaptive_avg_pool2d(standardized, KEY_GRID).flatten(1)


class TemplateAggregator(nn.Module):
    """TFA-Net on backbone features: [B, C, h, w] → reconstruction tokens [B, (h/K)(w/K), K²·C].

    The template bank's features [T, C, h, w] and the per-channel standardization statistics are
    persistent buffers, so they travel in the state dict with the weights (the bundle needs nothing
    else). T = 1 is the paper's single fixed template. With T > 1 each input is aggregated onto the
    mean of its ``nearest`` bank entries, found by :meth:`nearest_templates`.
    """

    # Buffers registered in __init__, declared here so type checkers see Tensors (not Tensor | Module).
    pos_embed: torch.Tensor
    decoder_pos_embed: torch.Tensor
    template: torch.Tensor
    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(
        self,
        config: ModelConfig,
        in_channels: int,
        feature_size: int | tuple[int, int] | list[int],
        templates: int = 1,
        nearest: int = 1,
    ) -> None:
        super().__init__()
        rows, cols = (feature_size, feature_size) if isinstance(feature_size, int) else feature_size
        if rows % config.patch_size or cols % config.patch_size:
            raise ValueError(f"feature size {feature_size} is not a multiple of patch size {config.patch_size}")
        if templates < 1 or not 1 <= nearest <= templates:
            raise ValueError(f"a template bank needs 1 <= nearest ({nearest}) <= templates ({templates})")
        self.config = config
        self.in_channels = in_channels
        self.feature_size = (int(rows), int(cols))
        self.grid = (rows // config.patch_size, cols // config.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.nearest = nearest
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

        self.register_buffer("template", torch.zeros(templates, in_channels, rows, cols))
        self.register_buffer("feature_mean", torch.zeros(in_channels))
        self.register_buffer("feature_std", torch.ones(in_channels))
        self._cache: dict[str, torch.Tensor] = {}  # template-derived tensors, reused in inference
        self._init_weights()
        # Built last, so the TFA-Net weights are initialized identically with FADeR on and off.
        self.fader = (
            FeatureAttenuator(d, config.fader_hidden, config.fader_threshold, config.fader_temperature)
            if config.fader
            else None
        )

    @property
    def templates(self) -> int:
        """Size of the template bank (1: the paper's single template)."""
        return int(self.template.shape[0])

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
        """Store the template bank's raw backbone features [T, C, h, w] ([C, h, w] for one; computed once)."""
        self.template.copy_(features.reshape(self.template.shape))
        self._cache.clear()

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel standardization from training images, so MSE and cosine terms are balanced."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))
        self._cache.clear()

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean.view(1, -1, 1, 1)) / self.feature_std.view(1, -1, 1, 1)

    def train(self, mode: bool = True) -> TemplateAggregator:
        self._cache.clear()
        return super().train(mode)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()
        key = prefix + "template"
        if key in state_dict and state_dict[key].dim() == 3:  # bundles before template banks: one [C, S, S]
            state_dict[key] = state_dict[key].unsqueeze(0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- forward -------------------------------------------------------------------------------------

    def content_tokens(self, standardized: torch.Tensor) -> torch.Tensor:
        """Patch-embedded tokens [B, L, D] before positions are added: what FADeR reads and attenuates."""
        return self.patch_embed(standardized).flatten(2).transpose(1, 2)

    def _embed(self, standardized: torch.Tensor) -> torch.Tensor:
        return self.content_tokens(standardized) + self.pos_embed[:, 1:]

    def _cacheable(self) -> bool:
        """Inference: weights, template and statistics cannot change, so what is derived from them is kept."""
        return not self.training and not torch.is_grad_enabled()

    def _inference_cached(self, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, kept in inference (:meth:`_cacheable`).

        Cleared whenever any input of it can change: set_template, set_feature_stats, train(), load_state_dict.
        """
        hit = self._cache.get(name)
        if self._cacheable() and hit is not None and hit.device == self.template.device:
            return hit
        value = compute()
        if self._cacheable():
            self._cache[name] = value
        return value

    def template_tokens(self) -> torch.Tensor:
        """Embedded tokens [T, L, D] of every bank entry; cached in inference."""
        return self._inference_cached("tokens", lambda: self._embed(self.standardize(self.template)))

    def bank_keys(self) -> torch.Tensor:
        """The bank's search keys [T, C·16] (:func:`template_keys`); cached in inference (standardizing and
        pooling a bank of 64 costs ~30 ms, about a tenth of a batch of 8 on 2 CPU cores)."""
        return self._inference_cached("keys", lambda: template_keys(self.standardize(self.template)))

    def warm_cache(self) -> None:
        """Compute what inference reuses now: a served model does it once per load, an export folds it in."""
        with torch.inference_mode():
            self.template_tokens()
            if self.templates > 1:
                self.bank_keys()

    def nearest_templates(self, standardized: torch.Tensor) -> torch.Tensor:
        """Bank indices [B, nearest] each input is aggregated onto, nearest first.

        "Nearest" is the mean squared difference of the standardized features average-pooled to a
        KEY_GRID × KEY_GRID layout (C·16 numbers per image: about T·C·16 multiply-adds per image, nothing
        next to the backbone). An entry that *is* the input (relative distance ≤ SELF_TOLERANCE) is skipped
        whenever the bank has more entries than ``nearest``, so no training image is reconstructed from itself.
        """
        b = standardized.shape[0]
        if self.templates == 1:
            return torch.zeros(b, 1, dtype=torch.long, device=standardized.device)
        keys, bank = template_keys(standardized), self.bank_keys()
        distance = (keys.unsqueeze(1) - bank.unsqueeze(0)).pow(2).mean(dim=-1)  # [B, T]
        if self.templates > self.nearest:
            itself = distance <= SELF_TOLERANCE * keys.pow(2).mean(dim=-1, keepdim=True)
            distance = distance.masked_fill(itself, float("inf"))
        return distance.topk(self.nearest, dim=1, largest=False).indices

    def _bank_tokens(self, index: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L, D] of the mean of each input's chosen bank entries.

        The embedding (standardization, patch projection, positions) is affine, so the tokens of the mean
        are the mean of the tokens. Inference averages the cached tokens of the chosen entries (L·D numbers
        each, 1/12 of an entry's features in the ``cpu`` profile): gathering 8 raw feature maps per image
        cost a tenth of an OpenVINO batch. Training embeds the blend instead: embedding all T entries
        every step would cost T embeddings where the blend costs one per image.
        """
        if self.templates == 1:
            return self.template_tokens().expand(index.shape[0], -1, -1)
        if self._cacheable():
            return self.template_tokens()[index].mean(dim=1)
        return self._embed(self.standardize(self.template[index].mean(dim=1)))

    def forward(
        self,
        standardized: torch.Tensor,
        generator: torch.Generator | None = None,
        templates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Standardized input features [B, C, h, w] → predicted tokens [B, L, K²·C] (standardized space).

        ``templates`` ([B, nearest] bank indices) defaults to :meth:`nearest_templates` of the input.
        """
        b = standardized.shape[0]
        if templates is None:
            templates = self.nearest_templates(standardized)
        content = self.content_tokens(standardized)
        if self.fader is not None and self.fader.is_fitted:
            content = content * self.fader.mask(content).unsqueeze(-1)
        inputs = content + self.pos_embed[:, 1:]
        if self.training and self.config.mask_ratio > 0:
            inputs = drop_random_tokens(inputs, self.config.mask_ratio, generator)
        template = self._bank_tokens(templates)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)

        x = torch.cat([cls, inputs, template], dim=1)
        for block in self.tfam[:-1]:
            x = block(x)
        n = x.shape[1]  # [cls + template half] go on
        kept = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(n - self.num_patches, n)]).to(x.device)
        x = self.tfam_norm(block_at(self.tfam[-1], x, kept))

        x = self.decoder_embed(x) + self.decoder_pos_embed
        for block in self.fdrm:
            x = block(x)
        x = self.head(self.fdrm_norm(x))
        return x[:, 1:]

    def aggregate(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw features → (standardized target, standardized reconstruction, bank indices used [B, nearest])."""
        target = self.standardize(features)
        templates = self.nearest_templates(target)
        predicted = unpatchify(self(target, templates=templates), self.config.patch_size, self.in_channels, self.grid)
        return target, predicted, templates

    def reconstruct(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw features → (standardized target, standardized reconstruction), both [B, C, h, w]."""
        target, predicted, _ = self.aggregate(features)
        return target, predicted

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "cls_token": self.cls_token.numel()}
