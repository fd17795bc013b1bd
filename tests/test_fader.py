"""FADeR plug-in: the ranking loss, the soft mask's range and behaviour, and that the bundle carries it."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tfanet_core.bundle import load_bundle, read_metadata
from tfanet_core.config import Config, load_config
from tfanet_core.data.images import image_to_tensor, load_rgb
from tfanet_core.fader import FeatureAttenuator, _content_and_errors, fit_fader, margin_ranking_loss, token_errors
from tfanet_core.model import TemplateAggregator, patchify
from tfanet_core.predictor import Predictor
from tfanet_core.scoring import reconstruction_loss
from tfanet_core.training import build_model, feature_statistics, fit

# --- the ranking loss -------------------------------------------------------------------------------


def test_ranking_loss_is_zero_when_order_and_margin_hold_and_hand_computed_when_reversed() -> None:
    # pairs (0, 2) and (1, 3): targets say l0 > l2 and l1 < l3
    target = torch.tensor([[4.0, 1.0, 2.0, 3.0]])
    right = torch.tensor([[5.0, 0.0, 2.0, 1.5]])  # gaps 3 and −1.5: right order, both at least the margin 1
    assert margin_ranking_loss(right, target, margin=1.0).item() == 0.0
    # reversed: max(0, −(+1)(−5 + 2) + 1) = 4 and max(0, −(−1)(0 + 1.5) + 1) = 2.5 → mean 3.25
    assert margin_ranking_loss(-right, target, margin=1.0).item() == pytest.approx(3.25)
    # right order but inside the margin: gaps 0.5 and −0.5 → 0.5 each
    assert margin_ranking_loss(torch.tensor([[2.5, 0.0, 2.0, 0.5]]), target, margin=1.0).item() == pytest.approx(0.5)


def test_ranking_loss_matches_torch_and_leaves_ties_out() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    sign = torch.sign(target[:, :5] - target[:, 5:])
    expected = F.margin_ranking_loss(pred[:, :5], pred[:, 5:], sign, margin=0.7)
    assert margin_ranking_loss(pred, target, 0.7).item() == pytest.approx(expected.item(), rel=1e-6)
    # a tied pair has no order: only the untied pair (5 vs 2, gap 1 − 0 = 1 ≥ 1) counts, so the loss is 0
    assert margin_ranking_loss(torch.tensor([[9.0, 1.0, -9.0, 0.0]]), torch.tensor([[1.0, 5.0, 1.0, 2.0]]), 1.0) == 0
    all_tied = torch.zeros(1, 4, requires_grad=True)
    loss = margin_ranking_loss(all_tied, torch.ones(1, 4), 1.0)
    loss.backward()
    assert loss.item() == 0.0 and all_tied.grad is not None
    with pytest.raises(ValueError, match="even last dimension"):
        margin_ranking_loss(torch.zeros(1, 3), torch.zeros(1, 3), 1.0)


def test_token_errors_are_the_training_loss_per_token() -> None:
    g = torch.Generator().manual_seed(1)
    target, predicted = torch.randn(2, 6, 8, 8, generator=g), torch.randn(2, 6, 8, 8, generator=g)
    errors = token_errors(target, predicted, patch=2, cos_weight=5.0)
    assert errors.shape == (2, 16)
    loss = reconstruction_loss(patchify(predicted, 2), patchify(target, 2), 5.0)
    assert errors.mean().item() == pytest.approx(loss.item(), rel=1e-5)
    # token order is patchify's: a change in the top-right 2x2 patch moves token 3 only
    bumped = predicted.clone()
    bumped[0, :, 0:2, 6:8] += 10.0
    changed = token_errors(target, bumped, 2, 5.0) != errors
    assert changed.nonzero().tolist() == [[0, 3]]


# --- the module on toy features ---------------------------------------------------------------------


def _toy_features(n: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 8, 16, 16, generator=g) + 0.3 * torch.randn(n, 8, 16, 16, generator=g)


def _toy_model(config: Config, features: torch.Tensor) -> TemplateAggregator:
    model = build_model(config, features.shape[1])
    model.set_feature_stats(*feature_statistics(features))
    model.set_template(features[0])
    return model


def test_fader_off_adds_nothing_and_on_adds_only_the_mlp() -> None:
    off, on = load_config("tiny"), load_config("tiny", ["model.fader=true", "model.fader_hidden=32"])
    a, b = TemplateAggregator(off.model, 8, 16), TemplateAggregator(on.model, 8, 16)
    assert a.fader is None and not any(k.startswith("fader.") for k in a.state_dict())
    d = on.model.embed_dim
    extra = d * 32 + 32 + 32 + 1
    assert b.parameter_counts()["trainable"] == a.parameter_counts()["trainable"] + extra
    assert set(b.state_dict()) - set(a.state_dict()) == {
        "fader.mlp.0.weight",
        "fader.mlp.0.bias",
        "fader.mlp.2.weight",
        "fader.mlp.2.bias",
        "fader.scale",
        "fader.fitted",
    }


@pytest.mark.slow
def test_paper_profile_count_is_unchanged_with_fader_off() -> None:
    off = TemplateAggregator(load_config("paper").model, 1856, 64)
    assert off.parameter_counts()["trainable"] == 148_711_936
    del off
    on = TemplateAggregator(load_config("paper", ["model.fader=true"]).model, 1856, 64)
    assert on.parameter_counts()["trainable"] == 148_711_936 + 768 * 256 + 256 + 256 + 1


def test_tfanet_trains_identically_with_fader_on_until_the_mlp_is_fitted() -> None:
    """The ablation's premise: FADeR on and off share the very same TFA-Net; only the soft mask differs."""
    features = _toy_features()
    off = load_config("tiny", ["train.epochs=2"])
    on = load_config("tiny", ["train.epochs=2", "model.fader=true", "model.fader_epochs=3"])
    a = fit(_toy_model(off, features), features, off.train, progress=False).model
    b = fit(_toy_model(on, features), features, on.train, progress=False).model
    state_b = b.state_dict()
    assert all(torch.equal(v, state_b[k]) for k, v in a.state_dict().items())
    with torch.no_grad():
        before = b(b.standardize(features[:2]))
        assert torch.equal(a(a.standardize(features[:2])), before)  # unfitted: no mask
    fit_fader(b, features, on, progress=False)
    with torch.no_grad():
        assert not torch.equal(b(b.standardize(features[:2])), before)  # fitted: the mask is applied


def test_fit_fader_is_seeded_and_learns_the_order_of_errors() -> None:
    features = _toy_features()
    config = load_config("tiny", ["train.epochs=4", "model.fader=true", "model.fader_epochs=15"])
    model = fit(_toy_model(config, features), features, config.train, progress=False).model
    twin = copy.deepcopy(model)
    history = fit_fader(model, features, config, progress=False)
    assert len(history) == 15 and history[-1]["ranking_loss"] < 0.7 * history[0]["ranking_loss"]
    assert fit_fader(twin, features, config, progress=False) == history
    state, twin_state = model.fader.state_dict(), twin.fader.state_dict()
    assert all(torch.equal(v, twin_state[k]) for k, v in state.items())
    assert bool(model.fader.fitted) and float(model.fader.scale) > 0

    model.fader.fitted.fill_(False)
    content, errors = _content_and_errors(model, features, config.train.cos_weight, 8, torch.device("cpu"))
    with torch.no_grad():
        scores = model.fader(content)
    ranks = torch.stack([scores.flatten().argsort().argsort(), errors.flatten().argsort().argsort()]).float()
    spearman = torch.corrcoef(ranks)[0, 1].item()
    assert spearman > 0.6  # measured 0.80 (tiny profile, 16 toy images)


def test_fit_fader_needs_a_model_built_with_it() -> None:
    features = _toy_features(4)
    config = load_config("tiny")
    with pytest.raises(ValueError, match=r"model\.fader=true"):
        fit_fader(_toy_model(config, features), features, config, progress=False)


def test_mask_lies_strictly_inside_0_1_even_for_extreme_tokens() -> None:
    torch.manual_seed(0)
    attenuator = FeatureAttenuator(dim=16, hidden=8, threshold=3.0, temperature=0.5)
    content = torch.randn(2, 64, 16) * torch.logspace(-3, 6, 64).view(1, 64, 1)  # up to 1e6: far-out scores
    mask = attenuator.mask(content)
    assert mask.shape == (2, 64)
    assert (mask > 0).all() and (mask < 1).all()
    assert mask.min() < 1e-5 or mask.max() > 1 - 1e-5  # the extremes are reached, yet stay inside


# --- on images: a tiny TFA-Net with FADeR trained on the synthetic fabric ----------------------------

PASTE = (64, 32, 32)  # top, left, side in pixels of the 128-px image: exactly 2x2 tokens of 16 px


@pytest.fixture(scope="module")
def fader_bundle(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tfanet_core.workflow import train_category

    out = tmp_path_factory.mktemp("fader") / "fabric"
    # Layers pinned: the mask bounds below were measured on this configuration, not on whatever tiny becomes.
    overrides = ["features.layers=[1,2]", "train.epochs=12", "calibration.target_fpr=0.25", "model.fader=true"]
    config = load_config("tiny", overrides)
    train_category(synth_root, "fabric", config, out, device="cpu", progress=False)
    return out


def _good_images(synth_root: Path, size: tuple[int, int]) -> torch.Tensor:
    paths = sorted((synth_root / "fabric" / "test" / "good").glob("*.png"))
    return torch.stack([image_to_tensor(load_rgb(p), size) for p in paths])


def _paste(images: torch.Tensor) -> torch.Tensor:
    top, left, side = PASTE
    pasted = images.clone()
    pasted[:, :, top : top + side, left : left + side] = torch.tensor([0.9, 0.1, 0.6]).view(3, 1, 1)  # magenta
    return pasted


def _pasted_tokens(grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    top, left, side = PASTE
    token = size[0] // grid[0]
    rows = torch.arange(grid[0]).repeat_interleave(grid[1]) * token
    cols = torch.arange(grid[1]).repeat(grid[0]) * token
    return (rows >= top) & (rows + token <= top + side) & (cols >= left) & (cols + token <= left + side)


@torch.no_grad()
def _masks(predictor: Predictor, images: torch.Tensor) -> torch.Tensor:
    model = predictor.model
    return model.fader.mask(model.content_tokens(model.standardize(predictor.extractor(images))))


def test_bundle_records_fader_and_the_round_trip_keeps_it(fader_bundle: Path, synth_root: Path, tmp_path: Path) -> None:
    meta = read_metadata(fader_bundle)
    assert meta["config"]["model"]["fader"] is True
    assert len(meta["training"]["fader_history"]) == meta["config"]["model"]["fader_epochs"]
    bundle = load_bundle(fader_bundle)
    assert bundle.model.fader is not None and bundle.model.fader.is_fitted
    copy = tmp_path / "copy"
    bundle.save(copy)
    first, again = Predictor.from_bundle(fader_bundle, device="cpu"), Predictor.from_bundle(copy, device="cpu")
    images = _paste(_good_images(synth_root, first.image_size)[:3])
    scores, maps = first.score_tensors(images)
    scores2, maps2 = again.score_tensors(images)
    assert torch.equal(scores, scores2) and torch.equal(maps, maps2)
    assert torch.equal(_masks(first, images), _masks(again, images))


def test_the_predictor_applies_the_mask_with_no_change_of_its_own(fader_bundle: Path, synth_root: Path) -> None:
    predictor = Predictor.from_bundle(fader_bundle, device="cpu")
    images = _paste(_good_images(synth_root, predictor.image_size)[:2])
    calls: list[int] = []
    handle = predictor.model.fader.register_forward_hook(lambda *_: calls.append(1))
    with_fader = predictor.score_tensors(images)[0]
    handle.remove()
    assert calls  # the predictor's ordinary path runs the MLP
    predictor.model.fader.fitted.fill_(False)
    without = predictor.score_tensors(images)[0]
    assert not torch.equal(with_fader, without)


def test_mask_is_near_uniform_on_defect_free_images(fader_bundle: Path, synth_root: Path) -> None:
    predictor = Predictor.from_bundle(fader_bundle, device="cpu")
    masks = _masks(predictor, _good_images(synth_root, predictor.image_size))
    assert (masks > 0).all() and (masks < 1).all()
    # measured (2-core x86_64, EfficientNet-Lite0, synthetic fabric, 12 test/good images): per-image std
    # 0.005–0.024, per-image mean 0.990–0.996
    assert masks.std(dim=1).max() < 0.05
    assert masks.mean(dim=1).min() > 0.97


def test_mask_is_lower_on_a_pasted_defect_than_elsewhere(fader_bundle: Path, synth_root: Path) -> None:
    predictor = Predictor.from_bundle(fader_bundle, device="cpu")
    masks = _masks(predictor, _paste(_good_images(synth_root, predictor.image_size)))
    assert (masks > 0).all() and (masks < 1).all()
    inside = _pasted_tokens(predictor.model.grid, predictor.image_size)
    assert int(inside.sum()) == 4
    defect, rest = masks[:, inside].mean(dim=1), masks[:, ~inside].mean(dim=1)
    # measured: defect tokens 0.34–0.62 per image, the other tokens 0.98–0.995
    assert (defect < rest - 0.2).all()
    assert defect.mean() < 0.75 < rest.min()


def test_a_bundle_written_before_fader_loads_with_it_off(fader_bundle: Path, tmp_path: Path) -> None:
    """Older bundles have no fader keys in their config or weights: they load, with FADeR off."""
    old = tmp_path / "old"
    shutil.copytree(fader_bundle, old)
    meta = json.loads((old / "bundle.json").read_text())
    meta["config"]["model"] = {k: v for k, v in meta["config"]["model"].items() if not k.startswith("fader")}
    (old / "bundle.json").write_text(json.dumps(meta))
    state = torch.load(old / "model.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("fader.")}, old / "model.pt")
    bundle = load_bundle(old)
    assert bundle.model.fader is None and bundle.config.model.fader is False
