"""Template strategies: medoid picks a central image, never a planted outlier; best_of_k trusts validation loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tfanet_core.bundle import load_bundle
from tfanet_core.cli import main
from tfanet_core.config import load_config
from tfanet_core.features import FeatureExtractor, extract_features, sha256_file
from tfanet_core.templates import (
    best_of_k,
    candidates,
    distances_to_mean,
    read_choice,
    select_template,
)


def _planted(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A typical part plus per-image noise of known size; image 0 is an outlier (another pose/lighting)."""
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(8, 16, 16, generator=g)
    amplitude = torch.linspace(0.3, 0.6, n)[torch.randperm(n, generator=g)]
    features = center + amplitude.view(-1, 1, 1, 1) * torch.randn(n, 8, 16, 16, generator=g)
    features[0] = center.flip(-1) + 2.0  # mirrored and brighter
    return features, amplitude


def test_first_takes_the_outlier_medoid_takes_the_least_perturbed_image() -> None:
    features, amplitude = _planted()
    assert select_template(features, "first").index == 0
    choice = select_template(features, "medoid")
    typical = amplitude.clone()
    typical[0] = float("inf")
    assert choice.index == int(typical.argmin())  # closest to the mean = least noise around the centre
    assert choice.evidence["distance_to_mean"] < choice.evidence["median_distance"] < choice.evidence["max_distance"]
    assert int(distances_to_mean(features).argmax()) == 0


@pytest.fixture(scope="module")
def planted_dataset(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fabric training images plus one bracket image planted as the first training file."""
    root = tmp_path_factory.mktemp("planted")
    good = root / "fabric" / "train" / "good"
    good.mkdir(parents=True)
    for path in sorted((synth_root / "fabric" / "train" / "good").glob("*.png"))[:14]:
        shutil.copy(path, good / path.name)
    outlier = sorted((synth_root / "bracket" / "train" / "good").glob("*.png"))[0]
    shutil.copy(outlier, good / "-outlier.png")
    return root


def test_medoid_on_synthetic_images_is_not_the_planted_outlier(planted_dataset: Path, tmp_path: Path) -> None:
    paths = sorted((planted_dataset / "fabric" / "train" / "good").glob("*.png"))
    assert paths[0].name == "-outlier.png"
    extractor = FeatureExtractor(load_config("tiny").features)
    features = extract_features(extractor, paths, progress=False)
    distances = distances_to_mean(features)
    assert int(distances.argmax()) == 0  # the backbone sees the bracket as the odd one out
    assert select_template(features, "first").index == 0
    choice = select_template(features, "medoid")
    assert choice.index != 0
    assert distances[choice.index] < 0.5 * distances[0]


def test_candidates_include_first_and_medoid_and_skip_the_farthest() -> None:
    features, _ = _planted(n=12)
    distances = distances_to_mean(features)
    picked = candidates(features, 4)
    assert len(picked) == len(set(picked)) == 4
    assert picked[0] == 0 and int(distances.argmin()) in picked
    far = int(distances[1:].argmax()) + 1  # the farthest *typical* image is not spent a trial on
    assert far not in picked
    assert sorted(candidates(features[:3], 8)) == [0, 1, 2]  # k > n: every image once
    with pytest.raises(ValueError, match="k >= 1"):
        candidates(features, 0)


def test_best_of_k_picks_the_lowest_validation_loss_and_records_every_trial() -> None:
    features, _ = _planted(n=10)
    losses = {i: 1.0 + 0.1 * i for i in range(10)}
    picked = candidates(features, 3)
    losses[picked[-1]] = 0.5
    seen: list[int] = []

    def trial(index: int) -> float:
        seen.append(index)
        return losses[index]

    choice = best_of_k(features, trial, k=3)
    assert seen == picked
    assert choice.index == picked[-1] and choice.strategy == "best_of_k"
    assert [row["val_loss"] for row in choice.evidence["candidates"]] == [losses[i] for i in picked]
    assert choice.evidence["val_loss"] == 0.5


def test_best_of_k_short_runs_reject_the_planted_outlier() -> None:
    features, _ = _planted(n=12)
    val, _ = _planted(n=5, seed=1)
    val = val[1:] + (features[1:].mean(0) - val[1:].mean(0))  # normal images of the same part
    config = load_config("tiny", ["train.batch_size=4"])
    choice = select_template(features, "best_of_k", val_features=val, config=config, k=3, trial_epochs=3)
    rows = {row["index"]: row["val_loss"] for row in choice.evidence["candidates"]}
    assert 0 in rows and len(rows) == 3
    assert choice.index != 0 and rows[0] > min(rows.values())
    assert choice.evidence["trial_epochs"] == 3


def test_best_of_k_needs_validation_images() -> None:
    features, _ = _planted()
    with pytest.raises(ValueError, match="val_fraction"):
        select_template(features, "best_of_k", val_features=None, config=load_config("tiny"))
    with pytest.raises(ValueError, match="best_of_k"):
        select_template(features, "worst")


def test_cli_template_then_train_uses_that_choice(planted_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "template.json"
    cache = str(tmp_path / "cache")
    code = main(
        [
            "template",
            "--data",
            str(planted_dataset),
            "--category",
            "fabric",
            "--profile",
            "tiny",
            "--strategy",
            "medoid",
            "--out",
            str(out),
            "--cache-dir",
            cache,
            "--quiet",
        ]
    )
    assert code == 0
    record = json.loads(out.read_text())
    assert record["strategy"] == "medoid" and record["image"] != "fabric/train/good/-outlier.png"
    assert record["sha256"] == sha256_file(planted_dataset / record["image"])
    assert record["evidence"]["distance_to_mean"] <= record["evidence"]["median_distance"]

    bundle_dir = tmp_path / "bundle"
    train_args = ["train", "--data", str(planted_dataset), "--category", "fabric", "--profile", "tiny"]
    train_args += ["--set", "train.epochs=1", "--out", str(bundle_dir), "--cache-dir", cache, "--quiet"]
    assert main([*train_args, "--template", str(out)]) == 0
    template = load_bundle(bundle_dir).template
    assert template["image"] == record["image"] and template["sha256"] == record["sha256"]
    assert template["strategy"] == "medoid" and template["evidence"] == record["evidence"]


def test_a_template_file_from_another_dataset_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"image": "x.png", "sha256": "ab" * 32, "strategy": "medoid", "evidence": {}}))
    with pytest.raises(ValueError, match="rerun `tfanet template`"):
        read_choice(path, [Path("a.png")], ["cd" * 32])
    assert read_choice(path, [Path("a.png"), Path("x.png")], ["cd" * 32, "ab" * 32]).index == 1
