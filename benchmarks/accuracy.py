"""Accuracy harness: train a profile per category, evaluate, and tabulate beside the baselines (issue #6, #11).

Every row (one method × one configuration × one category × one seed) is written as JSON to
``benchmarks/results/accuracy_runs/<row id>.json`` the moment it finishes, and a row whose JSON
exists is skipped, so a killed run loses at most the row in progress. ``report`` rebuilds
``benchmarks/results/accuracy.md`` from those files alone.

    python benchmarks/accuracy.py run --plan baselines            # kNN + mean-reconstruction rows
    python benchmarks/accuracy.py run --plan ablations [--only mask]
    python benchmarks/accuracy.py run --plan final --seeds 0 1
    python benchmarks/accuracy.py run --plan candidates --seeds 0 1   # alternatives to the profile, same protocol
    python benchmarks/accuracy.py list --plan ablations           # what a plan would run, and what is done
    python benchmarks/accuracy.py rescore --plan final --seeds 0 1  # kept bundles, today's metrics and variants
    python benchmarks/accuracy.py report

Evaluation reads the test images' backbone features from the feature cache (float16 layer maps;
one cache under ``--cache``, shared by all rows of the same backbone configuration) and scores
them with the bundle's model — the same computation as ``tfanet evaluate`` up to float16 rounding
of the cached features. Checkpoints are chosen on held-out normal images (``train.selection``),
never on test labels. Scoring variants (map product/sum, image score std/max/top-k) re-score one
trained model; FADeR rows score one trained model with its attenuator on and off (the TFA-Net
weights are bit-identical either way, see tfanet_core/fader.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import knn_scores, mean_reconstruction

from tfanet_core.bundle import load_bundle
from tfanet_core.cache import FeatureCache
from tfanet_core.config import Config, FeatureConfig, ScoringConfig, load_config
from tfanet_core.data.images import load_mask
from tfanet_core.data.layouts import Sample, load_defects_config
from tfanet_core.data.manifest import Manifest
from tfanet_core.data.synth import generate
from tfanet_core.evaluate import loco_defects
from tfanet_core.features import FeatureExtractor, extract_features
from tfanet_core.geometry import resolve_geometry
from tfanet_core.metrics import Defect, au_spro, evaluate_scores, pixel_auroc
from tfanet_core.model import TemplateAggregator
from tfanet_core.scoring import anomaly_map, image_score
from tfanet_core.templates import select_template
from tfanet_core.training import fit, prepared_model
from tfanet_core.workflow import manifest_for, train_category

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = RESULTS / "accuracy_runs"
REAL_ROOT = Path(os.environ.get("TFANET_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
REAL_CATEGORIES = ("kolektorsdd", "magnetic_tile", "mvtec_loco/juice_bottle")
SYNTH_ROOT = Path("/tmp/tfanet-acc-synth")
SYNTH_CATEGORIES = ("fabric", "bracket")
SCORING_VARIANTS = {
    # map and image score at the profile's scale 1
    "product+std, scales 1": {"map": "product", "image_score": "std", "scales": [1]},
    "product+max, scales 1": {"map": "product", "image_score": "max", "scales": [1]},
    "product+topk, scales 1": {"map": "product", "image_score": "topk", "scales": [1]},
    "sum+std, scales 1": {"map": "sum", "image_score": "std", "scales": [1]},
    "sum+max, scales 1": {"map": "sum", "image_score": "max", "scales": [1]},
    "sum+topk, scales 1": {"map": "sum", "image_score": "topk", "scales": [1]},
    # map scales (feature pooling factors, tfanet_core/scoring.py) with the paper's product map and std score
    "product+std, scales 1,2": {"map": "product", "image_score": "std", "scales": [1, 2]},
    "product+std, scales 1,2,4": {"map": "product", "image_score": "std", "scales": [1, 2, 4]},
    "product+std, scales 1,2,4,8": {"map": "product", "image_score": "std", "scales": [1, 2, 4, 8]},
    "product+std, scales 1,8": {"map": "product", "image_score": "std", "scales": [1, 8]},
    "product+std, scales 8": {"map": "product", "image_score": "std", "scales": [8]},
}


@dataclass(frozen=True)
class Row:
    group: str  # the table a row belongs to: "main", "baseline", an ablation name
    variant: str  # the value being compared within the group
    category: str
    method: str = "tfanet"  # tfanet | knn | mean
    profile: str = "cpu"
    overrides: tuple[str, ...] = ()
    seed: int = 0
    dataset: str = "real"  # real | synth
    rescore: bool = False  # also score every SCORING_VARIANTS entry
    fader_pair: bool = False  # score with the FADeR attenuator on and off (and over FADER_SWEEP)
    raw_template: bool = False  # reproduce the reference code's fault: template features of the unnormalized image

    @property
    def id(self) -> str:
        text = f"{self.group}__{self.variant}__{self.category}__s{self.seed}"
        return re.sub(r"[^A-Za-z0-9_.+=-]+", "-", text)

    @property
    def root(self) -> Path:
        return REAL_ROOT if self.dataset == "real" else SYNTH_ROOT

    def config(self) -> Config:
        return load_config(self.profile, [*self.overrides, f"train.seed={self.seed}"])


# --- data: samples, cached features, masks ---------------------------------------------------------------


@dataclass
class Split:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    masks: np.ndarray | None
    defects: list[list[Defect]] | None
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.is_anomalous for s in self.test], dtype=int)


_SPLITS: dict[tuple, Split] = {}
_EXTRACTORS: dict[str, FeatureExtractor] = {}


def _features_key(config: FeatureConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def extractor_for(config: FeatureConfig) -> FeatureExtractor:
    key = _features_key(config)
    if key not in _EXTRACTORS:
        _EXTRACTORS.clear()  # one backbone in memory at a time
        _EXTRACTORS[key] = FeatureExtractor(config)
    return _EXTRACTORS[key]


_MANIFESTS: dict[tuple, Manifest] = {}


def manifest_of(root: Path, category: str, config: Config) -> Manifest:
    """The manifest train_category builds for this split (cached: building it hashes every image)."""
    key = (str(root), category, config.train.val_fraction, config.train.seed)
    if key not in _MANIFESTS:
        _MANIFESTS.clear()
        _MANIFESTS[key] = manifest_for(root, category, config, progress=False)
    return _MANIFESTS[key]


def resolved_config(row: Row) -> Config:
    """The row's config with its geometry resolved from the category's training images, as train_category does."""
    config = row.config()
    return resolve_geometry(config, manifest_of(row.root, row.category, config))


def load_split(root: Path, category: str, config: Config, cache: FeatureCache) -> Split:
    """Train/val/test samples of the seed's validation split and their (cached) features for ``config.features``."""
    size = config.features.image_hw
    key = (str(root), category, config.train.val_fraction, config.train.seed, size)
    if key not in _SPLITS:
        samples = manifest_of(root, category, config).samples()  # the split train_category uses
        test = [s for s in samples if s.split == "test"]
        masks = defects = None
        if any(s.mask_paths for s in test):
            masks = np.stack([load_mask(s.mask_paths, size) if s.mask_paths else np.zeros(size, bool) for s in test])
            loco = load_defects_config(root, category)
            if loco is not None:
                defects = loco_defects(test, loco, Path(category).name, size)
        _SPLITS.clear()  # one category in memory at a time
        _SPLITS[key] = Split(
            [s for s in samples if s.split == "train"], [s for s in samples if s.split == "val"], test, masks, defects
        )
    split = _SPLITS[key]
    fkey = _features_key(config.features)
    if fkey not in split.features:
        extractor = extractor_for(config.features)
        split.features.clear()
        for name in ("train", "val", "test"):
            paths = [s.path for s in getattr(split, name)]
            split.features[f"{fkey}:{name}"] = extract_features(extractor, paths, progress=False, cache=cache)
        split.features[fkey] = torch.empty(0)
    return split


def features_of(split: Split, config: Config, name: str) -> torch.Tensor:
    return split.features[f"{_features_key(config.features)}:{name}"]


# --- metrics -------------------------------------------------------------------------------------------------


def metrics_of(split: Split, scores: torch.Tensor, maps: torch.Tensor) -> dict[str, Any]:
    """evaluate_scores, AU-sPRO where LOCO defects exist, and pixel AUROC per defect type where there are several.

    The per-type figures show when one type dominates the pooled pixel AUROC (magnetic_tile's large "uneven"
    regions hold most of its defective pixels).
    """
    maps_np = maps.numpy().astype(np.float32)
    result: dict[str, Any] = evaluate_scores(split.labels, scores.numpy(), split.masks, maps_np)
    if split.defects is not None:
        result["au_spro"] = {str(k): v for k, v in au_spro(maps_np, split.defects).items()}
    types = np.array([s.label for s in split.test])
    defect_types = sorted({t for t, bad in zip(types, split.labels, strict=True) if bad})
    if split.masks is not None and len(defect_types) > 1:
        good = split.labels == 0
        result["pixel_auroc_by_type"] = {
            t: pixel_auroc(split.masks[(types == t) | good], maps_np[(types == t) | good]) for t in defect_types
        }
    return result


@torch.no_grad()
def score_model(
    model: TemplateAggregator,
    features: torch.Tensor,
    image_size: tuple[int, int],
    scorings: dict[str, ScoringConfig],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One reconstruction per batch, scored under every scoring config (a rescoring costs no retraining)."""
    model.eval()
    out: dict[str, tuple[list, list]] = {name: ([], []) for name in scorings}
    for start in range(0, len(features), 16):
        target, predicted = model.reconstruct(features[start : start + 16])
        for name, scoring in scorings.items():
            m = anomaly_map(target, predicted, image_size, scoring)
            out[name][0].append(image_score(m, scoring))
            out[name][1].append(m)
    return {name: (torch.cat(s), torch.cat(m)) for name, (s, m) in out.items()}


def train_with_raw_template(config: Config, split: Split) -> tuple[TemplateAggregator, dict[str, Any], dict[str, Any]]:
    """The reference code's fault, for its ablation row: the template image skips the input normalization.

    Everything else is ``train_category``'s path (same template choice, same fit); the template's
    features bypass the cache, whose key does not know about the normalization.
    """
    train_f, val_f = features_of(split, config, "train"), features_of(split, config, "val")
    choice = select_template(train_f, config.template.strategy, val_features=val_f, config=config)
    extractor = extractor_for(config.features)
    mean, std = extractor.mean.clone(), extractor.std.clone()
    extractor.mean.zero_()
    extractor.std.fill_(1.0)
    try:
        raw = extract_features(extractor, [split.train[choice.index].path], progress=False)
    finally:
        extractor.mean.copy_(mean)
        extractor.std.copy_(std)
    model = prepared_model(config, train_f, choice.index)
    model.set_template(raw[0])
    result = fit(model, train_f, config.train, val_f, progress=False)
    training = {"history": result.history, "best_epoch": result.best_epoch, "seconds": round(result.seconds, 2)}
    template = {"image": str(split.train[choice.index].path), "evidence": choice.evidence}
    return result.model, training, template


@torch.no_grad()
def fader_mask_stats(model: TemplateAggregator, features: torch.Tensor, masks: np.ndarray | None) -> dict[str, Any]:
    """What FADeR's soft mask does on the test images: its mean on tokens that touch a real defect, and on the
    tokens of the normal test images.

    "Touch": any pixel the token covers is in the ground-truth mask (thin cracks rarely fill half a token).
    """
    assert model.fader is not None
    values = []
    for start in range(0, len(features), 16):
        content = model.content_tokens(model.standardize(features[start : start + 16]))
        values.append(model.fader.mask(content))
    mask = torch.cat(values)  # [N, L]
    out: dict[str, Any] = {"all_tokens": float(mask.mean()), "below_0.5": float((mask < 0.5).float().mean())}
    if masks is not None:
        touched = F.adaptive_max_pool2d(torch.from_numpy(masks).float().unsqueeze(1), model.grid).flatten(1) > 0
        normal_images = ~torch.from_numpy(masks).flatten(1).any(dim=1)
        if touched.any():
            out["defect_tokens"] = float(mask[touched].mean())
            out["defect_tokens_below_0.5"] = float((mask[touched] < 0.5).float().mean())
        if normal_images.any():
            out["normal_tokens"] = float(mask[normal_images].mean())
    return out


def scorings_of(row: Row, config: Config) -> dict[str, ScoringConfig]:
    """The profile's scoring ("default"), plus every SCORING_VARIANTS entry for a row that asks to be re-scored."""
    scorings = {"default": config.scoring}
    if row.rescore:
        scorings |= {name: dataclasses.replace(config.scoring, **v) for name, v in SCORING_VARIANTS.items()}
    return scorings


# --- one row -------------------------------------------------------------------------------------------------


def run_row(row: Row, cache: FeatureCache, work: Path) -> dict[str, Any]:
    config = resolved_config(row)
    load_before = os.getloadavg()
    started = time.perf_counter()
    cpu_started = time.process_time()
    split = load_split(row.root, row.category, config, cache)
    train_f, test_f = features_of(split, config, "train"), features_of(split, config, "test")
    size = config.features.image_hw
    record: dict[str, Any] = {
        **dataclasses.asdict(row),
        "id": row.id,
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
        "n_test_defective": int(split.labels.sum()),
        "torch_threads": torch.get_num_threads(),
        "geometry": list(size),
    }
    variants: dict[str, dict[str, Any]] = {}
    if row.method == "knn":
        t0 = time.perf_counter()
        scores, maps, sizes = knn_scores(train_f, test_f, size, coreset=0.1, sigma=config.scoring.sigma, seed=row.seed)
        record.update(sizes, fit_and_score_seconds=round(time.perf_counter() - t0, 1))
        variants["max"] = metrics_of(split, scores, maps)
    elif row.method == "mean":
        for name, scoring in scorings_of(row, config).items():
            variants[name] = metrics_of(split, *mean_reconstruction(train_f, test_f, size, scoring))
    else:
        bundle_dir = work / row.id
        t0, c0 = time.perf_counter(), time.process_time()
        if row.raw_template:
            model, training, template = train_with_raw_template(config, split)
        else:
            bundle = train_category(row.root, row.category, config, bundle_dir, cache_dir=cache.root, progress=False)
            model, training, template = bundle.model, bundle.training, bundle.template
        train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        history = training["history"]
        epochs_run = len(history)
        record.update(
            train_minutes=round(train_seconds / 60, 2),
            fit_seconds=training["seconds"],
            train_cpu_share=round(train_cpu / max(train_seconds, 1e-9) / torch.get_num_threads(), 2),
            train_images_per_s=round(len(split.train) * epochs_run / max(training["seconds"], 1e-9), 1),
            best_epoch=training["best_epoch"],
            history=history,
            epochs=epochs_run,
            final_train_loss=history[-1]["train_loss"] if history else None,
            best_val_loss=min((h.get("val_loss", float("inf")) for h in history), default=None),
            template=template.get("image"),
            template_evidence=template.get("evidence"),
            parameters=sum(p.numel() for p in model.parameters()),
        )
        t0 = time.perf_counter()
        for name, (scores, maps) in score_model(model, test_f, size, scorings_of(row, config)).items():
            variants[name] = metrics_of(split, scores, maps)
        record["test_images_per_s_cached"] = round(len(split.test) / (time.perf_counter() - t0), 1)
        if row.fader_pair:
            assert model.fader is not None
            sweep: dict[str, Any] = {}
            for threshold, temperature in FADER_SWEEP:
                model.fader.threshold, model.fader.temperature = threshold, temperature
                scores, maps = score_model(model, test_f, size, {"x": config.scoring})["x"]
                name = f"threshold {threshold}, temperature {temperature}"
                variants[f"fader {name}"] = metrics_of(split, scores, maps)
                sweep[name] = fader_mask_stats(model, test_f, split.masks)
            record["fader_masks"] = sweep
            model.fader.fitted.fill_(False)  # the same TFA-Net, attenuator switched off
            scores, maps = score_model(model, test_f, size, {"x": config.scoring})["x"]
            variants["fader_off"] = metrics_of(split, scores, maps)
        if not row.rescore:
            shutil.rmtree(bundle_dir, ignore_errors=True)  # keep only the bundles later rescored by hand
    record["metrics"] = variants
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    record["process_cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    record["loadavg_before"] = [round(x, 2) for x in load_before]
    record["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    record["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    return record


# --- plans -----------------------------------------------------------------------------------------------


def _categories(dataset: str) -> tuple[str, ...]:
    return REAL_CATEGORIES if dataset == "real" else SYNTH_CATEGORIES


# Ablations run at a fixed budget and selection (ABLATION_BASE, pinned so that a profile change does not move old
# rows: it is the first ``cpu`` profile, 10 epochs with validation-loss selection, maps at scale 1 only); the
# reference point of every group is that row ("base").
ABLATION_BASE = ("train.epochs=10", "train.selection=val_loss", "train.patience=0", "scoring.scales=[1]")
ABLATIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "standardize": {"on": (), "off": ("features.standardize=false",)},
    "mask_ratio": {"0": (), "0.25": ("model.mask_ratio=0.25",), "0.5": ("model.mask_ratio=0.5",)},
    "template": {
        "medoid": (),
        "first": ("template.strategy=first",),
        "best_of_k": ("template.strategy=best_of_k",),
    },
    # feature size S and token size K at a constant number of tokens, (S/K)² = 64: the sequence length
    # sets the cost of attention, so these three cost about the same per step
    "feature_size_K": {
        "S=32,K=4": (),
        "S=16,K=2": ("features.feature_size=16", "model.patch_size=2"),
        "S=64,K=8": ("features.feature_size=64", "model.patch_size=8"),
    },
    "width_depth": {
        "256/4+2": (),
        "128/2+1": ("model.embed_dim=128", "model.decoder_dim=128", "model.tfam_depth=2", "model.fdrm_depth=1"),
        "384/6+2": ("model.embed_dim=384", "model.tfam_depth=6"),
    },
    "backbone": {
        "lite2 [1,2,3]": (),
        "lite0 [1,2,3]": ("features.backbone=efficientnet_lite0",),
        "lite1 [1,2,3]": ("features.backbone=efficientnet_lite1",),
        "lite2 [1,2]": ("features.layers=[1,2]",),
        "lite2 [2,3]": ("features.layers=[2,3]",),
    },
    "epochs": {"10": (), "5": ("train.epochs=5",), "20": ("train.epochs=20",), "40": ("train.epochs=40",)},
    # checkpoint chosen on pseudo-anomaly separation (tfanet_core/pseudo_anomalies.py) instead of the normal-image
    # validation loss, up to 40 epochs, stopping 10 epochs after the best
    "selection": {
        "val_loss, 10 epochs": (),
        "synthetic, ≤40 epochs": ("train.epochs=40", "train.selection=synthetic", "train.patience=10"),
    },
}


# FADeR's mask threshold (robust SDs above the image's median token) and temperature, swept on one trained model:
# both only shape the mask at inference, so the sweep re-scores, it does not retrain.
FADER_SWEEP = [(t, temp) for t in (0.5, 1.0, 2.0, 3.0) for temp in (0.25, 0.5, 1.0)]

# Round 2 (issue #21): geometry with the single medoid template (the previous cpu profile), then a template bank
# at the native geometry, the network-free baselines at that geometry, FADeR swept at it. The rows were run before
# the shared-aspect rule (tfanet_core/geometry.py), so magnetic_tile's "native" rows are 288×224; the rule now keeps
# it square (reproduce them with features.geometry=fixed, features.image_size=[288,224], features.feature_size=[36,28]).
MEDOID = ("template.strategy=medoid", "template.k=4", "template.nearest=1")
NATIVE = ("features.geometry=native",)
GEOMETRIES = {
    "square 256²": ("features.geometry=fixed", *MEDOID),
    "native, 256² budget": (*NATIVE, *MEDOID),
    "native, 320² budget": (*NATIVE, "features.image_size=320", "features.feature_size=40", *MEDOID),
}
BANKS = {
    "k=2": (*NATIVE, "template.strategy=bank", "template.k=2", "template.nearest=1"),
    "k=4": (*NATIVE, "template.strategy=bank", "template.k=4", "template.nearest=1"),
    "k=8": (*NATIVE, "template.strategy=bank", "template.k=8", "template.nearest=1"),
    "blend 8 of 64": (*NATIVE, "template.strategy=bank", "template.k=64", "template.nearest=8"),
}

# Alternatives to the ``cpu`` profile run exactly like its main rows (full schedule, every seed, re-scored).
CANDIDATES: dict[str, tuple[str, ...]] = {"map scales 1,2,4,8": ("scoring.scales=[1,2,4,8]",)}


def plan(name: str, seeds: list[int], groups: list[str] | None = None) -> list[Row]:
    rows: list[Row] = []
    if name == "baselines":
        rows += [Row("baseline", "mean", cat, method="mean", rescore=True) for cat in REAL_CATEGORIES]
        rows += [Row("baseline", "mean", c, method="mean", profile="tiny", dataset="synth") for c in SYNTH_CATEGORIES]
        # kolektorsdd last: its 2·10⁵-vector bank makes the greedy coreset the slowest step of the harness
        rows += [Row("baseline", "patchcore-knn", cat, method="knn") for cat in sorted(REAL_CATEGORIES, reverse=True)]
    elif name == "ablations":
        base = ABLATION_BASE
        for group, variants in ABLATIONS.items():
            if groups and group not in groups:
                continue
            for variant, overrides in variants.items():
                for cat in REAL_CATEGORIES:
                    # every group's first variant is the cpu profile at the ablation budget: run it once, as "base"
                    is_base = not overrides
                    rows.append(
                        Row(
                            "ablation" if is_base else group,
                            "base" if is_base else variant,
                            cat,
                            overrides=(*base, *overrides),
                        )
                    )
        if not groups or "template_input" in groups:
            for cat in REAL_CATEGORIES:
                rows.append(
                    Row("template_input", "not normalized (reference code)", cat, overrides=base, raw_template=True)
                )
    elif name == "fader":
        for dataset, profile, extra in (("real", "cpu", ABLATION_BASE), ("synth", "tiny", ())):
            for cat in _categories(dataset):
                for seed in seeds:
                    rows.append(
                        Row(
                            "fader",
                            profile,
                            cat,
                            profile=profile,
                            overrides=(*extra, "model.fader=true"),
                            seed=seed,
                            dataset=dataset,
                            fader_pair=True,
                        )
                    )
    elif name == "final":
        for seed in seeds:
            rows += [Row("main", "cpu", cat, seed=seed, rescore=True) for cat in REAL_CATEGORIES]
    elif name == "round2":
        for cat in REAL_CATEGORIES:
            rows += [Row("geometry", v, cat, overrides=o) for v, o in GEOMETRIES.items()]
            rows += [Row("bank", v, cat, overrides=o) for v, o in BANKS.items()]
            rows.append(Row("baseline_native", "mean", cat, method="mean", overrides=NATIVE))
            rows.append(Row("baseline_native", "patchcore-knn", cat, method="knn", overrides=NATIVE))
            fader = (*NATIVE, *MEDOID, *ABLATION_BASE, "model.fader=true")
            rows.append(Row("fader_sweep", "native, 10 epochs", cat, overrides=fader, fader_pair=True))
    elif name == "candidates":
        for variant, overrides in CANDIDATES.items():
            for seed in seeds:
                rows += [
                    Row("candidate", variant, cat, overrides=overrides, seed=seed, rescore=True)
                    for cat in REAL_CATEGORIES
                ]
    else:
        raise SystemExit(f"unknown plan {name!r}: baselines | ablations | fader | final | candidates | round2")
    return list(dict.fromkeys(rows))  # the shared "base" rows once


def write_row(out: Path, record: dict[str, Any]) -> None:
    """Atomically: a killed run never leaves a half-written row that would count as done."""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out)


def run(rows: list[Row], cache_dir: Path, work: Path, only: str | None) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    cache = FeatureCache(cache_dir)
    if any(r.dataset == "synth" for r in rows) and not (SYNTH_ROOT / "fabric").is_dir():
        generate(SYNTH_ROOT, seed=0)
    for row in rows:
        if only and only not in row.id:
            continue
        out = RUNS / f"{row.id}.json"
        if out.is_file():
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {row.id} (load {os.getloadavg()[0]:.2f})", flush=True)
        record = run_row(row, cache, work)
        write_row(out, record)
        m = next(iter(record["metrics"].values()))
        print(
            f"    image {m['image_auroc']}  pixel {m['pixel_auroc']}  aupro {m['aupro']}  "
            f"train {record.get('train_minutes', '-')} min  wall {record['wall_seconds']} s",
            flush=True,
        )


def rescore(rows: list[Row], cache_dir: Path, work: Path, only: str | None) -> None:
    """Re-evaluate the kept bundles of finished rows with today's metrics and scoring variants; training stays."""
    cache = FeatureCache(cache_dir)
    for row in rows:
        out, bundle_dir = RUNS / f"{row.id}.json", work / row.id
        if (only and only not in row.id) or not out.is_file() or not (bundle_dir / "bundle.json").is_file():
            continue
        print(f"[{time.strftime('%H:%M:%S')}] rescore {row.id}", flush=True)
        record = json.loads(out.read_text())
        bundle = load_bundle(bundle_dir)
        split = load_split(row.root, row.category, bundle.config, cache)
        test_f = features_of(split, bundle.config, "test")
        scored = score_model(bundle.model, test_f, bundle.config.features.image_hw, scorings_of(row, bundle.config))
        record["metrics"] = {name: metrics_of(split, *result) for name, result in scored.items()}
        record["rescored_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        write_row(out, record)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "list", "rescore", "report"])
    parser.add_argument("--plan", default="baselines")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--groups", nargs="*", help="ablation groups to run (default: all)")
    parser.add_argument("--only", help="run only rows whose id contains this text")
    parser.add_argument(
        "--shard",
        help="i/n: run every n-th row from the i-th (0-based), so n one-thread processes share the plan's rows",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 because on a shared 2-core machine 2 OpenMP threads wait for each other (20x slower "
        "in a coreset step measured under load 5)",
    )
    parser.add_argument("--cache", type=Path, default=Path("/tmp/tfanet-acc-cache"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/tfanet-acc-bundles"))
    args = parser.parse_args(argv)
    if args.command == "report":
        from accuracy_report import write_report

        print(write_report(RUNS, RESULTS / "accuracy.md"), end="")
        return
    torch.set_num_threads(args.threads)
    rows = plan(args.plan, args.seeds, args.groups)
    if args.shard:
        index, count = (int(x) for x in args.shard.split("/"))
        rows = rows[index::count]
    if args.command == "list":
        for row in rows:
            print(("done  " if (RUNS / f"{row.id}.json").is_file() else "todo  ") + row.id)
        return
    if args.command == "rescore":
        rescore(rows, args.cache, args.work, args.only)
        return
    run(rows, args.cache, args.work, args.only)


if __name__ == "__main__":
    main()
