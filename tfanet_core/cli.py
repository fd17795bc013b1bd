"""The ``tfanet`` command (DESIGN §6 is the contract: scripts outside the project call it).

Model verbs live here. MLOps verbs (register, deploy, drift, pipeline, ...) are contributed by
``components/`` and ``pipelines/`` through the ``tfanet.commands`` entry-point group, so this
module — and the whole core — never imports MLflow, kfp, DVC or boto3.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from tfanet_core.config import load_config, profile_names

USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)


def _add_config_args(parser: argparse.ArgumentParser, default_profile: str = "cpu") -> None:
    parser.add_argument(
        "--profile",
        default=default_profile,
        choices=profile_names(),
        help="model profile (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.epochs=5 (repeatable)",
    )


def cmd_info(args: argparse.Namespace) -> int:
    from tfanet_core.info import model_info

    info = model_info(load_config(args.profile, args.overrides))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["parameters"]
    print(f"profile {info['profile']}  backbone {info['backbone']}  features {info['feature_shape']}")
    print(f"parameters: backbone {p['backbone']:,}  trainable {p['trainable']:,}  paper_count {p['paper_count']:,}")
    c = info["cost_per_image"]
    print(
        f"per image (template cached): {c['gmacs']:.2f} GMAC = {c['gflops']:.2f} GFLOP "
        f"(backbone {c['backbone_gflops']:.2f}, transformer {c['transformer_gflops']:.2f})"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tfanet_core.training import train_category

    config = load_config(args.profile, args.overrides)
    bundle = train_category(
        args.data,
        args.category,
        config,
        args.out,
        checkpoint_dir=args.checkpoint_dir,
        device=args.device,
        progress=not args.quiet,
        dataset_version=args.dataset_version,
    )
    threshold = bundle.thresholds.get("image", {}).get("value")
    print(
        json.dumps(
            {
                "bundle": str(args.out),
                "profile": config.profile,
                "best_epoch": bundle.training["best_epoch"],
                "seconds": bundle.training["seconds"],
                "image_threshold": threshold,
            }
        )
    )
    return 0


def _expand(paths: Sequence[Path]) -> list[Path]:
    from tfanet_core.data.images import is_image_file

    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
        else:
            out.append(path)
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from tfanet_core.predictor import Predictor

    predictor = Predictor.from_bundle(args.bundle, device=args.device, batch_size=args.batch_size)
    paths = _expand(args.paths)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        for path, pred in zip(chunk, predictor.predict_paths(chunk), strict=True):
            row = {
                "path": str(path),
                "score": pred.score,
                "threshold": pred.threshold,
                "is_anomalous": pred.is_anomalous,
            }
            print(json.dumps(row), flush=True)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tfanet_core.evaluate import evaluate

    metrics = evaluate(
        args.bundle,
        args.data,
        args.category,
        args.out,
        device=args.device,
        overlays_per_type=args.overlays,
        progress=not args.quiet,
    )
    keys = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
    print(json.dumps({"out": str(args.out), **{k: metrics.get(k) for k in keys}}))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from tfanet_core.data.synth import generate

    products = generate(args.out, seed=args.seed)
    print(json.dumps({"out": str(args.out), "seed": args.seed, "products": products}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tfanet", description="TFA-Net anomaly detection: train, evaluate, predict.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameter counts and per-image cost of a profile")
    _add_config_args(p, default_profile="cpu")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train one category and write a bundle")
    p.add_argument("--data", type=Path, required=True, help="dataset root (MVTec AD / LOCO / plain folders)")
    p.add_argument("--category", required=True)
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    _add_config_args(p)
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="resume from / write checkpoints here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dataset-version", default=None, help="recorded in the bundle (e.g. the DVC hash)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="score images; one JSON object per line")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="metrics, curves and overlays on a category's test split")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="dataset root")
    p.add_argument("--category", required=True)
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json, plots and overlays")
    p.add_argument("--device", default=None)
    p.add_argument("--overlays", type=int, default=2, help="overlay images per test folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("synth", help="write the synthetic MVTec-layout dataset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    for ep in entry_points(group="tfanet.commands"):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"tfanet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
