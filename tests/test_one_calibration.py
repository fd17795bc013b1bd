"""One calibration, after evaluation: a calibration-only change re-runs calibrate and register only, and
the at-threshold figures MLflow shows are those of the registered bundle's threshold (real DVC, MLflow, S3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from dvc_project import REPO, DvcProject

from components.stack import LocalStack

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_a_calibration_only_change_recalibrates_and_mlflow_describes_the_registered_threshold(
    local_stack: LocalStack, tracking: str, synth_root: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from components.tracking import download_bundle
    from tfanet_core.bundle import load_bundle
    from tfanet_core.evaluate import at_threshold

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["products"] = {"fabric": params["products"]["fabric"]}
    params["products"]["fabric"]["train"] |= {"epochs": 2, "checkpoint_every": 1}
    (tmp_path / "project").mkdir()
    project = DvcProject.create(tmp_path / "project", local_stack, params, synth_root)
    assert {"train@fabric", "evaluate@fabric", "calibrate@fabric"} <= project.repro("register@fabric")
    first = project.registry("fabric")

    target = 0.3
    project.set_param("fabric", "calibration", "target_fpr", target)
    assert project.repro("register@fabric") == {"calibrate@fabric", "register@fabric"}
    record = project.registry("fabric")
    assert int(record["version"]) == int(first["version"]) + 1

    runs = project.root / "runs" / "fabric"
    local = load_bundle(runs / "bundle").thresholds["image"]
    client = MlflowClient(tracking)
    registered_dir = download_bundle(f"models:/tfanet-fabric/{record['version']}", tmp_path / "registered")
    registered = load_bundle(registered_dir).thresholds["image"]
    assert registered == local and registered.target_fpr == target

    scores = json.loads((runs / "scores.json").read_text())
    labels = np.array([row["label"] != "good" for row in scores])
    expected = at_threshold(labels, np.array([row["score"] for row in scores]), registered.value)
    logged = client.get_run(record["run_id"]).data.metrics
    for name, value in expected.items():
        assert logged[f"at_threshold/{name}"] == pytest.approx(value), name
    assert logged["guarantee/fpr_upper_bound"] == pytest.approx(registered.fpr_upper_bound)
    calibration = json.loads((runs / "calibration.json").read_text())
    assert calibration["at_threshold"] == expected and calibration["image_threshold"] == registered.value
    assert (runs / "calibration.png").stat().st_size > 1000
