"""Drift → retrain end to end: `tfanet drift check` against a real MLflow + SeaweedFS and a temporary DVC project.

The project is built like test_chain's (a git repo with this repository's dvc.yaml and params.yaml), with
one product ("drifting": the synthetic fabric images, tiny profile, a few epochs) on its own dataset, and a first
`dvc repro register@drifting` makes v1 the champion. Then, in order, as production would deliver them:
a window of fresh normal images changes nothing; a window of the same kind of images 30 % brighter
triggers exactly one retrain (one new training run, one new registered version, a new dataset version in
the DVC remote beside the old one); a second brighter window inside the cooldown triggers nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from dvc_project import BIN, REPO, DvcProject
from PIL import Image

from components.stack import LocalStack

pytestmark = [pytest.mark.server, pytest.mark.slow]

# The product under watch has its own registered model (tfanet-drifting): the session's MLflow also holds the
# other end-to-end tests' tfanet-fabric. Its images are the synthetic fabric category.
PRODUCT, CATEGORY = "drifting", "fabric"
EPOCHS = 3
REMOTE = "s3://dvc/drift-retrain"
FIRST_BUNDLE = "first-bundle"  # in the project: the bundle registered as version 1, kept whatever runs later


def drift_check(project: DvcProject, images: Path) -> tuple[int, dict[str, Any]]:
    """`tfanet drift check` in the project: (exit code, the decision it printed and wrote to drift.json)."""
    args = ("drift", "check", "--product", PRODUCT, "--images", str(images))
    proc = project.run(str(BIN / "tfanet"), *args, ok=(0, 1))
    decision = json.loads(proc.stdout)
    assert decision == json.loads((project.root / "runs" / PRODUCT / "drift.json").read_text())
    return proc.returncode, decision


def _fresh_normals(out: Path, seed: int, gain: float = 1.0) -> Path:
    """50 new normal fabric images (another seed of the generator), brightness × ``gain``."""
    from tfanet_core.data.synth import generate

    generate(out / "gen", seed=seed, n_train=1, n_test_good=50, n_test_defect_per_type=1)
    window = out / "window"
    window.mkdir()
    for path in sorted((out / "gen" / CATEGORY / "test" / "good").glob("*.png")):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) * gain
        Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(window / path.name)
    return window


@pytest.fixture(scope="module")
def project(local_stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> DvcProject:
    from tfanet_core.data.synth import generate

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    section = params["products"][CATEGORY] | {"data": {"category": CATEGORY}}
    section["train"] |= {"epochs": EPOCHS, "checkpoint_every": 1, "val_fraction": 0.25}
    section["calibration"] |= {"target_fpr": 0.05}  # 20 held-out normals: a 1 % threshold would be their maximum
    params["products"] = {PRODUCT: section}
    params["retrain"] = {"cooldown_hours": 24, "mode": "dvc"}
    gen = tmp_path_factory.mktemp("drift-synth")
    generate(gen, seed=0, n_train=80, n_test_good=12, n_test_defect_per_type=4)
    shutil.rmtree(gen / "bracket")  # one product in the project's data/synth
    project = DvcProject.create(tmp_path_factory.mktemp("drift-project"), local_stack, params, gen, remote=REMOTE)
    project.repro(f"register@{PRODUCT}")
    shutil.copytree(project.root / "runs" / PRODUCT / "bundle", project.root / FIRST_BUNDLE)  # v1, before retrains
    import mlflow

    mlflow.set_tracking_uri(project.env["MLFLOW_TRACKING_URI"])  # for download_bundle in this process
    return project


def _state(project: DvcProject) -> dict[str, Any]:
    """Training runs, registered versions and drift-check runs (newest first) of the product in MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    training = client.get_experiment_by_name(f"tfanet-{PRODUCT}")
    drift = client.get_experiment_by_name(f"tfanet-{PRODUCT}-drift")
    return {
        "client": client,
        "training_runs": client.search_runs([training.experiment_id]),
        "versions": sorted(int(v.version) for v in client.search_model_versions(f"name='tfanet-{PRODUCT}'")),
        "drift_runs": client.search_runs([drift.experiment_id], order_by=["attributes.start_time DESC"])
        if drift
        else [],
    }


def test_drift_reference_travels_with_the_registered_champion(project: DvcProject, tmp_path: Path) -> None:
    from components.tracking import download_bundle
    from tfanet_core.drift import REFERENCE_FILE, Reference
    from tfanet_core.predictor import Predictor

    local = Reference.load(project.root / FIRST_BUNDLE)
    bundle = download_bundle(f"models:/tfanet-{PRODUCT}/1", tmp_path)
    registered = Reference.load(bundle / REFERENCE_FILE)
    np.testing.assert_array_equal(registered.embeddings, local.embeddings)
    assert len(registered.embeddings) == 80 and len(registered.scores) == 20  # train + val; val scores
    assert registered.threshold == Predictor.from_bundle(bundle).threshold


def test_no_drift_window_then_drift_retrains_once_then_cooldown_suppresses(
    project: DvcProject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    before = _state(project)
    assert (len(before["training_runs"]), before["versions"], before["drift_runs"]) == (1, [1], [])
    md5_v1 = project.dataset_md5()
    good = project.root / "data" / "synth" / CATEGORY / "train" / "good"
    originals = {p.name: p.read_bytes() for p in good.iterdir()}

    code, quiet = drift_check(project, _fresh_normals(tmp_path_factory.mktemp("normal"), seed=101))
    assert code == 0 and quiet["decision"] == "no_drift" and not quiet["drift"], quiet["reason"]
    assert quiet["reason"].startswith("no drift: every p-value >=") and quiet["n_images"] == 50
    assert quiet["champion_version"] == "1" and quiet["retrain"] is None
    state = _state(project)
    assert (len(state["training_runs"]), state["versions"], len(state["drift_runs"])) == (1, [1], 1)

    code, drifted = drift_check(project, _fresh_normals(tmp_path_factory.mktemp("bright1"), seed=102, gain=1.3))
    assert code == 1 and drifted["decision"] == "retrain_triggered", drifted["reason"]
    assert drifted["reason"].startswith("drift, retraining via dvc (none before, cooldown 24 h): drift: ")
    retrain = drifted["retrain"]
    assert retrain["stages"][-1] == f"register@{PRODUCT}" and f"train@{PRODUCT}" in retrain["stages"]
    assert retrain["registry"]["version"] == "2"
    # New data = a new dataset version: the gate compared v2 with champion v1 re-evaluated on it, not blocked.
    assert retrain["registry"]["decision"] in ("promoted", "rejected")
    assert "champion v1 re-evaluated on dataset" in retrain["registry"]["reason"], retrain["registry"]["reason"]
    state = _state(project)
    assert (len(state["training_runs"]), state["versions"], len(state["drift_runs"])) == (2, [1, 2], 2)
    # A new dataset version: the window's images added beside the old files, both versions in the remote.
    stamp = Path(retrain["images_added"][0]).name.rsplit("-", 1)[0]  # drift-<UTC time>
    assert sorted(p.name for p in good.glob("drift-*")) == [f"{stamp}-{i:03d}.png" for i in range(50)]
    assert {p.name: p.read_bytes() for p in good.iterdir() if p.name in originals} == originals
    md5_v2 = project.dataset_md5()
    assert (retrain["dataset_md5_before"], retrain["dataset_md5"]) == (md5_v1, md5_v2) and md5_v1 != md5_v2
    from components.storage import S3Settings, s3_client

    bucket, prefix = REMOTE[len("s3://") :].split("/", 1)
    keys = {
        o["Key"]
        for page in s3_client(S3Settings.from_env(project.env))
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=f"{prefix}/files/md5/")
        for o in page.get("Contents", [])
    }
    for md5 in (md5_v1, md5_v2):
        assert f"{prefix}/files/md5/{md5[:2]}/{md5[2:]}" in keys
    client = state["client"]
    assert client.get_registered_model(f"tfanet-{PRODUCT}").tags["drift.last_retrain_at"] == drifted["checked_at"]

    code, again = drift_check(project, _fresh_normals(tmp_path_factory.mktemp("bright2"), seed=103, gain=1.3))
    assert code == 1 and again["decision"] == "suppressed" and again["drift"], again["reason"]
    assert again["reason"].startswith(
        f"drift, retrain suppressed by cooldown (last at {drifted['checked_at']}, cooldown 24 h, next allowed after "
    )
    assert again["last_retrain_at"] == drifted["checked_at"] and again["retrain"] is None
    state = _state(project)
    assert (len(state["training_runs"]), state["versions"], len(state["drift_runs"])) == (2, [1, 2], 3)
    assert len(list(good.glob("drift-*.png"))) == 50 and project.dataset_md5() == md5_v2

    # Every check is a run of the drift experiment: decision and reason as tags, statistics as metrics, the plot.
    runs = state["drift_runs"]
    assert [r.data.tags["drift.decision"] for r in runs] == ["suppressed", "retrain_triggered", "no_drift"]
    assert [r.data.tags["drift.reason"] for r in runs] == [again["reason"], drifted["reason"], quiet["reason"]]
    for run, decision in zip(runs, (again, drifted, quiet), strict=True):
        assert run.info.run_id == decision["drift_run_id"]
        assert run.data.metrics["p_mmd"] == pytest.approx(decision["report"]["p_values"]["mmd"])
        assert (
            run.data.metrics["window_size"] == 50
            and run.data.params["champion_version"] == decision["champion_version"]
        )
        history = client.get_metric_history(run.info.run_id, "p_mmd")
        assert [m.step for m in history] == [int(dt.datetime.fromisoformat(decision["checked_at"]).timestamp())]
        assert {"drift.png", "decision.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert runs[0].data.metrics["drift"] == 1.0 and runs[2].data.metrics["drift"] == 0.0


def test_kfp_mode_uploads_a_new_dataset_version_and_submits_retrain_on_drift(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The cluster branch up to the KFP API: new objects beside the old ones, arguments the compiled pipeline takes."""
    import pipelines.submit
    from components.drift_check import RetrainError, RetrainParams, retrain_kfp
    from components.storage import ensure_bucket, s3_client

    for key, value in local_stack.client_env().items():
        monkeypatch.setenv(key, value)
    client = s3_client()
    ensure_bucket(client, "tfanet-data")
    client.put_object(Bucket="tfanet-data", Key="datasets/fabric/train/good/000.png", Body=b"old")
    window = _fresh_normals(tmp_path, seed=104)
    submitted: list[dict[str, Any]] = []

    def fake_submit(pipeline: str, arguments: dict[str, Any], **options: Any) -> str:
        inputs = pipelines.submit.pipeline_inputs(pipeline)
        required = {name for name, spec in inputs.items() if "defaultValue" not in spec}
        assert required <= set(arguments) <= set(inputs)
        submitted.append({"pipeline": pipeline, "arguments": arguments, **options})
        return "run-1"

    monkeypatch.setattr(pipelines.submit, "submit", fake_submit)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    retrain = RetrainParams(mode="kfp", dataset_uri="s3://tfanet-data/datasets", kfp_host="http://kfp.invalid")
    images = sorted(window.glob("*.png"))[:3]
    submit = pipelines.submit.submit_retrain  # what `tfanet drift check` hands the check (pipelines.cli)
    result = retrain_kfp(
        CATEGORY, images, CATEGORY, retrain, "drift-20261124T120000Z", params, "drift check r1: x", submit
    )

    keys = {o["Key"] for o in client.list_objects_v2(Bucket="tfanet-data", Prefix="datasets/")["Contents"]}
    new = {f"datasets/fabric/train/good/drift-20261124T120000Z-{i:03d}.png" for i in range(3)}
    assert keys == {"datasets/fabric/train/good/000.png"} | new
    assert client.get_object(Bucket="tfanet-data", Key="datasets/fabric/train/good/000.png")["Body"].read() == b"old"
    assert result["dataset_version"] != result["dataset_version_before"] and result["kfp_run_id"] == "run-1"
    (call,) = submitted
    assert (call["pipeline"], call["host"], call["experiment"]) == (
        "retrain_on_drift",
        "http://kfp.invalid",
        "tfanet-fabric",
    )
    args = call["arguments"]
    assert (args["product"], args["dataset_uri"], args["drift_report"]) == (
        CATEGORY,
        retrain.dataset_uri,
        "drift check r1: x",
    )
    assert (
        args["dataset_version"] == result["dataset_version"]
        and json.loads(args["params"])["data"]["category"] == CATEGORY
    )
    with pytest.raises(RetrainError, match="already uploaded"):
        retrain_kfp(CATEGORY, images, CATEGORY, retrain, "drift-20261124T120000Z", params, "again", submit)
    assert len(submitted) == 1
