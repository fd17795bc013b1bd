"""The manifest is the one split: features, template, train and calibrate use exactly its rows, per layout."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from components import steps
from tfanet_core import workflow
from tfanet_core.bundle import load_bundle
from tfanet_core.data.manifest import Manifest

CATEGORY = "widget"


def _mvtec(synth: Path, root: Path) -> None:
    """MVTec AD layout, with a byte-identical pair of training images (KolektorSDD has 17)."""
    shutil.copytree(synth / "fabric", root / CATEGORY)
    good = root / CATEGORY / "train" / "good"
    for i in range(6):  # six twins: whatever the seeded split picks, some pairs meet the val boundary
        shutil.copy(good / f"{i:03d}.png", good / f"twin_{i:03d}.png")


def _loco(synth: Path, root: Path) -> None:
    """MVTec LOCO layout: shipped validation/good, masks as folders of one PNG per defect, defects_config.json."""
    src, cat = synth / "fabric", root / CATEGORY
    train = sorted((src / "train" / "good").glob("*.png"))
    for split, files in (("train/good", train[:30]), ("validation/good", train[30:])):
        (cat / split).mkdir(parents=True)
        for f in files:
            shutil.copy(f, cat / split / f.name)
    shutil.copytree(src / "test" / "good", cat / "test" / "good")
    shutil.copytree(src / "test" / "hole", cat / "test" / "logical_anomalies")
    for mask in sorted((src / "ground_truth" / "hole").glob("*_mask.png")):
        folder = cat / "ground_truth" / "logical_anomalies" / mask.name.removesuffix("_mask.png")
        folder.mkdir(parents=True)
        shutil.copy(mask, folder / "000.png")
    config = [{"defect_name": "hole", "pixel_value": 255, "saturation_threshold": 1.0, "relative_saturation": True}]
    (cat / "defects_config.json").write_text(json.dumps(config))


def _folders(synth: Path, root: Path) -> None:
    """Plain folders: good/ and defect/ with masks/; the good images are split into train and test here."""
    src, cat = synth / "fabric", root / CATEGORY
    (cat / "good").mkdir(parents=True)
    for f in sorted((src / "train" / "good").glob("*.png")) + sorted((src / "test" / "good").glob("*.png")):
        shutil.copy(f, cat / "good" / f"{f.parent.parent.name}_{f.name}")
    shutil.copytree(src / "test" / "hole", cat / "defect")
    shutil.copytree(src / "ground_truth" / "hole", cat / "masks")


class _Recorder:
    """Wraps the real feature extraction and records which images each call read."""

    def __init__(self, real: Callable[..., torch.Tensor]) -> None:
        self.real, self.calls = real, []

    def __call__(self, extractor: Any, paths: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append([Path(p) for p in paths])
        return self.real(extractor, paths, *args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [_mvtec, _loco, _folders], ids=["mvtec_ad", "mvtec_loco", "folders"])
def test_every_step_uses_exactly_the_manifests_rows(
    layout: Callable[[Path, Path], None], synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    layout(synth_root, data)
    section = {
        "profile": "tiny",
        "data": {"category": CATEGORY},
        "train": {"epochs": 1, "val_fraction": 0.2, "seed": 3},
        "template": {"strategy": "medoid"},
        "calibration": {"target_fpr": 0.25},
    }
    paths = steps.ProductPaths.of(tmp_path / "runs", "widget")
    steps.prepare(data, "widget", section, paths)
    manifest = Manifest.read(paths.manifest, data)
    train = [s.path for s in manifest.samples("train")]
    val = [s.path for s in manifest.samples("val")]
    assert train and val and not set(train) & set(val)
    sha = {manifest.root / r.path: r.sha256 for r in manifest.rows}
    assert not {sha[p] for p in train} & {sha[p] for p in val}  # no byte-identical pair straddles train/val
    if layout is _mvtec:  # and the rule was exercised: a held-out image's twin went to val with it
        assert any(all(manifest.row_for(p).split == "val" for p in pair) for pair in manifest.duplicates())
    steps.validate(data, {}, paths)  # the suite checks the manifest file itself

    recorder = _Recorder(workflow.extract_features)
    monkeypatch.setattr(workflow, "extract_features", recorder)
    steps.features(data, "widget", section, paths)
    template = steps.template(data, "widget", section, paths)
    assert recorder.calls == [train, val]
    assert data / template["image"] in train
    recorder.calls.clear()
    steps.train(data, "widget", section, paths)
    assert recorder.calls == [train, val]
    model = load_bundle(paths.model)
    assert model.thresholds == {} and model.dataset["version"] == manifest.version
    assert (model.dataset["n_train"], model.dataset["n_val"]) == (len(train), len(val))

    steps.evaluate(data, "widget", section, paths)
    scored = {r["path"] for r in json.loads(paths.scores.read_text())}
    assert scored == {r.path for r in manifest.rows if r.split == "test"}
    recorder.calls.clear()
    summary = steps.calibrate(data, "widget", section, paths)
    assert recorder.calls == [train, val]
    bundle = load_bundle(paths.bundle)
    assert bundle.thresholds["image"].n_normal == len(val) == summary["n_val"]
    assert bundle.drift_reference is not None and len(bundle.drift_reference.embeddings) == len(train) + len(val)
