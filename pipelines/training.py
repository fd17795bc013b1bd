"""The kfp pipelines: training of one product, all products in parallel, and the retrain that drift triggers.

All three run the same chain (:func:`training_chain`): validate → extract-features → select-template
→ train → evaluate → calibrate → register, the components of :mod:`components.kfp_components`.
``dataset_version`` (the DVC hash of the dataset root) goes to every step that reads data, so a new
dataset version never hits a cached step (KFP's cache key ignores what lies behind ``dataset_uri``).
register is never cached: it writes to the registry. The multi-product and retrain pipelines
deploy the champion to the product's TorchServe when the gate promoted the new version (publish,
rollout, parity in the cluster, rollback: :mod:`components.cluster_deploy`).

Kubernetes settings per task (kfp-kubernetes, in the compiled platform spec): every task gets the
S3 credentials Secret as env (each one reads the dataset, which may be ``s3://``; train also mirrors
its checkpoints there, deploy publishes archives); train runs on GPU nodes (node selector and
tolerations are pipeline parameters) and is retried, resuming from the checkpoints of the same run
(:mod:`components.checkpoints`); deploy carries the label that opens TorchServe's inference gateway.

``training_pipeline`` uses nothing that ``kfp.local`` lacks (no ParallelFor, no condition), so it
also runs without a cluster (:mod:`pipelines.local`); its resource requests are ignored there.
"""

from typing import Any, NamedTuple

from kfp import dsl, kubernetes

from components import kfp_components as steps
from components.cluster_deploy import PARITY_LABEL

__all__ = [
    "CHECKPOINT_ROOT",
    "CLUSTER_MLFLOW",
    "CLUSTER_S3",
    "GPU_NODE_SELECTOR",
    "GPU_TOLERATIONS",
    "MODEL_BUCKET",
    "S3_SECRET",
    "TORCHSERVE_NAMESPACE",
    "TRAIN_RETRIES",
    "Chain",
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
TORCHSERVE_NAMESPACE = "tfanet"
CHECKPOINT_ROOT = f"s3://{MODEL_BUCKET}/checkpoints"  # + /<run id>/<product>/ (components/checkpoints.py)
GPU = "nvidia.com/gpu"
# The label NVIDIA's GPU feature discovery (GPU operator) puts on GPU nodes, and the taint GPU node pools
# commonly carry (GKE, AKS, EKS with the GPU operator). Pipeline parameters: pass {} / [] to drop them,
# or your own (e.g. add a spot toleration such as cloud.google.com/gke-spot).
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
TRAIN_RETRIES = 3  # preemptions survived per run; each retry resumes from the last mirrored checkpoint
S3_SECRET = "tfanet-s3-credentials"  # infra/k8s/secrets/s3-credentials.env.example
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class Chain(NamedTuple):
    """What :func:`training_chain` hands on: the register task and the manifest the chain trained on."""

    registered: dsl.PipelineTask
    manifest: Any


class Registered(NamedTuple):
    """What training_pipeline returns: the registered model version and the gate's decision."""

    version: str
    decision: str


def _data(product: str, dataset_uri: str, dataset_version: str, params: str, s3_endpoint: str) -> dict:
    """The arguments every data-reading step takes (``dataset_version`` keeps the cache honest, see above)."""
    return {
        "product": product,
        "dataset_uri": dataset_uri,
        "dataset_version": dataset_version,
        "params": params,
        "s3_endpoint": s3_endpoint,
    }


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
    checkpoint_root: str,
    gpu_node_selector: dict,
    gpu_tolerations: list,
) -> Chain:
    """The seven steps of one product: the register task (outputs ``version``, ``decision``) and the
    manifest artifact, which the deploy reads its probe images from."""
    data = _data(product, dataset_uri, dataset_version, params, s3_endpoint)
    validated = _cpu(steps.validate(**data, rules=validate_rules))
    manifest = validated.outputs["manifest"]
    features = _cpu(steps.extract_features(**data, manifest=manifest)).outputs["features"]
    template = _cpu(steps.select_template(**data, manifest=manifest, features=features)).outputs["template"]
    trained = _s3(
        steps.train(
            **data,
            checkpoint_root=checkpoint_root,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            manifest=manifest,
            features=features,
            template=template,
        )
    )
    trained.set_accelerator_type(GPU).set_accelerator_limit(1)
    trained.set_cpu_request("2").set_cpu_limit("4").set_memory_request("8G").set_memory_limit("16G")
    trained.set_retry(TRAIN_RETRIES, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="600s")
    kubernetes.add_node_selector_json(trained, gpu_node_selector)
    kubernetes.add_toleration_json(trained, gpu_tolerations)
    model = trained.outputs["model"]
    evaluated = _cpu(steps.evaluate(**data, manifest=manifest, model=model))
    calibrated = steps.calibrate(
        **data, manifest=manifest, model=model, features=features, evaluation=evaluated.outputs["evaluation"]
    )
    bundle = _cpu(calibrated).outputs["bundle"]
    registered = steps.register(
        **data,
        promotion=promotion,
        trigger=trigger,
        mlflow_tracking_uri=mlflow_tracking_uri,
        manifest=manifest,
        evaluation=evaluated.outputs["evaluation"],
        bundle=bundle,
    )
    return Chain(_cpu(registered).set_caching_options(False), manifest)


def _s3(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """The S3 credentials Secret as env: boto3's default chain finds them (no secret in any parameter)."""
    return kubernetes.use_secret_as_env(task, S3_SECRET, {key: key for key in S3_KEYS})


def _cpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return _s3(task).set_cpu_request("1").set_cpu_limit("2").set_memory_request("2G").set_memory_limit("4G")


def _deploy_if_promoted(
    chain: Chain,
    data: dict,
    deploy_settings: str,
    model_bucket: str,
    torchserve_namespace: str,
    mlflow_tracking_uri: str,
) -> None:
    with dsl.If(chain.registered.outputs["decision"] == "promoted", name="promoted"):
        deployed = steps.deploy(
            **data,
            manifest=chain.manifest,
            deploy_settings=deploy_settings,
            model_bucket=model_bucket,
            torchserve_namespace=torchserve_namespace,
            mlflow_tracking_uri=mlflow_tracking_uri,
        )
        kubernetes.add_pod_label(_cpu(deployed).set_caching_options(False), PARITY_LABEL, "true")


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
    checkpoint_root: str = CHECKPOINT_ROOT,
    gpu_node_selector: dict = GPU_NODE_SELECTOR,
    gpu_tolerations: list = GPU_TOLERATIONS,
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
        checkpoint_root,
        gpu_node_selector,
        gpu_tolerations,
    ).registered
    return Registered(registered.outputs["version"], registered.outputs["decision"])


@dsl.pipeline(
    name="tfanet-multi-product",
    description="Every product's training in parallel; a promoted champion is deployed to its TorchServe.",
)
def multi_product_pipeline(
    products: list,
    dataset_uri: str,
    dataset_version: str,
    promotion: str,
    validate_rules: str,
    deploy_settings: str,
    model_bucket: str = MODEL_BUCKET,
    torchserve_namespace: str = TORCHSERVE_NAMESPACE,
    mlflow_tracking_uri: str = CLUSTER_MLFLOW,
    s3_endpoint: str = CLUSTER_S3,
    checkpoint_root: str = CHECKPOINT_ROOT,
    gpu_node_selector: dict = GPU_NODE_SELECTOR,
    gpu_tolerations: list = GPU_TOLERATIONS,
) -> None:
    """``products``: ``[{"product": "fabric", "params": "<its params.yaml section as JSON>"}, ...]``."""
    with dsl.ParallelFor(products, name="products") as item:
        chain = training_chain(
            item.product,
            dataset_uri,
            dataset_version,
            item.params,
            validate_rules,
            promotion,
            "",
            mlflow_tracking_uri,
            s3_endpoint,
            checkpoint_root,
            gpu_node_selector,
            gpu_tolerations,
        )
        data = _data(item.product, dataset_uri, dataset_version, item.params, s3_endpoint)
        _deploy_if_promoted(chain, data, deploy_settings, model_bucket, torchserve_namespace, mlflow_tracking_uri)


@dsl.pipeline(
    name="tfanet-retrain-on-drift",
    description="Retrain one product on a new dataset version after a drift alarm; deploy it if promoted.",
)
def retrain_on_drift_pipeline(
    product: str,
    dataset_uri: str,
    dataset_version: str,
    params: str,
    promotion: str,
    validate_rules: str,
    deploy_settings: str,
    drift_report: str,
    model_bucket: str = MODEL_BUCKET,
    torchserve_namespace: str = TORCHSERVE_NAMESPACE,
    mlflow_tracking_uri: str = CLUSTER_MLFLOW,
    s3_endpoint: str = CLUSTER_S3,
    checkpoint_root: str = CHECKPOINT_ROOT,
    gpu_node_selector: dict = GPU_NODE_SELECTOR,
    gpu_tolerations: list = GPU_TOLERATIONS,
) -> None:
    chain = training_chain(
        product,
        dataset_uri,
        dataset_version,
        params,
        validate_rules,
        promotion,
        drift_report,
        mlflow_tracking_uri,
        s3_endpoint,
        checkpoint_root,
        gpu_node_selector,
        gpu_tolerations,
    )
    data = _data(product, dataset_uri, dataset_version, params, s3_endpoint)
    _deploy_if_promoted(chain, data, deploy_settings, model_bucket, torchserve_namespace, mlflow_tracking_uri)
