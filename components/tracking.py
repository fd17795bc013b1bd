"""MLflow tracking and registry for tfanet: one experiment and one registered model per product.

A training run records what is needed to compare and reproduce it: the params (the bundle's
full config plus the caller's params.yaml section), the dataset version (the DVC hash, also a
tag, so the promotion gate can tell whether two runs saw the same test set), every numeric
value of ``metrics.json`` (overall and per defect type), the evaluation plots and overlays,
and the model: an MLflow pyfunc (:mod:`components.pyfunc_model`) that carries the bundle and
the ``tfanet_core`` source, registered as ``tfanet-<product>`` with the alias ``candidate``.
Only :mod:`components.promotion` moves ``champion``.

Talks to whatever ``MLFLOW_TRACKING_URI`` (or ``tracking_uri=``) names; with the local stack
the artifacts go through the MLflow server to SeaweedFS, so clients need no S3 credentials.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import requires, version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema
from packaging.requirements import Requirement
from PIL import Image

import tfanet_core
from components.naming import experiment_name, registered_model_name
from tfanet_core.bundle import read_metadata
from tfanet_core.config import as_hw
from tfanet_core.errors import TfanetError

__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "SIGNATURE",
    "TAG_DATASET",
    "TAG_PRODUCT",
    "TrainingRun",
    "download_bundle",
    "encode_images",
    "flatten_metrics",
    "flatten_params",
    "log_training_run",
    "model_uri",
    "version_by_alias",
]

CANDIDATE = "candidate"
CHAMPION = "champion"
TAG_PRODUCT = "tfanet.product"
TAG_DATASET = "tfanet.dataset_version"
BUNDLE_ARTIFACT = "bundle"  # key in the pyfunc's artifacts (MLmodel gives its path)
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")  # by path: MLflow copies and runs it (model from code)

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image")]),
    outputs=Schema([ColSpec("double", "score"), ColSpec("double", "threshold"), ColSpec("boolean", "is_anomalous")]),
)


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at; None when the model or the alias does not exist (other errors raise)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or f"alias {alias} not found" in str(exc):
            return None
        raise


def model_uri(product: str, alias: str = CHAMPION) -> str:
    """``models:/tfanet-<product>@<alias>``: what deploy and the drift check load."""
    return f"models:/{registered_model_name(product)}@{alias}"


@dataclass(frozen=True)
class TrainingRun:
    run_id: str
    experiment_id: str
    model_uri: str  # models:/m-<id>, the logged model itself
    registered_name: str | None
    version: str | None  # registry version, None when not registered


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping → ``{"train.epochs": 12, ...}``: MLflow params are flat, params.yaml is not."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten_params(value, f"{name}.")
        else:
            out[name] = value
    return out


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite number of a ``metrics.json`` as a flat MLflow metric, nested keys joined by ``/``.

    ``{"image_auroc": 0.9, "per_type": {"hole": {"image_auroc": 1.0}}}`` →
    ``{"image_auroc": 0.9, "per_type/hole/image_auroc": 1.0}``. ``None`` (undefined, e.g.
    pixel AUROC without masks), strings and booleans are left out rather than logged as 0.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten_metrics(value, f"{name}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def encode_images(images: Sequence[Path | str | bytes]) -> pd.DataFrame:
    """Image files (or their bytes) → the pyfunc input: a DataFrame with a base64 ``image`` column."""
    encoded = [
        base64.b64encode(img if isinstance(img, bytes) else Path(img).read_bytes()).decode("ascii") for img in images
    ]
    return pd.DataFrame({"image": pd.Series(encoded, dtype="object")})


def _grey_example(size: tuple[int, int]) -> bytes:
    """A neutral PNG at the model's input size (H, W): an input example that needs no dataset at hand."""
    buf = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def _pip_requirements() -> list[str]:
    """tfanet's own pinned core dependencies (pyproject) plus mlflow and pandas at the installed versions.

    Explicit, because MLflow's inference would load the model in a subprocess and list ``tfanet``
    itself, which is not on any index (its source travels in the model's code/ instead).
    """
    core = [str(r) for r in map(Requirement, requires("tfanet") or []) if r.marker is None]
    return [*core, f"mlflow=={version('mlflow')}", f"pandas=={version('pandas')}"]


def _core_source(tmp: Path) -> Path:
    """A clean copy of the tfanet_core package (no __pycache__) for the model's code/ folder."""
    src = Path(tfanet_core.__file__).parent
    dst = tmp / "tfanet_core"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def log_training_run(
    product: str,
    bundle_dir: Path | str,
    *,
    metrics: Mapping[str, Any] | Path | str,
    dataset_version: str,
    params: Mapping[str, Any] | None = None,
    artifacts_dir: Path | str | None = None,
    example_images: Sequence[Path | str] = (),
    register: bool = True,
    run_name: str | None = None,
    tracking_uri: str | None = None,
) -> TrainingRun:
    """Log one trained bundle and its test metrics as a run of experiment ``tfanet-<product>``.

    ``metrics`` is ``tfanet evaluate``'s metrics.json (path or dict) for this bundle on the
    test split of ``dataset_version``; ``artifacts_dir`` (usually evaluate's ``--out``: plots,
    overlays) is logged under ``evaluation/``. With ``register``, the pyfunc becomes a new
    version of ``tfanet-<product>`` tagged with the product and dataset version, and the
    ``candidate`` alias moves to it.
    """
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    bundle_dir = Path(bundle_dir)
    meta = read_metadata(bundle_dir)
    if (meta.get("thresholds", {}).get("image") or {}).get("value") is None:
        raise TfanetError(f"{bundle_dir}: no calibrated image threshold; calibrate the bundle before logging it")
    metric_values = flatten_metrics(metrics if isinstance(metrics, Mapping) else json.loads(Path(metrics).read_text()))
    if not metric_values:
        raise TfanetError("no numeric metrics to log: pass tfanet evaluate's metrics.json")
    size = as_hw(meta["config"]["features"]["image_size"])
    example = encode_images(list(example_images)[:2] or [_grey_example(size)])

    experiment = mlflow.set_experiment(experiment_name(product))
    name = registered_model_name(product) if register else None
    tags = {TAG_PRODUCT: product, TAG_DATASET: dataset_version}
    with mlflow.start_run(run_name=run_name, tags=tags) as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params(
            flatten_params({"config": meta["config"]})
            | flatten_params(params or {})
            | {"dataset_version": dataset_version, "backbone.tag": meta["backbone"].get("tag")}
        )
        mlflow.log_metrics(metric_values)
        mlflow.log_dict(meta, "bundle.json")
        if artifacts_dir is not None:
            mlflow.log_artifacts(str(artifacts_dir), "evaluation")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=PYFUNC_FILE,
            artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            code_paths=[str(_core_source(Path(tmp)))],
            signature=SIGNATURE,
            input_example=example,
            pip_requirements=_pip_requirements(),
            registered_model_name=name,
            tags=tags,
        )
    version_id = None
    if name is not None:
        version_id = str(info.registered_model_version)
        client = MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(name, version_id, key, value)
        client.set_registered_model_alias(name, CANDIDATE, version_id)
    return TrainingRun(run.info.run_id, experiment.experiment_id, info.model_uri, name, version_id)


def download_bundle(uri: str, dst: Path | str) -> Path:
    """The bundle inside a logged/registered pyfunc (e.g. ``models:/tfanet-fabric@champion``), downloaded to ``dst``.

    For consumers that need the bundle itself rather than the pyfunc (TorchServe archive, drift check).
    """
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
    if BUNDLE_ARTIFACT not in artifacts:
        raise TfanetError(f"{uri} is not a tfanet model: its pyfunc has no '{BUNDLE_ARTIFACT}' artifact")
    bundle = local / artifacts[BUNDLE_ARTIFACT]["path"]
    read_metadata(bundle)
    return bundle
