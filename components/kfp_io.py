"""What runs inside a kfp component's container: artifacts ↔ :class:`components.steps.ProductPaths`, data, publish.

Kept apart from :mod:`components.kfp_components` because kfp's runtime (``_KFP_RUNTIME=true``)
strips ``kfp.dsl`` down to the artifact types, so a module that defines components cannot be
imported inside one.

**Every artifact is a directory holding a piece of one product's ``RUNS/<product>/`` tree**
(:data:`ARTIFACT_CONTENTS`): :func:`run_step` lays a step's input artifacts side by side into a
temporary product tree, runs the step function of :mod:`components.steps` on it (the function
``dvc.yaml`` calls), and copies what it wrote into the output artifacts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kfp.dsl import Artifact, Metrics

__all__ = ["ARTIFACT_CONTENTS", "fetch_dataset", "log_numbers", "publish_champion", "run_step"]

# Artifact name -> the entries of RUNS/<product>/ it carries (relative paths, as ProductPaths names them).
ARTIFACT_CONTENTS: dict[str, tuple[str, ...]] = {
    "manifest": ("manifest.csv", "dataset.json"),
    "validation": ("validation",),
    "features": ("features",),
    "template": ("template.json",),
    "model": ("model", "history.json"),
    "evaluation": ("metrics.json", "plots", "overlays"),
    "bundle": ("bundle", "calibration.json"),
    "registry": ("registry.json",),
}


# --- runs inside the component's container -----------------------------------------------------------


def _category(params: Mapping[str, Any], product: str) -> str:
    return str((params.get("data") or {}).get("category", product))


def _s3(s3_endpoint: str) -> Any:
    from components.storage import S3Settings, s3_client

    settings = S3Settings.from_env()
    if s3_endpoint:
        settings = S3Settings(s3_endpoint, settings.access_key_id, settings.secret_access_key, settings.region)
    return s3_client(settings)


def fetch_dataset(dataset_uri: str, category: str, work: Path, s3_endpoint: str = "") -> Path:
    """The dataset root holding ``<category>/``: the local path itself, or that folder downloaded from S3."""
    if not dataset_uri.startswith("s3://"):
        root = Path(dataset_uri)
        if not (root / category).is_dir():
            raise FileNotFoundError(f"{root / category}: no such dataset folder (dataset_uri={dataset_uri!r})")
        return root
    from components.storage import download_dir, parse_s3_uri

    bucket, prefix = parse_s3_uri(dataset_uri)
    root = work / "data"
    key = f"{prefix}/{category}" if prefix else category
    download_dir(_s3(s3_endpoint), bucket, key, root / category, progress=False)
    return root


def run_step(
    step: str,
    *,
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    inputs: Mapping[str, Artifact],
    outputs: Mapping[str, Artifact],
    s3_endpoint: str = "",
    **kwargs: Any,
) -> dict[str, Any]:
    """Run ``components.steps.<step>`` on a product tree made of ``inputs``; copy its results into ``outputs``.

    ``params`` is the product's section of params.yaml as JSON. ``inputs``/``outputs`` map artifact
    names of :data:`ARTIFACT_CONTENTS` to kfp artifacts. Step ``validate`` runs prepare first (the
    manifest is what it validates). ``kwargs`` go to the step function (``rules`` for validate,
    ``promotion``/``tracking_uri`` for register).
    """
    from components import steps

    section = json.loads(params)
    with tempfile.TemporaryDirectory(prefix=f"tfanet-{step}-") as tmp:
        work = Path(tmp)
        paths = steps.ProductPaths(work / "runs" / product)
        paths.root.mkdir(parents=True)
        for name, artifact in inputs.items():
            _expect(name)
            shutil.copytree(artifact.path, paths.root, dirs_exist_ok=True)
        data_root = fetch_dataset(dataset_uri, _category(section, product), work, s3_endpoint)
        if step == "validate":
            steps.prepare(data_root, product, section, paths)
            result = steps.validate(data_root, kwargs["rules"], paths)
        elif step == "register":
            result = steps.register(data_root, product, section, paths, **kwargs)
        else:
            result = getattr(steps, step)(data_root, product, section, paths, **kwargs)
        for name, artifact in outputs.items():
            out = Path(artifact.path)
            out.mkdir(parents=True, exist_ok=True)
            for rel in _expect(name):
                source = paths.root / rel
                if source.is_dir():
                    shutil.copytree(source, out / rel, dirs_exist_ok=True)
                else:
                    shutil.copy2(source, out / rel)
            artifact.metadata.update({"product": product, "dataset_version": dataset_version})
    return result


def _expect(name: str) -> tuple[str, ...]:
    if name not in ARTIFACT_CONTENTS:
        raise ValueError(f"unknown artifact {name!r}; expected one of {sorted(ARTIFACT_CONTENTS)}")
    return ARTIFACT_CONTENTS[name]


def log_numbers(metrics: Metrics, values: Mapping[str, Any], prefix: str = "") -> None:
    """Every finite number of ``values`` (nested dicts flattened with dots) as a KFP metric."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            log_numbers(metrics, value, f"{name}.")
        elif isinstance(value, int | float) and not isinstance(value, bool) and value == value:
            metrics.log_metric(name, float(value))


def publish_champion(product: str, model_bucket: str, tracking_uri: str = "", s3_endpoint: str = "") -> dict[str, Any]:
    """Put the registry champion's ``.mar`` under ``s3://<model_bucket>/torchserve/<product>/``, alone.

    The in-cluster deploy (infra/README.md): TorchServe's model store is an emptyDir filled from that
    prefix when a pod starts, and its management keys cannot be handed to a pipeline pod, so the step
    publishes the archive (the same builder as :func:`components.deploy.deploy`) and a rollout restart
    loads it. Archives of other versions are removed from the prefix; the registry keeps every version.
    """
    import mlflow
    from mlflow import MlflowClient

    from components.serving.archive import build_archive, model_name
    from components.tracking import CHAMPION, download_bundle, registered_model_name

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    registry = MlflowClient()
    reg_name = registered_model_name(product)
    champion = registry.get_model_version_by_alias(reg_name, CHAMPION)
    version = str(champion.version)
    prefix = f"torchserve/{product}"
    key = f"{prefix}/{model_name(product)}-v{version}.mar"
    client = _s3(s3_endpoint)
    with tempfile.TemporaryDirectory(prefix=f"publish-{product}-") as tmp:
        bundle = download_bundle(f"models:/{reg_name}/{version}", Path(tmp) / "model")
        source = {"kind": "mlflow", "model": reg_name, "version": version, "run_id": champion.run_id}
        mar = build_archive(bundle, product, version, Path(tmp) / "store", source=source, filename=Path(key).name)
        client.upload_file(str(mar), model_bucket, key)
    listed = client.list_objects_v2(Bucket=model_bucket, Prefix=f"{prefix}/").get("Contents", [])
    removed = [o["Key"] for o in listed if o["Key"].endswith(".mar") and o["Key"] != key]
    for old in removed:
        client.delete_object(Bucket=model_bucket, Key=old)
    record = {
        "product": product,
        "registered_model": reg_name,
        "champion": version,
        "archive": f"s3://{model_bucket}/{key}",
        "removed": [f"s3://{model_bucket}/{k}" for k in removed],
        "rollout": f"kubectl rollout restart deployment/torchserve-{product}",
    }
    registry.set_model_version_tag(reg_name, version, "deploy.published", record["archive"])
    return record
