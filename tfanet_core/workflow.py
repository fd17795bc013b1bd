"""The library's recipe for one product: manifest → features → template → fit → calibrate → bundle.

``tfanet train`` runs it whole; the chain's steps (``components/steps.py``) run it piece by piece,
each piece reading what the previous one wrote. Every piece takes a :class:`Manifest`, so the
split is decided once, by ``build_manifest`` (which applies ``data.layouts.split_validation``),
and training, template choice, feature extraction and calibration see exactly its rows. On a
bare folder the manifest is built in memory with the same rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tfanet_core.bundle import Bundle
from tfanet_core.cache import FeatureCache, resolve_cache_dir
from tfanet_core.config import Config
from tfanet_core.data.images import DataError
from tfanet_core.data.manifest import Manifest, build_manifest
from tfanet_core.fader import fit_fader
from tfanet_core.features import FeatureExtractor, extract_features
from tfanet_core.geometry import aspect_summary, resolve_geometry, training_sizes
from tfanet_core.model import TemplateAggregator
from tfanet_core.predictor import Predictor, default_device
from tfanet_core.pseudo_anomalies import separation_selector
from tfanet_core.templates import TemplateChoice, choice_record, read_choice, select_template
from tfanet_core.threshold import Threshold, calibrate_normals
from tfanet_core.training import fit, prepared_model

__all__ = [
    "SplitFeatures",
    "calibrate_bundle",
    "manifest_for",
    "split_features",
    "template_record",
    "train_category",
    "train_manifest",
]


@dataclass
class SplitFeatures:
    """Backbone features of the manifest's train and val images, in manifest order."""

    train_paths: list[Path]
    val_paths: list[Path]
    train: torch.Tensor  # [N_train, C, S, S]
    val: torch.Tensor  # [N_val, C, S, S]


def manifest_for(root: Path | str, category: str, config: Config, progress: bool = True) -> Manifest:
    """The manifest of a bare dataset folder, built in memory with the chain's rules (the config's split)."""
    return build_manifest(root, category, config.train.val_fraction, config.train.seed, progress=progress)


def _cache(cache_dir: Path | str | None) -> FeatureCache | None:
    root = resolve_cache_dir(cache_dir)
    return FeatureCache(root) if root is not None else None


def split_features(
    manifest: Manifest,
    extractor: FeatureExtractor,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    cache_dir: Path | str | None = None,
) -> SplitFeatures:
    """Features of the manifest's train and val rows (through the feature cache unless it is off)."""
    train_paths = [s.path for s in manifest.samples("train")]
    val_paths = [s.path for s in manifest.samples("val")]
    if not train_paths:
        raise DataError(f"{manifest.root}: the manifest has no training images (split 'train')")
    cache = _cache(cache_dir)
    train = extract_features(
        extractor, train_paths, device=device, progress=progress, desc="train features", cache=cache
    )
    val = extract_features(extractor, val_paths, device=device, progress=progress, desc="val features", cache=cache)
    return SplitFeatures(train_paths, val_paths, train, val)


def template_record(
    manifest: Manifest,
    config: Config,
    *,
    cache_dir: Path | str | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    **trials: int,
) -> dict[str, Any]:
    """``tfanet template``: the template choice among the manifest's training images, with its evidence."""
    config = resolve_geometry(config, manifest)
    extractor = FeatureExtractor(config.features)
    features = split_features(manifest, extractor, device=device, progress=progress, cache_dir=cache_dir)
    choice = _choose(features, config, device, progress, _selector(features, extractor, config, device), **trials)
    record = choice_record(choice, features.train_paths, manifest)
    record["n_train"] = len(features.train_paths)
    record["backbone"] = extractor.describe()
    return record


def calibrate_bundle(bundle: Bundle, predictor: Predictor, val_features: torch.Tensor) -> dict[str, Threshold]:
    """Image and pixel thresholds on the held-out normals at the bundle's ``calibration.target_fpr``."""
    if len(val_features) == 0:
        raise DataError(
            "no held-out normal images to calibrate on: the manifest's val split is empty (train.val_fraction > 0)"
        )
    scores, maps = predictor.score_features(val_features)
    bundle.thresholds = calibrate_normals(scores.numpy(), maps.numpy(), bundle.config.calibration.target_fpr)
    return bundle.thresholds


def train_manifest(
    manifest: Manifest,
    config: Config,
    out: Path | str,
    *,
    checkpoint_dir: Path | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    cache_dir: Path | str | None = None,
    template_file: Path | str | None = None,
    calibrate: bool = True,
) -> Bundle:
    """Fit TFA-Net on the manifest's train rows and write the bundle to ``out``.

    ``template_file`` (from ``tfanet template``) fixes the template instead of choosing it here.
    A native geometry (``features.geometry``) is resolved here from the manifest's training images and
    stored, resolved, in the bundle's config. ``calibrate=False`` leaves the thresholds to a later calibration
    step (the chain calibrates once, after evaluation); ``tfanet train`` calibrates here, on the manifest's val rows.
    """
    device = torch.device(device) if device is not None else default_device()
    config = resolve_geometry(config, manifest)
    extractor = FeatureExtractor(config.features)
    features = split_features(manifest, extractor, device=device, progress=progress, cache_dir=cache_dir)
    selector = _selector(features, extractor, config, device)
    choice = _template(features, config, template_file, manifest, device, progress, selector)
    model = prepared_model(config, features.train, choice.indices, nearest=choice.nearest)
    if config.train.selection != "synthetic":
        selector = None
    result = fit(model, features.train, config.train, features.val, checkpoint_dir, device, progress, selector=selector)
    training: dict[str, Any] = {
        "history": result.history,
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 2),
    }
    if config.model.fader:
        training["fader_history"] = fit_fader(result.model, features.train, config, features.val, device, progress)
    bundle = Bundle(
        config=config,
        model=result.model,
        backbone=extractor.describe(),
        template=choice_record(choice, features.train_paths, manifest),
        dataset={
            "root": str(manifest.root),
            "category": manifest.category,
            "version": manifest.version,
            "n_train": len(features.train_paths),
            "n_val": len(features.val_paths),
            "aspect_ratios": aspect_summary(training_sizes(manifest)),  # what features.geometry=native reads
        },
        training=training,
    )
    if calibrate:
        calibrate_bundle(bundle, Predictor(bundle, device=device, extractor=extractor), features.val)
    bundle.save(out)
    return bundle


def _template(
    features: SplitFeatures,
    config: Config,
    template_file: Path | str | None,
    manifest: Manifest,
    device: torch.device,
    progress: bool,
    selector: Selector | None,
) -> TemplateChoice:
    if template_file is not None:
        sha256s = [manifest.row_for(p).sha256 for p in features.train_paths]
        return read_choice(template_file, features.train_paths, sha256s)
    return _choose(features, config, device, progress, selector)


Selector = Callable[[TemplateAggregator], dict[str, float]]


def _selector(
    features: SplitFeatures, extractor: FeatureExtractor, config: Config, device: torch.device | str
) -> Selector | None:
    """The pseudo-anomaly check (synthetic defects on the val normals) where checkpoint or template choice uses it."""
    if config.train.selection != "synthetic" and config.template.strategy != "auto":
        return None
    return separation_selector(extractor, features.val_paths, features.train_paths, features.val, config, device)


def _choose(
    features: SplitFeatures,
    config: Config,
    device: torch.device | str,
    progress: bool,
    selector: Selector | None,
    **trials: int,
) -> TemplateChoice:
    """The configured strategy over the training features (``best_of_k`` trials score on the val features,
    ``auto`` trials on synthetic defects drawn onto them)."""
    return select_template(
        features.train,
        config.template.strategy,
        val_features=features.val,
        config=config,
        device=device,
        progress=progress,
        selector=selector,
        **trials,
    )


def train_category(
    root: Path | str, category: str, config: Config, out: Path | str, *, progress: bool = True, **options: Any
) -> Bundle:
    """``tfanet train`` on a dataset folder: its manifest built in memory, then :func:`train_manifest`."""
    return train_manifest(manifest_for(root, category, config, progress), config, out, progress=progress, **options)
