"""``tfanet stage <step> --product P``: the pipeline steps as commands, for the stages of dvc.yaml.

Registered in the ``tfanet.commands`` entry-point group (pyproject.toml), so the core CLI gains
the verb without importing anything of the MLOps stack. Paths follow the layout of
:class:`components.steps.ProductPaths` under ``--runs``; the dataset root and the product's
settings come from ``params.yaml``, the file DVC tracks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from components.params import load_params, product_section

STEPS = ("prepare", "validate", "features", "template", "train", "evaluate", "calibrate", "register")


def run_stage(args: argparse.Namespace) -> int:
    from components import steps

    params = load_params(args.params)
    section = product_section(params, args.product)
    data_root = Path(args.data or (params.get("data") or {}).get("root", "data/synth"))
    paths = steps.ProductPaths.of(args.runs, args.product)
    paths.root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any]
    if args.step == "validate":
        result = steps.validate(data_root, params.get("validate") or {}, paths)
        result = {k: result[k] for k in ("success", "dataset", "manifest_version", "n_images", "evaluated")}
    elif args.step == "register":
        result = steps.register(data_root, args.product, section, paths, params.get("promotion") or {})
    else:
        result = getattr(steps, args.step)(data_root, args.product, section, paths)
        if args.step == "template":
            result = {k: result[k] for k in ("image", "strategy", "index")}
        elif args.step == "evaluate":
            result = {k: result.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")}
    print(json.dumps({"stage": args.step, "product": args.product, **result}, default=str))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point of the ``tfanet.commands`` group: adds ``tfanet stage``."""
    p = subparsers.add_parser(
        "stage",
        help="run one pipeline step for one product (what dvc.yaml's stages call)",
        description="Run one step of prepare → validate → features → template → train → evaluate → calibrate → "
        "register for one product, reading params.yaml and writing RUNS/<product>/.",
    )
    p.add_argument("step", choices=STEPS)
    p.add_argument("--product", required=True, help="a product section of params.yaml (e.g. fabric)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="default: %(default)s")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="outputs root (default: %(default)s)")
    p.add_argument("--data", type=Path, help="dataset root (default: params.yaml data.root)")
    p.set_defaults(func=run_stage)
