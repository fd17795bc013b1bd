"""The kfp pipelines: compiled YAML (fresh, components, GPU, dataset version, ParallelFor, Kubernetes platform
spec), submit errors, kfp.local.

The compiled-YAML tests read the committed ``pipelines/compiled/*.yaml`` (what a cluster runs)
after checking that compiling again gives the same bytes. The end-to-end test runs
``training_pipeline`` through ``kfp.local`` against the session's real MLflow + SeaweedFS.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines import COMPILED, NAMES

REPO = Path(__file__).resolve().parents[1]
CHAIN = ("validate", "extract-features", "select-template", "train", "evaluate", "calibrate", "register")
# Every step reads the dataset (register and deploy: their probe images), which may be s3://.
DATA_STEPS = {*CHAIN, "deploy"}
EPOCHS = 5


def spec(name: str) -> dict[str, Any]:
    """The pipeline spec: the first document of the compiled YAML."""
    return next(yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text()))


def platform(name: str) -> dict[str, Any]:
    """The Kubernetes platform spec (kfp-kubernetes) by executor: the second document of the compiled YAML."""
    docs = list(yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text()))
    assert len(docs) == 2, f"{name}.yaml has no platform spec"
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def dags(pipeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every DAG of a compiled pipeline by component name (``root`` for the pipeline's own)."""
    out = {"root": pipeline["root"]["dag"]}
    out |= {name: c["dag"] for name, c in pipeline["components"].items() if "dag" in c}
    return out


def tasks(pipeline: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(owning DAG's component, task name, task) for every task at any depth."""
    return [(owner, name, task) for owner, dag in dags(pipeline).items() for name, task in dag["tasks"].items()]


def pipeline_parameter(pipeline: dict[str, Any], owner: str, parameter: str) -> str | None:
    """Follow ``componentInputParameter`` from a DAG up to the root: the pipeline parameter it comes from."""
    while owner != "root":
        parents = [(o, t) for o, _, t in tasks(pipeline) if t["componentRef"]["name"] == owner]
        assert len(parents) == 1, f"{owner} is used {len(parents)} times"
        source = parents[0][1]["inputs"]["parameters"].get(parameter, {})
        if "componentInputParameter" not in source:
            return None
        owner, parameter = parents[0][0], source["componentInputParameter"]
    return parameter


def test_compiled_yaml_is_current(tmp_path: Path) -> None:
    from pipelines.compile import compile_all

    fresh = {p.name: p.read_bytes() for p in compile_all(tmp_path)}
    committed = {p.name: p.read_bytes() for p in COMPILED.glob("*.yaml")}
    assert set(fresh) == {f"{n}.yaml" for n in NAMES} == set(committed)
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"pipelines/compiled/{stale} is stale: run `python -m pipelines.compile` and commit the YAML"


@pytest.mark.parametrize("name", NAMES)
def test_every_step_is_a_component(name: str) -> None:
    pipeline = spec(name)
    names = {
        task["taskInfo"]["name"]
        for _, _, task in tasks(pipeline)
        if "dag" not in pipeline["components"].get(task["componentRef"]["name"], {})
    }
    expected = set(CHAIN) | ({"deploy"} if name != "training" else set())
    assert names == expected
    for step in expected:
        assert f"comp-{step}" in pipeline["components"]
        assert f"exec-{step}" in pipeline["deploymentSpec"]["executors"]


@pytest.mark.parametrize("name", NAMES)
def test_train_requests_a_gpu_and_the_other_steps_run_on_cpu(name: str) -> None:
    executors = spec(name)["deploymentSpec"]["executors"]
    train = executors["exec-train"]["container"]
    assert train["image"] == "tfanet-component:0.1.0-cuda"
    assert train["resources"]["accelerator"] == {
        "count": "1",
        "resourceCount": "1",
        "resourceType": "nvidia.com/gpu",
        "type": "nvidia.com/gpu",
    }
    assert train["resources"]["resourceMemoryRequest"] == "8G"
    assert train["resources"]["resourceMemoryLimit"] == "16G"
    for executor, body in executors.items():
        container = body["container"]
        assert "packages_to_install" not in json.dumps(container) and "pip install" not in json.dumps(container)
        if executor != "exec-train":
            assert container["image"] == "tfanet-component:0.1.0-cpu"
            assert "accelerator" not in container["resources"]
            assert container["resources"]["resourceMemoryLimit"] == "4G"


@pytest.mark.parametrize("name", NAMES)
def test_dataset_version_reaches_every_data_reading_step(name: str) -> None:
    pipeline = spec(name)
    assert pipeline["root"]["inputDefinitions"]["parameters"]["dataset_version"]["parameterType"] == "STRING"
    seen = set()
    for owner, task_name, task in tasks(pipeline):
        params = task["inputs"].get("parameters", {})
        if task_name in DATA_STEPS:
            seen.add(task_name)
            assert "dataset_uri" in params, task_name
            source = params["dataset_version"]["componentInputParameter"]
            assert pipeline_parameter(pipeline, owner, source) == "dataset_version", task_name
        if "dataset_uri" in params:
            assert task_name in DATA_STEPS, f"{task_name} reads data but is not checked"
    assert seen == DATA_STEPS - ({"deploy"} if name == "training" else set())


@pytest.mark.parametrize("name", NAMES)
def test_registry_writes_are_never_cached(name: str) -> None:
    for _, task_name, task in tasks(spec(name)):
        if task_name in ("register", "deploy"):
            assert not task.get("cachingOptions", {}).get("enableCache", False), task_name
        elif task_name in DATA_STEPS:
            assert task["cachingOptions"]["enableCache"] is True, task_name


def leaf_tasks(pipeline: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(owning DAG, task name, executor label) of every task that runs a container."""
    out = []
    for owner, task_name, task in tasks(pipeline):
        component = pipeline["components"][task["componentRef"]["name"]]
        if "executorLabel" in component:
            out.append((owner, task_name, component["executorLabel"]))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_task_gets_the_s3_credentials_secret_as_env(name: str) -> None:
    """Every task reads the dataset (maybe s3://), train mirrors checkpoints and deploy publishes to S3."""
    pipeline, executors = spec(name), platform(name)
    checked = set()
    for owner, task_name, executor in leaf_tasks(pipeline):
        assert "dataset_uri" in dags(pipeline)[owner]["tasks"][task_name]["inputs"]["parameters"], task_name
        (mapping,) = executors[executor]["secretAsEnv"]
        assert mapping["secretNameParameter"] == {"runtimeValue": {"constant": "tfanet-s3-credentials"}}, task_name
        assert mapping["optional"] is False
        pairs = {(k["secretKey"], k["envVar"]) for k in mapping["keyToEnv"]}
        assert pairs == {("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")}
        checked.add(task_name)
    assert checked == DATA_STEPS - ({"deploy"} if name == "training" else set())


@pytest.mark.parametrize("name", NAMES)
def test_train_is_placed_on_gpu_nodes_by_pipeline_parameters_and_retried(name: str) -> None:
    from pipelines.training import GPU_NODE_SELECTOR, GPU_TOLERATIONS, TRAIN_RETRIES

    pipeline, executors = spec(name), platform(name)
    inputs = pipeline["root"]["inputDefinitions"]["parameters"]
    assert inputs["gpu_node_selector"] == {
        "defaultValue": GPU_NODE_SELECTOR,
        "isOptional": True,
        "parameterType": "STRUCT",
    }
    assert (
        inputs["gpu_tolerations"]["defaultValue"]
        == GPU_TOLERATIONS
        == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    for owner, task_name, executor in leaf_tasks(pipeline):
        task = dags(pipeline)[owner]["tasks"][task_name]
        placement = {k: v for k, v in executors[executor].items() if k in ("nodeSelector", "tolerations")}
        if task_name != "train":
            assert not placement and "retryPolicy" not in task, task_name
            continue
        selector = placement["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"]
        (toleration,) = placement["tolerations"]
        tolerations = toleration["tolerationJson"]["componentInputParameter"]
        assert pipeline_parameter(pipeline, owner, selector) == "gpu_node_selector"
        assert pipeline_parameter(pipeline, owner, tolerations) == "gpu_tolerations"
        assert task["retryPolicy"] == {
            "backoffDuration": "30s",
            "backoffFactor": 2.0,
            "backoffMaxDuration": "600s",
            "maxRetryCount": TRAIN_RETRIES,
        }
        # checkpoints keyed by the run: KFP's run UUID, the same for every retry of the task in this run
        params = task["inputs"]["parameters"]
        assert params["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
        assert pipeline_parameter(pipeline, owner, params["checkpoint_root"]["componentInputParameter"]) == (
            "checkpoint_root"
        )


@pytest.mark.parametrize("name", NAMES)
def test_only_deploy_may_reach_the_torchserve_inference_gateway(name: str) -> None:
    pipeline, executors = spec(name), platform(name)
    for _, task_name, executor in leaf_tasks(pipeline):
        labels = executors[executor].get("podMetadata", {}).get("labels", {})
        assert labels == ({"tfanet.io/torchserve-parity": "true"} if task_name == "deploy" else {}), task_name


def test_multi_product_runs_the_chain_in_a_parallel_for_over_products() -> None:
    pipeline = spec("multi_product")
    (loop,) = pipeline["root"]["dag"]["tasks"].values()
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--products"}
    assert loop["inputs"]["parameters"]["pipelinechannel--products"] == {"componentInputParameter": "products"}
    assert pipeline["root"]["inputDefinitions"]["parameters"]["products"]["parameterType"] == "LIST"
    body = pipeline["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(CHAIN) <= set(body)
    assert body["train"]["inputs"]["parameters"]["product"]["parameterExpressionSelector"] == (
        'parseJson(string_value)["product"]'
    )
    (condition,) = (t for t in body.values() if "triggerPolicy" in t)
    assert "== 'promoted'" in condition["triggerPolicy"]["condition"]
    inner = pipeline["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"deploy"}


def test_retrain_on_drift_takes_the_drift_report_and_deploys_only_when_promoted() -> None:
    pipeline = spec("retrain_on_drift")
    inputs = pipeline["root"]["inputDefinitions"]["parameters"]
    assert "defaultValue" not in inputs["drift_report"]
    register = pipeline["root"]["dag"]["tasks"]["register"]
    assert register["inputs"]["parameters"]["trigger"] == {"componentInputParameter": "drift_report"}
    (condition,) = (t for t in pipeline["root"]["dag"]["tasks"].values() if "triggerPolicy" in t)
    assert "== 'promoted'" in condition["triggerPolicy"]["condition"]


def test_params_yaml_sections_travel_as_json_with_their_types() -> None:
    """kfp turns dict parameters into Structs (ints become floats), so sections are JSON strings."""
    from components.params import load_params
    from pipelines.submit import _checked, pipeline_arguments

    params = load_params(REPO / "params.yaml")
    args = pipeline_arguments("training", params, ["fabric"])
    assert json.loads(args["params"])["features"]["layers"] == params["products"]["fabric"]["features"]["layers"]
    assert json.loads(args["promotion"]) == params["promotion"]
    multi = pipeline_arguments("multi_product", params, [])
    assert [item["product"] for item in multi["products"]] == list(params["products"])
    retrain = pipeline_arguments("retrain_on_drift", params, ["fabric"])
    assert json.loads(retrain["deploy_settings"]) == params["deploy"] and "deploy_settings" not in args
    checked = _checked(
        "retrain_on_drift", retrain | {"dataset_uri": "s3://d/p", "dataset_version": "1", "drift_report": {}}
    )
    assert checked["drift_report"] == "{}"
    with pytest.raises(ValueError, match="exactly one --product"):
        pipeline_arguments("training", params, ["fabric", "bracket"])


def test_submit_without_a_host_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from tfanet_core.cli import main

    monkeypatch.delenv("KFP_HOST", raising=False)
    argv = ["pipeline", "submit", "training", "--product", "fabric", "--params", str(REPO / "params.yaml")]
    argv += ["--param", "dataset_uri=s3://datasets/synth", "--param", "dataset_version=abc"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no Kubeflow Pipelines host: pass --host URL or set KFP_HOST" in err and "Traceback" not in err


def test_submit_to_an_unreachable_host_and_with_a_bad_parameter_fails_clearly() -> None:
    from pipelines.submit import SubmitError, submit

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    arguments = {"product": "fabric", "dataset_uri": "s3://d/p", "dataset_version": "1", "params": "{}"}
    arguments |= {"promotion": "{}", "validate_rules": "{}"}
    with pytest.raises(SubmitError, match=f"cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}"):
        submit("training", arguments, host=f"http://127.0.0.1:{port}")
    with pytest.raises(SubmitError, match=r"training has no parameter\(s\) \['epochs'\]"):
        submit("training", arguments | {"epochs": 3}, host=f"http://127.0.0.1:{port}")
    with pytest.raises(SubmitError, match="unknown pipeline 'nightly'"):
        submit("nightly", arguments, host=f"http://127.0.0.1:{port}")


@pytest.mark.server
@pytest.mark.slow
def test_training_pipeline_runs_locally_registers_and_publishes(
    local_stack,
    synth_root: Path,
    synth_probes: Callable[[str, int], list[Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    """`tfanet pipeline run-local`: kfp.local, tiny profile, a few epochs, the dataset read from the local S3."""
    from mlflow import MlflowClient

    from components.cluster_deploy import publish
    from components.serving.archive import read_manifest
    from components.storage import S3Settings, s3_client, upload_dir
    from tfanet_core.cli import main

    env = local_stack.client_env()
    for key, value in env.items():  # the S3 credentials reach the task subprocesses through the environment
        monkeypatch.setenv(key, value)
    s3 = s3_client(S3Settings.from_env(env))
    data = tmp_path / "data"
    shutil.copytree(synth_root / "fabric", data / "fabric")
    prefix = f"kfp-test/{tmp_path.name}"
    upload_dir(s3, data, "dvc", prefix, progress=False)
    (tmp_path / "synth.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "0123abcd.dir", "path": "synth"}]}))

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["products"]["fabric"]["train"] |= {"epochs": EPOCHS, "checkpoint_every": 1}
    # A product name of its own (data category fabric): the registered model is this test's alone.
    product = "kfpfabric"
    params["products"][product] = params["products"]["fabric"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    argv = ["pipeline", "run-local", "--product", product, "--data", f"s3://dvc/{prefix}"]
    argv += ["--params", str(tmp_path / "params.yaml"), "--dvc-file", str(tmp_path / "synth.dvc")]
    argv += ["--param", "trigger=test_pipelines", "--pipeline-root", str(tmp_path / "kfp")]
    capsys.readouterr()
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"pipeline": "training", "product": product, "version": "1", "decision": "promoted"}

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias(f"tfanet-{product}", "champion")
    assert version.version == "1"
    assert version.tags["tfanet.dvc_version"] == "0123abcd.dir" and version.tags["tfanet.trigger"] == "test_pipelines"
    run = client.get_run(version.run_id)
    assert run.data.params["train.epochs"] == str(EPOCHS)

    (run_dir,) = (p for p in (tmp_path / "kfp").iterdir() if p.name != "checkpoints")
    trained = json.loads((run_dir / "train" / "executor_output.json").read_text())
    model_metadata = trained["artifacts"]["model"]["artifacts"][0]["metadata"]
    assert model_metadata["restored_checkpoints"] == []  # a new run starts fresh
    assert model_metadata["checkpoints"].startswith(str(tmp_path / "kfp" / "checkpoints"))
    assert not Path(model_metadata["checkpoints"]).exists()  # deleted once the training succeeded
    evaluated = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())
    logged = evaluated["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    for name in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert run.data.metrics[name] == pytest.approx(logged[name])
    assert logged["image_auroc"] > 0.5
    assert (run_dir / "validate" / "report").read_text().lstrip().lower().startswith("<!doctype html")
    registry = json.loads((run_dir / "register" / "registry" / "registry.json").read_text())
    assert registry["version"] == "1" and registry["run_id"] == version.run_id

    # The deploy component's first move (a cluster-only task): the champion's archive alone under the product's prefix.
    stale = f"torchserve/{product}/tfanet-{product}-v0.mar"
    s3.put_object(Bucket="dvc", Key=stale, Body=b"old")
    record = publish(product, "1", "dvc", s3, client, synth_probes("fabric", 2))
    key = f"torchserve/{product}/tfanet-{product}-v1.mar"
    assert record["archive"] == f"s3://dvc/{key}" and record["removed"] == [f"s3://dvc/{stale}"]
    chosen = record["runtime"]  # no serving.runtime in a trained bundle: the fastest in parity, timed here
    assert chosen.chosen_by == "measured" and chosen.runtime == max(chosen.images_per_s, key=chosen.images_per_s.get)
    listed = s3.list_objects_v2(Bucket="dvc", Prefix=f"torchserve/{product}/")["Contents"]
    assert [o["Key"] for o in listed] == [key]
    s3.download_file("dvc", key, str(tmp_path / "champion.mar"))
    manifest = read_manifest(tmp_path / "champion.mar")
    assert (manifest["model_name"], manifest["model_version"]) == (f"tfanet-{product}", "1")
    assert manifest["runtime"] == chosen.runtime and (manifest["export"] is None) == (chosen.runtime == "torch")
    assert manifest["source"] == {
        "kind": "mlflow",
        "model": f"tfanet-{product}",
        "version": "1",
        "run_id": version.run_id,
    }
    assert client.get_model_version(f"tfanet-{product}", "1").tags["deploy.published"] == record["archive"]
