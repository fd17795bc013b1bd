"""Choosing the one normal image every input is aggregated onto.

The paper simply takes the first training image. A template far from the typical part (an
odd pose, a lighting outlier) makes every reconstruction harder, so ``medoid`` picks the image
whose features are closest to the mean feature map. The choice and its evidence go into the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STRATEGIES = ("first", "medoid")


@dataclass
class TemplateChoice:
    index: int
    strategy: str
    evidence: dict[str, object] = field(default_factory=dict)


def select_template(features: torch.Tensor, strategy: str) -> TemplateChoice:
    """Index into ``features`` [N, C, S, S] (training images, in manifest order) of the template."""
    if len(features) == 0:
        raise ValueError("no training images to choose a template from")
    if strategy == "first":
        return TemplateChoice(0, strategy, {"reason": "first training image (paper)"})
    if strategy == "medoid":
        return _medoid(features)
    raise ValueError(f"unknown template strategy '{strategy}'; choose one of {STRATEGIES}")


def _medoid(features: torch.Tensor) -> TemplateChoice:
    mean = features.double().mean(dim=0, keepdim=True)
    distances = torch.stack([(f.double() - mean[0]).pow(2).mean() for f in features])
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
