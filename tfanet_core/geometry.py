"""A product's input geometry: the [H, W] its images are resized to, chosen once from its training images.

Factory cameras are rarely square, and squashing a 2.5:1 part into a square halves a thin crack's height
before the backbone sees it. With ``features.geometry: native`` the product keeps the aspect ratio its
training images share, at the pixel budget of ``features.image_size`` (so it costs what the square costs),
with both sides rounded to a whole number of *units*: the image pixels behind one transformer token
(image/feature ratio × patch size), so the feature map stays a whole token grid.

Images from one camera and fixture share one ratio. Crops of many sizes in both orientations (magnetic
tile: widths/heights from 0.57 to 1.65) have none: any one ratio distorts most of them, so such a product
keeps the square, which distorts both orientations alike. The resolved [H, W] is written into the config
the bundle stores; training, evaluation, the feature cache key, the exported graph and the servers all
read it from there, and a resolved config resolves to itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from statistics import quantiles
from typing import Any

from tfanet_core.config import Config
from tfanet_core.data.manifest import Manifest
from tfanet_core.errors import ConfigError

#: The training images share an aspect ratio when the middle half of their width/height ratios lies within
#: this factor (upper quartile / lower quartile): one camera gives ~1.0, mixed crops far more.
SHARED_ASPECT_SPREAD = 1.25


def aspect_summary(sizes: Iterable[tuple[int, int]]) -> dict[str, Any]:
    """Quartiles of the width/height ratios of ``sizes`` ((width, height) pairs) and whether they share one."""
    ratios = sorted(w / h for w, h in sizes if w > 0 and h > 0)
    if not ratios:
        raise ConfigError("features.geometry=native needs training images to take the aspect ratio from")
    low, mid, high = quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    shared = high / low <= SHARED_ASPECT_SPREAD
    return {"median": mid, "quartiles": [low, high], "shared": shared, "images": len(ratios)}


def native_size(sizes: Iterable[tuple[int, int]], budget: int, unit: int) -> tuple[int, int]:
    """(H, W), multiples of ``unit``, with about ``budget`` pixels: the median width/height ratio of ``sizes``
    ((width, height) pairs) where they share one, else the square."""
    summary = aspect_summary(sizes)
    aspect = summary["median"] if summary["shared"] else 1.0
    # The short side first (at least one unit), then the long side from the budget that is left: an extreme
    # aspect ratio keeps its pixel budget instead of growing past it.
    short = max(unit, round(math.sqrt(budget / max(aspect, 1 / aspect)) / unit) * unit)
    long = max(unit, round(budget / short / unit) * unit)
    return (short, long) if aspect >= 1 else (long, short)


def training_sizes(manifest: Manifest) -> list[tuple[int, int]]:
    """(width, height) of the manifest's training images, as the manifest recorded them."""
    return [(row.width, row.height) for row in manifest.rows if row.split == "train"]


def resolve_geometry(config: Config, manifest: Manifest) -> Config:
    """``config`` with its native geometry decided from the manifest's training images (unchanged otherwise).

    Only an unresolved native config (an int ``image_size``: the budget's side) is resolved, so calling this on
    a bundle's config, or twice, changes nothing.
    """
    f = config.features
    if f.geometry != "native" or not isinstance(f.image_size, int):
        return config
    if not isinstance(f.feature_size, int):
        raise ConfigError("features.geometry=native takes an int image_size and feature_size (a square budget)")
    ratio = f.image_size // f.feature_size
    height, width = native_size(training_sizes(manifest), f.image_size**2, ratio * config.model.patch_size)
    features = dataclasses.replace(f, image_size=[height, width], feature_size=[height // ratio, width // ratio])
    return dataclasses.replace(config, features=features)
