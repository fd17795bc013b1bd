"""Serving an exported runtime: the archive carries the export, the handler runs it, TorchServe serves it, and
the deploy gate refuses an export that does not reproduce the bundle's scores."""

from __future__ import annotations

import copy
import io
import json
import shutil
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from components.deploy import deploy
from components.naming import torchserve_model_name
from components.promotion import GatePolicy, promote
from components.serving import server
from components.serving.archive import build_archive, read_manifest
from components.serving.handler import TFANetHandler
from components.serving.parity import EXPORT_ARTIFACT, export_for_serving
from components.serving.torchserve import TorchServeClient
from components.tracking import log_training_run, registered_model_name
from tfanet_core.bundle import load_bundle
from tfanet_core.predictor import Predictor
from tfanet_core.runtimes import (
    MANIFEST_FILE,
    PARITY_TOLERANCE,
    OpenVINORunner,
    Parity,
    bundle_digest,
    export_bundle,
    verify_export,
)

OCTET = "application/octet-stream"


@pytest.fixture(autouse=True)
def _export_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exports made on first use go to the test's folder, never the user's cache."""
    monkeypatch.setenv("TFANET_EXPORT_DIR", str(tmp_path / "export-cache"))


@pytest.fixture(scope="module")
def served_bundle(fabric_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained fabric bundle with ``serving.runtime: openvino`` (what `tfanet export --serve` records)."""
    out = tmp_path_factory.mktemp("served") / "fabric"
    bundle = load_bundle(fabric_bundle)
    bundle.serving = {"runtime": "openvino"}
    return bundle.save(out)


@pytest.fixture(scope="module")
def openvino_export(served_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    reference = Predictor.from_bundle(served_bundle, device="cpu", runtime="torch")
    return export_bundle(reference, "openvino", tmp_path_factory.mktemp("export") / "openvino")


@pytest.fixture(scope="module")
def openvino_mar(served_bundle: Path, openvino_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store")
    return build_archive(served_bundle, "fabric", "5", store, export=openvino_export, workers=2)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _torch_score(bundle: Path, image: Image.Image) -> float:
    return Predictor.from_bundle(bundle, device="cpu", runtime="torch").predict([image])[0].score


def test_archive_carries_the_export_and_sets_threads_per_worker(openvino_mar: Path) -> None:
    manifest = read_manifest(openvino_mar)
    assert manifest["runtime"] == "openvino"
    assert manifest["workers"] == 2  # the handler gives each usable cores // 2 threads (threads_per_worker)
    assert manifest["export"]["format"] == "openvino" and manifest["export"]["parity"]["passed"]
    with zipfile.ZipFile(openvino_mar) as z:
        names = set(z.namelist())
    assert {"export/model.xml", "export/model.bin", f"export/{MANIFEST_FILE}", "bundle/model.pt"} <= names


def test_handler_runs_the_exported_model(openvino_mar: Path, served_bundle: Path, tmp_path: Path) -> None:
    from ts.context import Context, RequestProcessor

    model_dir = tmp_path / "model"
    with zipfile.ZipFile(openvino_mar) as z:
        z.extractall(model_dir)
    handler = TFANetHandler()
    handler.initialize(Context("tfanet-fabric", str(model_dir), None, 4, None, "0.12.0"))
    assert handler.predictor is not None and handler.predictor.runtime == "openvino"
    assert handler.predictor.exported is not None and handler.predictor.exported.directory == model_dir / "export"
    runner = handler.predictor.exported._run
    assert isinstance(runner, OpenVINORunner)
    precompiled = dict(runner._compiled)
    # compiled at load for every batch size TorchServe may send (up to 4 here), not on a first request
    assert set(precompiled) == {runner.streams(n) for n in range(1, 5)}
    image = Image.new("RGB", (96, 80), (120, 90, 60))
    ctx = Context("tfanet-fabric", str(model_dir), None, 4, None, "0.12.0")
    ctx.request_processor = [RequestProcessor({"Content-Type": OCTET})]
    [out] = handler.handle([{"body": _png(image)}], ctx)
    assert runner._compiled == precompiled
    doc = json.loads(out)
    expected = _torch_score(served_bundle, image)
    assert doc["model_version"] == "5" and abs(doc["score"] - expected) <= PARITY_TOLERANCE * abs(expected)


@pytest.mark.server
def test_torchserve_serves_the_exported_model(
    openvino_mar: Path, served_bundle: Path, synth_root: Path, tmp_path: Path
) -> None:
    state = tmp_path / "torchserve"
    server.start(state, server.free_ports())
    try:
        client = TorchServeClient.from_state_dir(state)
        (state / "model_store").mkdir(parents=True, exist_ok=True)
        shutil.copy2(openvino_mar, state / "model_store" / openvino_mar.name)
        client.register(openvino_mar.name, torchserve_model_name("fabric"), batch_size=4, max_batch_delay_ms=20)
        for path in sorted((synth_root / "fabric" / "test").glob("*/000.png")):
            resp = client.predict(torchserve_model_name("fabric"), path.read_bytes())
            assert resp.status == 200, resp.body[:300]
            expected = Predictor.from_bundle(served_bundle, device="cpu", runtime="torch").predict_paths([path])[0]
            doc = resp.json()
            assert abs(doc["score"] - expected.score) <= PARITY_TOLERANCE * abs(expected.score)
            assert doc["is_anomalous"] == expected.is_anomalous
    finally:
        server.stop(state)


@pytest.mark.server
def test_deploy_serves_the_export_and_refuses_an_altered_one(
    tracking: str,
    torchserve: Path,
    served_bundle: Path,
    synth_probes: Callable[[str, int], list[Path]],
    tmp_path: Path,
) -> None:
    client = TorchServeClient.from_state_dir(torchserve)
    store = torchserve / "model_store"
    registry = MlflowClient()
    product = f"fabric-{uuid.uuid4().hex[:8]}"
    name = registered_model_name(product)
    probes = synth_probes("fabric", 2)
    metrics = {"image_auroc": 0.9}
    policy = GatePolicy(metrics=("image_auroc",))

    # v1: no export in its run yet, so the deploy exports it, logs it to the run, gates it and serves it
    first_version = log_training_run(product, served_bundle, metrics=metrics, dataset_version="ds-1")
    assert promote(product, policy=policy).promoted
    first = deploy(product, client, store, probes, record=tmp_path / "deploy.json")
    assert first.status == "deployed", first.reason
    assert first.export_parity is not None and first.export_parity["passed"]
    assert first.export_parity["runtime"] == "openvino" and first.export_parity["images"] == 4
    assert first.export_parity["max_relative_difference"] <= PARITY_TOLERANCE
    assert json.loads((tmp_path / "deploy.json").read_text())["export_parity"]["passed"]
    assert first.archive is not None and read_manifest(first.archive)["runtime"] == "openvino"
    run_id = first_version.run_id
    logged = {a.path for a in registry.list_artifacts(run_id, f"{EXPORT_ARTIFACT}/openvino")}
    assert f"{EXPORT_ARTIFACT}/openvino/model.xml" in logged and f"{EXPORT_ARTIFACT}/openvino/{MANIFEST_FILE}" in logged
    tags = registry.get_model_version(name, "1").tags
    assert json.loads(tags["deploy.export_parity"])["passed"]
    resp = client.predict(torchserve_model_name(product), probes[1].read_bytes())
    expected = Predictor.from_bundle(served_bundle, device="cpu", runtime="torch").predict_paths([probes[1]])[0]
    assert resp.status == 200 and abs(resp.json()["score"] - expected.score) <= PARITY_TOLERANCE * expected.score

    # v2: the same bundle, but the export in its run was made from changed weights and claims to be this
    # bundle's (a hand-edited or mis-converted export): the gate measures the difference and refuses it
    second_version = log_training_run(product, served_bundle, metrics=metrics, dataset_version="ds-1")
    bundle = load_bundle(served_bundle)
    changed = copy.deepcopy(bundle)
    with torch.no_grad():
        changed.model.head.bias += 0.05
    altered = export_bundle(Predictor(changed, device="cpu", runtime="torch"), "openvino", tmp_path / "altered")
    manifest = json.loads((altered / MANIFEST_FILE).read_text())
    manifest["bundle_sha256"] = bundle_digest(bundle)
    (altered / MANIFEST_FILE).write_text(json.dumps(manifest))
    registry.log_artifacts(second_version.run_id, str(altered), f"{EXPORT_ARTIFACT}/openvino")
    assert promote(product, policy=policy).promoted  # equal metrics: not worse, champion -> v2
    refused = deploy(product, client, store, probes)
    assert refused.status == "refused" and refused.serving == "1" and refused.archive is None
    assert "export gate failed for v2: openvino scores differ from the torch bundle's by up to" in refused.reason
    assert "v1 keeps serving" in refused.reason
    assert refused.export_parity is not None and not refused.export_parity["passed"]
    assert refused.export_parity["max_relative_difference"] > PARITY_TOLERANCE
    assert registry.get_model_version(name, "2").tags["deploy.status"] == "refused"
    assert client.predict(torchserve_model_name(product), probes[0].read_bytes()).json()["model_version"] == "1"


def test_without_a_serving_runtime_the_fastest_in_parity_serves(
    fabric_bundle: Path,
    synth_probes: Callable[[str, int], list[Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probes = synth_probes("fabric", 2)
    assert not load_bundle(fabric_bundle).serving  # what training writes: no runtime chosen
    chosen = export_for_serving(fabric_bundle, None, tmp_path / "all", probes, batch_size=3, threads=1)
    assert chosen.chosen_by == "measured" and (chosen.batch_size, chosen.threads) == (3, 1)
    assert set(chosen.images_per_s) == {"torch", "onnxruntime", "openvino"} and not chosen.refused
    assert chosen.runtime == max(chosen.images_per_s, key=lambda runtime: chosen.images_per_s[runtime])
    if chosen.runtime == "torch":
        assert chosen.export is None and chosen.gate is None
    else:
        assert chosen.gate is not None and chosen.gate.passed and chosen.failure is None
        assert chosen.export is not None and json.loads((chosen.export / MANIFEST_FILE).read_text())["runtime"] == (
            chosen.runtime
        )

    # An export out of parity is no candidate: it is named with its reason, and the rest still compete.
    def onnx_out_of_parity(reference: Predictor, directory: Path, **kwargs: object) -> Parity:
        parity = verify_export(reference, directory, **kwargs)  # type: ignore[arg-type]
        if parity.runtime == "onnxruntime":
            parity.reasons.append("onnxruntime scores differ (made up by this test)")
        return parity

    monkeypatch.setattr("components.serving.parity.verify_export", onnx_out_of_parity)
    without = export_for_serving(fabric_bundle, None, tmp_path / "without", probes, batch_size=1, threads=1)
    assert without.refused == {"onnxruntime": "onnxruntime scores differ (made up by this test)"}
    assert set(without.images_per_s) == {"torch", "openvino"} and without.runtime in without.images_per_s
    assert without.failure is None  # a refused candidate does not refuse the deploy


def test_a_bundle_that_names_its_runtime_is_served_on_it(
    served_bundle: Path, synth_probes: Callable[[str, int], list[Path]], tmp_path: Path
) -> None:
    chosen = export_for_serving(served_bundle, None, tmp_path, synth_probes("fabric", 2))
    assert (chosen.runtime, chosen.chosen_by, chosen.images_per_s) == ("openvino", "bundle", {})
    assert chosen.gate is not None and chosen.gate.passed
