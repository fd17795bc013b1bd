"""Parameter counts and per-image cost of a profile, measured on the built model (not a formula).

The paper counts 173.57 M parameters = backbone up to layer3 + trainable weights without the
cls token; its "89.91 GFLOPs" are multiply-accumulates with the backbone run twice. We report
all three counts and the cost of one image with the template's tokens cached, as served.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from tfanet_core.config import Config
from tfanet_core.features import FeatureExtractor
from tfanet_core.model import TemplateAggregator


def _count_flops(fn: Callable[..., object], *args: object) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    return int(counter.get_total_flops())


@torch.no_grad()
def model_info(config: Config) -> dict[str, Any]:
    """Counts from an architecture-only build: weights do not change sizes or FLOPs."""
    extractor = FeatureExtractor(config.features, load_weights=False)
    model = TemplateAggregator(config.model, extractor.out_channels, config.features.feature_hw).eval()
    backbone = sum(p.numel() for p in extractor.parameters())
    counts = model.parameter_counts()

    image = torch.rand(1, 3, *config.features.image_hw)
    features = extractor(image)
    model.warm_cache()  # template tokens (and bank keys): served models compute them once per bundle
    backbone_flops = _count_flops(extractor, image)
    transformer_flops = _count_flops(model, model.standardize(features))
    total = backbone_flops + transformer_flops
    return {
        "profile": config.profile,
        "backbone": config.features.backbone,
        "feature_shape": [extractor.out_channels, *config.features.feature_hw],
        "tokens": model.num_patches,
        "parameters": {
            "backbone": backbone,
            "trainable": counts["trainable"],
            "paper_count": backbone + counts["trainable"] - counts["cls_token"],
        },
        "cost_per_image": {
            "gflops": total / 1e9,
            "gmacs": total / 2e9,
            "backbone_gflops": backbone_flops / 1e9,
            "transformer_gflops": transformer_flops / 1e9,
        },
    }
