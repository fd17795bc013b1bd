"""Exported runtimes: the graph scores what the torch bundle scores, and an export that does not is refused."""

from __future__ import annotations

import json
import threading
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch
from onnx import numpy_helper

from tfanet_core.bundle import Bundle
from tfanet_core.cli import main
from tfanet_core.config import load_config
from tfanet_core.features import FeatureExtractor, sha256_file
from tfanet_core.model import TemplateAggregator
from tfanet_core.predictor import Predictor
from tfanet_core.runtimes import (
    MANIFEST_FILE,
    PARITY_TOLERANCE,
    ExportedModel,
    ExportError,
    OpenVINORunner,
    bundle_digest,
    compare_scores,
    export_bundle,
    measure_speed,
    probe_images,
    read_manifest,
    settle,
    threads_per_worker,
    usable_cores,
    verify_export,
    wait_until_quiet,
)
from tfanet_core.threshold import Threshold

EXPORTED = ("onnxruntime", "openvino")


def _random_bundle(seed: int) -> Bundle:
    """The tiny profile on random backbone and TFA-Net weights: parity is arithmetic, weights do not matter."""
    config = load_config("tiny", ["features.backbone=random:tf_efficientnet_lite0"])
    extractor = FeatureExtractor(config.features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TemplateAggregator(config.model, extractor.out_channels, config.features.feature_size)
        model.set_template(extractor(torch.rand(1, 3, 128, 128)))
    bundle = Bundle(config=config, model=model, backbone=extractor.describe())
    scores, _ = Predictor(bundle, device="cpu").score_tensors(probe_images(128))
    low, high = scores.sort().values[3:5].tolist()
    bundle.thresholds = {"image": Threshold(value=(low + high) / 2, method="normal_quantile")}  # 4 probes above
    return bundle


@pytest.fixture(autouse=True)
def _export_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exports made on first use go to the test's folder, never the user's cache."""
    monkeypatch.setenv("TFANET_EXPORT_DIR", str(tmp_path / "export-cache"))


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return _random_bundle(0)


@pytest.fixture(scope="module")
def exports(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    reference = Predictor(bundle, device="cpu")
    return {fmt: export_bundle(reference, fmt, root / fmt) for fmt in ("onnx", "openvino")}


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("runtime", EXPORTED)
@pytest.mark.parametrize("n, batch_size", [(1, 1), (5, 2)])  # batch 1, and a ragged last batch
def test_exported_scores_equal_the_bundles(
    bundle: Bundle, exports: dict[str, Path], runtime: str, n: int, batch_size: int
) -> None:
    fmt = "onnx" if runtime == "onnxruntime" else "openvino"
    torch_path = Predictor(bundle, device="cpu", batch_size=batch_size)
    exported = Predictor(bundle, device="cpu", batch_size=batch_size, runtime=runtime, export_dir=exports[fmt])
    assert (torch_path.runtime, exported.runtime) == ("torch", runtime)
    images = _images(n)
    expected, expected_maps = torch_path.score_tensors(images)
    scores, maps = exported.score_tensors(images)
    assert scores.shape == (n,) and maps.shape == (n, 128, 128)
    assert float(((scores - expected).abs() / expected.abs()).max()) <= PARITY_TOLERANCE
    assert torch.allclose(maps, expected_maps, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_manifest_names_bundle_runtime_and_parity(bundle: Bundle, exports: dict[str, Path], fmt: str) -> None:
    manifest = read_manifest(exports[fmt])
    assert manifest["bundle_sha256"] == bundle_digest(bundle)
    assert manifest["runtime"] == ("onnxruntime" if fmt == "onnx" else "openvino")
    assert manifest["runtime_version"] == version(manifest["runtime"])
    parity = manifest["parity"]
    assert parity["passed"] and parity["images"] == 8 and parity["decision_flips"] == 0
    assert 0 < parity["max_relative_difference"] <= PARITY_TOLERANCE
    assert manifest["threshold"] == bundle.thresholds["image"].value


def test_the_gate_passes_an_untouched_export(bundle: Bundle, exports: dict[str, Path]) -> None:
    parity = verify_export(Predictor(bundle, device="cpu"), exports["openvino"])
    assert parity.passed, parity.reasons
    assert parity.max_relative_difference <= PARITY_TOLERANCE


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_gate_refuses_an_export_whose_weights_were_changed(
    bundle: Bundle, exports: dict[str, Path], tmp_path: Path
) -> None:
    altered = _copy(exports["onnx"], tmp_path / "altered")
    graph = onnx.load(str(altered / "model.onnx"))
    biases = [t for t in graph.graph.initializer if t.name.endswith("head.bias")]
    assert biases, [t.name for t in graph.graph.initializer][:20]
    bias = numpy_helper.to_array(biases[0])
    biases[0].CopyFrom(numpy_helper.from_array(bias + 0.05, biases[0].name))
    onnx.save(graph, str(altered / "model.onnx"))
    reference = Predictor(bundle, device="cpu")

    # Changed after export: the recorded file hash says so before anything runs.
    parity = verify_export(reference, altered)
    assert not parity.passed and "model.onnx was altered after export" in parity.reasons[0]

    # Changed and re-hashed (as a hand-edited or mis-converted export would be): the scores say so.
    manifest = json.loads((altered / MANIFEST_FILE).read_text())
    manifest["files"]["model.onnx"] = sha256_file(altered / "model.onnx")
    (altered / MANIFEST_FILE).write_text(json.dumps(manifest))
    parity = verify_export(reference, altered)
    assert not parity.passed
    assert "onnxruntime scores differ from the torch bundle's by up to" in parity.reasons[0]
    assert parity.max_relative_difference > PARITY_TOLERANCE


def test_gate_refuses_an_export_of_another_bundle(exports: dict[str, Path]) -> None:
    other = _random_bundle(1)
    parity = verify_export(Predictor(other, device="cpu"), exports["openvino"])
    assert not parity.passed
    assert "was made from bundle" in parity.reasons[0] and bundle_digest(other)[:12] in parity.reasons[0]
    with pytest.raises(ExportError, match="not of this bundle"):
        Predictor(other, device="cpu", runtime="openvino", export_dir=exports["openvino"])


def test_decision_flips_fail_parity_even_within_tolerance() -> None:
    reference = torch.tensor([1.0, 2.0, 3.0])
    parity = compare_scores(reference, reference * (1 + 1e-6), threshold=2.0 * (1 + 5e-7), tolerance=1e-5, runtime="x")
    assert parity.decision_flips == 1 and parity.max_relative_difference <= 1e-5
    assert not parity.passed and "1 of 3 probe decisions flip" in parity.reasons[0]
    assert compare_scores(reference, reference, 2.5, 1e-5, "x").passed


def test_first_use_exports_into_the_cache_and_reuses_it(
    bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TFANET_EXPORT_DIR", str(tmp_path))
    first = Predictor(bundle, device="cpu", runtime="onnxruntime")
    assert first.exported is not None
    stored = tmp_path / bundle_digest(bundle)[:16] / "onnx"
    assert first.exported.directory == stored and (stored / "model.onnx").is_file()
    created = read_manifest(stored)["created"]
    again = Predictor(bundle, device="cpu", runtime="onnxruntime")
    assert again.exported is not None and read_manifest(again.exported.directory)["created"] == created


def test_runtime_comes_from_the_bundles_serving_config(bundle: Bundle, exports: dict[str, Path]) -> None:
    served = Bundle(**{**bundle.__dict__, "serving": {"runtime": "openvino"}})
    assert bundle_digest(served) == bundle_digest(bundle)  # the serving choice does not change scores
    assert Predictor(served, device="cpu", export_dir=exports["openvino"]).runtime == "openvino"
    assert Predictor(served, device="cpu", runtime="torch").runtime == "torch"
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        Predictor(bundle, device="cpu", runtime="tensorrt")
    with pytest.raises(ValueError, match="int8"):
        Predictor(bundle, device="cpu", runtime="openvino", int8=True, export_dir=exports["openvino"])


@pytest.mark.slow
def test_cli_predict_gives_the_same_json_for_every_runtime(
    fabric_bundle: Path,
    synth_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A trained bundle with no stored export: each runtime exports on first use and prints the same rows."""
    monkeypatch.setenv("TFANET_EXPORT_DIR", str(tmp_path / "exports"))
    paths = [str(p) for p in sorted((synth_root / "fabric" / "test").glob("*/*.png"))[::4]]
    rows = {}
    for runtime in ("torch", *EXPORTED):
        assert main(["predict", "--bundle", str(fabric_bundle), "--runtime", runtime, "--batch-size", "3", *paths]) == 0
        rows[runtime] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows["torch"]) == len(paths) > 3
    assert {r["is_anomalous"] for r in rows["torch"]} == {True, False}
    for runtime in EXPORTED:
        for ref, row in zip(rows["torch"], rows[runtime], strict=True):
            assert row["path"] == ref["path"] and row["threshold"] == ref["threshold"]
            assert row["is_anomalous"] == ref["is_anomalous"]
            assert abs(row["score"] - ref["score"]) <= PARITY_TOLERANCE * abs(ref["score"])
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()).__len__() == 1  # one bundle, two formats

    out = tmp_path / "export"
    assert main(["export", "--bundle", str(fabric_bundle), "--format", "openvino", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["runtime"] == "openvino" and printed["parity"]["passed"]


def test_openvino_runs_a_batch_one_image_per_request_on_one_stream_per_thread(exports: dict[str, Path]) -> None:
    """Five images on two threads run as five single-image requests on two streams; the scores, maps and
    template choices are those of one thread running them in turn, and a single image keeps both threads."""
    split = ExportedModel(exports["openvino"], threads=2)
    whole = ExportedModel(exports["openvino"], threads=1)
    images = _images(5)
    scores, maps, templates = split.scores(images)
    expected, expected_maps, expected_templates = whole.scores(images)
    assert scores.shape == (5,) and maps.shape == (5, 128, 128) and templates.shape == expected_templates.shape
    assert float(((scores - expected).abs() / expected.abs()).max()) <= PARITY_TOLERANCE
    assert torch.allclose(maps, expected_maps, rtol=1e-4, atol=1e-6) and torch.equal(templates, expected_templates)
    runner = split._run
    assert isinstance(runner, OpenVINORunner) and list(runner._compiled) == [2]
    single, _, _ = split.scores(images[3:4])  # the latency path: one request on both threads
    assert list(runner._compiled) == [2, 1]
    assert float((single[0] - scores[3]).abs() / scores[3].abs()) <= PARITY_TOLERANCE


def test_precompile_compiles_once_per_stream_count_whatever_the_batch_sizes(exports: dict[str, Path]) -> None:
    """Batches of 1..20 images on two threads need two compiled models (one image on both threads, one
    image per single-threaded stream), both compiled up front; no batch size compiles anything afterwards."""
    model = ExportedModel(exports["openvino"], threads=2)
    model.precompile(20)
    runner = model._run
    assert isinstance(runner, OpenVINORunner)
    compiled = dict(runner._compiled)
    assert sorted(compiled) == [1, 2]
    images = _images(20)
    for n in (1, 2, 7, 20):
        assert model.scores(images[:n])[0].shape == (n,)
    assert runner._compiled == compiled
    ExportedModel(exports["onnx"], threads=2).precompile(20)  # ONNX Runtime has nothing to compile


def test_worker_threads_follow_the_cpu_limit_not_the_machines_core_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr("tfanet_core.runtimes.CGROUP_CPU_MAX", cpu_max)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(64)), raising=False)
    cpu_max.write_text("max 100000\n")  # no limit: the affinity mask counts
    assert usable_cores() == 64 and threads_per_worker(4) == 16
    cpu_max.write_text("250000 100000\n")  # a pod limited to 2.5 CPUs: 2 threads, not 64
    assert usable_cores() == 2 and threads_per_worker(1) == 2 and threads_per_worker(4) == 1
    cpu_max.unlink()  # no cgroup v2 controller
    assert usable_cores() == 64


def test_measure_speed_does_not_bill_a_runtime_for_the_threads_of_the_one_before() -> None:
    """A runtime whose threads keep spinning after its call slows whichever call comes next; the choice of the
    serving runtime must time each runtime after a call of its own."""
    spinning = {"left": False}

    def spinner(images: torch.Tensor) -> None:  # fast itself, leaves its threads busy
        spinning["left"] = True

    def victim(images: torch.Tensor) -> None:  # 1 ms, 30 ms more right after the spinner
        time.sleep(0.031 if spinning["left"] else 0.001)
        spinning["left"] = False

    speed = measure_speed(
        SimpleNamespace(score_images=spinner),  # type: ignore[arg-type]
        {"openvino": SimpleNamespace(scores=victim)},  # type: ignore[dict-item]
        torch.zeros(4, 3, 8, 8),
        rounds=3,
    )
    assert speed["openvino"] > 4 / 0.01  # ~4 / 0.001 s: the 30 ms it pays after the spinner are not counted


def _spin(seconds: float) -> None:
    """Keep a core busy, as a runtime's pool thread does while it waits for more work."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def test_settle_waits_until_threads_left_spinning_by_another_call_have_stopped() -> None:
    """A thread still spinning 0.2 s after the call that woke it: the untimed call, and so the timed one after
    it, start only once it has stopped; a thread that never stops costs a bounded wait, not a hang."""
    spinner = threading.Thread(target=_spin, args=(0.2,))
    spinner.start()
    calls = []
    settle(lambda: calls.append(spinner.is_alive()))
    assert calls == [False]

    spinner = threading.Thread(target=_spin, args=(0.5,))
    spinner.start()
    assert wait_until_quiet(limit_s=0.05) is False
    spinner.join()
    assert wait_until_quiet(limit_s=0.05) is True
