"""The ``tfanet`` command (docs/architecture.md §Command line is the contract: scripts outside the project call it).

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
from typing import TYPE_CHECKING

from tfanet_core.allocator import keep_freed_memory
from tfanet_core.config import load_config, profile_names
from tfanet_core.errors import ConfigError, TfanetError

if TYPE_CHECKING:  # imported inside _cache at run time, like the other commands' modules
    from tfanet_core.cache import FeatureCache


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
    from tfanet_core.workflow import train_category

    config = load_config(args.profile, args.overrides)
    bundle = train_category(
        args.data,
        args.category,
        config,
        args.out,
        checkpoint_dir=args.checkpoint_dir,
        device=args.device,
        progress=not args.quiet,
        cache_dir=args.cache_dir,
        template_file=args.template,
    )
    image = bundle.thresholds["image"]
    if not args.quiet:
        print(image.guarantee(), file=sys.stderr)
    print(
        json.dumps(
            {
                "bundle": str(args.out),
                "profile": config.profile,
                "dataset_version": bundle.dataset["version"],
                "best_epoch": bundle.training["best_epoch"],
                "seconds": bundle.training["seconds"],
                "image_threshold": image.value,
                "fpr_upper_bound": image.fpr_upper_bound,
                "normals_needed": image.normals_needed,
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

    predictor = Predictor.from_bundle(
        args.bundle,
        device=args.device,
        batch_size=args.batch_size,
        int8=args.int8,
        runtime=args.runtime,
        export_dir=args.export_dir,
    )
    paths = _expand(args.paths)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        for path, pred in zip(chunk, predictor.predict_paths(chunk), strict=True):
            row = {
                "path": str(path),
                "score": pred.score,
                "threshold": pred.threshold,
                "is_anomalous": pred.is_anomalous,
                "templates": pred.templates,
            }
            print(json.dumps(row), flush=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tfanet_core.bundle import load_bundle
    from tfanet_core.predictor import Predictor
    from tfanet_core.runtimes import FORMATS, export_bundle, read_manifest

    bundle = load_bundle(args.bundle)
    tolerance = {} if args.tolerance is None else {"tolerance": args.tolerance}
    out = export_bundle(Predictor(bundle, device="cpu", runtime="torch"), args.format, args.out, **tolerance)
    if args.serve:
        bundle.serving = {**bundle.serving, "runtime": FORMATS[args.format]}
        bundle.save(args.bundle)
    manifest = read_manifest(out)
    keys = ("format", "runtime", "runtime_version", "bundle_sha256")
    print(json.dumps({"out": str(out), **{k: manifest[k] for k in keys}, "parity": manifest["parity"]}))
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

    products = generate(args.out, seed=args.seed, n_train=args.n_train)
    print(json.dumps({"out": str(args.out), "seed": args.seed, "n_train": args.n_train, "products": products}))
    return 0


def cmd_template(args: argparse.Namespace) -> int:
    from tfanet_core.templates import write_choice
    from tfanet_core.workflow import manifest_for, template_record

    overrides = args.overrides + ([f"template.strategy={args.strategy}"] if args.strategy else [])
    config = load_config(args.profile, overrides)
    trials = {name: value for name, value in (("k", args.k), ("trial_epochs", args.trial_epochs)) if value is not None}
    record = template_record(
        manifest_for(args.data, args.category, config, progress=not args.quiet),
        config,
        **trials,
        cache_dir=args.cache_dir,
        device=args.device or "cpu",
        progress=not args.quiet,
    )
    write_choice(record, args.out)
    print(json.dumps({"out": str(args.out), "strategy": record["strategy"], "image": record["image"]}))
    return 0


def _cache(args: argparse.Namespace) -> FeatureCache:
    from tfanet_core.cache import FeatureCache, resolve_cache_dir

    root = resolve_cache_dir(args.cache_dir)
    if root is None:
        raise ConfigError("the feature cache is off (--cache-dir off or TFANET_CACHE_DIR=off); pass --cache-dir DIR")
    return FeatureCache(root)


def cmd_cache_report(args: argparse.Namespace) -> int:
    report = _cache(args).report(verify=args.verify)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['root']}: {report['entries']} entries, {report['bytes'] / 2**20:.1f} MiB")
    for name, group in sorted(report["groups"].items()):
        print(f"  {name}: {group['entries']} entries, {group['bytes'] / 2**20:.1f} MiB")
    if report["corrupt"] or report["temp_files"]:
        print(f"  {report['corrupt']} corrupt entries, {report['temp_files']} temp files (tfanet cache prune)")
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    from tfanet_core.cache import parse_size

    if args.max_size is None and args.older_than_days is None and not args.all:
        raise ConfigError("say what to prune: --max-size SIZE, --older-than-days N or --all")
    max_bytes = parse_size(args.max_size) if args.max_size is not None else None
    result = _cache(args).prune(max_bytes, args.older_than_days, args.all, args.dry_run)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(
            f"{result['root']}: {verb} {result['removed']} entries ({result['freed_bytes'] / 2**20:.1f} MiB), "
            f"kept {result['kept']} ({result['kept_bytes'] / 2**20:.1f} MiB)"
        )
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="feature cache (default: $TFANET_CACHE_DIR or ~/.cache/tfanet/features; 'off' disables it)",
    )
    p.add_argument("--template", type=Path, default=None, help="use the choice written by `tfanet template`")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="score images; one JSON object per line")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--int8",
        action="store_true",
        help="CPU only: int8 linear layers, faster, scores move slightly (see benchmarks/results/perf.md)",
    )
    p.add_argument(
        "--runtime",
        default=None,
        help="torch | onnxruntime | openvino: the last two run the exported graph on the CPU "
        "(default: the bundle's serving runtime, else torch)",
    )
    p.add_argument(
        "--export-dir",
        type=Path,
        default=None,
        help="the export to run (default: $TFANET_EXPORT_DIR or ~/.cache/tfanet/exports; exported on first use)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="the bundle's whole inference path as one ONNX / OpenVINO graph, parity-checked")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--format", required=True, help="onnx | openvino")
    p.add_argument("--out", type=Path, required=True, help="export directory to write (replaced)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max relative score difference from the torch bundle (default: runtimes.PARITY_TOLERANCE, 1e-5)",
    )
    p.add_argument("--serve", action="store_true", help="also make this runtime the bundle's serving runtime")
    p.set_defaults(func=cmd_export)

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
    p.add_argument("--n-train", type=int, default=40, help="normal training images per product (default: %(default)s)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("template", help="choose the template image and write the choice with its evidence")
    p.add_argument("--data", type=Path, required=True, help="dataset root")
    p.add_argument("--category", required=True)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write (tfanet train --template reads it)")
    _add_config_args(p)
    p.add_argument("--strategy", default=None, help="first | medoid | best_of_k | bank | auto (default: the profile's)")
    p.add_argument(
        "--k", type=int, default=None, help="best_of_k: candidates; bank, auto: templates kept (default: template.k)"
    )
    p.add_argument("--trial-epochs", type=int, default=None, help="best_of_k, auto: epochs per trial (default: 5)")
    p.add_argument("--cache-dir", default=None, help="feature cache (default as for train; 'off' disables it)")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_template)

    p = sub.add_parser("cache", help="feature cache: size report and prune")
    cache_sub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    q = cache_sub.add_parser("report", help="entries and bytes per backbone/layers/size")
    q.add_argument("--verify", action="store_true", help="read and checksum every entry")
    q.set_defaults(func=cmd_cache_report)
    q = cache_sub.add_parser("prune", help="delete entries (stale temp files of killed writers always go)")
    q.add_argument("--max-size", default=None, help="keep the most recently used entries up to e.g. 2G")
    q.add_argument("--older-than-days", type=float, default=None, help="delete entries unused for N days")
    q.add_argument("--all", action="store_true", help="delete every entry")
    q.add_argument("--dry-run", action="store_true", help="only say what would go")
    q.set_defaults(func=cmd_cache_prune)
    for q in cache_sub.choices.values():
        q.add_argument("--cache-dir", default=None, help="default: $TFANET_CACHE_DIR or ~/.cache/tfanet/features")
        q.add_argument("--json", action="store_true", help="machine-readable output")

    for ep in entry_points(group="tfanet.commands"):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except TfanetError as exc:  # the user's to fix: one line. Anything else is a bug and shows its traceback.
        print(f"tfanet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
