"""Why the `cpu` profile chooses checkpoints on synthetic defects: three signals per epoch, per dev category.

For each category, one `cpu`-profile model is trained for a fixed number of epochs and after each
listed epoch we record the validation loss on held-out normals, the pseudo-anomaly pixel AUROC
that ``train.selection=synthetic`` maximizes (tfanet_core/pseudo_anomalies.py, same draws as in
training), and — for this figure only, never for selection — the test image and pixel AUROC.

    python benchmarks/selection_curves.py run [--categories kolektorsdd ...] [--epochs 30]
    python benchmarks/selection_curves.py plot

Writes results/selection_curves.json (one entry per category, resumable) and
results/selection_curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import REAL_CATEGORIES, REAL_ROOT, RESULTS, extractor_for, features_of, load_split, score_model

from tfanet_core.cache import FeatureCache
from tfanet_core.config import load_config
from tfanet_core.metrics import image_auroc, pixel_auroc
from tfanet_core.pseudo_anomalies import separation_selector
from tfanet_core.templates import select_template
from tfanet_core.training import fit, prepared_model

OUT_JSON = RESULTS / "selection_curves.json"
OUT_PNG = RESULTS / "selection_curves.png"
PATIENCE = load_config("cpu").train.patience


def curve(category: str, epochs: int, cache: FeatureCache) -> dict:
    """Train once; the selector records the signals after every epoch and the test metrics ride along."""
    config = load_config("cpu", [f"train.epochs={epochs}", "train.patience=0"])
    split = load_split(REAL_ROOT, category, config, cache)
    train_f, val_f, test_f = (features_of(split, config, n) for n in ("train", "val", "test"))
    select = separation_selector(
        extractor_for(config.features), [s.path for s in split.val], [s.path for s in split.train], val_f, config
    )
    size = config.features.image_hw

    def signals(model):  # type: ignore[no-untyped-def]
        record = select(model)
        scores, maps = score_model(model, test_f, size, {"default": config.scoring})["default"]
        record["test_image_auroc"] = image_auroc(split.labels, scores.numpy())
        if split.masks is not None:
            record["test_pixel_auroc"] = pixel_auroc(split.masks, maps.numpy())
        return record

    model = prepared_model(config, train_f, select_template(train_f, config.template.strategy).index)
    started = time.perf_counter()
    result = fit(model, train_f, config.train, val_f, progress=False, selector=signals)
    return {
        "category": category,
        "profile": "cpu",
        "epochs": epochs,
        "chosen_epoch": result.best_epoch,
        "history": result.history,
        "seconds": round(time.perf_counter() - started, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
    }


def chosen_with_patience(history: list[dict], patience: int) -> int:
    """The epoch ``train.selection=synthetic`` with this patience keeps (the full curve's argmax may come later)."""
    best_epoch, best = 0, float("-inf")
    for record in history:
        if record["synthetic_pixel_auroc"] > best:
            best_epoch, best = record["epoch"], record["synthetic_pixel_auroc"]
        if record["epoch"] - best_epoch >= patience:
            break
    return best_epoch


def plot(entries: dict[str, dict]) -> None:
    fig, axes = plt.subplots(1, len(entries), figsize=(5.2 * len(entries), 4.2), squeeze=False)
    for ax, (category, entry) in zip(axes[0], entries.items(), strict=True):
        h = entry["history"]
        epochs = [r["epoch"] for r in h]
        ax.plot(epochs, [r["test_image_auroc"] for r in h], color="tab:blue", label="test image AUROC (not used)")
        if "test_pixel_auroc" in h[0]:
            ax.plot(epochs, [r["test_pixel_auroc"] for r in h], color="tab:cyan", label="test pixel AUROC (not used)")
        ax.plot(
            epochs, [r["synthetic_pixel_auroc"] for r in h], color="tab:red", lw=2, label="synthetic-defect pixel AUROC"
        )
        chosen = chosen_with_patience(h, PATIENCE)
        ax.axvline(chosen, color="tab:red", ls=":", lw=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel("AUROC")
        ax.set_title(f"{category}: kept epoch {chosen} (patience {PATIENCE})", fontsize=10)
        loss_ax = ax.twinx()
        loss_ax.plot(epochs, [r["val_loss"] for r in h], color="0.5", ls="--", label="val loss, normals (right)")
        loss_ax.set_ylabel("validation loss")
        if ax is axes[0][0]:
            lines = ax.get_legend_handles_labels()
            extra = loss_ax.get_legend_handles_labels()
            ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8, loc="lower left")
    fig.suptitle("cpu profile (EfficientNet-Lite2, 256²), seed 0, 40 epochs without early stopping", fontsize=11)
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "plot"])
    parser.add_argument("--categories", nargs="+", default=list(REAL_CATEGORIES))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/tfanet-acc-cache"))
    args = parser.parse_args(argv)
    entries = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}
    if args.command == "run":
        torch.set_num_threads(args.threads)
        cache = FeatureCache(args.cache)
        for category in args.categories:
            if category in entries:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {category}", flush=True)
            entries[category] = curve(category, args.epochs, cache)
            OUT_JSON.write_text(json.dumps(entries, indent=1) + "\n")
    plot({c: entries[c] for c in REAL_CATEGORIES if c in entries})
    print(OUT_PNG)


if __name__ == "__main__":
    main()
