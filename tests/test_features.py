"""Backbone weights and multi-scale fusion."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from tfanet_core.config import FeatureConfig, load_config
from tfanet_core.features import (
    WEIGHT_SOURCES,
    FeatureExtractor,
    MissingWeightsError,
    load_backbone_weights,
    resolve_source,
    sha256_file,
)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_efficientnet_lite_weights_load_strictly_with_their_sha256(n: int) -> None:
    source = WEIGHT_SOURCES[f"efficientnet_lite{n}"]
    state, digest = load_backbone_weights(source)
    assert digest == source.sha256 == sha256_file(source.locate())
    model = timm.create_model(source.arch, pretrained=False)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert source.mean == source.std == (0.5, 0.5, 0.5)
    # real weights, not an init: BatchNorm running statistics have moved away from 0/1
    assert state["bn1.running_var"].mean() != pytest.approx(1.0, abs=1e-3)


def test_missing_paper_weights_say_which_file_to_put_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFANET_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TFANET_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        FeatureExtractor(load_config("paper").features)
    message = str(err.value)
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert str(tmp_path / "weights" / "wide_resnet50_2-95faca4d.pth") in message
    assert "TFANET_WEIGHTS_DIR" in message


def test_paper_weights_are_found_in_the_weights_dir_and_hash_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TFANET_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "wide_resnet50_2-95faca4d.pth").write_bytes(b"not the real file")
    with pytest.raises(ValueError, match="does not start with 95faca4d"):
        FeatureExtractor(load_config("paper").features)


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        resolve_source("resnet9000")


def test_fusion_pools_the_stem_and_resizes_bilinearly_with_aligned_corners() -> None:
    config = FeatureConfig(backbone="random:resnet18", layers=[0, 1, 2], pool_stem=True, image_size=64, feature_size=16)
    extractor = FeatureExtractor(config)
    images = torch.rand(2, 3, 64, 64)
    fused = extractor(images)
    assert fused.shape == (2, 64 + 64 + 128, 16, 16)
    raw = extractor.backbone((images - extractor.mean) / extractor.std)
    stem = F.max_pool2d(raw[0], 3, 2, 1)  # 32x32 -> 16x16 after the maxpool
    assert torch.allclose(fused[:, :64], stem)
    layer2 = F.interpolate(raw[2], (16, 16), mode="bilinear", align_corners=True)
    assert torch.allclose(fused[:, 128:], layer2)
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.training  # BatchNorm statistics of the frozen backbone never move


def test_random_backbones_are_reproducible() -> None:
    a, digest_a = load_backbone_weights(resolve_source("random:resnet18"))
    b, digest_b = load_backbone_weights(resolve_source("random:resnet18"))
    assert digest_a == digest_b and torch.equal(a["conv1.weight"], b["conv1.weight"])
