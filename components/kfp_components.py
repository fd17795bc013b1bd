"""The kfp v2 components: one per pipeline step, each a thin wrapper over the function ``dvc.yaml`` calls.

A component body names its artifacts and calls :func:`components.kfp_io.run_step`, the one place
where kfp artifacts meet :class:`components.steps.ProductPaths`; then it writes the summaries the
KFP UI shows (``Metrics``, ``ClassificationMetrics``, ``HTML`` for the Data Docs page, ``Markdown``).

The dataset root comes from ``dataset_uri`` (``s3://bucket/prefix`` or a local path) and every
step that reads it also takes ``dataset_version`` (the DVC hash) as a plain string: KFP's cache
key covers parameters but not the contents behind an URI (kubeflow/pipelines#12751), so this
string is what keeps a new dataset version from hitting a stale cached step. ``params`` (a product's
section of params.yaml), ``rules`` and ``promotion`` are JSON strings, not dicts: kfp passes dicts as
protobuf Structs, which turn every int into a float (``layers: [1, 2, 3]`` would arrive as floats).

Bodies import inside the function: kfp embeds each body's source in the compiled YAML and runs it
in the component image (``infra/docker``), where ``tfanet[mlops]`` and so kfp are installed, hence
``install_kfp_package=False`` and no ``packages_to_install``.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

__all__ = [
    "CPU_IMAGE",
    "GPU_IMAGE",
    "calibrate",
    "deploy",
    "evaluate",
    "extract_features",
    "register",
    "select_template",
    "train",
    "validate",
]

CPU_IMAGE = "tfanet-component:0.1.0-cpu"  # infra/docker/component.Dockerfile
GPU_IMAGE = "tfanet-component:0.1.0-cuda"  # infra/docker/component-cuda.Dockerfile


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def validate(
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    rules: str,
    s3_endpoint: str,
    manifest: Output[Dataset],
    validation: Output[Artifact],
    report: Output[HTML],
) -> None:
    """Manifest of the product's images, then the great-expectations gate (fails naming every problem)."""
    import json
    import shutil
    from pathlib import Path

    from components.kfp_io import run_step

    result = run_step(
        "validate",
        product=product,
        dataset_uri=dataset_uri,
        dataset_version=dataset_version,
        params=params,
        inputs={},
        outputs={"manifest": manifest, "validation": validation},
        s3_endpoint=s3_endpoint,
        rules=json.loads(rules),
    )
    manifest.metadata.update({"manifest_version": result["manifest_version"], "n_images": result["n_images"]})
    pages = sorted((Path(validation.path) / "validation" / "validations" / "tfanet_manifest").rglob("*.html"))
    shutil.copy(pages[-1], report.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def extract_features(
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    s3_endpoint: str,
    manifest: Input[Dataset],
    features: Output[Dataset],
) -> None:
    """The backbone's features of every normal train/val image, as the content-addressed feature cache."""
    from components.kfp_io import run_step

    stats = run_step(
        "features",
        product=product,
        dataset_uri=dataset_uri,
        dataset_version=dataset_version,
        params=params,
        inputs={"manifest": manifest},
        outputs={"features": features},
        s3_endpoint=s3_endpoint,
    )
    features.metadata.update(stats)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def select_template(
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    s3_endpoint: str,
    manifest: Input[Dataset],
    features: Input[Dataset],
    template: Output[Artifact],
) -> str:
    """The template image (``template.json``) among the manifest's training images; returns its dataset path."""
    from components.kfp_io import run_step

    record = run_step(
        "template",
        product=product,
        dataset_uri=dataset_uri,
        dataset_version=dataset_version,
        params=params,
        inputs={"manifest": manifest, "features": features},
        outputs={"template": template},
        s3_endpoint=s3_endpoint,
    )
    template.metadata.update({"strategy": record["strategy"], "index": record["index"]})
    return str(record["image"])


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    s3_endpoint: str,
    checkpoint_root: str,
    run_id: str,
    manifest: Input[Dataset],
    features: Input[Dataset],
    template: Input[Artifact],
    model: Output[Model],
    history: Output[Metrics],
) -> None:
    """TFA-Net fitted on the cached features with the chosen template (the GPU step).

    Checkpoints are mirrored to ``<checkpoint_root>/<run_id>/<product>/`` while it trains
    (:mod:`components.checkpoints`): a retry of this task in the same run (``run_id`` is KFP's run
    UUID) resumes from the last one, a new run starts fresh. Empty ``checkpoint_root``: no mirror.
    """
    import json
    from pathlib import Path

    from components.checkpoints import checkpoint_location
    from components.kfp_io import run_step

    location = checkpoint_location(checkpoint_root, run_id, product) if checkpoint_root else ""
    summary = run_step(
        "train",
        product=product,
        dataset_uri=dataset_uri,
        dataset_version=dataset_version,
        params=params,
        inputs={"manifest": manifest, "features": features, "template": template},
        outputs={"model": model},
        s3_endpoint=s3_endpoint,
        checkpoint_uri=location,
    )
    restored = summary.get("restored_checkpoints", [])
    model.metadata.update({"checkpoints": location, "restored_checkpoints": restored})
    last = json.loads((Path(model.path) / "history.json").read_text())[-1]
    history.log_metric("epochs", float(summary["epochs"]))
    history.log_metric("best_epoch", float(summary["best_epoch"]))
    history.log_metric("resumed", float(bool(restored)))
    for key, value in last.items():
        if key != "epoch" and isinstance(value, int | float):
            history.log_metric(f"last.{key}", float(value))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    s3_endpoint: str,
    manifest: Input[Dataset],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
) -> None:
    """Test-split metrics of the manifest's test rows (AUROC, AUPRO, F1-max, per defect type), plots, overlays."""
    from components.kfp_io import log_numbers, run_step

    result = run_step(
        "evaluate",
        product=product,
        dataset_uri=dataset_uri,
        dataset_version=dataset_version,
        params=params,
        inputs={"manifest": manifest, "model": model},
        outputs={"evaluation": evaluation},
        s3_endpoint=s3_endpoint,
    )
    log_numbers(metrics, result)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def calibrate(
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    s3_endpoint: str,
    manifest: Input[Dataset],
    model: Input[Model],
    features: Input[Dataset],
    evaluation: Input[Artifact],
    bundle: Output[Model],
    thresholds: Output[Metrics],
    confusion: Output[ClassificationMetrics],
) -> None:
    """The one calibration: thresholds on the held-out normals, and the test counts at that very threshold."""
    from components.kfp_io import log_numbers, run_step

    summary = run_step(
        "calibrate",
        product=product,
        dataset_uri=dataset_uri,
        dataset_version=dataset_version,
        params=params,
        inputs={"manifest": manifest, "model": model, "features": features, "evaluation": evaluation},
        outputs={"bundle": bundle},
        s3_endpoint=s3_endpoint,
    )
    at = summary.pop("at_threshold")
    log_numbers(thresholds, summary)
    confusion.log_confusion_matrix(
        ["good", "anomalous"],
        [[at["true_negatives"], at["false_positives"]], [at["false_negatives"], at["true_positives"]]],
    )
    confusion.metadata["threshold"] = at["threshold"]


# The return type is kfp's inline multi-output form, which mypy rejects: kfp ships only the function's source, so a
# module-level NamedTuple class would not exist in the container.
@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    promotion: str,
    trigger: str,
    mlflow_tracking_uri: str,
    s3_endpoint: str,
    manifest: Input[Dataset],
    evaluation: Input[Artifact],
    bundle: Input[Model],
    registry: Output[Artifact],
    summary: Output[Markdown],
) -> NamedTuple("Registered", [("version", str), ("decision", str)]):  # type: ignore[valid-type]
    """Log the run to MLflow, register the version as candidate, gate it (champion moves only if no metric drops).

    Returns the registered version and the gate's decision (``promoted`` or ``rejected``). The model
    version is tagged with ``tfanet.dvc_version`` (the DVC hash; MLflow's ``tfanet.dataset_version`` is
    the manifest's) and, when not empty, ``tfanet.trigger``: why this run happened (e.g. a drift report).
    """
    import json

    from mlflow import MlflowClient

    from components.kfp_io import run_step

    record = run_step(
        "register",
        product=product,
        dataset_uri=dataset_uri,
        dataset_version=dataset_version,
        params=params,
        inputs={"manifest": manifest, "evaluation": evaluation, "bundle": bundle},
        outputs={"registry": registry},
        s3_endpoint=s3_endpoint,
        promotion=json.loads(promotion),
        tracking_uri=mlflow_tracking_uri or None,
    )
    tags = {"tfanet.dvc_version": dataset_version} | ({"tfanet.trigger": trigger} if trigger else {})
    client = MlflowClient(mlflow_tracking_uri or None)
    for key, value in tags.items():
        client.set_model_version_tag(record["registered_model"], record["version"], key, value)
    registry.metadata.update({"version": record["version"], "decision": record["decision"]})
    with open(summary.path, "w") as f:
        f.write(
            f"## {record['registered_model']} v{record['version']}: {record['decision']}\n\n"
            f"{record['reason']}\n\n"
            f"- run `{record['run_id']}` (experiment {record['experiment_id']})\n"
            f"- previous champion: {record['previous_champion'] or 'none'}\n"
            f"- dataset version (manifest): `{record['dataset_version']}`; DVC: `{dataset_version}`\n"
            + (f"- trigger: {trigger}\n" if trigger else "")
        )
    return record["version"], record["decision"]


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def deploy(
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    deploy_settings: str,
    model_bucket: str,
    torchserve_namespace: str,
    mlflow_tracking_uri: str,
    s3_endpoint: str,
    manifest: Input[Dataset],
    decision: Output[Markdown],
) -> str:
    """Serve the registry's champion on the product's TorchServe in the cluster, if it passes parity there.

    Publishes its ``.mar`` to ``s3://<model_bucket>/torchserve/<product>/``, restarts
    ``deployment/torchserve-<product>`` in ``torchserve_namespace``, scores the probe images (the
    manifest's test split, ``deploy.probe_count``, chosen as the register step chose its own) through the
    pod's inference gateway and compares them with the bundle's scores (``deploy.tolerance``); on a
    difference it rolls back to the previous deployed version (:mod:`components.cluster_deploy`). Returns
    the decision's status; the Markdown output and the model version's ``deploy.*`` tags say why.
    """
    import json
    import tempfile
    from pathlib import Path

    from components.cluster_deploy import KubernetesRollout, deploy_in_cluster, gateway_url, markdown
    from components.deploy_cli import DEFAULT_PROBE_COUNT
    from components.kfp_io import fetch_dataset
    from components.params import ProductSettings
    from components.serving.parity import DEFAULT_TOLERANCE
    from components.steps import ProductPaths, prepared_manifest
    from components.storage import s3_for
    from tfanet_core.allocator import keep_freed_memory

    keep_freed_memory()  # the runtimes are timed here under the allocator the serving pod's handler uses
    settings = json.loads(deploy_settings)
    category = ProductSettings.of(product, json.loads(params)).category
    with tempfile.TemporaryDirectory(prefix="tfanet-deploy-") as tmp:
        data_root = fetch_dataset(dataset_uri, category, Path(tmp), s3_endpoint)
        prepared = prepared_manifest(data_root, ProductPaths(Path(manifest.path)))
        probes = prepared.probe_images(int(settings.get("probe_count", DEFAULT_PROBE_COUNT)))
        record = deploy_in_cluster(
            product,
            model_bucket=model_bucket,
            s3=s3_for(s3_endpoint),
            probes=probes,
            restart=KubernetesRollout(torchserve_namespace),
            inference_url=gateway_url(product, torchserve_namespace),
            tolerance=float(settings.get("tolerance", DEFAULT_TOLERANCE)),
            tracking_uri=mlflow_tracking_uri or None,
        )
    with open(decision.path, "w") as f:
        f.write(markdown(record))
    print(json.dumps(record.to_json()), flush=True)
    return record.status
