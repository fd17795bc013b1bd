"""The in-cluster deploy step against a real MLflow (on SeaweedFS), a real TorchServe 0.12 and the inference gateway.

What stands in for Kubernetes is only the rollout: ``pod_start`` does what a new TorchServe pod does
(the init container ``infra/k8s/torchserve/fetch_models.py`` copies the product's archives from S3 into
the model store, ``load_models=all`` registers them; the old pod's models are gone). Everything else is
the code the deploy component runs: publish to S3, parity through the gateway (which holds the key file,
the step holds no key), registry tags, rollback.

Scenario: v1 goes live; v2's archive is altered in the bucket before the pods start (built from another
model under the same version), so parity fails and v1 is published, started and served again; v3 with
a matching archive goes live.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.cluster_deploy import deploy_in_cluster, markdown
from components.deploy import deploy_history
from components.inference_gateway import make_server
from components.naming import registered_model_name, torchserve_model_name
from components.serving.archive import build_archive
from components.serving.torchserve import TorchServeClient, TorchServeError
from components.storage import S3Settings, ensure_bucket, s3_client
from components.tracking import CHAMPION, log_training_run
from tfanet_core.config import load_config
from tfanet_core.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
BUCKET = "tfanet-models"
OCTET = {"Content-Type": "application/octet-stream"}


def _train(synth_root: Path, out: Path, seed: int) -> Path:
    from tfanet_core.workflow import train_category

    config = load_config("tiny", ["train.epochs=2", f"train.seed={seed}", "calibration.target_fpr=0.25"])
    train_category(synth_root, "fabric", config, out, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def bundles(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cluster-bundles")
    return {"a": _train(synth_root, root / "a", seed=0), "b": _train(synth_root, root / "b", seed=1)}


@pytest.fixture
def gateway(torchserve: Path) -> Iterator[str]:
    """The pod's sidecar, on loopback, reading the running TorchServe's key file."""
    server = make_server(TorchServeClient.from_state_dir(torchserve), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.server
def test_cluster_deploy_goes_live_on_parity_and_rolls_back_an_altered_archive(
    tracking: str,
    local_stack,
    torchserve: Path,
    gateway: str,
    bundles: dict[str, Path],
    synth_probes: Callable[[str, int], list[Path]],
) -> None:
    env = local_stack.client_env()
    s3 = s3_client(S3Settings.from_env(env))
    ensure_bucket(s3, BUCKET)
    ts = TorchServeClient.from_state_dir(torchserve)
    registry = MlflowClient()
    product = f"fabric-{uuid.uuid4().hex[:8]}"
    name, reg_name = torchserve_model_name(product), registered_model_name(product)
    probes = synth_probes("fabric", 2)
    a, b = bundles["a"], bundles["b"]
    altered: dict[str, Path] = {}  # version -> the bundle its archive is replaced with before the next pod start

    def pod_start(prod: str) -> None:
        """A new TorchServe pod: its models come from the bucket (fetch_models.py), the old pod's are gone."""
        assert prod == product
        for version, bundle in altered.items():
            mar = build_archive(bundle, product, version, torchserve / "altered", filename=f"{name}-v{version}.mar")
            s3.upload_file(str(mar), BUCKET, f"torchserve/{product}/{mar.name}")
        altered.clear()  # once: the rollback's pods start from what the step published
        try:
            for described in ts.versions(name):
                ts.unregister(name, described["modelVersion"])
        except TorchServeError as exc:
            assert exc.status == 404
        fetch = {**os.environ, **env, "MODEL_BUCKET": BUCKET, "PRODUCT": product}
        fetch["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        script = REPO / "infra" / "k8s" / "torchserve" / "fetch_models.py"
        subprocess.run([sys.executable, str(script), str(torchserve / "model_store")], env=fetch, check=True)
        for listed in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"torchserve/{product}/").get("Contents", []):
            ts.register(Path(listed["Key"]).name, name, batch_size=1, max_batch_delay_ms=50)

    def deploy() -> object:
        return deploy_in_cluster(
            product, model_bucket=BUCKET, s3=s3, probes=probes, restart=pod_start, inference_url=gateway
        )

    def version(bundle: Path) -> str:
        logged = log_training_run(product, bundle, metrics={"image_auroc": 0.9}, dataset_version="ds-1").version
        assert logged is not None
        registry.set_registered_model_alias(reg_name, CHAMPION, logged)  # what a promoting gate does
        return logged

    def served(probe: Path) -> dict:
        resp = TorchServeClient(gateway, gateway, key_file=None).predict(name, probe.read_bytes())
        assert resp.status == 200, resp.body[:300]
        return resp.json()

    def bundle_score(bundle: Path, probe: Path) -> float:
        return Predictor.from_bundle(bundle, device="cpu").predict_paths([probe])[0].score

    assert abs(bundle_score(a, probes[1]) - bundle_score(b, probes[1])) > 1e-3  # two different models

    # v1: a matching archive goes live
    assert version(a) == "1"
    first = deploy()
    assert (first.status, first.serving, first.previous_default, first.champion) == ("deployed", "1", None, "1")
    assert first.parity_max_abs_diff is not None and first.parity_max_abs_diff <= 1e-4
    assert first.archive == f"s3://{BUCKET}/torchserve/{product}/{name}-v1.mar"
    tags = registry.get_model_version(reg_name, "1").tags
    assert tags["deploy.status"] == "deployed" and tags["deploy.archive"] == first.archive
    assert served(probes[1])["model_version"] == "1" and deploy_history(registry, reg_name) == ["1"]
    assert "## tfanet-" in markdown(first) and "deployed" in markdown(first)
    assert deploy().status == "unchanged"

    # v2: the archive in the bucket is altered (another model under v2's name): parity fails, v1 serves again
    assert version(b) == "2"
    altered["2"] = a
    second = deploy()
    assert (second.status, second.serving, second.previous_default, second.champion) == ("rolled_back", "1", "1", "1")
    worst = max(probes, key=lambda p: abs(bundle_score(a, p) - bundle_score(b, p))).name  # served a, bundle b
    assert "parity failed: served scores of v2 differ from its bundle's" in second.reason
    assert f"worst probe {worst}" in second.reason and "rolled back to v1" in second.reason
    assert second.parity_max_abs_diff is not None and second.parity_max_abs_diff > 1e-4
    tags = registry.get_model_version(reg_name, "2").tags
    assert tags["deploy.status"] == "rolled_back" and tags["deploy.reason"] == second.reason
    assert registry.get_model_version_by_alias(reg_name, CHAMPION).version == "1"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"torchserve/{product}/")["Contents"]]
    assert keys == [f"torchserve/{product}/{name}-v1.mar"]
    doc = served(probes[1])
    assert doc["model_version"] == "1" and doc["score"] == pytest.approx(bundle_score(a, probes[1]), abs=1e-4)
    assert deploy_history(registry, reg_name) == ["1"]
    report = markdown(second)
    assert "rolled_back" in report and "parity failed" in report and "serving: v1" in report

    # v3: the same model as v2, its archive untouched: it goes live and replaces v1
    assert version(b) == "3"
    third = deploy()
    assert (third.status, third.serving, third.previous_default) == ("deployed", "3", "1")
    doc = served(probes[1])
    assert doc["model_version"] == "3" and doc["score"] == pytest.approx(bundle_score(b, probes[1]), abs=1e-4)
    assert deploy_history(registry, reg_name) == ["1", "3"]

    # the gateway forwards predictions and /ping without a key, and nothing else; TorchServe itself wants the key
    client = TorchServeClient(gateway, gateway, key_file=None)
    assert client.request("GET", "inference", "/ping").status == 200
    assert client.request("GET", "management", "/models").status == 404
    assert client.request("POST", "management", f"/models?url={name}-v1.mar").status == 404
    direct = f"/predictions/{name}"
    assert ts.request("POST", "inference", direct, probes[0].read_bytes(), OCTET, token="").status == 400
