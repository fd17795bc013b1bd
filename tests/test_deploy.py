"""The deploy step against a real MLflow (on SeaweedFS) and a real TorchServe 0.12 with token auth.

One scenario, in order, because each step starts from the state the previous one left:
deploy v1; a better v2 becomes the default; a worse v3 is kept out by the promotion gate (v2 keeps
serving); rollback to v1 (re-registered from the registry: ``keep_versions=1`` pruned it); a second
product served beside the first (deployed through ``tfanet deploy run``); a champion that fails
parity is refused; requests without a token are refused.

The gate compares *logged* metrics, so the metric dicts are set by the test: the v1 bundle is
evaluated once (real ``tfanet evaluate`` numbers), v1 is logged with that image_auroc minus 0.05,
v2 with the evaluated value (better by 0.05), v3 with minus 0.10 (worse than v2). The bundles are
real, different models (two training seeds), so a version switch changes the served scores.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

import components.deploy as deploy_module
from components.deploy import DeployDecision, ServingParams, deploy, deploy_history, rollback
from components.naming import registered_model_name
from components.promotion import GatePolicy, promote
from components.serving.archive import read_manifest
from components.serving.parity import check_parity
from components.serving.torchserve import TorchServeClient
from components.tracking import CHAMPION, log_training_run
from tfanet_core.cli import main as tfanet_main
from tfanet_core.config import load_config
from tfanet_core.errors import ConfigError
from tfanet_core.predictor import Predictor

OCTET = "application/octet-stream"


def _train(synth_root: Path, category: str, out: Path, seed: int) -> Path:
    from tfanet_core.workflow import train_category

    config = load_config("tiny", ["train.epochs=2", f"train.seed={seed}", "calibration.target_fpr=0.25"])
    train_category(synth_root, category, config, out, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def bundles(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deploy-bundles")
    return {
        "fabric-a": _train(synth_root, "fabric", root / "fabric-a", seed=0),
        "fabric-b": _train(synth_root, "fabric", root / "fabric-b", seed=1),
        "bracket": _train(synth_root, "bracket", root / "bracket", seed=0),
    }


def _served(client: TorchServeClient, product: str, probe: Path) -> dict[str, Any]:
    resp = client.predict(f"tfanet-{product}", probe.read_bytes())
    assert resp.status == 200, resp.body[:300]
    return resp.json()


def _score(bundle: Path, probe: Path) -> float:
    return Predictor.from_bundle(bundle, device="cpu").predict_paths([probe])[0].score


def _registered(client: TorchServeClient, product: str) -> list[str]:
    return sorted(v["modelVersion"] for v in client.versions(f"tfanet-{product}"))


def test_serving_params_and_probe_selection(synth_probes: Callable[[str, int], list[Path]]) -> None:
    assert ServingParams.from_params({"batch_size": 4, "max_batch_delay_ms": 20}) == ServingParams(4, 20)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['batchsize'\] in params.yaml 'serving'"):
        ServingParams.from_params({"batchsize": 4})
    with pytest.raises(ValueError, match="keep_versions must be >= 1"):
        ServingParams(keep_versions=0)
    probes = synth_probes("fabric", 4)
    assert len(probes) == 4
    assert [p.parent.name == "good" for p in probes] == [True, False, True, False]


@pytest.mark.server
def test_deploy_gate_rollback_and_two_products(
    tracking: str,
    torchserve: Path,
    bundles: dict[str, Path],
    synth_root: Path,
    synth_probes: Callable[[str, int], list[Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tfanet_core.evaluate import evaluate

    client = TorchServeClient.from_state_dir(torchserve)
    store = torchserve / "model_store"
    registry = MlflowClient()
    product = f"fabric-{uuid.uuid4().hex[:8]}"  # a registry of its own
    name = registered_model_name(product)
    probes = synth_probes("fabric", 2)  # one good, one defective
    serving = ServingParams(keep_versions=1)  # only the default stays registered: rollback must re-register
    kwargs: dict[str, Any] = {"serving": serving}
    a, b = bundles["fabric-a"], bundles["fabric-b"]
    assert abs(_score(a, probes[1]) - _score(b, probes[1])) > 1e-3  # two different models

    base = evaluate(a, synth_root, "fabric", tmp_path / "eval", device="cpu", overlays_per_type=0, progress=False)

    def metrics(delta: float) -> dict[str, Any]:
        out = copy.deepcopy(base)
        out["image_auroc"] = base["image_auroc"] + delta
        return out

    def log(bundle: Path, delta: float) -> str:
        version = log_training_run(product, bundle, metrics=metrics(delta), dataset_version="ds-1").version
        assert version is not None
        return version

    policy = GatePolicy(metrics=("image_auroc",))

    # v1: the first version is promoted and deployed
    assert log(a, -0.05) == "1" and promote(product, policy=policy).promoted
    first = deploy(product, client, store, probes, record=tmp_path / "deploy-1.json", **kwargs)
    assert (first.status, first.serving, first.previous_default, first.champion) == ("deployed", "1", None, "1")
    assert first.parity_max_abs_diff is not None and first.parity_max_abs_diff <= 1e-4
    assert json.loads((tmp_path / "deploy-1.json").read_text())["status"] == "deployed"
    manifest = read_manifest(first.archive)  # type: ignore[arg-type]
    assert manifest["model_version"] == "1" and manifest["source"]["version"] == "1"
    assert manifest["source"]["kind"] == "mlflow" and manifest["source"]["model"] == name
    doc = _served(client, product, probes[1])
    assert doc["model_version"] == "1" and doc["score"] == pytest.approx(_score(a, probes[1]), abs=1e-4)
    tags = registry.get_model_version(name, "1").tags
    assert tags["deploy.status"] == "deployed" and tags["deploy.served_at"] and tags["deploy.archive"]
    again = deploy(product, client, store, probes, **kwargs)
    assert again.status == "unchanged" and "already is the served default" in again.reason

    # v2, better: promoted, and it becomes TorchServe's default
    assert log(b, 0.0) == "2" and promote(product, policy=policy).promoted
    second = deploy(product, client, store, probes, **kwargs)
    assert (second.status, second.serving, second.previous_default) == ("deployed", "2", "1")
    doc = _served(client, product, probes[1])
    assert doc["model_version"] == "2" and doc["score"] == pytest.approx(_score(b, probes[1]), abs=1e-4)
    assert _registered(client, product) == ["2"] and deploy_history(registry, name) == ["1", "2"]

    # v3, worse: the gate refuses it, the deploy changes nothing and says why
    assert log(a, -0.10) == "3"
    assert promote(product, policy=policy).decision == "rejected"
    third = deploy(product, client, store, probes, **kwargs)
    assert third.status == "unchanged" and third.serving == "2" and third.champion == "2"
    assert "candidate v3 was rejected by the promotion gate: image_auroc" in third.reason
    assert _served(client, product, probes[0])["model_version"] == "2"
    assert registry.get_model_version(name, "3").tags["deploy.status"] == "not_deployed"

    # rollback: v1 serves again (rebuilt from the registry), champion moves back
    back = rollback(product, client, store, probes, record=tmp_path / "rollback.json", **kwargs)
    assert (back.status, back.serving, back.previous_default, back.champion) == ("rolled_back", "1", "2", "1")
    assert back.archive is not None and back.parity_max_abs_diff is not None and back.parity_max_abs_diff <= 1e-4
    assert client.default_version(f"tfanet-{product}") == "1" and _registered(client, product) == ["1"]
    assert registry.get_model_version_by_alias(name, CHAMPION).version == "1"
    doc = _served(client, product, probes[1])
    assert doc["model_version"] == "1" and doc["score"] == pytest.approx(_score(a, probes[1]), abs=1e-4)
    assert deploy_history(registry, name) == ["1"]
    assert registry.get_model_version(name, "2").tags["deploy.status"] == "rolled_back"
    assert deploy(product, client, store, probes, **kwargs).status == "unchanged"
    with pytest.raises(ValueError, match="no earlier deployed version"):
        rollback(product, client, store, probes, **kwargs)

    # a second product, deployed through the CLI, served beside the first
    other = f"bracket-{uuid.uuid4().hex[:8]}"
    other_probes = synth_probes("bracket", 2)
    log_training_run(other, bundles["bracket"], metrics=base, dataset_version="ds-1")
    assert promote(other, policy=policy).promoted
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"products": {other: {"serving": {"batch_size": 2, "max_batch_delay_ms": 20}}}}))
    out = tmp_path / "bracket-deploy.json"
    argv = ["deploy", "run", "--product", other, "--params", str(params), "--state-dir", str(torchserve)]
    argv += [a for p in other_probes for a in ("--probe", str(p))]
    assert tfanet_main([*argv, "--out", str(out)]) == 0
    recorded = json.loads(out.read_text())
    assert (recorded["status"], recorded["serving"]) == ("deployed", "1")
    [described] = client.versions(f"tfanet-{other}")
    assert described["batchSize"] == 2 and described["maxBatchDelay"] == 20
    assert {f"tfanet-{product}", f"tfanet-{other}"} <= set(client.models())
    rollback_argv = ["deploy", "rollback", "--product", other, "--params", str(params), "--state-dir", str(torchserve)]
    assert tfanet_main([*rollback_argv, "--probe", str(other_probes[0])]) == 2  # nothing earlier to roll back to
    for prod, probe, bundle in ((product, probes[1], a), (other, other_probes[1], bundles["bracket"])):
        doc = _served(client, prod, probe)
        assert (doc["product"], doc["model_version"]) == (prod, "1")
        assert doc["score"] == pytest.approx(_score(bundle, probe), abs=1e-4)

    # a champion whose served scores differ from the reference is refused; v1 keeps serving
    log_training_run(other, bundles["bracket"], metrics=base, dataset_version="ds-1")
    assert promote(other, policy=policy).promoted  # equal metrics: not worse, champion -> v2

    def parity_against_another_model(client_, model, bundle, probe_images_, **kw):  # type: ignore[no-untyped-def]
        return check_parity(client_, model, bundles["fabric-a"], probe_images_, **kw)

    monkeypatch.setattr(deploy_module, "check_parity", parity_against_another_model)
    refused: DeployDecision = deploy(other, client, store, other_probes, **kwargs)
    assert refused.status == "refused" and refused.serving == "1" and refused.previous_default == "1"
    assert "parity failed" in refused.reason and "v1 keeps serving" in refused.reason
    assert refused.parity_max_abs_diff is not None and refused.parity_max_abs_diff > 1e-4
    assert _registered(client, other) == ["1"]  # the refused version was unregistered again
    assert _served(client, other, other_probes[0])["model_version"] == "1"
    assert registry.get_model_version(registered_model_name(other), "2").tags["deploy.status"] == "refused"
    assert deploy_history(registry, registered_model_name(other)) == ["1"]

    # requests without the token are refused (TorchServe answers 400), with it they pass
    path = f"/predictions/tfanet-{product}"
    body = probes[0].read_bytes()
    assert client.request("POST", "inference", path, body, {"Content-Type": OCTET}, token="").status == 400
    assert client.request("GET", "management", "/models", token="").status == 400
    assert client.request("POST", "inference", path, body, {"Content-Type": OCTET}).status == 200
