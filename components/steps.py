"""The pipeline steps: prepare → validate → features → template → train → evaluate → calibrate → register.

Each step is a plain function of paths and params (a product's section of ``params.yaml``), so
the DVC stages (``tfanet stage <step>``, see :mod:`components.cli`) and the kfp components call
the same code. Each one is thin: it resolves the product's config, calls ``tfanet_core`` and
writes its outputs; only :func:`register` talks to MLflow. The deploy stage that follows
(:mod:`components.deploy`, ``tfanet deploy run``) serves the registry's champion on TorchServe.

Layout of one product's outputs (``RUNS/<product>/``, what ``dvc.yaml`` declares)::

    manifest.csv  dataset.json        prepare   (dataset.json: manifest version = the dataset version)
    validation/                       validate  (Data Docs + validation.json)
    features/                         features  (the feature cache of the train/val images)
    template.json                     template
    model/  checkpoints/  history.json  train   (checkpoints persist, so a killed train resumes)
    metrics.json  plots/  overlays/   evaluate
    bundle/  calibration.json         calibrate (the bundle that is registered and served)
    registry.json                     register
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from components.params import ProductSettings
from tfanet_core.data.images import DataError, is_image_file, open_image
from tfanet_core.data.layouts import GOOD, Sample, split_validation
from tfanet_core.data.manifest import Manifest, ManifestRow, build_manifest
from tfanet_core.errors import TfanetError

__all__ = [
    "ProductPaths",
    "calibrate",
    "evaluate",
    "features",
    "prepare",
    "prepared_manifest",
    "register",
    "template",
    "train",
    "validate",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProductPaths:
    """Where one product's step outputs live; dvc.yaml declares exactly these paths."""

    root: Path

    @classmethod
    def of(cls, runs: Path | str, product: str) -> ProductPaths:
        return cls(Path(runs) / product)

    manifest = property(lambda self: self.root / "manifest.csv")
    dataset = property(lambda self: self.root / "dataset.json")
    validation = property(lambda self: self.root / "validation")
    features = property(lambda self: self.root / "features")
    template = property(lambda self: self.root / "template.json")
    model = property(lambda self: self.root / "model")
    checkpoints = property(lambda self: self.root / "checkpoints")
    history = property(lambda self: self.root / "history.json")
    metrics = property(lambda self: self.root / "metrics.json")
    plots = property(lambda self: self.root / "plots")
    overlays = property(lambda self: self.root / "overlays")
    bundle = property(lambda self: self.root / "bundle")
    scores = property(lambda self: self.root / "scores.json")
    calibration = property(lambda self: self.root / "calibration.json")
    calibration_plot = property(lambda self: self.root / "calibration.png")
    registry = property(lambda self: self.root / "registry.json")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# --- prepare ---------------------------------------------------------------------------------------------


def _inventory(root: Path, category: str, val_fraction: float, seed: int) -> Manifest:
    """What is on disk, bad files included, for an MVTec AD folder whose strict manifest build failed.

    The strict build stops at the first kind of problem (an unreadable image, a defect image
    without its mask). Listing the files as they are — with the masks the layout *expects* —
    lets the validation step name every problem of the dataset in one report instead.
    """
    cat = root / category
    rows = []
    for split_dir, split in ((cat / "train", "train"), (cat / "test", "test")):
        for label_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() else ():
            if split == "train" and label_dir.name != GOOD:
                continue
            for path in sorted(p for p in label_dir.iterdir() if is_image_file(p)):
                data = path.read_bytes()
                try:
                    img = open_image(path, data)
                    width, height, mode = img.size[0], img.size[1], img.mode
                except DataError:
                    width, height, mode = 0, 0, "unreadable"
                label = label_dir.name
                masks: tuple[str, ...] = ()
                mask_sha: tuple[str, ...] = ()
                if label != GOOD:
                    mask = cat / "ground_truth" / label / f"{path.stem}_mask.png"
                    masks = (mask.relative_to(root).as_posix(),)
                    mask_sha = (_sha256(mask.read_bytes()),) if mask.is_file() else ()
                rows.append(
                    ManifestRow(
                        path=path.relative_to(root).as_posix(),
                        sha256=_sha256(data),
                        category=category,
                        split=split,
                        label=label,
                        defect_type=None if label == GOOD else label,
                        mask_paths=masks,
                        mask_sha256=mask_sha,
                        width=width,
                        height=height,
                        mode=mode,
                    )
                )
    if not rows:
        raise DataError(f"{cat}: no images found (expected train/good and test/<type> folders)")
    samples = [Sample(root / r.path, r.split, r.label) for r in rows]
    sha = {root / r.path: r.sha256 for r in rows}
    val = {s.path for s in split_validation(samples, val_fraction, seed, sha) if s.split == "val"}
    return Manifest([dataclasses.replace(r, split="val") if root / r.path in val else r for r in rows], root)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare(data_root: Path | str, product: str, section: Mapping[str, Any], paths: ProductPaths) -> dict[str, Any]:
    """The manifest of one product (one row per image, with its split) and the dataset version.

    A dataset the strict reader rejects still gets a manifest of what is on disk (MVTec AD
    layout), marked ``"strict": false``: the validate step then stops the chain naming every
    problem at once.
    """
    root = Path(data_root)
    settings = ProductSettings.of(product, section)
    category, config = settings.category, settings.config
    strict = True
    try:
        manifest = build_manifest(root, category, config.train.val_fraction, config.train.seed)
    except DataError as exc:
        log.warning("%s/%s: strict manifest build failed; validation will name the problems:\n%s", root, category, exc)
        manifest = _inventory(root, category, config.train.val_fraction, config.train.seed)
        strict = False
    manifest.write(paths.manifest)
    counts: dict[str, int] = {}
    for (split, _label), n in manifest.counts().items():
        counts[split] = counts.get(split, 0) + n
    info = {
        "product": product,
        "category": category,
        "root": str(root),
        "version": manifest.version,
        "n_images": len(manifest),
        "counts": counts,
        "strict": strict,
    }
    _write_json(paths.dataset, info)
    return info


def _dataset(paths: ProductPaths) -> dict[str, Any]:
    if not paths.dataset.is_file():
        raise DataError(f"{paths.dataset} is missing: run the prepare step first (dvc repro)")
    return json.loads(paths.dataset.read_text())


# --- validate --------------------------------------------------------------------------------------------


def validate(data_root: Path | str, rules: Mapping[str, Any], paths: ProductPaths) -> dict[str, Any]:
    """The great-expectations gate over the manifest: raises ValidationFailed naming every problem."""
    from components.validate import ValidationRules, validate_manifest

    manifest = Manifest.read(paths.manifest, data_root)
    report = validate_manifest(manifest, rules=ValidationRules.from_params(rules), docs_dir=paths.validation)
    return report.to_dict()


# --- features, template, train ----------------------------------------------------------------------------


def prepared_manifest(data_root: Path | str, paths: ProductPaths) -> Manifest:
    """The prepare step's manifest: the one split every later step trains, selects and calibrates on."""
    if not paths.manifest.is_file():
        raise DataError(f"{paths.manifest} is missing: run the prepare step first (dvc repro)")
    return Manifest.read(paths.manifest, data_root)


def features(data_root: Path | str, product: str, section: Mapping[str, Any], paths: ProductPaths) -> dict[str, Any]:
    """Fill the product's feature cache with the manifest's normal train and val images.

    Template, train and calibrate then read features without running the backbone.
    """
    from tfanet_core.cache import FeatureCache
    from tfanet_core.features import FeatureExtractor, extract_features
    from tfanet_core.geometry import resolve_geometry

    manifest = prepared_manifest(data_root, paths)
    config = resolve_geometry(ProductSettings.of(product, section).config, manifest)
    cache = FeatureCache(paths.features)
    images = sorted(s.path for split in ("train", "val") for s in manifest.samples(split))
    extract_features(
        FeatureExtractor(config.features), images, config.train.batch_size, desc=f"features {product}", cache=cache
    )
    stats = cache.stats.to_dict() | {"images": len(images)}
    log.info("features %s: %s", product, stats)
    return stats


def template(data_root: Path | str, product: str, section: Mapping[str, Any], paths: ProductPaths) -> dict[str, Any]:
    """The template image choice (``template.json``) among the manifest's training images, from cached features."""
    from tfanet_core.templates import write_choice
    from tfanet_core.workflow import template_record

    config = ProductSettings.of(product, section).config
    record = template_record(prepared_manifest(data_root, paths), config, cache_dir=paths.features)
    write_choice(record, paths.template)
    return record


def train(data_root: Path | str, product: str, section: Mapping[str, Any], paths: ProductPaths) -> dict[str, Any]:
    """Fit TFA-Net on the manifest's training rows with the chosen template; resumes from ``checkpoints/``.

    The model is written uncalibrated: the calibrate step sets its thresholds, once, after evaluation.
    """
    from tfanet_core.workflow import train_manifest

    bundle = train_manifest(
        prepared_manifest(data_root, paths),
        ProductSettings.of(product, section).config,
        paths.model,
        checkpoint_dir=paths.checkpoints,
        cache_dir=paths.features,
        template_file=paths.template,
        calibrate=False,
    )
    _write_json(paths.history, bundle.training["history"])
    return {"best_epoch": bundle.training["best_epoch"], "epochs": len(bundle.training["history"])}


# --- evaluate, calibrate --------------------------------------------------------------------------------


def evaluate(data_root: Path | str, product: str, section: Mapping[str, Any], paths: ProductPaths) -> dict[str, Any]:
    """Test-split metrics of the trained model: ``metrics.json``, ``scores.json``, ``plots/``, ``overlays/``.

    Runs before calibrate and needs no threshold (AUROC, AUPRO, F1-max), so a new calibration
    target re-runs calibrate and register only; calibrate reads ``scores.json`` back for the
    counts at its threshold.
    """
    from tfanet_core.evaluate import SCORES_FILE
    from tfanet_core.evaluate import evaluate as evaluate_bundle

    manifest = prepared_manifest(data_root, paths)
    with tempfile.TemporaryDirectory(dir=paths.root) as tmp:
        metrics = evaluate_bundle(paths.model, data_root, manifest.category, tmp, manifest=manifest)
        for out in (paths.plots, paths.overlays):
            shutil.rmtree(out, ignore_errors=True)
        paths.plots.mkdir(parents=True)
        for png in Path(tmp).glob("*.png"):
            shutil.move(png, paths.plots / png.name)
        shutil.move(Path(tmp) / "overlays", paths.overlays)
        shutil.move(Path(tmp) / SCORES_FILE, paths.scores)
    metrics["bundle"] = str(paths.model)
    _write_json(paths.metrics, metrics)
    return metrics


def calibrate(data_root: Path | str, product: str, section: Mapping[str, Any], paths: ProductPaths) -> dict[str, Any]:
    """The one calibration: thresholds on the manifest's held-out normals → the bundle that is registered and served.

    Also writes what depends on the threshold, so that it describes this very bundle: the test
    split's counts at the image threshold (from evaluate's ``scores.json``) and the score plot
    (``calibration.json``, ``calibration.png``), and the bundle's drift reference (pooled backbone
    embeddings of the train + val images, the model's scores on the val images).
    """
    from tfanet_core.bundle import load_bundle
    from tfanet_core.drift import build_reference
    from tfanet_core.evaluate import at_threshold, plot_scores
    from tfanet_core.features import FeatureExtractor
    from tfanet_core.predictor import Predictor
    from tfanet_core.workflow import calibrate_bundle, split_features

    config = ProductSettings.of(product, section).config
    manifest = prepared_manifest(data_root, paths)
    bundle = load_bundle(paths.model)
    bundle.config = dataclasses.replace(bundle.config, calibration=config.calibration)
    extractor = FeatureExtractor(bundle.config.features)
    features = split_features(manifest, extractor, progress=False, cache_dir=paths.features)
    predictor = Predictor(bundle, extractor=extractor)
    thresholds = calibrate_bundle(bundle, predictor, features.val)
    # The cache holds fused maps, not the per-layer pooled embeddings drift compares: one backbone pass each.
    bundle.drift_reference = build_reference(predictor, features.train_paths, features.val_paths)
    bundle.save(paths.bundle)

    scores = json.loads(paths.scores.read_text())
    test = [Sample(manifest.root / r["path"], "test", r["label"]) for r in scores]
    values = np.array([r["score"] for r in scores], dtype=np.float64)
    image = thresholds["image"]
    plot_scores(test, values, image.value, paths.calibration_plot)
    summary = {
        "target_fpr": config.calibration.target_fpr,
        "image_threshold": image.value,
        "pixel_threshold": thresholds["pixel"].value,
        "n_val": len(features.val_paths),
        "guarantee": {
            "calibration_fpr": image.calibration_fpr,
            "fpr_upper_bound": image.fpr_upper_bound,
            "confidence": image.confidence,
            "normals_needed": image.normals_needed,
        },
        "at_threshold": at_threshold(np.array([s.is_anomalous for s in test]), values, image.value),
        "drift_reference": {
            "embeddings": len(bundle.drift_reference.embeddings),
            "expected_fpr": bundle.drift_reference.expected_fpr,
        },
    }
    _write_json(paths.calibration, summary)
    log.info("%s: %s", product, image.guarantee())
    return summary


# --- register --------------------------------------------------------------------------------------------

#: Test images the registered pyfunc model must score like the bundle: one normal and one defective.
REGISTER_PROBE_COUNT = 2


def _champion_on_dataset(
    data_root: Path | str, product: str, section: Mapping[str, Any], manifest: Manifest, tracking_uri: str | None
) -> dict[str, Any] | None:
    """The champion's metrics on *this* dataset version, when it was tested on another one; else None.

    New data (a drift retrain, more images) changes the dataset version, and test metrics on different
    datasets are not comparable: so the gate compares the candidate with the champion re-evaluated here,
    instead of blocking every candidate trained on new data.
    """
    import mlflow
    from mlflow import MlflowClient

    from components.naming import registered_model_name
    from components.tracking import (
        CHAMPION,
        TAG_DATASET,
        download_bundle,
        model_uri,
        version_by_alias,
    )
    from tfanet_core.evaluate import evaluate as evaluate_bundle

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    champion = version_by_alias(MlflowClient(), registered_model_name(product), CHAMPION)
    version = manifest.version
    if champion is None or champion.tags.get(TAG_DATASET) == version:
        return None  # no champion yet (the gate promotes the first version), or tested on this very dataset
    log.info(
        "champion v%s was tested on dataset %s: re-evaluating it on %s",
        champion.version,
        champion.tags.get(TAG_DATASET),
        version,
    )
    with tempfile.TemporaryDirectory() as tmp:
        bundle = download_bundle(model_uri(product), Path(tmp) / "champion")
        out = Path(tmp) / "evaluation"
        return evaluate_bundle(bundle, data_root, manifest.category, out, manifest=manifest, overlays_per_type=0)


def register(
    data_root: Path | str,
    product: str,
    section: Mapping[str, Any],
    paths: ProductPaths,
    promotion: Mapping[str, Any],
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Log the run (params, metrics, plots, the bundle as a pyfunc), register it as candidate, then gate it.

    ``champion`` moves only if the gate passes (:mod:`components.promotion`); either way the
    decision and its reason are in ``registry.json`` and on the model version's tags.
    """
    from components.promotion import GatePolicy, promote
    from components.tracking import log_training_run

    if not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise TfanetError(
            "MLFLOW_TRACKING_URI is not set: start the stack and export its env: "
            'eval "$(python -m infra.local.stack env)"'
        )
    dataset = _dataset(paths)
    manifest = prepared_manifest(data_root, paths)
    probes = manifest.probe_images(REGISTER_PROBE_COUNT)
    champion_metrics = _champion_on_dataset(data_root, product, section, manifest, tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        evaluation = Path(tmp) / "evaluation"
        shutil.copytree(paths.plots, evaluation / "plots")
        shutil.copytree(paths.overlays, evaluation / "overlays")
        shutil.copy(paths.calibration, evaluation / "calibration.json")
        shutil.copy(paths.calibration_plot, evaluation / "plots" / "scores.png")
        calibration = json.loads(paths.calibration.read_text())
        metrics = json.loads(paths.metrics.read_text())
        # The threshold-dependent figures come from calibrate, so they describe the registered bundle's threshold.
        metrics |= {key: calibration[key] for key in ("at_threshold", "guarantee")}
        run = log_training_run(
            product,
            paths.bundle,
            metrics=metrics,
            dataset_version=dataset["version"],
            params=dict(section),
            artifacts_dir=evaluation,
            example_images=probes,
            run_name=f"{product}-{dataset['version'][:8]}",
            tracking_uri=tracking_uri,
        )
    decision = promote(
        product,
        run.version,
        policy=GatePolicy.from_params(promotion),
        champion_metrics=champion_metrics,
        probe_images=probes,
        bundle_dir=paths.bundle,
        tracking_uri=tracking_uri,
    )
    record = {
        "product": product,
        "run_id": run.run_id,
        "experiment_id": run.experiment_id,
        "registered_model": run.registered_name,
        "version": run.version,
        "decision": decision.decision,
        "reason": decision.reason,
        "previous_champion": decision.champion_version,
        "dataset_version": dataset["version"],
    }
    _write_json(paths.registry, record)
    log.info("%s v%s: %s (%s)", run.registered_name, run.version, decision.decision, decision.reason)
    return record
