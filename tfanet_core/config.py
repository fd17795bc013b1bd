"""Typed configuration: profiles from ``profiles.yaml`` plus ``--set key=value`` overrides.

One dataclass per concern so that a bundle can store the *full* resolved config and a reader
sees every number the model was built and trained with.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from tfanet_core.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


@dataclass
class FeatureConfig:
    backbone: str = "efficientnet_lite2"
    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    pool_stem: bool = False
    image_size: int | list[int] = 256  # an int is a square; [H, W] a fixed rectangle
    feature_size: int | list[int] = 64  # the fused feature map: an int or [h, w], as image_size
    standardize: bool = False
    # fixed: image_size as given. native: the training images' median aspect ratio at the pixel budget of
    # image_size (tfanet_core/geometry.py), resolved once per product into [H, W] and recorded in the bundle.
    geometry: str = "fixed"

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the image the backbone sees."""
        return as_hw(self.image_size)

    @property
    def feature_hw(self) -> tuple[int, int]:
        """(height, width) of the fused feature map TFA-Net reconstructs."""
        return as_hw(self.feature_size)


def as_hw(size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """An int (a square) or an [H, W] pair as an (H, W) tuple."""
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ConfigError(f"a size is an int (square) or [height, width], got {size!r}")
    return int(size[0]), int(size[1])


@dataclass
class ModelConfig:
    patch_size: int = 4
    embed_dim: int = 768
    tfam_depth: int = 12
    tfam_heads: int = 12
    decoder_dim: int = 512
    fdrm_depth: int = 8
    fdrm_heads: int = 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.0
    fader: bool = False
    fader_hidden: int = 256
    fader_margin: float = 1.0
    fader_epochs: int = 50
    fader_threshold: float = 3.0
    fader_temperature: float = 0.5


@dataclass
class TrainConfig:
    epochs: int = 400
    batch_size: int = 4
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01
    cos_weight: float = 5.0
    val_fraction: float = 0.1
    selection: str = "last"
    patience: int = 0  # stop after this many epochs without a better selection signal; 0 = never (as with `last`)
    checkpoint_every: int = 10
    seed: int = 0

    @property
    def adam_betas(self) -> tuple[float, float]:
        """``betas`` as the (beta1, beta2) pair AdamW takes (a list in YAML)."""
        return self.betas[0], self.betas[1]


@dataclass
class TemplateConfig:
    strategy: str = "first"  # first | medoid | best_of_k | bank | auto (tfanet_core/templates.py)
    k: int = 4  # bank, auto: templates kept (k-center cover of the training images); best_of_k: candidates
    nearest: int = 1  # bank: each image is aggregated onto the mean of its `nearest` templates; auto: the blend tried


@dataclass
class ScoringConfig:
    map: str = "product"
    sigma: float = 4.0
    scales: list[int] = field(default_factory=lambda: [1])  # feature pooling factors; several → geometric mean
    image_score: str = "std"
    top_k: int = 100


@dataclass
class CalibrationConfig:
    target_fpr: float = 0.01


@dataclass
class Config:
    profile: str = "paper"
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        sections = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "profile"}
        unknown = set(data) - set(sections) - {"profile"}
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(sections)}")
        kwargs: dict[str, Any] = {"profile": data.get("profile", "custom")}
        for name in sections:
            kwargs[name] = section_from_mapping(type(getattr(cls(), name)), data.get(name), f"config section '{name}'")
        return cls(**kwargs)


def section_from_mapping(section_cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """A settings dataclass from a params/config mapping; a misspelt key is an error naming the known ones."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where}; known: {sorted(known)}")
    return section_cls(**values)


PROFILES_FILE = Path(__file__).with_name("profiles.yaml")
SCORING_MAPS = ("product", "sum")
IMAGE_SCORES = ("std", "max", "topk")
SELECTIONS = ("last", "val_loss", "synthetic")
GEOMETRIES = ("fixed", "native")
TEMPLATE_STRATEGIES = ("first", "medoid", "best_of_k", "bank", "auto")


def _raw_profiles() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(PROFILES_FILE.read_text())


def profile_names() -> list[str]:
    return list(_raw_profiles())


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve(name: str, raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if name not in raw:
        raise ConfigError(f"unknown profile '{name}'; choose one of {sorted(raw)}")
    entry = dict(raw[name])
    parent = entry.pop("inherit", None)
    return _deep_merge(_resolve(parent, raw), entry) if parent else entry


def _parse_value(text: str) -> Any:
    """Values of ``--set`` are YAML scalars/lists, so ``layers=[1,2]`` and ``lr=1e-3`` just work."""
    value = yaml.safe_load(text)
    # YAML 1.1 reads "1e-3" as a string; accept it as the float everyone means.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.epochs=5")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key '{key}' must be section.key, e.g. model.embed_dim")
        section, name = parts
        out.setdefault(section, {})[name] = _parse_value(text)
    return out


def load_config(profile: str = "cpu", overrides: list[str] | None = None) -> Config:
    """The resolved config of a profile with ``section.key=value`` overrides applied and validated."""
    data = _resolve(profile, _raw_profiles())
    data["profile"] = profile
    config = Config.from_dict(apply_overrides(data, overrides or []))
    validate(config)
    return config


def validate(config: Config) -> None:
    f, m, s, t = config.features, config.model, config.scoring, config.train
    problems = []
    try:
        (ih, iw), (fh, fw) = f.image_hw, f.feature_hw
    except (ConfigError, TypeError, ValueError):
        raise ConfigError(
            f"features.image_size={f.image_size!r} and features.feature_size={f.feature_size!r} must each be an "
            "int (square) or [height, width]"
        ) from None
    if fh % m.patch_size or fw % m.patch_size:
        problems.append(f"features.feature_size={f.feature_size} is not a multiple of model.patch_size={m.patch_size}")
    if f.geometry not in GEOMETRIES:
        problems.append(f"features.geometry={f.geometry!r} must be one of {GEOMETRIES}")
    elif f.geometry == "native" and (ih % fh or iw % fw or ih // fh != iw // fw):
        problems.append(
            f"features.geometry=native scales the image and the feature map together, so image_size "
            f"{f.image_size} must be the same whole multiple of feature_size {f.feature_size} in both directions"
        )
    if m.embed_dim % m.tfam_heads:
        problems.append(f"model.embed_dim={m.embed_dim} is not divisible by model.tfam_heads={m.tfam_heads}")
    if m.decoder_dim % m.fdrm_heads:
        problems.append(f"model.decoder_dim={m.decoder_dim} is not divisible by model.fdrm_heads={m.fdrm_heads}")
    if not 0.0 <= m.mask_ratio < 1.0:
        problems.append(f"model.mask_ratio={m.mask_ratio} must be in [0, 1)")
    if m.fader and (m.fader_hidden < 1 or m.fader_epochs < 1 or m.fader_margin <= 0 or m.fader_temperature <= 0):
        problems.append(
            f"FADeR needs model.fader_hidden >= 1, model.fader_epochs >= 1, model.fader_margin > 0 and "
            f"model.fader_temperature > 0 (got {m.fader_hidden}, {m.fader_epochs}, {m.fader_margin}, "
            f"{m.fader_temperature})"
        )
    if s.map not in SCORING_MAPS:
        problems.append(f"scoring.map={s.map!r} must be one of {SCORING_MAPS}")
    if not s.scales or any(k < 1 or fh % k or fw % k for k in s.scales) or len(set(s.scales)) != len(s.scales):
        problems.append(
            f"scoring.scales={s.scales} must be distinct divisors of features.feature_size={f.feature_size} "
            "(e.g. [1, 8])"
        )
    if s.image_score not in IMAGE_SCORES:
        problems.append(f"scoring.image_score={s.image_score!r} must be one of {IMAGE_SCORES}")
    tp = config.template
    if tp.strategy not in TEMPLATE_STRATEGIES:
        problems.append(f"template.strategy={tp.strategy!r} must be one of {TEMPLATE_STRATEGIES}")
    if tp.k < 1 or not 1 <= tp.nearest <= tp.k:
        problems.append(f"template.k={tp.k} and template.nearest={tp.nearest} need 1 <= nearest <= k")
    if t.selection not in SELECTIONS:
        problems.append(f"train.selection={t.selection!r} must be one of {SELECTIONS}")
    if t.patience < 0:
        problems.append(f"train.patience={t.patience} must be >= 0")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
