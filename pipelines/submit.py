"""Submit a compiled pipeline to Kubeflow Pipelines: :func:`submit`, and the arguments params.yaml implies.

:func:`submit` is the stable entry point for other code (``tfanet drift check`` submits
``retrain_on_drift`` through :func:`submit_retrain`, which its CLI hands to the check). It checks
the arguments against the compiled pipeline's inputs before contacting anything, so a typo fails
here and not in a pod; values of string inputs that are dicts or lists are sent as JSON (the
pipelines take params.yaml sections as JSON strings).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipelines.compile import compiled_path
from tfanet_core.errors import ConfigError, TfanetError

if TYPE_CHECKING:
    from components.drift_check import RetrainRequest

__all__ = [
    "HOST_VARIABLE",
    "SubmitError",
    "dvc_version",
    "pipeline_arguments",
    "pipeline_inputs",
    "submit",
    "submit_retrain",
]

HOST_VARIABLE = "KFP_HOST"
PER_PRODUCT = ("training", "retrain_on_drift")
DEPLOYING = ("multi_product", "retrain_on_drift")  # they take params.yaml's deploy section (parity settings)


class SubmitError(RuntimeError):
    """The run was not submitted; the message says why and what to do."""


def pipeline_inputs(pipeline: str) -> dict[str, dict[str, Any]]:
    """The compiled pipeline's input parameters: name -> ``{"parameterType": ..., "defaultValue"?: ...}``."""
    path = compiled_path(pipeline)
    if not path.is_file():
        raise SubmitError(f"{path} is missing: compile the pipelines first (`tfanet pipeline compile`)")
    spec = next(yaml.safe_load_all(path.read_text()))  # the second document is the Kubernetes platform spec
    return spec["root"]["inputDefinitions"]["parameters"]


def _coerce(name: str, value: Any, kind: str) -> Any:
    if kind == "STRING" and not isinstance(value, str):
        return json.dumps(value, sort_keys=True)
    if kind in ("LIST", "STRUCT") and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise SubmitError(f"parameter {name} must be JSON ({kind.lower()}): {exc}") from exc
    return value


def _checked(pipeline: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    inputs = pipeline_inputs(pipeline)
    unknown = sorted(set(arguments) - set(inputs))
    if unknown:
        raise SubmitError(f"{pipeline} has no parameter(s) {unknown}; its parameters: {', '.join(inputs)}")
    missing = [n for n, spec in inputs.items() if n not in arguments and "defaultValue" not in spec]
    if missing:
        raise SubmitError(f"{pipeline} needs parameter(s) {missing} (pass --param NAME=VALUE)")
    return {name: _coerce(name, value, inputs[name]["parameterType"]) for name, value in arguments.items()}


def _reachable(host: str, timeout: float = 10.0) -> None:
    """Any HTTP answer from the KFP API's health endpoint counts (auth may still refuse the run later)."""
    url = f"{host.rstrip('/')}/apis/v2beta1/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SubmitError(
            f"cannot reach Kubeflow Pipelines at {host} ({reason}); check the URL, or forward the UI: "
            "kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80"
        ) from exc


def submit(
    pipeline: str,
    arguments: dict[str, Any],
    host: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
) -> str:
    """Start a run of compiled pipeline ``pipeline`` (``pipelines/compiled/<pipeline>.yaml``); returns its run id.

    ``host``: the KFP API/UI URL, else ``$KFP_HOST``. Raises :class:`SubmitError` (unknown pipeline or
    parameter, missing parameter, no host, host unreachable, refused by the server).
    """
    try:
        checked = _checked(pipeline, arguments)
    except ValueError as exc:
        raise SubmitError(str(exc)) from exc
    host = host or os.environ.get(HOST_VARIABLE)
    if not host:
        raise SubmitError(
            f"no Kubeflow Pipelines host: pass --host URL or set {HOST_VARIABLE} "
            "(e.g. http://localhost:8080 after `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`)"
        )
    _reachable(host)
    import kfp
    from kfp_server_api.exceptions import ApiException

    try:
        result = kfp.Client(host=host).create_run_from_pipeline_package(
            str(compiled_path(pipeline)), arguments=checked, run_name=run_name, experiment_name=experiment
        )
    except ApiException as exc:
        raise SubmitError(f"Kubeflow Pipelines at {host} refused the run: {exc.status} {exc.reason}") from exc
    return str(result.run_id)


def submit_retrain(request: RetrainRequest) -> str:
    """The drift check's ``mode: kfp`` submitter: a ``retrain_on_drift`` run on the new dataset version."""
    from components.drift_check import RetrainError

    arguments = pipeline_arguments("retrain_on_drift", request.params, [request.product]) | {
        "dataset_uri": request.dataset_uri,
        "dataset_version": request.dataset_version,
        "drift_report": request.trigger[:2000],
    }
    try:
        return submit(
            "retrain_on_drift", arguments, host=request.host, experiment=request.experiment, run_name=request.run_name
        )
    except SubmitError as exc:
        raise RetrainError(str(exc)) from exc


def dvc_version(dvc_file: Path | str) -> str:
    """The dataset version DVC recorded for a tracked directory: the md5 in ``<path>.dvc``."""
    path = Path(dvc_file)
    if not path.is_file():
        raise TfanetError(f"{path}: no such .dvc file (e.g. data/synth.dvc after `dvc add data/synth`)")
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    if "md5" not in outs[0]:
        raise ConfigError(f"{path}: no md5 in its first output; run `dvc add` on the dataset again")
    return str(outs[0]["md5"])


def pipeline_arguments(pipeline: str, params: Mapping[str, Any], products: Iterable[str] = ()) -> dict[str, Any]:
    """The arguments params.yaml provides, as JSON: product sections, the promotion gate, validation rules, deploy.

    ``training``/``retrain_on_drift`` take exactly one product; ``multi_product`` takes any
    (default: every product of params.yaml).
    """
    from components.params import product_section

    products = list(products)
    sections = params.get("products") or {}
    common = {
        "promotion": json.dumps(params.get("promotion") or {}, sort_keys=True),
        "validate_rules": json.dumps(params.get("validate") or {}, sort_keys=True),
    }
    compiled_path(pipeline)  # an unknown pipeline name fails here, naming the known ones
    if pipeline in DEPLOYING:
        common["deploy_settings"] = json.dumps(params.get("deploy") or {}, sort_keys=True)
    if pipeline in PER_PRODUCT:
        if len(products) != 1:
            raise ConfigError(f"pipeline {pipeline} trains one product: pass exactly one --product")
        section = product_section(params, products[0])
        return {"product": products[0], "params": json.dumps(section, sort_keys=True), **common}
    chosen = products or list(sections)
    items = [{"product": p, "params": json.dumps(product_section(params, p), sort_keys=True)} for p in chosen]
    return {"products": items, **common}
