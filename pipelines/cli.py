"""``tfanet pipeline compile|submit|run-local``: the Kubeflow pipelines from the command line.

Registered in the ``tfanet.commands`` entry-point group (pyproject.toml), as is ``tfanet drift`` (its
parser is ``components.drift_cli``; this layer hands it the pipeline submitter). ``submit`` and
``run-local`` fill the pipeline's ``params``/``promotion``/``validate_rules`` from params.yaml for
the ``--product`` given; ``--param NAME=VALUE`` sets (or overrides) any parameter, and
``--dvc-file`` takes ``dataset_version`` from a ``.dvc`` file. Errors are one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import COMPILED, NAMES
from tfanet_core.errors import ConfigError, TfanetError

if TYPE_CHECKING:
    from components.drift_check import RetrainRequest


def _key_values(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--param {pair!r}: expected NAME=VALUE")
        out[name] = value
    return out


def _arguments(args: argparse.Namespace, pipeline: str, products: list[str]) -> dict[str, Any]:
    from components.params import load_params
    from pipelines.submit import dvc_version, pipeline_arguments

    arguments = pipeline_arguments(pipeline, load_params(args.params), products)
    if args.dvc_file:
        arguments["dataset_version"] = dvc_version(args.dvc_file)
    return arguments | _key_values(args.param)


def run_compile(args: argparse.Namespace) -> int:
    from pipelines.compile import compile_all

    for path in compile_all(args.out):
        print(path)
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from pipelines.submit import SubmitError, submit

    try:
        run_id = submit(
            args.pipeline, _arguments(args, args.pipeline, args.product), args.host, args.experiment, args.run_name
        )
    except SubmitError as exc:
        print(f"tfanet pipeline submit: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"pipeline": args.pipeline, "run_id": run_id}))
    return 0


def run_local_pipeline(args: argparse.Namespace) -> int:
    from components.storage import ENDPOINT_VARIABLES
    from pipelines.local import run_local

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise ConfigError(
            "MLFLOW_TRACKING_URI is not set: start the stack and export its env: "
            'eval "$(python -m infra.local.stack env)"'
        )
    arguments = _arguments(args, "training", [args.product])
    data = args.data if args.data.startswith("s3://") else str(Path(args.data).resolve())
    if not (data.startswith("s3://") or Path(data).is_dir()):
        raise TfanetError(f"{data}: no such dataset directory (--data: a directory or s3://bucket/prefix)")
    arguments.setdefault("dataset_uri", data)
    if "dataset_version" not in arguments:
        raise ConfigError("no dataset version: pass --dvc-file DATA.dvc or --param dataset_version=HASH")
    arguments.setdefault("mlflow_tracking_uri", tracking_uri)
    arguments.setdefault("s3_endpoint", next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), ""))
    # kfp.local: checkpoints on the local disk (the "volume" form of checkpoint_root), not the cluster's bucket.
    arguments.setdefault("checkpoint_root", str((args.pipeline_root / "checkpoints").resolve()))
    try:
        outputs = run_local(arguments, args.pipeline_root)
    except RuntimeError as exc:  # kfp.local names the failed task; the task's own log is above on stderr
        print(f"tfanet pipeline run-local: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"pipeline": "training", "product": arguments["product"], **outputs}))
    return 0


def _submit_retrain(request: RetrainRequest) -> str:
    from pipelines.submit import submit_retrain

    return submit_retrain(request)


def register_drift(subparsers: argparse._SubParsersAction) -> None:
    """Entry point of the ``tfanet.commands`` group: ``tfanet drift check``, able to submit ``retrain_on_drift``."""
    from components.drift_cli import register

    register(subparsers, submit=_submit_retrain)


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="default: %(default)s")
    p.add_argument("--dvc-file", type=Path, help="take dataset_version from this .dvc file (e.g. data/synth.dvc)")
    p.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="a pipeline parameter (repeatable)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point of the ``tfanet.commands`` group: adds ``tfanet pipeline``."""
    p = subparsers.add_parser(
        "pipeline",
        help="Kubeflow pipelines: compile, submit to a cluster, or run the training pipeline locally",
        description="compile: write pipelines/compiled/*.yaml. submit: start a run on Kubeflow Pipelines. "
        "run-local: run the training pipeline of one product with kfp.local (no cluster).",
    )
    actions = p.add_subparsers(dest="action", required=True)

    c = actions.add_parser("compile", help="compile every pipeline to YAML")
    c.add_argument("--out", type=Path, default=COMPILED, help="output directory (default: pipelines/compiled)")
    c.set_defaults(func=run_compile)

    s = actions.add_parser(
        "submit",
        help="start a run of a compiled pipeline",
        description="Parameters come from params.yaml for --product (params, promotion, validate_rules), from "
        "--dvc-file (dataset_version) and from --param NAME=VALUE; dataset_uri is always a --param.",
    )
    s.add_argument("pipeline", choices=NAMES)
    s.add_argument("--host", help="KFP API/UI URL (default: $KFP_HOST)")
    s.add_argument(
        "--product", action="append", default=[], help="product(s) of params.yaml (multi_product default: all)"
    )
    s.add_argument("--experiment", help="KFP experiment name (default: the server's default experiment)")
    s.add_argument("--run-name", help="run name (default: chosen by KFP)")
    _params_args(s)
    s.set_defaults(func=run_submit)

    r = actions.add_parser(
        "run-local",
        help="run the training pipeline locally with kfp.local (needs MLFLOW_TRACKING_URI)",
        description="kfp.local has no ParallelFor, conditions, caching or resources: only the training pipeline "
        "runs here, one product at a time. Each step runs as a subprocess of this Python.",
    )
    r.add_argument("--product", required=True, help="a product of params.yaml")
    r.add_argument("--data", required=True, help="dataset root: a directory or s3://bucket/prefix")
    r.add_argument(
        "--pipeline-root",
        type=Path,
        default=Path(".tfanet/kfp"),
        help="where task outputs and artifacts go (default: %(default)s)",
    )
    _params_args(r)
    r.set_defaults(func=run_local_pipeline)
