"""The bundle is self-describing and the predictor reproduces its scores exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tfanet_core.bundle import METADATA_FILE, WEIGHTS_FILE, BundleError, load_bundle, read_metadata
from tfanet_core.data.images import image_to_tensor, load_rgb
from tfanet_core.drift import REFERENCE_FILE, DriftConfig, build_reference, check_window, measure
from tfanet_core.predictor import Predictor


def _test_images(synth_root: Path, size: tuple[int, int]) -> torch.Tensor:
    paths = sorted((synth_root / "fabric" / "test" / "good").glob("*.png"))[:2]
    paths += sorted((synth_root / "fabric" / "test" / "hole").glob("*.png"))[:2]
    return torch.stack([image_to_tensor(load_rgb(p), size) for p in paths])


def test_bundle_records_what_a_reader_needs(fabric_bundle: Path) -> None:
    meta = read_metadata(fabric_bundle)
    assert meta["config"]["profile"] == "tiny"
    assert meta["backbone"]["tag"] == "efficientnet_lite0"
    assert len(meta["backbone"]["sha256"]) == 64
    assert meta["template"]["strategy"] == "first"
    assert meta["template"]["image"].startswith("fabric/train/good/")
    assert meta["thresholds"]["image"]["method"] == "normal_quantile"
    assert meta["thresholds"]["pixel"]["level"] == "pixel"
    assert meta["dataset"]["category"] == "fabric" and meta["dataset"]["n_val"] > 0
    assert len(meta["training"]["history"]) == 12


def test_save_load_gives_bit_identical_scores(fabric_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    first = Predictor.from_bundle(fabric_bundle, device="cpu")
    images = _test_images(synth_root, first.image_size)
    scores, maps = first.score_tensors(images)
    copy = tmp_path / "copy"
    load_bundle(fabric_bundle).save(copy)
    again = Predictor.from_bundle(copy, device="cpu")
    scores2, maps2 = again.score_tensors(images)
    assert torch.equal(scores, scores2) and torch.equal(maps, maps2)
    # batching does not change a score
    single = torch.cat([again.score_tensors(images[i : i + 1])[0] for i in range(len(images))])
    assert torch.allclose(single, scores, rtol=1e-5, atol=1e-7)


def test_predictions_carry_the_calibrated_threshold(fabric_bundle: Path, synth_root: Path) -> None:
    predictor = Predictor.from_bundle(fabric_bundle, device="cpu")
    paths = [synth_root / "fabric" / "test" / "hole" / "000.png"]
    [pred] = predictor.predict_paths(paths, return_maps=True)
    assert pred.threshold == read_metadata(fabric_bundle)["thresholds"]["image"]["value"]
    assert pred.is_anomalous == (pred.score > pred.threshold)
    assert pred.anomaly_map is not None and pred.anomaly_map.shape == (128, 128)
    assert np.isfinite(pred.anomaly_map).all()


def test_bundle_refuses_other_backbone_weights(fabric_bundle: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(fabric_bundle, tampered)
    meta = json.loads((tampered / "bundle.json").read_text())
    meta["backbone"]["sha256"] = "0" * 64
    (tampered / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="backbone weights differ"):
        Predictor.from_bundle(tampered, device="cpu")


def test_not_a_bundle_and_future_format_are_clear_errors(fabric_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a tfanet bundle"):
        load_bundle(tmp_path)
    future = tmp_path / "future"
    shutil.copytree(fabric_bundle, future)
    meta = json.loads((future / "bundle.json").read_text())
    meta["format_version"] = 99
    (future / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="format 99 was written by a newer tfanet"):
        load_bundle(future)


def test_pasted_anomaly_raises_the_score_and_the_map_peaks_inside_it(fabric_bundle: Path, synth_root: Path) -> None:
    predictor = Predictor.from_bundle(fabric_bundle, device="cpu")
    size = predictor.image_size
    normal = image_to_tensor(load_rgb(synth_root / "fabric" / "test" / "good" / "000.png"), size)
    pasted = normal.clone()
    top, left, side = 70, 30, 18
    pasted[:, top : top + side, left : left + side] = torch.tensor([0.9, 0.1, 0.6]).view(3, 1, 1)  # a magenta patch
    scores, maps = predictor.score_tensors(torch.stack([normal, pasted]))
    assert scores[1] > 2 * scores[0]
    row, col = divmod(int(maps[1].argmax()), size[1])
    assert top - 4 <= row < top + side + 4 and left - 4 <= col < left + side + 4


def test_save_load_save_keeps_the_drift_reference_and_drift_checks_run_on_the_resaved_bundle(
    fabric_bundle: Path, synth_root: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(fabric_bundle)
    normals = sorted((synth_root / "fabric" / "train" / "good").glob("*.png"))[:8]
    bundle.drift_reference = build_reference(Predictor(bundle, device="cpu"), normals[:5], normals[5:])
    saved = bundle.save(tmp_path / "bundle")
    resaved = load_bundle(saved).save(saved)  # in place: the directory is replaced as a whole
    assert sorted(p.name for p in resaved.iterdir()) == [METADATA_FILE, REFERENCE_FILE, WEIGHTS_FILE]
    again = load_bundle(resaved)
    assert again.drift_reference is not None and again.thresholds == bundle.thresholds
    np.testing.assert_array_equal(again.drift_reference.embeddings, bundle.drift_reference.embeddings)
    np.testing.assert_array_equal(again.drift_reference.scores, bundle.drift_reference.scores)
    assert again.drift_reference.threshold == bundle.thresholds["image"].value
    # what `tfanet drift check` does with the champion's bundle: embed a window, test it against the reference
    embeddings, scores = measure(Predictor(again, device="cpu"), normals[:4])
    report = check_window(again.drift_reference, embeddings, scores, DriftConfig(window=4, n_permutations=50))
    assert report.n_window == 4 and isinstance(report.drift, bool) and set(report.p_values) >= {"mmd"}


def test_predictions_carry_the_defect_mask_of_the_pixel_threshold(fabric_bundle: Path, synth_root: Path) -> None:
    predictor = Predictor.from_bundle(fabric_bundle, device="cpu")
    assert predictor.pixel_threshold is not None and predictor.pixel_threshold.level == "pixel"
    path = sorted((synth_root / "fabric" / "test" / "hole").glob("*.png"))[0]
    [with_map] = predictor.predict_paths([path], return_maps=True)
    assert with_map.anomaly_map is not None and with_map.pred_mask is not None
    np.testing.assert_array_equal(with_map.pred_mask, with_map.anomaly_map > predictor.pixel_threshold.value)
    [plain] = predictor.predict_paths([path])
    assert plain.pred_mask is None and plain.score == with_map.score
