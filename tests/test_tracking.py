"""MLflow tracking, the registered pyfunc and the promotion gate, against a real MLflow server on S3."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from components.promotion import Comparison, GatePolicy, compare, promote
from components.tracking import (
    CANDIDATE,
    CHAMPION,
    TAG_DATASET,
    download_bundle,
    encode_images,
    flatten_metrics,
    flatten_params,
    log_training_run,
    model_uri,
    registered_model_name,
)
from tfanet_core.bundle import load_bundle, read_metadata
from tfanet_core.errors import ConfigError
from tfanet_core.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- no server
def test_flatten_metrics_keeps_every_number_and_nothing_else() -> None:
    metrics = {
        "image_auroc": 0.9,
        "pixel_auroc": None,
        "n_test": 30,
        "category": "fabric",
        "ok": True,
        "nan": float("nan"),
        "per_type": {"hole": {"image_auroc": 1.0, "aupro": None}},
        "au_spro": {"0.05": 0.25},
    }
    assert flatten_metrics(metrics) == {
        "image_auroc": 0.9,
        "n_test": 30.0,
        "per_type/hole/image_auroc": 1.0,
        "au_spro/0.05": 0.25,
    }
    assert flatten_params({"train": {"epochs": 3, "lr": 1e-4}, "seed": 0}) == {
        "train.epochs": 3,
        "train.lr": 1e-4,
        "seed": 0,
    }


def test_gate_comparison_rules() -> None:
    policy = GatePolicy(metrics=("image_auroc", "pixel_auroc", "aupro"), tolerance=0.01)
    champion = {"image_auroc": 0.90, "aupro": 0.80}
    assert compare({"image_auroc": 0.895, "aupro": 0.85}, champion, policy) == [
        Comparison("image_auroc", 0.895, 0.90, True),  # worse, but within the tolerance
        Comparison("pixel_auroc", None, None, None),  # the champion has none: not compared
        Comparison("aupro", 0.85, 0.80, True),
    ]
    assert [c.passed for c in compare({"image_auroc": 0.88, "aupro": 0.9}, champion, policy)] == [False, None, True]
    assert [c.passed for c in compare({"image_auroc": 0.95}, champion, policy)] == [True, None, False]  # aupro lost
    assert GatePolicy.from_params({"metrics": ["f1_max"], "tolerance": 0.002}) == GatePolicy(("f1_max",), 0.002)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['tolerence'\] in params.yaml 'promotion'"):
        GatePolicy.from_params({"tolerence": 0.01})
    with pytest.raises(ValueError, match=">= 0"):
        GatePolicy(tolerance=-0.1)


def test_a_bundle_without_threshold_is_refused_before_anything_is_logged(fabric_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(fabric_bundle, bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["thresholds"] = {}
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no calibrated image threshold"):
        log_training_run("fabric", bundle, metrics={"image_auroc": 1.0}, dataset_version="x")


# --------------------------------------------------------------------------- real server
@pytest.fixture(scope="module")
def evaluation(fabric_bundle: Path, synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real `tfanet evaluate` output (metrics.json, plots, overlays) of the test bundle."""
    from tfanet_core.evaluate import evaluate

    out = tmp_path_factory.mktemp("evaluation")
    evaluate(fabric_bundle, synth_root, "fabric", out, device="cpu", overlays_per_type=1, progress=False)
    return out


@pytest.fixture(scope="module")
def probe_images(synth_root: Path) -> list[Path]:
    return [synth_root / "fabric" / "test" / "good" / "000.png", synth_root / "fabric" / "test" / "hole" / "000.png"]


def _product() -> str:
    return f"fabric-{uuid.uuid4().hex[:8]}"  # a registry of its own per test


@pytest.fixture(scope="module")
def champion(tracking: str, fabric_bundle: Path, evaluation: Path, probe_images: list[Path]) -> dict[str, Any]:
    product = _product()
    run = log_training_run(
        product,
        fabric_bundle,
        metrics=evaluation / "metrics.json",
        dataset_version="ds-1",
        params={"train": {"epochs": 12}, "calibration": {"target_fpr": 0.25}},
        artifacts_dir=evaluation,
        example_images=probe_images[:1],
    )
    decision = promote(product, probe_images=probe_images, bundle_dir=fabric_bundle)
    return {"product": product, "run": run, "decision": decision}


@pytest.mark.server
def test_run_records_params_dataset_metrics_and_artifacts(champion: dict[str, Any], evaluation: Path) -> None:
    client = MlflowClient()
    run = client.get_run(champion["run"].run_id)
    assert client.get_experiment(run.info.experiment_id).name == f"tfanet-{champion['product']}"
    params = run.data.params
    assert params["dataset_version"] == "ds-1" and run.data.tags[TAG_DATASET] == "ds-1"
    assert params["train.epochs"] == "12" and params["config.features.image_size"] == "128"
    expected = json.loads((evaluation / "metrics.json").read_text())
    for key in ("image_auroc", "f1_max", "pixel_auroc", "aupro"):
        assert run.data.metrics[key] == pytest.approx(expected[key])
    for defect in ("hole", "scratch", "stain"):
        assert run.data.metrics[f"per_type/{defect}/image_auroc"] == pytest.approx(
            expected["per_type"][defect]["image_auroc"]
        )
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/roc.png", "evaluation/pro.png", "evaluation/overlays"} <= logged
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"bundle.json", "evaluation"}


@pytest.mark.server
def test_first_version_is_registered_and_becomes_champion(champion: dict[str, Any]) -> None:
    name = registered_model_name(champion["product"])
    assert champion["run"].version == "1" and champion["run"].registered_name == name
    decision = champion["decision"]
    assert decision.promoted and decision.reason == "first model version: no champion yet"
    client = MlflowClient()
    for alias in (CANDIDATE, CHAMPION):
        assert client.get_model_version_by_alias(name, alias).version == "1"
    tags = client.get_model_version(name, "1").tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.compared_with"] == "none"
    assert tags[TAG_DATASET] == "ds-1"


@pytest.mark.server
def test_champion_scores_equal_the_bundle(
    champion: dict[str, Any], fabric_bundle: Path, probe_images: list[Path]
) -> None:
    model = mlflow.pyfunc.load_model(model_uri(champion["product"]))
    assert model.metadata.get_input_schema().input_names() == ["image"]
    assert model.metadata.get_output_schema().input_names() == ["score", "threshold", "is_anomalous"]
    served = model.predict(encode_images(probe_images))
    reference = Predictor.from_bundle(fabric_bundle, device="cpu").predict_paths(probe_images)
    np.testing.assert_allclose(served["score"], [p.score for p in reference], rtol=0, atol=1e-6)
    assert served["threshold"].tolist() == [p.threshold for p in reference]
    assert served["is_anomalous"].tolist() == [p.is_anomalous for p in reference]
    assert served["score"].iloc[1] > served["score"].iloc[0]  # the hole scores above the good image

    with pytest.raises(Exception, match=r"image\[1\]: not base64"):
        model.predict(pd.DataFrame({"image": [encode_images(probe_images[:1])["image"][0], "not base64!"]}))
    truncated = base64.b64encode(probe_images[0].read_bytes()[:200]).decode()
    with pytest.raises(Exception, match=r"image\[0\]: corrupt or truncated PNG"):
        model.predict(pd.DataFrame({"image": [truncated]}))


@pytest.mark.server
def test_champion_loads_in_a_fresh_process_from_its_own_code(
    champion: dict[str, Any], fabric_bundle: Path, probe_images: list[Path], tmp_path: Path
) -> None:
    """The model carries tfanet_core's source: a new interpreter imports it from the model, not from the repo."""
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "import tfanet_core\n"
        "out = model.predict(pd.DataFrame({'image': sys.argv[2:]}))\n"
        "print(json.dumps({'core': tfanet_core.__file__, 'scores': out['score'].tolist()}))\n"
    )
    encoded = encode_images(probe_images)["image"].tolist()
    done = subprocess.run(
        [sys.executable, "-c", script, model_uri(champion["product"]), *encoded],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["core"]).parent.parent.name == "code"
    assert not Path(result["core"]).is_relative_to(REPO)
    reference = [p.score for p in Predictor.from_bundle(fabric_bundle, device="cpu").predict_paths(probe_images)]
    np.testing.assert_allclose(result["scores"], reference, rtol=0, atol=1e-6)


@pytest.mark.server
def test_download_bundle_gives_back_the_trained_bundle(
    champion: dict[str, Any], fabric_bundle: Path, tmp_path: Path
) -> None:
    bundle = download_bundle(model_uri(champion["product"]), tmp_path / "dl")
    assert read_metadata(bundle) == read_metadata(fabric_bundle)
    assert (bundle / "model.pt").read_bytes() == (fabric_bundle / "model.pt").read_bytes()


def _tags(name: str, version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(name, version).tags


@pytest.mark.server
def test_gate_keeps_a_worse_candidate_out_and_compares_only_like_with_like(
    tracking: str, fabric_bundle: Path, evaluation: Path
) -> None:
    product = _product()
    name = registered_model_name(product)
    client = MlflowClient()
    metrics = json.loads((evaluation / "metrics.json").read_text())
    policy = GatePolicy(tolerance=0.01)

    def log(m: dict[str, Any], dataset: str) -> str:
        version = log_training_run(product, fabric_bundle, metrics=m, dataset_version=dataset).version
        assert version is not None and client.get_model_version_by_alias(name, CANDIDATE).version == version
        return version

    v1 = log(metrics, "ds-1")
    assert promote(product, policy=policy).promoted

    worse = copy.deepcopy(metrics)
    worse["image_auroc"] = metrics["image_auroc"] - 0.1  # deliberately worse beyond the tolerance
    v2 = log(worse, "ds-1")
    decision = promote(product, policy=policy)
    assert decision.decision == "rejected" and decision.champion_version == v1
    assert client.get_model_version_by_alias(name, CHAMPION).version == v1
    assert f"image_auroc {worse['image_auroc']:.4f} < champion {metrics['image_auroc']:.4f}" in decision.reason
    tags = _tags(name, v2)
    assert tags["promotion.decision"] == "rejected" and tags["promotion.compared_with"] == v1
    assert tags["promotion.reason"] == decision.reason and tags["promotion.tolerance"] == "0.01"

    slightly = copy.deepcopy(metrics)
    slightly["image_auroc"] = metrics["image_auroc"] - 0.005  # within the tolerance: not worse
    v3 = log(slightly, "ds-1")
    decision = promote(product, policy=policy)
    assert decision.promoted and "same dataset version ds-1" in decision.reason
    assert client.get_model_version_by_alias(name, CHAMPION).version == v3

    v4 = log(metrics, "ds-2")  # new data: its metrics say nothing against v3's on ds-1
    decision = promote(product, policy=policy)
    assert decision.decision == "blocked" and "not comparable" in decision.reason
    assert client.get_model_version_by_alias(name, CHAMPION).version == v3
    assert _tags(name, v4)["promotion.decision"] == "blocked"

    decision = promote(product, v4, policy=policy, champion_metrics=worse)  # the champion re-evaluated on ds-2
    assert decision.promoted and "re-evaluated on dataset ds-2" in decision.reason
    assert client.get_model_version_by_alias(name, CHAMPION).version == v4
    assert promote(product, v4).reason == f"version {v4} already is the champion"


@pytest.mark.server
def test_gate_rejects_a_model_that_does_not_reproduce_its_bundle(
    tracking: str, fabric_bundle: Path, probe_images: list[Path], tmp_path: Path
) -> None:
    other = load_bundle(fabric_bundle)
    with torch.no_grad():
        for parameter in other.model.parameters():
            parameter.mul_(1.5)  # another model: its scores differ by ~0.06-0.1 on the probes
    other.save(tmp_path / "other")
    product = _product()
    log_training_run(product, fabric_bundle, metrics={"image_auroc": 0.9}, dataset_version="ds-1")
    decision = promote(product, probe_images=probe_images, bundle_dir=tmp_path / "other")
    assert decision.decision == "rejected" and "scores differ from its bundle's" in decision.reason
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient().get_model_version_by_alias(registered_model_name(product), CHAMPION)
