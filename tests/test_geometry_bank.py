"""Native geometry (non-square products) and the template bank (issue #21).

A "strip" product: the synthetic fabric cropped to 64×128 (H×W), 2:1 like a line-scan camera's parts. With
``features.geometry=native`` it trains at its own aspect ratio, and with ``template.strategy=bank`` each image
is aggregated onto its nearest of three templates; the tests follow that bundle through predict, the bundle
round trip, an exported runtime, the CLI and (``-m server``) a real TorchServe.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tfanet_core import cli
from tfanet_core.bundle import load_bundle
from tfanet_core.config import load_config
from tfanet_core.data.manifest import build_manifest
from tfanet_core.features import FeatureExtractor, cache_namespace
from tfanet_core.geometry import aspect_summary, native_size, resolve_geometry
from tfanet_core.model import TemplateAggregator
from tfanet_core.predictor import Predictor
from tfanet_core.templates import TemplateChoice, auto_choice, k_center_bank, select_template
from tfanet_core.training import prepared_model

STRIP = (slice(32, 96), slice(0, 128))  # rows, cols of a 128×128 synthetic image: a 64×128 strip
STRIP_CONFIG = [
    "features.geometry=native",
    "template.strategy=bank",
    "template.k=3",
    "train.epochs=3",
    "calibration.target_fpr=0.25",
]


@pytest.fixture(scope="module")
def strip_root(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fabric product with every image and mask cropped to a 64×128 strip (same folders, same names)."""
    root = tmp_path_factory.mktemp("strip")
    for src in (synth_root / "fabric").rglob("*.png"):
        dst = root / "strip" / src.relative_to(synth_root / "fabric")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as img:
            Image.fromarray(np.asarray(img)[STRIP]).save(dst)
    return root


@pytest.fixture(scope="module")
def strip_bundle(strip_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tfanet_core.workflow import train_category

    out = tmp_path_factory.mktemp("bundles") / "strip"
    train_category(strip_root, "strip", load_config("tiny", STRIP_CONFIG), out, device="cpu", progress=False)
    return out


def _strip_images(strip_root: Path) -> list[Path]:
    test = strip_root / "strip" / "test"
    return [test / "good" / "000.png", test / "good" / "001.png", test / "hole" / "000.png", test / "stain" / "000.png"]


# --- geometry ------------------------------------------------------------------------------------------------


def test_native_size_keeps_the_median_aspect_at_the_pixel_budget_in_whole_units() -> None:
    # KolektorSDD-like parts, 2.5 times taller than wide, at the cpu profile's 256² budget (unit 8 × 4 = 32 px)
    assert native_size([(500, 1250), (510, 1260), (490, 1240)], 256**2, 32) == (416, 160)
    assert native_size([(300, 300), (310, 290)], 256**2, 32) == (256, 256)  # square parts stay square
    assert native_size([(4000, 10)], 256**2, 32) == (32, 2048)  # at least a unit a side, the budget kept
    # the median, not the mean: one odd crop does not move the product's geometry
    assert native_size([(200, 100)] * 4 + [(100, 1000)], 128**2, 16) == native_size([(200, 100)], 128**2, 16)
    # crops of many sizes in both orientations share no aspect ratio: the square distorts them alike
    mixed = [(100, 170), (120, 170), (150, 170), (170, 150), (170, 110), (170, 100)]
    assert not aspect_summary(mixed)["shared"] and native_size(mixed, 256**2, 32) == (256, 256)
    assert aspect_summary([(500, 1250), (510, 1260)])["shared"]


def test_resolving_a_native_geometry_uses_the_training_images_and_is_idempotent(strip_root: Path) -> None:
    config = load_config("tiny", STRIP_CONFIG)
    manifest = build_manifest(strip_root, "strip", config.train.val_fraction, config.train.seed, progress=False)
    resolved = resolve_geometry(config, manifest)
    # tiny: 128² budget, image/feature ratio 8, patch 2 → 16 px units; a 2:1 strip → 96 × 176
    assert resolved.features.image_size == [96, 176] and resolved.features.feature_size == [12, 22]
    assert resolve_geometry(resolved, manifest) == resolved
    assert resolve_geometry(load_config("tiny"), manifest) == load_config("tiny")  # fixed geometry: untouched
    # the feature cache keeps square keys as before and tells rectangles apart
    square = cache_namespace(FeatureExtractor(load_config("tiny").features))
    strip = cache_namespace(FeatureExtractor(resolved.features))
    assert square["image_size"] == 128 and strip["image_size"] == [96, 176]


def test_a_non_square_config_is_checked_before_anything_runs() -> None:
    from tfanet_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"multiple of model\.patch_size"):
        load_config("tiny", ["features.feature_size=[16, 15]"])
    with pytest.raises(ConfigError, match="same whole multiple"):
        load_config("tiny", ["features.geometry=native", "features.feature_size=[16, 8]"])
    with pytest.raises(ConfigError, match="geometry"):
        load_config("tiny", ["features.geometry=stretched"])


def test_a_non_square_product_trains_predicts_and_round_trips(
    strip_bundle: Path, strip_root: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(strip_bundle)
    assert bundle.config.features.image_size == [96, 176] and bundle.model.feature_size == (12, 22)
    assert bundle.dataset["aspect_ratios"]["median"] == 2.0 and bundle.dataset["aspect_ratios"]["shared"]
    assert bundle.model.grid == (6, 11) and bundle.model.num_patches == 66
    predictor = Predictor(bundle, device="cpu")
    images = _strip_images(strip_root)
    predictions = predictor.predict_paths(images, return_maps=True)
    assert all(p.anomaly_map is not None and p.anomaly_map.shape == (96, 176) for p in predictions)
    assert all(p.pred_mask is not None and p.pred_mask.shape == (96, 176) for p in predictions)
    # the strip's defects stand out at its own geometry
    assert min(p.score for p in predictions[2:]) > max(p.score for p in predictions[:2])
    copy = tmp_path / "copy"
    bundle.save(copy)
    again = Predictor.from_bundle(copy, device="cpu").predict_paths(images)
    assert [p.score for p in again] == [p.score for p in predictions]
    assert [p.templates for p in again] == [p.templates for p in predictions]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_an_exported_non_square_bank_model_keeps_parity_and_its_template_choices(
    strip_bundle: Path, strip_root: Path, runtime: str, tmp_path: Path
) -> None:
    images = _strip_images(strip_root)
    torch_path = Predictor.from_bundle(strip_bundle, device="cpu", runtime="torch").predict_paths(images)
    exported = Predictor.from_bundle(strip_bundle, device="cpu", runtime=runtime, export_dir=tmp_path / runtime)
    assert exported.exported is not None and exported.exported.manifest["image_size"] == [96, 176]
    for ours, theirs in zip(exported.predict_paths(images), torch_path, strict=True):
        assert ours.score == pytest.approx(theirs.score, rel=1e-5)
        assert ours.templates == theirs.templates


# --- template bank -------------------------------------------------------------------------------------------


def _bank_features(n: int = 12, seed: int = 0) -> torch.Tensor:
    """Three part variants (very different means), n/3 noisy copies of each, [n, 8, 8, 8]."""
    g = torch.Generator().manual_seed(seed)
    variants = torch.randn(3, 8, 8, 8, generator=g) * 3
    return torch.stack([variants[i % 3] + 0.3 * torch.randn(8, 8, 8, generator=g) for i in range(n)])


def test_k_center_bank_starts_at_the_medoid_and_covers_every_variant() -> None:
    features = _bank_features()
    choice = select_template(features, "bank", k=3)
    assert choice.index == select_template(features, "medoid").index == choice.bank[0]
    assert sorted(i % 3 for i in choice.bank) == [0, 1, 2]  # one template per variant
    radii = choice.evidence["cover_radius"]
    assert isinstance(radii, list) and radii == sorted(radii, reverse=True) and radii[-1] < 0.05 * radii[0]
    assert k_center_bank(features, 3) == choice  # deterministic
    assert k_center_bank(features, 50).bank == k_center_bank(features, 12).bank  # never more than the images
    assert sorted(k_center_bank(features, 50).bank) == list(range(12))


def test_a_bank_model_never_reconstructs_a_training_image_from_itself() -> None:
    features = _bank_features()
    config = load_config("tiny", ["template.strategy=bank", "features.feature_size=8"])
    model = prepared_model(config, features, list(range(12)))  # every training image is a template
    assert model.templates == 12 and model.nearest == 1
    chosen = model.nearest_templates(model.standardize(features))[:, 0]
    assert (chosen != torch.arange(12)).all()
    assert (chosen % 3 == torch.arange(12) % 3).all()  # the nearest *other* copy of its own variant
    # a byte-identical copy of a template is that template too (the feature cache rounds to float16)
    copies = features[:2].half().float()
    assert (model.nearest_templates(model.standardize(copies))[:, 0] != torch.tensor([0, 1])).all()
    # a bank of one is the paper's template, used by every image; a blend never takes the whole bank
    single = prepared_model(config, features, [0])
    assert single.nearest == 1 and (single.nearest_templates(features) == 0).all()
    assert k_center_bank(features, 3, nearest=8).nearest == 2
    # a blend of the 3 nearest skips itself as well
    model.nearest = 3
    three = model.nearest_templates(model.standardize(features))
    assert three.shape == (12, 3) and not (three == torch.arange(12).unsqueeze(1)).any()


def test_auto_keeps_the_candidate_that_finds_synthetic_defects_best() -> None:
    features = _bank_features()
    signals = {(1, 1): 0.80, (3, 1): 0.91, (3, 2): 0.91}  # (templates, nearest): single, nearest, blend of 2

    def trial(choice: TemplateChoice) -> float:
        return signals[(len(choice.indices), choice.nearest)]

    choice = auto_choice(features, trial, k=3, nearest=2, trial_epochs=4)
    # "nearest" and "blend of 2" tie at 0.91: the simpler one (listed first) wins
    assert choice.strategy == "auto" and choice.evidence["chosen"] == "nearest"
    assert len(choice.bank) == 3 and choice.nearest == 1
    auto = choice.evidence["auto"]
    assert isinstance(auto, dict) and auto["candidates"] == {"single": 0.80, "nearest": 0.91, "blend of 2": 0.91}


def test_auto_trains_its_winner_and_the_bundle_records_why(synth_root: Path, tmp_path: Path) -> None:
    from tfanet_core.workflow import train_category

    config = load_config(
        "tiny",
        ["template.strategy=auto", "template.k=3", "template.nearest=2", "train.epochs=2", "train.selection=last"],
    )
    bundle = train_category(synth_root, "fabric", config, tmp_path / "auto", device="cpu", progress=False)
    evidence = bundle.template["evidence"]
    signals = evidence["auto"]["candidates"]
    assert set(signals) == {"single", "nearest", "blend of 2"} and all(0.0 <= v <= 1.0 for v in signals.values())
    assert evidence["chosen"] == max(signals, key=lambda name: signals[name])
    shape = {"single": (1, 1), "nearest": (3, 1), "blend of 2": (3, 2)}[evidence["chosen"]]
    assert (bundle.model.templates, bundle.model.nearest) == shape
    assert (load_bundle(tmp_path / "auto").model.templates, load_bundle(tmp_path / "auto").model.nearest) == shape


def test_bank_choices_are_deterministic_and_named_in_every_prediction(
    strip_bundle: Path, strip_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = load_bundle(strip_bundle)
    names = [entry["image"] for entry in bundle.template["bank"]]
    assert len(names) == 3 and all(n.startswith("strip/train/good/") for n in names)
    images = _strip_images(strip_root)
    first = Predictor(bundle, device="cpu").predict_paths(images)
    second = Predictor.from_bundle(strip_bundle, device="cpu", batch_size=1).predict_paths(images)
    assert [p.templates for p in first] == [p.templates for p in second]
    assert all(p.templates is not None and len(p.templates) == 1 and p.templates[0] in names for p in first)
    assert cli.main(["predict", "--bundle", str(strip_bundle), *map(str, images[:2])]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["templates"] for r in rows] == [p.templates for p in first[:2]]


def test_a_bundle_from_before_template_banks_loads_as_a_bank_of_one(fabric_bundle: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(fabric_bundle, old)
    meta = json.loads((old / "bundle.json").read_text())
    meta["model"] = {"in_channels": meta["model"]["in_channels"], "feature_size": 16}  # the format-2 record
    (old / "bundle.json").write_text(json.dumps(meta))
    state = torch.load(old / "model.pt", weights_only=True)
    state["template"] = state["template"][0]  # [C, S, S], as saved before banks
    torch.save(state, old / "model.pt")
    images = torch.rand(2, 3, 128, 128)
    expected, _ = Predictor.from_bundle(fabric_bundle, device="cpu").score_tensors(images)
    loaded = Predictor.from_bundle(old, device="cpu")
    assert isinstance(loaded.model, TemplateAggregator) and loaded.model.templates == 1
    assert torch.equal(loaded.score_tensors(images)[0], expected)
    template_name = load_bundle(fabric_bundle).template["image"]
    assert loaded.predict([Image.new("RGB", (128, 128))])[0].templates == [template_name]


# --- served ----------------------------------------------------------------------------------------------------


@pytest.mark.server
def test_torchserve_serves_the_non_square_bank_model_in_parity(
    strip_bundle: Path, strip_root: Path, tmp_path: Path
) -> None:
    from components.naming import torchserve_model_name
    from components.serving import server
    from components.serving.archive import build_archive
    from components.serving.parity import check_parity
    from components.serving.torchserve import TorchServeClient

    images = _strip_images(strip_root)
    expected = Predictor.from_bundle(strip_bundle, device="cpu").predict_paths(images)
    state = tmp_path / "torchserve"
    server.start(state, server.free_ports())
    try:
        client = TorchServeClient.from_state_dir(state)
        mar = build_archive(strip_bundle, "strip", "1", state / "model_store")
        name = torchserve_model_name("strip")
        client.register(mar.name, name, batch_size=4, max_batch_delay_ms=20)
        report = check_parity(client, name, strip_bundle, images)
        assert report.passed and report.max_abs_diff <= 1e-4, report.rows
        for path, prediction in zip(images, expected, strict=True):
            doc = client.predict(name, path.read_bytes()).json()
            assert doc["templates"] == prediction.templates  # the served JSON names the template used
    finally:
        server.stop(state)
