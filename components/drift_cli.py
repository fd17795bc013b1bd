"""``tfanet drift check --product P --images DIR|s3://…``: the drift check and its retrain trigger.

Registered through ``pipelines.cli.register_drift`` (it passes the kfp submitter in). Run from the DVC project root:
the window tests come from params.yaml's ``drift:`` section, what a drift triggers from ``retrain:``
(``cooldown_hours``, ``mode: dvc|kfp``, ``kfp_host``, ``dataset_uri``); MLflow is whatever
``MLFLOW_TRACKING_URI`` names. Prints the decision as JSON (stdout carries nothing else; MLflow's run links go to
stderr) and writes it to ``RUNS/<product>/drift.json``.

Exit codes: 0 no drift; 1 drift (retrain triggered, or suppressed by the cooldown: the JSON says which);
2 error (no champion or drift reference, no images, or the triggered retrain failed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from components.params import ProductSettings, load_params, product_section
from tfanet_core.errors import TfanetError

if TYPE_CHECKING:
    from components.drift_check import RetrainSubmitter

EXIT_NO_DRIFT, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2


def run_check(args: argparse.Namespace, submit: RetrainSubmitter | None = None) -> int:
    from mlflow.exceptions import MlflowException

    from components.drift_check import NO_DRIFT, RETRAIN_FAILED, RetrainParams, check
    from tfanet_core.drift import DriftConfig

    params = load_params(args.params)
    section = product_section(params, args.product)
    retrain = RetrainParams.from_params(params.get("retrain"))
    if args.mode:
        retrain = dataclasses.replace(retrain, mode=args.mode)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise TfanetError(
            "MLFLOW_TRACKING_URI is not set: start the stack and export its env: "
            'eval "$(python -m infra.local.stack env)"'
        )
    try:
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run's URL: stdout stays pure JSON
            decision = check(
                args.product,
                args.images,
                config=DriftConfig.from_dict(params.get("drift")),
                retrain=retrain,
                project=args.params.parent,
                data_root=Path((params.get("data") or {}).get("root", "data/synth")),
                category=ProductSettings.of(args.product, section).category,
                runs=args.runs,
                record=args.out or args.params.parent / args.runs / args.product / "drift.json",
                params=params,
                submit=submit,
            )
    except MlflowException as exc:  # no champion, a server error: a message, not a traceback (tfanet's
        # main turns a TfanetError into exit 2 with the message likewise)
        print(f"tfanet drift check: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(decision.to_json(), indent=2, default=str))
    if decision.decision == RETRAIN_FAILED:
        return EXIT_ERROR
    return EXIT_NO_DRIFT if decision.decision == NO_DRIFT else EXIT_DRIFT


def register(subparsers: argparse._SubParsersAction, submit: RetrainSubmitter | None = None) -> None:
    """Adds ``tfanet drift check``; ``submit`` starts a ``mode: kfp`` retrain. The ``tfanet.commands`` entry point
    is ``pipelines.cli.register_drift``, which passes the pipelines' submitter in (components never import them)."""
    p = subparsers.add_parser(
        "drift",
        help="check a window of production images for drift against the champion; retrain on drift",
        description="check: score the images with the registry's champion of tfanet-<product>, test them against "
        "the drift reference in its bundle (MMD on backbone embeddings, KS and reject rate on scores), log the "
        "statistics and a plot to MLflow experiment tfanet-<product>-drift, and on drift (outside the cooldown) "
        "retrain the product. mode dvc: the images join <data.root>/<category>/train/good as a new DVC dataset "
        "version (dvc add + push; nothing existing is changed), then `dvc repro register@<product>` retrains and "
        "registers; it does NOT deploy (the deploy stage needs TorchServe: run `tfanet deploy run` there). mode kfp: "
        "the images are uploaded under retrain.dataset_uri and the retrain_on_drift pipeline is submitted. The "
        "images become training normals: pass images that passed inspection. Exit: 0 no drift, 1 drift (retrain "
        "triggered or suppressed by the cooldown), 2 error or failed retrain.",
    )
    p.add_argument("action", choices=("check",))
    p.add_argument("--product", required=True, help="a product section of params.yaml (e.g. fabric)")
    p.add_argument("--images", required=True, help="the window: a directory of images or an s3://bucket/prefix")
    p.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="in the DVC project root (default: %(default)s)"
    )
    p.add_argument("--runs", type=Path, default=Path("runs"), help="outputs root (default: %(default)s)")
    p.add_argument("--mode", choices=("dvc", "kfp"), help="override params.yaml retrain.mode")
    p.add_argument("--out", type=Path, help="decision JSON (default: RUNS/<product>/drift.json)")
    p.set_defaults(func=functools.partial(run_check, submit=submit))
