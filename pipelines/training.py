"""The kfp pipelines: training of one product, all products in parallel, and the retrain that drift triggers.

All three run the same chain (:func:`training_chain`): validate → extract-features → select-template
→ train → evaluate → calibrate → register, the components of :mod:`components.kfp_components`.
``dataset_version`` (the DVC hash of the dataset root) goes to every step that reads data, so a new
dataset version never hits a cached step (KFP's cache key ignores what lies behind ``dataset_uri``).
register is never cached: it writes to the registry. The multi-product and retrain pipelines
publish the champion's archive for TorchServe when the gate promoted the new version.

``training_pipeline`` uses nothing that ``kfp.local`` lacks (no ParallelFor, no condition), so it
also runs without a cluster (:mod:`pipelines.local`); its resource requests are ignored there.
"""

from typing import NamedTuple

from kfp import dsl

from components import kfp_components as steps

__all__ = [
    "CLUSTER_MLFLOW",
    "CLUSTER_S3",
    "MODEL_BUCKET",
    "Registered",
    "multi_product_pipeline",
    "retrain_on_drift_pipeline",
    "training_chain",
    "training_pipeline",
]

# Defaults for the in-cluster stack of infra/k8s (overlay `local`/`dev`; prod: pass its S3 endpoint and bucket).
CLUSTER_MLFLOW = "http://mlflow.tfanet.svc.cluster.local:5000"
CLUSTER_S3 = "http://seaweedfs.tfanet.svc.cluster.local:8333"
MODEL_BUCKET = "tfanet-models"
GPU = "nvidia.com/gpu"


class Registered(NamedTuple):
    """What training_pipeline returns: the registered model version and the gate's decision."""

    version: str
    decision: str


def training_chain(
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    validate_rules: str,
    promotion: str,
    trigger: str,
    mlflow_tracking_uri: str,
    s3_endpoint: str,
) -> dsl.PipelineTask:
    """The seven steps of one product; returns the register task (outputs ``version``, ``decision``)."""
    data = {
        "product": product,
        "dataset_uri": dataset_uri,
        "dataset_version": dataset_version,
        "params": params,
        "s3_endpoint": s3_endpoint,
    }
    validated = _cpu(steps.validate(**data, rules=validate_rules))
    manifest = validated.outputs["manifest"]
    features = _cpu(steps.extract_features(**data, manifest=manifest)).outputs["features"]
    template = _cpu(steps.select_template(**data, features=features)).outputs["template"]
    trained = steps.train(**data, manifest=manifest, features=features, template=template)
    trained.set_accelerator_type(GPU).set_accelerator_limit(1)
    trained.set_cpu_request("2").set_cpu_limit("4").set_memory_request("8G").set_memory_limit("16G")
    model = trained.outputs["model"]
    evaluated = _cpu(steps.evaluate(**data, model=model))
    bundle = _cpu(steps.calibrate(**data, model=model, features=features)).outputs["bundle"]
    registered = steps.register(
        **data,
        promotion=promotion,
        trigger=trigger,
        mlflow_tracking_uri=mlflow_tracking_uri,
        manifest=manifest,
        evaluation=evaluated.outputs["evaluation"],
        bundle=bundle,
    )
    return _cpu(registered).set_caching_options(False)


def _cpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return task.set_cpu_request("1").set_cpu_limit("2").set_memory_request("2G").set_memory_limit("4G")


def _deploy_if_promoted(
    registered: dsl.PipelineTask, product: str, model_bucket: str, mlflow_tracking_uri: str, s3_endpoint: str
) -> None:
    with dsl.If(registered.outputs["decision"] == "promoted", name="promoted"):
        published = steps.deploy(
            product=product, model_bucket=model_bucket, mlflow_tracking_uri=mlflow_tracking_uri, s3_endpoint=s3_endpoint
        )
        _cpu(published).set_caching_options(False)


@dsl.pipeline(name="tfanet-training", description="Train, evaluate, calibrate and register one product.")
def training_pipeline(
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    promotion: str,
    validate_rules: str,
    trigger: str = "",
    mlflow_tracking_uri: str = CLUSTER_MLFLOW,
    s3_endpoint: str = CLUSTER_S3,
) -> Registered:
    registered = training_chain(
        product,
        dataset_uri,
        dataset_version,
        params,
        validate_rules,
        promotion,
        trigger,
        mlflow_tracking_uri,
        s3_endpoint,
    )
    return Registered(registered.outputs["version"], registered.outputs["decision"])


@dsl.pipeline(
    name="tfanet-multi-product",
    description="Every product's training in parallel; a promoted champion is published for TorchServe.",
)
def multi_product_pipeline(
    products: list,
    dataset_uri: str,
    dataset_version: str,
    promotion: str,
    validate_rules: str,
    model_bucket: str = MODEL_BUCKET,
    mlflow_tracking_uri: str = CLUSTER_MLFLOW,
    s3_endpoint: str = CLUSTER_S3,
) -> None:
    """``products``: ``[{"product": "fabric", "params": "<its params.yaml section as JSON>"}, ...]``."""
    with dsl.ParallelFor(products, name="products") as item:
        registered = training_chain(
            item.product,
            dataset_uri,
            dataset_version,
            item.params,
            validate_rules,
            promotion,
            "",
            mlflow_tracking_uri,
            s3_endpoint,
        )
        _deploy_if_promoted(registered, item.product, model_bucket, mlflow_tracking_uri, s3_endpoint)


@dsl.pipeline(
    name="tfanet-retrain-on-drift",
    description="Retrain one product on a new dataset version after a drift alarm; publish it if promoted.",
)
def retrain_on_drift_pipeline(
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    promotion: str,
    validate_rules: str,
    drift_report: str,
    model_bucket: str = MODEL_BUCKET,
    mlflow_tracking_uri: str = CLUSTER_MLFLOW,
    s3_endpoint: str = CLUSTER_S3,
) -> None:
    registered = training_chain(
        product,
        dataset_uri,
        dataset_version,
        params,
        validate_rules,
        promotion,
        drift_report,
        mlflow_tracking_uri,
        s3_endpoint,
    )
    _deploy_if_promoted(registered, product, model_bucket, mlflow_tracking_uri, s3_endpoint)
