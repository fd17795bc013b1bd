"""``tfanet deploy run|rollback --product P``: the deploy stage of dvc.yaml and the operator's rollback.

Registered in the ``tfanet.commands`` entry-point group (pyproject.toml). The TorchServe to talk to
is the one started from ``--state-dir`` (``python -m infra.local.torchserve start``); MLflow is
whatever ``MLFLOW_TRACKING_URI`` names. Serving settings come from the product's ``serving:``
section of params.yaml, the probe images from the test split of the prepare step's manifest
(``deploy.probe_count`` of them, normal and defective alternating) unless ``--probe`` names them.
Prints the decision as JSON and writes it to ``RUNS/<product>/deploy.json``; exits 1 when parity
refused the champion (the old default keeps serving, but a champion that serves other scores than
its bundle needs a look).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from components.params import load_params, product_section
from tfanet_core.errors import TfanetError

DEFAULT_PROBE_COUNT = 4


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from components.deploy import ServingParams
    from components.serving.torchserve import TorchServeClient

    params = load_params(args.params)
    section = product_section(params, args.product)
    deploy_params = params.get("deploy") or {}
    if args.probe:
        probes = list(args.probe)
    else:  # the prepare step's test split, as register read it
        from components.steps import ProductPaths, prepared_manifest

        data_root = Path(args.data or (params.get("data") or {}).get("root", "data/synth"))
        manifest = prepared_manifest(data_root, ProductPaths.of(args.runs, args.product))
        probes = manifest.probe_images(int(deploy_params.get("probe_count", DEFAULT_PROBE_COUNT)))
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise TfanetError(
            "MLFLOW_TRACKING_URI is not set: start the stack and export its env: "
            'eval "$(python -m infra.local.stack env)"'
        )
    return {
        "client": TorchServeClient.from_state_dir(args.state_dir),
        "model_store": Path(args.state_dir) / "model_store",
        "probes": probes,
        "serving": ServingParams.from_params(section.get("serving")),
        "tolerance": float(deploy_params.get("tolerance", 1e-4)),
        "record": args.out or Path(args.runs) / args.product / "deploy.json",
    }


def run_deploy(args: argparse.Namespace) -> int:
    from components.deploy import REFUSED, DeployError, deploy, rollback
    from components.serving.archive import ArchiveError
    from components.serving.torchserve import TorchServeError

    action = deploy if args.action == "run" else rollback
    try:
        decision = action(args.product, **_settings(args))
    except (DeployError, ArchiveError, TorchServeError) as exc:  # server-side trouble: a message, not a traceback
        print(f"tfanet deploy {args.action}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(decision.to_json(), indent=2))
    return 1 if decision.status == REFUSED else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point of the ``tfanet.commands`` group: adds ``tfanet deploy``."""
    p = subparsers.add_parser(
        "deploy",
        help="serve the registry's champion on TorchServe (after a parity check), or roll back",
        description="run: when the registry's champion of tfanet-<product> is not TorchServe's default, register it, "
        "check that its served scores equal its bundle's, then make it the default. rollback: serve the previously "
        "deployed version again and move champion back to it.",
    )
    p.add_argument("action", choices=("run", "rollback"))
    p.add_argument("--product", required=True, help="a product section of params.yaml (e.g. fabric)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="default: %(default)s")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="outputs root (default: %(default)s)")
    p.add_argument("--data", type=Path, help="dataset root for the probe images (default: params.yaml data.root)")
    p.add_argument(
        "--probe", type=Path, action="append", metavar="IMAGE", help="probe image (repeatable; default: test split)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("TFANET_TORCHSERVE_DIR", ".tfanet/torchserve")),
        help="the running TorchServe's state dir (default: $TFANET_TORCHSERVE_DIR or ./.tfanet/torchserve)",
    )
    p.add_argument("--out", type=Path, help="decision JSON (default: RUNS/<product>/deploy.json)")
    p.set_defaults(func=run_deploy)
