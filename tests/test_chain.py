"""The local MLOps chain end to end: `dvc repro` of dvc.yaml on the synthetic data, real MLflow + SeaweedFS.

One temporary DVC project (a git repo with this repository's dvc.yaml and params.yaml, the tiny
profile cut to a few epochs) goes through the scenarios a user meets: the first run registers a
champion and serves it on TorchServe; a second run does nothing; a worse training setting re-runs
only train and what follows, is not promoted, and the served model stays; a run killed in the
middle of training finishes on the next `dvc repro`; a new dataset version is pushed beside the
old one. The scenarios share the project but not an order: each sets the params it needs and
asserts on what it changed (versions relative to the one before it, the first run's outputs from
a snapshot taken right after it). The working tree is never touched. The browser test opens the
MLflow UI of the same server in headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc_project import DVC, REPO, DvcProject

from components.stack import LocalStack

pytestmark = [pytest.mark.server, pytest.mark.slow]

EPOCHS = 5


@pytest.fixture(scope="module")
def project(
    local_stack: LocalStack, torchserve: Path, synth_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> DvcProject:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section in params["products"].values():
        section["train"] |= {"epochs": EPOCHS, "checkpoint_every": 1}
    return DvcProject.create(
        tmp_path_factory.mktemp("chain"),
        local_stack,
        params,
        synth_root,
        env={"TFANET_TORCHSERVE_DIR": str(torchserve)},
    )


@dataclass(frozen=True)
class FirstRun:
    """The first `dvc repro`: the stages it ran, a copy of its runs/ and the champions right after it."""

    ran: set[str]
    runs: Path
    champions: dict[str, str]

    def json(self, product: str, name: str) -> dict[str, Any]:
        return json.loads((self.runs / product / name).read_text())


@pytest.fixture(scope="module")
def first_run(project: DvcProject, tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    """The first `dvc repro`, committed in the temporary repo so that `dvc params diff` has a baseline."""
    from mlflow import MlflowClient

    ran = project.repro()
    project.run("git", "add", "-A")
    project.run("git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "first run")
    runs = tmp_path_factory.mktemp("first-run") / "runs"
    shutil.copytree(project.root / "runs", runs)
    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    champions = {p: client.get_model_version_by_alias(f"tfanet-{p}", "champion").version for p in ("fabric", "bracket")}
    return FirstRun(ran, runs, champions)


def _latest_version(project: DvcProject, product: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    return max(int(v.version) for v in client.search_model_versions(f"name='tfanet-{product}'"))


def _probes(project: DvcProject, product: str) -> list[Path]:
    """The probe images the register step chose: from the prepare step's manifest, the one split."""
    from components.steps import REGISTER_PROBE_COUNT
    from tfanet_core.data.manifest import Manifest

    manifest = Manifest.read(project.root / "runs" / product / "manifest.csv", project.root / "data" / "synth")
    return manifest.probe_images(REGISTER_PROBE_COUNT)


def test_first_run_trains_registers_and_promotes(project: DvcProject, first_run: FirstRun) -> None:
    import mlflow
    from mlflow import MlflowClient

    from components.promotion import max_score_difference
    from components.steps import ProductPaths

    steps = ("prepare", "validate", "features", "template", "train", "evaluate", "calibrate", "register", "deploy")
    assert first_run.ran == {f"{s}@{p}" for s in steps for p in ("fabric", "bracket")}
    mlflow.set_tracking_uri(project.env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    for product in ("fabric", "bracket"):
        record = first_run.json(product, "registry.json")
        assert (record["version"], record["decision"]) == ("1", "promoted")
        assert first_run.champions[product] == "1"
        assert client.get_model_version(f"tfanet-{product}", "1").run_id == record["run_id"]
        run = client.get_run(record["run_id"])
        metrics = first_run.json(product, "metrics.json")
        for name in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
            assert run.data.metrics[name] == pytest.approx(metrics[name])
        assert run.data.params["train.epochs"] == str(EPOCHS)
        assert run.data.tags["tfanet.dataset_version"] == record["dataset_version"]
        artifacts = {a.path for a in client.list_artifacts(record["run_id"], "evaluation")}
        assert {"evaluation/plots", "evaluation/overlays", "evaluation/calibration.json"} <= artifacts
        assert "roc.png" in {Path(a.path).name for a in client.list_artifacts(record["run_id"], "evaluation/plots")}
    paths = ProductPaths.of(first_run.runs, "fabric")
    probes = _probes(project, "fabric")
    assert max_score_difference("models:/tfanet-fabric/1", probes, paths.bundle) < 1e-4
    assert first_run.json("fabric", "history.json")[-1]["epoch"] == EPOCHS
    shown = json.loads(project.run(DVC, "metrics", "show", "--json").stdout)[""]["data"]["runs/fabric/metrics.json"]
    current = json.loads((project.root / "runs" / "fabric" / "metrics.json").read_text())
    assert shown["data"]["image_auroc"] == pytest.approx(current["image_auroc"])
    assert first_run.json("fabric", "metrics.json")["image_auroc"] > 0.5


def _served(project: DvcProject, product: str) -> dict[str, Any]:
    """What the product's TorchServe endpoint answers for its first defective test image."""
    from components.serving.torchserve import TorchServeClient

    client = TorchServeClient.from_state_dir(project.env["TFANET_TORCHSERVE_DIR"])
    [bad] = _probes(project, product)[1:]
    resp = client.predict(f"tfanet-{product}", bad.read_bytes())
    assert resp.status == 200, resp.message
    return resp.json()


def test_first_run_serves_each_champion_on_torchserve(
    project: DvcProject, first_run: FirstRun, tracking: str, tmp_path: Path
) -> None:
    """``tracking``: download_bundle talks to MLflow through the environment, whatever module ran before."""
    from mlflow import MlflowClient

    from components.tracking import download_bundle
    from tfanet_core.predictor import Predictor

    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    for product in ("fabric", "bracket"):
        deployed = first_run.json(product, "deploy.json")
        assert (deployed["status"], deployed["serving"], deployed["champion"]) == ("deployed", "1", "1")
        assert deployed["parity_max_abs_diff"] < 1e-4
        champion = client.get_model_version_by_alias(f"tfanet-{product}", "champion").version  # now, after any test
        answer = _served(project, product)
        assert (answer["product"], answer["model_version"]) == (product, champion)
        [bad] = _probes(project, product)[1:]
        bundle = download_bundle(f"models:/tfanet-{product}/{champion}", tmp_path / product)
        assert answer["score"] == pytest.approx(Predictor.from_bundle(bundle).predict_paths([bad])[0].score, abs=1e-4)


def test_second_repro_runs_nothing(project: DvcProject, first_run: FirstRun) -> None:
    project.repro()  # whatever another scenario changed last is brought up to date first
    assert project.repro() == set()


def test_worse_training_param_reruns_train_and_downstream_and_is_not_promoted(
    project: DvcProject, first_run: FirstRun
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    project.repro()  # up to date first (any epochs but 1), so that the change below is the only one
    champion = client.get_model_version_by_alias("tfanet-fabric", "champion").version
    before = _latest_version(project, "fabric")

    project.set_param("fabric", "train", "epochs", 1)
    downstream = {"train@fabric", "evaluate@fabric", "calibrate@fabric", "register@fabric", "deploy@fabric"}
    assert project.repro() == downstream
    record = project.registry("fabric")
    assert record["version"] == str(before + 1)
    assert record["decision"] == "rejected" and "< champion" in record["reason"]
    deployed = json.loads((project.root / "runs" / "fabric" / "deploy.json").read_text())
    assert (deployed["status"], deployed["serving"]) == ("unchanged", champion)
    assert f"candidate v{before + 1} was rejected by the promotion gate" in deployed["reason"]
    assert _served(project, "fabric")["model_version"] == champion
    diff = project.run(DVC, "params", "diff", "--json").stdout
    epochs_diff = json.loads(diff)["params.yaml"]["products.fabric.train.epochs"]
    assert (epochs_diff["old"], epochs_diff["new"]) == (EPOCHS, 1)
    assert client.get_model_version_by_alias("tfanet-fabric", "champion").version == champion


def test_kill_in_train_then_repro_finishes(project: DvcProject, first_run: FirstRun) -> None:
    import torch

    project.repro()  # up to date first, so that only fabric's new epochs are left to run
    before = _latest_version(project, "fabric")
    epochs = EPOCHS + 3
    project.set_param("fabric", "train", "epochs", epochs)
    checkpoint = project.root / "runs" / "fabric" / "checkpoints" / "checkpoint.pt"
    started = time.time()
    proc = subprocess.Popen(
        [DVC, "repro"],
        cwd=project.root,
        env=project.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while not (checkpoint.is_file() and checkpoint.stat().st_mtime > started):
            assert proc.poll() is None, "dvc repro ended before train wrote a checkpoint"
            assert time.time() < deadline, "no checkpoint after 600 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= killed_at < epochs
    ran = project.repro()
    assert {"train@fabric", "register@fabric"} <= ran and not any(s.endswith("@bracket") for s in ran)
    history = json.loads((project.root / "runs" / "fabric" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert project.registry("fabric")["version"] == str(before + 1)


def test_new_dataset_version_is_pushed_beside_the_old(project: DvcProject, first_run: FirstRun) -> None:
    from components.storage import S3Settings, s3_client

    old = project.dataset_md5()
    image = project.root / "data" / "synth" / "fabric" / "train" / "good" / "000.png"
    kept = image.read_bytes()
    image.unlink()
    try:
        project.run(DVC, "add", "-q", "data/synth")
        project.run(DVC, "push", "-q")
        new = project.dataset_md5()
        assert new != old
        client = s3_client(S3Settings.from_env(project.env))
        keys = {o["Key"] for o in client.list_objects_v2(Bucket="dvc", Prefix="store/files/md5/")["Contents"]}
        for md5 in (old, new):
            assert f"store/files/md5/{md5[:2]}/{md5[2:]}" in keys
        assert "Cache and remote 'store' are in sync" in project.run(DVC, "status", "-c").stdout
    finally:  # the other scenarios keep training on the first dataset version
        image.write_bytes(kept)
        project.run(DVC, "add", "-q", "data/synth")
    assert project.dataset_md5() == old


def test_corrupted_dataset_is_stopped_at_validation(synth_root: Path, tmp_path: Path, capsys) -> None:
    """Truncated image, missing mask, a train image copied into test: the validate step names all three."""
    from tfanet_core.cli import main

    data = tmp_path / "data"
    shutil.copytree(synth_root / "fabric", data / "fabric")
    cat = data / "fabric"
    shutil.copy(cat / "train" / "good" / "003.png", cat / "test" / "good" / "099.png")
    truncated = cat / "test" / "hole" / "000.png"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (cat / "ground_truth" / "scratch" / "001_mask.png").unlink()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    common = ["--product", "fabric", "--params", str(tmp_path / "params.yaml"), "--runs", str(tmp_path / "runs")]
    common += ["--data", str(data)]

    assert main(["stage", "prepare", *common]) == 0
    assert json.loads((tmp_path / "runs" / "fabric" / "dataset.json").read_text())["strict"] is False
    capsys.readouterr()
    assert main(["stage", "validate", *common]) == 2
    message = capsys.readouterr().err
    assert "fabric/test/hole/000.png: corrupt or truncated PNG" in message
    assert "mask fabric/ground_truth/scratch/001_mask.png is missing" in message
    assert "fabric/test/good/099.png: same bytes as fabric/train/good/003.png (train)" in message
    saved = json.loads((tmp_path / "runs" / "fabric" / "validation" / "validation.json").read_text())
    assert {p["check"] for p in saved["problems"]} >= {"readable", "masks", "leakage"}


def _chromium(url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=20000",
                "--window-size=1600,1000",
                *flags,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )


def _text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian chromium: apt-get install -y chromium")
def test_mlflow_ui_lists_the_run_with_its_metrics(project: DvcProject, first_run: FirstRun, tmp_path: Path) -> None:
    """Headless Chromium renders the MLflow UI: the product's runs list has the run, the run page its metrics.
    The screenshot goes to the test's temp dir (docs/mlflow_ui.png is a copy of one, refreshed by hand)."""
    record = first_run.json("bracket", "registry.json")
    metrics = first_run.json("bracket", "metrics.json")
    base = project.env["MLFLOW_TRACKING_URI"]
    runs_page = _text(_chromium(f"{base}/#/experiments/{record['experiment_id']}/runs", "--dump-dom").stdout)
    assert "tfanet-bracket" in runs_page and f"bracket-{record['dataset_version'][:8]}" in runs_page

    run_url = f"{base}/#/experiments/{record['experiment_id']}/runs/{record['run_id']}"
    run_page = _text(_chromium(run_url, "--dump-dom").stdout)
    for name in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert re.search(rf"\b{name} {re.escape(str(metrics[name]))[:8]}", run_page), f"{name} not shown"
    shot = tmp_path / "mlflow_ui.png"
    _chromium(run_url, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
